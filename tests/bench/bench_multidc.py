"""Cross-DC vs same-DC publish-to-viewer latency (a benchmark, not a test).

Three DCs on this machine (each: one dispatcher, one frontend, one bridge, its own embedded KV);
one viewer of a video in dc1 (same DC as the publisher) and one in dc3 (across two bridges:
dc1's export, dc3's import).  Likes are published to dc1's frontend at ``--rate`` per second;
latency is the viewer's receive time minus the event's ``ts`` (stamped by the accepting
frontend; one host, one clock).  Run::

    python tests/bench/bench_multidc.py --rate 50 --seconds 10

Cross-DC link latency is not emulated here (loopback); see README "Multiple datacenters" for
running the bridges' links through ``tc netem``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from helpers import Collector, like, viewer  # noqa: E402
from mesh.topology import Topology, free_port  # noqa: E402

DCS = ("dc1", "dc2", "dc3")


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def run(rate: float, seconds: float) -> None:
    tmp = tempfile.mkdtemp(prefix="livemesh-bench-")
    ports = {dc: free_port() for dc in DCS}
    topos = {dc: Topology(kv={"backend": "embedded", "path": f"{tmp}/kv-{dc}.db"}, log_dir=tmp,
                          extra={"node.dc": dc, "node.log_level": "warning"}) for dc in DCS}
    try:
        for dc, topo in topos.items():
            topo.dispatcher(f"{dc}-d1")
            topo.bridge(f"bridge-{dc}", [f"{o}=tcp://127.0.0.1:{p}" for o, p in ports.items() if o != dc],
                        export_port=ports[dc])
            topo.frontend(f"{dc}-f1")
        front = {dc: topos[dc].nodes[-1].url for dc in DCS}
        same, cross = Collector(await viewer(front["dc1"], "bench")), Collector(await viewer(front["dc3"], "bench"))
        while not cross.ids():  # wait for the cross-DC subscription
            await like(front["dc1"], "bench")
            await asyncio.sleep(0.05)
        start_same, start_cross = len(same.events), len(cross.events)
        n = int(rate * seconds)
        t0 = time.monotonic()
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            asyncio.ensure_future(like(front["dc1"], "bench"))
        await asyncio.sleep(1.0)
        rows = []
        for label, c, s in (("same DC (dc1 -> dc1)", same, start_same), ("cross DC (dc1 -> dc3)", cross, start_cross)):
            lat = [e.received - json.loads(e.data)["ts"] for e in c.events[s:] if e.event == "like"]
            rows.append((label, len(lat), pct(lat, 50), pct(lat, 90), pct(lat, 99), statistics.mean(lat)))
        print(f"{n} likes at {rate:g}/s published in dc1; publish-to-viewer latency (ms)")
        print(f"{'path':<24}{'events':>7}{'p50':>8}{'p90':>8}{'p99':>8}{'mean':>8}")
        for label, count, p50, p90, p99, mean in rows:
            print(f"{label:<24}{count:>7}{p50:>8.2f}{p90:>8.2f}{p99:>8.2f}{mean:>8.2f}")
        await same.close()
        await cross.close()
    finally:
        for topo in topos.values():
            topo.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=50.0, help="likes per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    asyncio.run(run(args.rate, args.seconds))


if __name__ == "__main__":
    main()
