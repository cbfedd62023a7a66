"""Side by side: livemesh (one dispatcher + one frontend) against the naive Tornado broadcaster
(``naive_broadcaster.py``), the same ``meshctl bench`` workload on each, in one process tree.

    python tests/bench/bench_fanout.py [--connections 2000] [--rate 100] [--duration 10] [--videos 1]

Prints each run's table and the ratios (deliveries/s, latency).  Bounded by the bench's own
limits; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from mesh.bench import Plan, print_table, run  # noqa: E402
from mesh.topology import NodeProcess, Topology  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def start_naive() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "naive_broadcaster.py")],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, json.loads(line)["http"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--videos", type=int, default=1)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="livemesh-bench-")
    topo = Topology(kv={"backend": "embedded", "path": os.path.join(tmp, "kv.db")}, log_dir=tmp,
                    extra={"security.max_viewers_per_ip": "200000", "security.ip_rate": "0"})
    naive, naive_url = start_naive()
    results = {}
    try:
        topo.dispatcher("d1")
        front = topo.frontend("f1")
        plain = topo.frontend("f1-no-coalescing", **{"frontend.coalesce_max": "1"})
        for name, url in (("livemesh", front.url), ("livemesh, coalescing off", plain.url),
                          ("naive", naive_url)):
            plan = Plan([url], args.connections, args.videos, args.videos == 1, args.rate, args.duration)
            print(f"== {name}: {args.connections} streams, {args.videos} video(s), "
                  f"{args.rate:g} likes/s for {args.duration:g} s", flush=True)
            results[name] = asyncio.run(run(plan, echo=lambda m: None))
            print_table(results[name])
        a = results["livemesh"]
        for other in ("livemesh, coalescing off", "naive"):
            b = results[other]
            print(f"== ratio livemesh / {other}")
            print(f"deliveries/s      {a['deliveries_per_s'] / max(1, b['deliveries_per_s']):.2f}x")
            for q in ("p50", "p99"):
                la, lb = a["latency_ms"][q], b["latency_ms"][q]
                if la and lb:
                    print(f"latency {q:<8}  {lb / la:.2f}x lower" if la < lb else
                          f"latency {q:<8}  {la / lb:.2f}x higher")
    finally:
        topo.close()
        naive.terminate()
        naive.wait(10)


if __name__ == "__main__":
    main()
