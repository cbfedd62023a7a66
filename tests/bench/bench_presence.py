"""Benchmark: presence traffic while 10 k viewers join one video over 10 s.

    python tests/bench/bench_presence.py [--viewers 10000] [--seconds 10] [--identified 0.5]

One dispatcher and two frontends on the embedded KV (loopback).  Viewers join one video at an
even rate, spread over both frontends, a share of them with a user identity; a watcher counts
the presence events it receives.  Reported: presence messages frontends sent to the owner
(``presence_msgs``), presence fan-out messages the owner published, ``count``/``join`` events
one viewer received, and the KV writes the frontends made -- all for the whole join phase plus
settling.  Bounded: ``viewers`` connections, ``seconds`` of joining.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from tornado.httpclient import AsyncHTTPClient  # noqa: E402

from mesh.sse_client import SSEClient  # noqa: E402
from mesh.topology import Topology  # noqa: E402


async def health(url: str) -> dict:
    return json.loads((await AsyncHTTPClient().fetch(url + "/healthz")).body)


async def main_async(args) -> None:
    tmp = tempfile.mkdtemp(prefix="livemesh-bench-")
    topo = Topology(kv={"backend": "embedded", "path": os.path.join(tmp, "kv.db")}, log_dir=tmp,
                    extra={"security.max_viewers_per_ip": "20000"})  # all viewers come from 127.0.0.1
    clients: list[SSEClient] = []
    try:
        d = topo.dispatcher("d1")
        fronts = [topo.frontend("f1"), topo.frontend("f2")]
        watcher = await SSEClient(f"{fronts[0].url}/v1/videos/show/events").connect()
        received = {"count": 0, "join": 0, "leave": 0, "last_count": 0}

        async def watch():
            while True:
                ev = await watcher.next_event(timeout=3600)
                if ev.event in received:
                    received[ev.event] += 1
                    if ev.event == "count":
                        received["last_count"] = json.loads(ev.data)["count"]
        watch_task = asyncio.ensure_future(watch())
        before = [await health(f.url) for f in fronts]
        dbefore = await health(d.url)
        t0 = time.monotonic()
        interval = args.seconds / args.viewers
        pending = set()
        for i in range(args.viewers):
            delay = t0 + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            f = fronts[i % 2]
            user = f"?user=u{i}" if (i % 100) < args.identified * 100 else ""
            c = SSEClient(f"{f.url}/v1/videos/show/events{user}")
            clients.append(c)
            task = asyncio.ensure_future(c.connect(timeout=30))
            pending.add(task)
            task.add_done_callback(pending.discard)
        issued_s = time.monotonic() - t0
        if pending:
            await asyncio.wait(pending, timeout=60)
        join_s = time.monotonic() - t0
        opened = sum(1 for c in clients if c.status == 200)
        want = opened + 1
        deadline = time.monotonic() + 30
        while received["last_count"] != want and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        settle_s = time.monotonic() - t0
        after = [await health(f.url) for f in fronts]
        dafter = await health(d.url)
        watch_task.cancel()

        def delta(key, a, b):
            return a["stats"].get(key, 0) - b["stats"].get(key, 0)
        pres_up = sum(delta("presence_msgs", a, b) for a, b in zip(after, before))
        kv = sum(delta("kv_requests", a, b) for a, b in zip(after, before))
        pres_down = delta("presence_msgs", dafter, dbefore)
        print(f"{opened} of {args.viewers} viewers joined one video: connects issued over {issued_s:.1f} s, "
              f"all open after {join_s:.1f} s ({int(args.identified * 100)}% identified), "
              f"2 frontends, 1 dispatcher")
        print(f"count reached {received['last_count']} (want {want}) after {settle_s:.1f} s")
        print(f"{'presence messages frontends -> owner':45} {pres_up:6d}")
        print(f"{'presence fan-out messages owner -> frontends':45} {pres_down:6d}")
        print(f"{'count events one viewer received':45} {received['count']:6d}")
        print(f"{'join events one viewer received':45} {received['join']:6d}")
        print(f"{'KV writes (both frontends)':45} {kv:6d}")
    finally:
        for c in clients:
            c.close()
        topo.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--identified", type=float, default=0.5)
    args = ap.parse_args()
    if not (1 <= args.viewers <= 18000 and 0 < args.seconds <= 120):
        ap.error("viewers 1..18000 (one client process; open-file limit), seconds 0..120")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
