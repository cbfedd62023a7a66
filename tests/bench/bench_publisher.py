"""Benchmark: the frontend's publish path, this tree's ``MeshLink`` against a baseline tree's,
alternated in one run against one real dispatcher process.

    python tests/bench/bench_publisher.py [--baseline-ref REF | --baseline-tree DIR] [--rounds 5]
        [--events 20000] [--videos 200] [--window 32] [--json]

Each link runs in a child process of its own (this file with ``--child TREE``: ``TREE`` first
on ``sys.path``, so the child imports that tree's ``frontend`` and ``mesh`` whole, whatever its
wire format), both children on one embedded KV, publishing to the same dispatcher of this tree
(started with ``mesh.tools.topology``, stopped at the end).  The baseline tree is
``--baseline-tree``, or ``--baseline-ref`` (default: the merge-base of ``HEAD`` and ``main``)
exported with ``git archive`` to a temporary directory.  A child keeps its link for the whole
run and does one run per line it reads on stdin.  Two patterns, each ``--events`` new likes
over ``--videos`` videos:

* ``batch100``: ``publish_many`` of 100 events, at most ``--window`` calls in flight (a
  service's ``POST /v1/publish``);
* ``single``: ``publish_many`` of one event, 8 x ``--window`` in flight (plain likes over HTTP,
  each its own call: what the per-loop-turn batching level merges).

Reported per variant and pattern: the median over ``--rounds`` of acknowledged events/s and
of the child's CPU per event (µs: the link's cost; the dispatcher runs elsewhere).  The
variants alternate run by run, so load from elsewhere on the shared machine hits both.
Bounded: ``rounds x 2 x 2`` runs of ``--events`` each, each run cut at ``RUN_MAX`` seconds,
every child given ``CHILD_MAX`` seconds per answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

#: seconds one run may take at most (a stuck dispatcher ends the run, not the benchmark)
RUN_MAX = 20.0
#: seconds a child may take to start or to answer one run
CHILD_MAX = RUN_MAX + 30.0
PATTERNS = {"batch100": (100, 1), "single": (1, 8)}  # events per call, window multiplier


async def run_once(P, publish_many, videos: list[str], events: int, per_call: int, window: int) -> dict:
    """One run of ``events`` likes, ``per_call`` per ``publish_many`` call, ``window`` calls in
    flight; ``P`` is the protocol module of the link's tree."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(window)
    acked = 0
    tasks = set()

    async def one(batch: list[dict]) -> None:
        nonlocal acked
        try:
            results = await publish_many(batch)
            acked += sum(1 for r in results if "error" not in r)
        finally:
            slots.release()

    cpu0, t0 = time.process_time(), loop.time()
    deadline = t0 + RUN_MAX
    for start in range(0, events, per_call):
        if loop.time() > deadline:
            break
        await slots.acquire()
        batch = [P.make_event(videos[(start + i) % len(videos)], "like", "u", None)
                 for i in range(min(per_call, events - start))]
        task = asyncio.ensure_future(one(batch))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.1, deadline - loop.time()))
    wall, cpu = loop.time() - t0, time.process_time() - cpu0
    return {"acked": acked, "events_per_s": acked / wall, "cpu_us_per_event": cpu * 1e6 / max(1, acked)}


async def child(args) -> None:
    """``--child TREE``: one link of that tree, one run per stdin line (``pattern``), one JSON
    line per run on stdout; ends at EOF."""
    sys.path.insert(0, args.child)
    import zmq.asyncio

    import frontend.link
    from frontend.link import MeshLink
    from mesh.config import FrontendSection
    from mesh.kv.embedded import EmbeddedKV
    from mesh.wire import protocol as P

    ctx = zmq.asyncio.Context()
    kv = EmbeddedKV(args.kv_path)
    link = MeshLink(ctx, kv, f"bench-{args.name}", FrontendSection(), on_events=lambda v, e: None)
    loop = asyncio.get_running_loop()
    try:
        await kv.open()
        await link.start()
        videos = [f"bench-{i}" for i in range(args.videos)]
        await run_once(P, link.publish_many, videos, 2000, 100, args.window)  # warm-up: logs made
        print(json.dumps({"tree": os.path.dirname(os.path.dirname(os.path.abspath(frontend.link.__file__)))}),
              flush=True)
        while True:
            pattern = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if not pattern:
                break
            per_call, mult = PATTERNS[pattern]
            result = await run_once(P, link.publish_many, videos, args.events, per_call, args.window * mult)
            print(json.dumps(result), flush=True)
    finally:
        await link.stop()
        await kv.close()
        ctx.term()


def main(args) -> dict:
    sys.path.insert(0, ROOT)
    from mesh.tools.topology import Topology
    from tests.bench.bench_dispatcher import read_json_line

    tmp = tempfile.mkdtemp(prefix="bench-publisher-")
    ref = ""
    baseline = args.baseline_tree
    if not baseline:
        ref = args.baseline_ref or subprocess.run(["git", "-C", ROOT, "merge-base", "HEAD", "main"], check=True,
                                                  capture_output=True, text=True).stdout.strip()
        baseline = os.path.join(tmp, "baseline-tree")
        os.makedirs(baseline)
        archive = subprocess.run(["git", "-C", ROOT, "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", baseline], input=archive, check=True)
    kv_path = os.path.join(tmp, "kv.db")
    topo = Topology(kv={"backend": "embedded", "path": kv_path, "liveness_ttl": "5"}, log_dir=tmp)
    children: dict[str, subprocess.Popen] = {}
    try:
        topo.dispatcher("d1")
        for name, tree in (("before", baseline), ("after", ROOT)):
            with open(os.path.join(tmp, f"child-{name}.log"), "ab") as log:
                children[name] = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--child", os.path.abspath(tree), "--name", name,
                     "--kv-path", kv_path, "--events", str(args.events), "--videos", str(args.videos),
                     "--window", str(args.window)],
                    cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        for name, tree in (("before", baseline), ("after", ROOT)):
            ready = read_json_line(children[name], CHILD_MAX)
            if os.path.realpath(ready["tree"]) != os.path.realpath(tree):
                raise SystemExit(f"the {name} child imported {ready['tree']}, not {tree}")
        runs = {(v, p): [] for v in children for p in PATTERNS}
        for _ in range(args.rounds):
            for pattern in PATTERNS:
                for name, proc in children.items():
                    proc.stdin.write(f"{pattern}\n".encode())
                    proc.stdin.flush()
                    runs[(name, pattern)].append(read_json_line(proc, CHILD_MAX))
        out = {"baseline": ref or baseline, "rounds": args.rounds, "events": args.events, "results": {}}
        for (name, pattern), rs in runs.items():
            out["results"][f"{pattern}/{name}"] = {
                "events_per_s": round(statistics.median(r["events_per_s"] for r in rs)),
                "cpu_us_per_event": round(statistics.median(r["cpu_us_per_event"] for r in rs), 2),
                "acked_min": min(r["acked"] for r in rs)}
        return out
    finally:
        for proc in children.values():
            if proc.poll() is None:
                proc.stdin.close()  # EOF: the child stops its link and exits
        for proc in children.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        topo.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-ref", default="", help="commit of the 'before' link (default: merge-base with main)")
    ap.add_argument("--baseline-tree", default="", help="source tree of the 'before' link (instead of a ref)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--videos", type=int, default=200)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="", help=argparse.SUPPRESS)
    ap.add_argument("--kv-path", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not (1 <= a.rounds <= 20 and 1 <= a.events <= 1000000 and 1 <= a.videos <= 100000 and 1 <= a.window <= 1024):
        ap.error("bounds: rounds 1..20, events 1..1e6, videos 1..1e5, window 1..1024")
    if a.child:
        asyncio.run(child(a))
        sys.exit(0)
    result = main(a)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"baseline {result['baseline'][:40]}, {a.rounds} rounds of {a.events} events, medians:")
        for key, r in result["results"].items():
            print(f"  {key:18s} {r['events_per_s']:>9,} events/s  {r['cpu_us_per_event']:>7} us CPU/event "
                  f"(link process)  acked>={r['acked_min']}")
