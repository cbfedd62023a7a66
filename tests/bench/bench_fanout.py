"""Side by side: livemesh (one dispatcher + one frontend) against the naive Tornado broadcaster
(``naive_broadcaster.py``: one ``write`` + ``flush`` per event per viewer), the same
``meshctl bench`` workloads on each, in one process tree.

    python tests/bench/bench_fanout.py [--fanout 1000x2200,10000x200] [--fanout-repeats 3]
                                       [--duration 10] [--clients 2] [--client-nice 0]
                                       [--light-connections 1000] [--light-rate 1]
                                       [--light-duration 10] [--light-clients 4]
                                       [--ingest-rate 1000] [--ingest-repeats 3]
                                       [--agg-connections 2000] [--agg-rate 200] [--agg-above 5]
                                       [--agg-repeats 2]
                                       [--only-aggregation]

Workloads, the issue's targets:

* fan-out: for each ``VIEWERSxRATE`` of ``--fanout``, VIEWERS viewers of one hot video and
  RATE likes/s for ``--duration`` seconds: deliveries/s (likes delivered; an aggregated
  ``likes`` event counts as the likes it stands for), SSE events/s, latency p50/p99, server CPU
  per delivery; livemesh as configured by default (likes aggregated past
  ``frontend.aggregate_likes_above``; ``--fanout-repeats`` runs, alternated with the others,
  medians and each run's figures), livemesh with aggregation off (every like its own event)
  and the naive broadcaster; ratios.  The viewers are read by ``--clients`` processes;
* light load: ``--light-connections`` viewers over 10 videos, ``--light-rate`` likes/s, read by
  ``--light-clients`` processes: latency p50/p99 on livemesh and the naive broadcaster;
* HTTP ingest: ``--ingest-rate`` likes/s over 10 videos with one viewer each: the frontend's
  CPU per like published (the HTTP request, the mesh publish and its ack, one delivery) on
  livemesh (the publish fast path, ``frontend/ingest.py``), livemesh with
  ``frontend.publish_fast_path = false`` (Tornado's handler) and the naive broadcaster (a bare
  Tornado handler: the HTTP server's own share), alternated ``--ingest-repeats`` times, medians;
* like aggregation: ``--agg-connections`` viewers of one hot video at ``--agg-rate`` likes/s,
  on a frontend with ``frontend.aggregate_likes_above = --agg-above`` and one with it off
  (0), alternated
  ``--agg-repeats`` times: medians of frontend CPU per like delivered, bytes received per like,
  latency p50/p99, and the on/off ratios.  ``--only-aggregation`` runs just this one.  The
  default threshold (20 per 50 ms tick) kicks in from ~400 likes/s on one video;
  ``--agg-above 5`` makes 200 likes/s (~10 per tick) aggregate.

Load generator, nodes and baseline share the machine's cores.  Bounded by the bench's own
limits; every process it starts is stopped at the end, even on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from mesh.tools.bench import Plan, run  # noqa: E402
from mesh.tools.bench.report import print_table  # noqa: E402
from mesh.tools.topology import Topology  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def start_naive() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "naive_broadcaster.py")],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, json.loads(line)["http"]


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def bench(name: str, url: str, plan: Plan) -> dict:
    print(f"== {name}: {plan.connections:,} streams, {'1 hot video' if plan.hot else f'{plan.videos} videos'}, "
          f"{plan.rate:g} likes/s for {plan.duration:g} s", flush=True)
    result = asyncio.run(run(plan, echo=lambda m: None))
    print_table(result)
    return result


def workloads(spec: str) -> list[tuple[int, float]]:
    out = []
    for part in spec.split(","):
        viewers, _, rate = part.strip().partition("x")
        try:
            out.append((int(viewers), float(rate)))
        except ValueError:
            raise SystemExit(f"--fanout: {part!r} is not VIEWERSxRATE (e.g. 10000x200)") from None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fanout", type=workloads, default=workloads("1000x2200,10000x200"),
                    help="fan-out workloads, VIEWERSxRATE,...")
    ap.add_argument("--fanout-repeats", type=int, default=3, help="livemesh runs per fan-out workload")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=2, help="client processes of the fan-out runs")
    ap.add_argument("--client-nice", type=int, default=0,
                    help="niceness of the fan-out runs' client processes (the load generator)")
    ap.add_argument("--light-connections", type=int, default=1000)
    ap.add_argument("--light-rate", type=float, default=1.0)
    ap.add_argument("--light-duration", type=float, default=10.0)
    ap.add_argument("--light-clients", type=int, default=4)
    ap.add_argument("--ingest-rate", type=float, default=1000.0)
    ap.add_argument("--ingest-repeats", type=int, default=3)
    ap.add_argument("--agg-connections", type=int, default=2000)
    ap.add_argument("--agg-rate", type=float, default=200.0)
    ap.add_argument("--agg-above", type=int, default=5)
    ap.add_argument("--agg-duration", type=float, default=10.0)
    ap.add_argument("--agg-repeats", type=int, default=2)
    ap.add_argument("--only-aggregation", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="livemesh-bench-")
    topo = Topology(kv={"backend": "embedded", "path": os.path.join(tmp, "kv.db")}, log_dir=tmp,
                    extra={"security.max_viewers_per_ip": "200000", "security.ip_rate": "0"})
    naive, naive_url = start_naive()
    try:
        topo.dispatcher("d1")
        if args.only_aggregation:
            aggregation(topo, args)
            return
        front = topo.frontend("f1")
        no_agg = topo.frontend("f1-agg-off", **{"frontend.aggregate_likes_above": "0"})
        tornado_publish = topo.frontend("f1-tornado-publish", **{"frontend.publish_fast_path": "false"})
        targets = (("livemesh", front.url), ("livemesh, aggregation off", no_agg.url), ("naive", naive_url))
        heavy, repeats = {}, {}
        for viewers, rate in args.fanout:
            for k in range(max(1, args.fanout_repeats)):  # livemesh runs alternated with the others
                for name, url in targets if k == 0 else targets[:1]:
                    r = bench(name, url, Plan([url], viewers, 1, True, rate, args.duration,
                                              clients=args.clients, client_nice=args.client_nice))
                    repeats.setdefault((viewers, rate, name), []).append(r)
            for name, _ in targets:
                heavy[viewers, rate, name] = median_run(repeats[viewers, rate, name])
        light = {}
        for name, url in (("livemesh", front.url), ("naive", naive_url)):
            light[name] = bench(f"{name}, light load", url, Plan([url], args.light_connections, 10, False,
                                                                 args.light_rate, args.light_duration,
                                                                 clients=args.light_clients))
        ingest_runs: dict[str, list[dict]] = {}
        for _ in range(max(1, args.ingest_repeats)):
            for name, url in (("livemesh", front.url), ("livemesh, Tornado publish", tornado_publish.url),
                              ("naive", naive_url)):
                ingest_runs.setdefault(name, []).append(
                    bench(f"{name}, HTTP ingest", url, Plan([url], 10, 10, False, args.ingest_rate,
                                                             args.duration, clients=1)))
        print()
        for viewers, rate in args.fanout:
            print(f"fan-out: {viewers:,} viewers of one video, {rate:g} likes/s offered "
                  f"({viewers * rate:,.0f} deliveries/s offered), {args.clients} client processes")
            print(f"{'':<26} {'deliveries/s':>13} {'events/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'lost':>6} "
                  f"{'acked':>7} {'us CPU/delivery':>16}")
            for name, _ in targets:
                runs = repeats[viewers, rate, name]
                for label, r in [(name if len(runs) == 1 else f"{name}, median", heavy[viewers, rate, name])] + \
                        ([(f"  run {i + 1}", r) for i, r in enumerate(runs)] if len(runs) > 1 else []):
                    lat = r["latency_ms"]
                    cpu = r["server_cpu_us_per_delivery"]
                    print(f"{label:<26} {r['deliveries_per_s']:>13,} {r['events_per_s']:>11,} "
                          f"{lat['p50'] or 0:>8.1f} {lat['p99'] or 0:>8.1f} {r['lost']:>6,} "
                          f"{r['published_acked']:>7,} {'-' if cpu is None else f'{cpu:.2f}':>16}")
            a = heavy[viewers, rate, "livemesh"]
            for other, _ in targets[1:]:
                b = heavy[viewers, rate, other]
                print(f"livemesh / {other}: {ratio(a['deliveries_per_s'], b['deliveries_per_s'])} deliveries/s")
        print(f"light load: {args.light_connections:,} viewers over 10 videos, {args.light_rate:g} likes/s, "
              f"{args.light_clients} client processes")
        for name, r in light.items():
            lat = r["latency_ms"]
            print(f"{name:<26} p50 {lat['p50'] or 0:.1f} ms  p99 {lat['p99'] or 0:.1f} ms  "
                  f"({r['latency_samples']} samples, lost {r['lost']})")
        print(f"HTTP ingest: {args.ingest_rate:g} likes/s offered over 10 videos, one viewer each, "
              f"medians of {max(1, args.ingest_repeats)} alternated runs")
        cpus = {}
        for name, runs in ingest_runs.items():
            cpus[name] = median(r["server_cpu_us_per_delivery"] for r in runs)
            acked = median(r["published_acked"] for r in runs)
            each = ", ".join(f"{r['server_cpu_us_per_delivery'] or 0:,.0f}" for r in runs)
            print(f"{name:<26} {acked:,.0f} of {int(args.ingest_rate * args.duration):,} likes acknowledged, "
                  f"{'-' if cpus[name] is None else f'{cpus[name]:,.0f}'} us server CPU per like ({each}), "
                  f"p50 {median(r['latency_ms']['p50'] for r in runs) or 0:.1f} ms")
        print(f"fast path / Tornado publish: {ratio(cpus['livemesh'], cpus['livemesh, Tornado publish'])} "
              f"server CPU per like")
        aggregation(topo, args)
    finally:
        topo.close()
        naive.terminate()
        naive.wait(10)


def aggregation(topo: Topology, args) -> None:
    """Aggregation on vs off on one hot video, alternated, medians and ratios."""
    fronts = {"aggregation on": topo.frontend("f1-agg-on", **{"frontend.aggregate_likes_above":
                                                              str(args.agg_above)}).url,
              "aggregation off": topo.frontend("f1-agg-off", **{"frontend.aggregate_likes_above": "0"}).url}
    runs: dict[str, list[dict]] = {name: [] for name in fronts}
    for _ in range(args.agg_repeats):
        for name, url in fronts.items():
            runs[name].append(bench(name, url, Plan([url], args.agg_connections, 1, True,
                                                    args.agg_rate, args.agg_duration,
                                                    clients=args.clients)))
    rows = {}
    for name, rs in runs.items():
        rows[name] = {
            "likes delivered/s": median(r["deliveries_per_s"] for r in rs),
            "us CPU/like": median(r["server_cpu_us_per_delivery"] for r in rs),
            "bytes/like": median(r["bytes_per_delivery"] for r in rs),
            "p50 ms": median(r["latency_ms"]["p50"] for r in rs),
            "p99 ms": median(r["latency_ms"]["p99"] for r in rs),
            "likes events": median(r["aggregated_events"] for r in rs),
            "lost": sum(r["lost"] for r in rs), "dup": sum(r["duplicates"] for r in rs),
            "mismatch": sum(r["aggregate_mismatch"] for r in rs),
        }
    print()
    print(f"aggregation: {args.agg_connections:,} viewers of one video, {args.agg_rate:g} likes/s, "
          f"aggregate_likes_above {args.agg_above}, medians of {args.agg_repeats} alternated runs each")
    cols = list(rows["aggregation on"])
    print(f"{'':<18}" + "".join(f"{c:>18}" for c in cols))
    for name, row in rows.items():
        print(f"{name:<18}" + "".join(f"{'-' if v is None else f'{v:,.2f}':>18}" for v in row.values()))
    on, off = rows["aggregation on"], rows["aggregation off"]
    print("on / off: " + ", ".join(f"{c} {ratio(on[c], off[c])}" for c in ("us CPU/like", "bytes/like", "p50 ms", "p99 ms")))


def median_run(runs: list[dict]) -> dict:
    """The run whose p99 is the median one (its own figures, consistent with each other)."""
    ranked = sorted(runs, key=lambda r: r["latency_ms"]["p99"] or 0)
    return ranked[len(ranked) // 2]


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
