"""Many idle viewers: how many SSE streams frontends hold, at what RSS per connection, whether
heartbeats stay on time, and whether a full garbage collection stalls delivery.

    python tests/bench/bench_connections.py [--connections 19800] [--frontends 1] [--hold 20]
                                            [--heartbeat 5] [--rate 2] [--gc-every 2]
                                            [--open-rate 500] [--quiet-only] [--set KEY=VALUE ...]

One dispatcher and ``--frontends`` frontends (embedded KV), then ``meshctl bench`` opens
``--connections`` streams spread over them (client processes past the open-file limit, source
addresses 127.0.0.x past the ephemeral ports), spread over 100 videos, and publishes ``--rate``
likes/s for ``--hold`` seconds.  Three runs, side by side:

1. quiet: latency p50/p99 of the likes, heartbeat gaps (every stream's time between two
   ``: hb`` comments; on time = close to ``--heartbeat``), RSS per connection;
2. the same with a full ``gc.collect()`` forced in every frontend every ``--gc-every`` seconds
   (``SIGUSR2``): latency while the collector runs, and each pass's duration;
3. as 2, on frontends with ``frontend.gc_freeze_after = 0`` (no ``gc.freeze()`` of viewers).

Bounded: at most 200,000 streams, ``--hold`` at most 600 s; every process it starts is
stopped at the end, even on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from mesh.tools.bench import Plan, run  # noqa: E402
from mesh.tools.topology import Topology  # noqa: E402


def healthz(url: str) -> dict:
    with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
        return json.load(resp)


def force_gc(fronts, every: float, hold: float, pauses: list[float]):
    """An async callable for ``run(during=...)``: SIGUSR2 to each frontend every ``every``
    seconds while publishing; appends each full pass's duration (ms, from /healthz)."""
    async def during() -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + hold
        while loop.time() + every < end:
            await asyncio.sleep(every)
            for f in fronts:
                before = (await asyncio.to_thread(healthz, f.url))["gc"]["full_passes"]
                os.kill(f.proc.pid, signal.SIGUSR2)
                for _ in range(50):  # the pass is done when the counter moved (5 s at most)
                    await asyncio.sleep(0.1)
                    gc_stats = (await asyncio.to_thread(healthz, f.url))["gc"]
                    if gc_stats["full_passes"] > before:
                        pauses.append(gc_stats["last_full_ms"])
                        break
    return during


def fmt(v, unit="") -> str:
    return "-" if v is None else f"{v:,.1f}{unit}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=19800)
    ap.add_argument("--frontends", type=int, default=1)
    ap.add_argument("--hold", type=float, default=20.0, help="seconds of publishing per run")
    ap.add_argument("--heartbeat", type=float, default=5.0, help="frontend.heartbeat_interval")
    ap.add_argument("--rate", type=float, default=2.0, help="likes/s while holding")
    ap.add_argument("--gc-every", type=float, default=2.0)
    ap.add_argument("--open-rate", type=float, default=500.0,
                    help="streams opened per second (a 2-core machine shared with the clients "
                         "sets up ~1,000 Tornado connections/s at most)")
    ap.add_argument("--quiet-only", action="store_true", help="only run 1 (e.g. for 100 k streams)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a node setting, e.g. presence.count_writes_max=0 (repeatable)")
    args = ap.parse_args()
    if not 1 <= args.connections <= 200000 or not 0 < args.hold <= 600:
        ap.error("bounds: 1..200000 connections, 0..600 s hold")
    tmp = tempfile.mkdtemp(prefix="livemesh-bench-conn-")
    # max_viewers: as many as the open-file limit allows (the frontend clamps it under that)
    extra = {"security.max_viewers_per_ip": "200000", "security.ip_rate": "0", "security.max_viewers": "200000",
             "frontend.heartbeat_interval": str(args.heartbeat)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        extra[key] = value
    topo = Topology(kv={"backend": "embedded", "path": os.path.join(tmp, "kv.db")}, log_dir=tmp, extra=extra)
    rows = []
    try:
        topo.dispatcher("d1")
        frozen = [topo.frontend(f"f{i}") for i in range(args.frontends)]
        runs = [("quiet", frozen, False)]
        if not args.quiet_only:
            unfrozen = [topo.frontend(f"nofreeze{i}", **{"frontend.gc_freeze_after": "0"})
                        for i in range(args.frontends)]
            runs += [(f"full GC every {args.gc_every:g} s", frozen, True),
                     (f"full GC every {args.gc_every:g} s, no gc.freeze", unfrozen, True)]
        for name, fronts, disturb in runs:
            pauses: list[float] = []
            plan = Plan([f.url for f in fronts], args.connections, 100, False, args.rate, args.hold,
                        sources=8, open_rate=args.open_rate)
            print(f"== {name}: {args.connections:,} streams over {len(fronts)} frontend(s), "
                  f"{args.rate:g} likes/s for {args.hold:g} s", flush=True)
            during = force_gc(fronts, args.gc_every, args.hold, pauses) if disturb else None
            r = asyncio.run(run(plan, echo=lambda m: None, during=during))
            held = r["connections_held"]
            rss = [b for b in r["rss_bytes_per_connection"].values() if b is not None]
            row = {"run": name, "held": held, "failed": r["connections_failed_why"],
                   "rss_per_conn_kib": round(statistics.mean(rss) / 1024, 2) if rss else None,
                   "latency_ms": r["latency_ms"], "lost": r["lost"], "heartbeats": r["heartbeats"],
                   "heartbeat_gap_s": r["heartbeat_gap_s"],
                   "gc_pause_ms": {"n": len(pauses), "median": round(statistics.median(pauses), 1) if pauses else None,
                                   "max": round(max(pauses), 1) if pauses else None},
                   "frontends": [healthz(f.url)["gc"] for f in fronts]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        print()
        print(f"{'run':<36} {'held':>8} {'KiB/conn':>9} {'p50 ms':>8} {'p99 ms':>8} {'lost':>5} "
              f"{'hb gap p50/p99/max s':>22} {'full GC ms med/max':>19}")
        for row in rows:
            gap = row["heartbeat_gap_s"]
            gcp = row["gc_pause_ms"]
            print(f"{row['run']:<36} {row['held']:>8,} {fmt(row['rss_per_conn_kib']):>9} "
                  f"{fmt(row['latency_ms']['p50']):>8} {fmt(row['latency_ms']['p99']):>8} {row['lost']:>5} "
                  f"{'/'.join('-' if v is None else f'{v:.2f}' for v in gap.values()):>22} "
                  f"{fmt(gcp['median'])}/{fmt(gcp['max']):>8}")
        print(f"(heartbeat interval {args.heartbeat:g} s; machine: {os.cpu_count()} cores; "
              f"open-file limit per process {os.sysconf('SC_OPEN_MAX')})")
    finally:
        topo.close()


if __name__ == "__main__":
    main()
