"""Benchmark: presence traffic while 10 k viewers join one video over 10 s.

    python tests/bench/bench_presence.py [--viewers 10000] [--seconds 10] [--identified 0.5] [--dcs 1|2]

One dispatcher and two frontends on the embedded KV (loopback).  Viewers join one video at an
even rate, spread over both frontends, a share of them with a user identity; a watcher counts
the presence events it receives.  Reported: presence messages frontends sent to the owner
(``presence_msgs``), presence fan-out messages the owner published, ``count``/``join`` events
one viewer received, and the KV writes the frontends made -- all for the whole join phase plus
settling.  Bounded: ``viewers`` connections, ``seconds`` of joining.

``--dcs 2``: the same workload split over two datacenters (one dispatcher, one frontend and one
bridge each, default presence timers), with a watcher in each DC.  Also reported: the DC
presence summaries that crossed the bridges (counted at each bridge: ``/healthz`` ``presence``),
how long after the last join both watchers saw the global count, and, after dc2's viewers all
leave at once, how long until dc1's watcher saw the count drop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))

from tornado.httpclient import AsyncHTTPClient  # noqa: E402

from mesh.tools.sse_client import SSEClient  # noqa: E402
from mesh.tools.topology import Topology  # noqa: E402
from multidc_fixtures import datacenters  # noqa: E402

EXTRA = {"security.max_viewers_per_ip": "20000"}  # all viewers come from 127.0.0.1


async def health(url: str) -> dict:
    return json.loads((await AsyncHTTPClient().fetch(url + "/healthz")).body)


class Watcher:
    """Counts the presence events one viewer receives; remembers the last count."""

    def __init__(self, url: str):
        self.url = url
        self.received = {"count": 0, "join": 0, "leave": 0, "last_count": 0}

    async def start(self) -> "Watcher":
        self.client = await SSEClient(f"{self.url}/v1/videos/show/events").connect()
        self.task = asyncio.ensure_future(self._watch())
        return self

    async def _watch(self) -> None:
        while True:
            ev = await self.client.next_event(timeout=3600)
            if ev.event in self.received:
                self.received[ev.event] += 1
                if ev.event == "count":
                    self.received["last_count"] = json.loads(ev.data)["count"]

    async def until(self, count: int, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.received["last_count"] != count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.received["last_count"] == count


async def join(fronts: list[str], args, clients: list[SSEClient]) -> tuple[float, float]:
    """Open ``args.viewers`` viewers at an even rate over ``fronts``; (issued_s, join_s)."""
    t0 = time.monotonic()
    interval = args.seconds / args.viewers
    pending = set()
    for i in range(args.viewers):
        delay = t0 + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        user = f"?user=u{i}" if (i % 100) < args.identified * 100 else ""
        c = SSEClient(f"{fronts[i % len(fronts)]}/v1/videos/show/events{user}")
        clients.append(c)
        task = asyncio.ensure_future(c.connect(timeout=30))
        pending.add(task)
        task.add_done_callback(_settled(pending))
    issued_s = time.monotonic() - t0
    if pending:
        await asyncio.wait(pending, timeout=60)
    return issued_s, time.monotonic() - t0


def _settled(pending: set):
    """Done-callback of a viewer's connect: forget it; a failed one is counted by the caller
    (status != 200), its exception read here so asyncio does not log each one."""
    def done(task: asyncio.Future) -> None:
        pending.discard(task)
        if not task.cancelled():
            task.exception()
    return done


def delta(key, after, before) -> int:
    return after["stats"].get(key, 0) - before["stats"].get(key, 0)


async def one_dc(args, tmp: str, clients: list[SSEClient]) -> None:
    topo = Topology(kv={"backend": "embedded", "path": os.path.join(tmp, "kv.db")}, log_dir=tmp, extra=EXTRA)
    try:
        d = topo.dispatcher("d1")
        fronts = [topo.frontend("f1"), topo.frontend("f2")]
        watcher = await Watcher(fronts[0].url).start()
        before = [await health(f.url) for f in fronts]
        dbefore = await health(d.url)
        t0 = time.monotonic()
        issued_s, join_s = await join([f.url for f in fronts], args, clients)
        opened = sum(1 for c in clients if c.status == 200)
        want = opened + 1
        await watcher.until(want)
        settle_s = time.monotonic() - t0
        after = [await health(f.url) for f in fronts]
        dafter = await health(d.url)
        watcher.task.cancel()
        pres_up = sum(delta("presence_msgs", a, b) for a, b in zip(after, before))
        kv = sum(delta("kv_requests", a, b) for a, b in zip(after, before))
        received = watcher.received
        print(f"{opened} of {args.viewers} viewers joined one video: connects issued over {issued_s:.1f} s, "
              f"all open after {join_s:.1f} s ({int(args.identified * 100)}% identified), "
              f"2 frontends, 1 dispatcher")
        print(f"count reached {received['last_count']} (want {want}) after {settle_s:.1f} s")
        print(f"{'presence messages frontends -> owner':45} {pres_up:6d}")
        print(f"{'presence fan-out messages owner -> frontends':45} {delta('presence_msgs', dafter, dbefore):6d}")
        print(f"{'count events one viewer received':45} {received['count']:6d}")
        print(f"{'join events one viewer received':45} {received['join']:6d}")
        print(f"{'KV writes (both frontends)':45} {kv:6d}")
    finally:
        topo.close()


async def two_dcs(args, tmp: str, clients: list[SSEClient]) -> None:
    with datacenters(pathlib.Path(tmp), {"dc1": (1, 1), "dc2": (1, 1)}, extra=EXTRA) as dcs:
        d1, d2 = dcs["dc1"], dcs["dc2"]
        watchers = [await Watcher(d1.front).start(), await Watcher(d2.front).start()]
        bridges = [d1.bridge.url, d2.bridge.url]
        before = [await health(b) for b in bridges]
        dbefore = [await health(dc.dispatchers[0].url) for dc in (d1, d2)]
        issued_s, join_s = await join([d1.front, d2.front], args, clients)
        last_join = time.monotonic()
        opened = sum(1 for c in clients if c.status == 200)
        want = opened + 2
        ok = all([await w.until(want) for w in watchers])
        converge_s = time.monotonic() - last_join
        after = [await health(b) for b in bridges]
        dafter = [await health(dc.dispatchers[0].url) for dc in (d1, d2)]
        # dc2's viewers (every other one) all leave at once
        gone = [c for i, c in enumerate(clients) if i % 2 == 1 and c.status == 200]
        left_at = time.monotonic()
        for c in gone:
            c.close()
        dropped = await watchers[0].until(want - len(gone), timeout=60)
        drop_s = time.monotonic() - left_at
        for w in watchers:
            w.task.cancel()

        def crossed(direction: str, i: int) -> int:
            return after[i]["presence"].get(direction, 0) - before[i]["presence"].get(direction, 0)
        print(f"{opened} of {args.viewers} viewers joined one video over 2 DCs (half each): connects issued "
              f"over {issued_s:.1f} s, all open after {join_s:.1f} s ({int(args.identified * 100)}% identified); "
              f"1 dispatcher, 1 frontend, 1 bridge per DC; default presence timers")
        print(f"global count {want} at both DCs' watchers {converge_s:.2f} s after the last join "
              f"({'ok' if ok else 'NOT reached: ' + str([w.received['last_count'] for w in watchers])})")
        print(f"dc2's {len(gone)} viewers left at once: dc1's watcher saw {want - len(gone)} after {drop_s:.2f} s"
              f"{'' if dropped else ' (NOT reached: ' + str(watchers[0].received['last_count']) + ')'}")
        print(f"{'DC presence summaries exported by dc1 bridge':45} {crossed('export', 0):6d}")
        print(f"{'DC presence summaries exported by dc2 bridge':45} {crossed('export', 1):6d}")
        print(f"{'summaries imported (dc1 + dc2 bridges)':45} {crossed('import', 0) + crossed('import', 1):6d}")
        print(f"{'summaries the owners exported (dc1 + dc2)':45} "
              f"{sum(delta('presence_dc_exports', a, b) for a, b in zip(dafter, dbefore)):6d}")
        for name, w in zip(("dc1", "dc2"), watchers):
            print(f"{'count / join events, watcher in ' + name:45} {w.received['count']:6d} {w.received['join']:6d}")


async def main_async(args) -> None:
    tmp = tempfile.mkdtemp(prefix="livemesh-bench-")
    clients: list[SSEClient] = []
    try:
        await (two_dcs if args.dcs == 2 else one_dc)(args, tmp, clients)
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--identified", type=float, default=0.5)
    ap.add_argument("--dcs", type=int, default=1, choices=(1, 2))
    args = ap.parse_args()
    if not (1 <= args.viewers <= 18000 and 0 < args.seconds <= 120):
        ap.error("viewers 1..18000 (one client process; open-file limit), seconds 0..120")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
