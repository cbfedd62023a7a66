"""Benchmark: the frontend's publish path, this tree's ``Publisher`` against the ``MeshLink`` of
a baseline commit, alternated in one run against one real dispatcher process.

    python tests/bench/bench_publisher.py [--baseline-ref REF] [--rounds 5] [--events 20000]
        [--videos 200] [--window 32] [--json]

Both links run in this process at once, on one ``zmq.asyncio`` context and one embedded KV,
and publish to the same dispatcher (started with ``mesh.tools.topology``, stopped at the end);
the baseline's ``frontend/link.py`` is read from git (``git show REF:frontend/link.py``) and
loaded as a module against this tree's ``mesh``, so only the link's own code differs.  Two
patterns, each ``--events`` new likes over ``--videos`` videos:

* ``batch100``: ``publish_many`` of 100 events, at most ``--window`` calls in flight (a
  service's ``POST /v1/publish``);
* ``single``: ``publish_many`` of one event, 8 x ``--window`` in flight (plain likes over HTTP,
  each its own call: what the per-loop-turn batching level merges).

Reported per variant and pattern: the median over ``--rounds`` of acknowledged events/s and
of this process's CPU per event (µs: the link's cost; the dispatcher runs elsewhere).  The
variants alternate round by round, so load from elsewhere on the shared machine hits both.
Bounded: ``rounds x 2 x 2`` runs of ``--events`` each, each run cut at ``RUN_MAX`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, ROOT)

import zmq.asyncio  # noqa: E402

from frontend.link import MeshLink  # noqa: E402
from mesh.config import FrontendSection  # noqa: E402
from mesh.kv.embedded import EmbeddedKV  # noqa: E402
from mesh.tools.topology import Topology  # noqa: E402
from mesh.wire import protocol as P  # noqa: E402

#: seconds one run may take at most (a stuck dispatcher ends the run, not the benchmark)
RUN_MAX = 20.0
PATTERNS = {"batch100": (100, 1), "single": (1, 8)}  # events per call, window multiplier


def baseline_link_class(ref: str):
    source = subprocess.run(["git", "-C", ROOT, "show", f"{ref}:frontend/link.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("baseline_link", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{ref}:frontend/link.py", "exec"), module.__dict__)
    return module.MeshLink


async def run_once(publish_many, videos: list[str], events: int, per_call: int, window: int) -> dict:
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


async def main(args) -> dict:
    ref = args.baseline_ref or subprocess.run(["git", "-C", ROOT, "merge-base", "HEAD", "main"], check=True,
                                              capture_output=True, text=True).stdout.strip()
    Baseline = baseline_link_class(ref)
    tmp = tempfile.mkdtemp(prefix="bench-publisher-")
    kv_path = os.path.join(tmp, "kv.db")
    topo = Topology(kv={"backend": "embedded", "path": kv_path, "liveness_ttl": "5"}, log_dir=tmp)
    ctx = zmq.asyncio.Context()
    kv = EmbeddedKV(kv_path)
    links = []
    try:
        topo.dispatcher("d1")
        await kv.open()
        new = MeshLink(ctx, kv, "bench-new", FrontendSection(), on_events=lambda v, e: None)
        old = Baseline(ctx, kv, "bench-old", lambda v, e: None)
        links = [old, new]
        for link in links:
            await link.start()
        videos = [f"bench-{i}" for i in range(args.videos)]
        variants = {"before": old.publish_many, "after": new.publish_many}
        runs = {(v, p): [] for v in variants for p in PATTERNS}
        for publish in variants.values():  # warm-up: links connected, dispatcher's logs made
            await run_once(publish, videos, 2000, 100, args.window)
        for _ in range(args.rounds):
            for pattern, (per_call, mult) in PATTERNS.items():
                for name, publish in variants.items():
                    runs[(name, pattern)].append(
                        await run_once(publish, videos, args.events, per_call, args.window * mult))
        out = {"baseline_ref": ref, "rounds": args.rounds, "events": args.events, "results": {}}
        for (name, pattern), rs in runs.items():
            out["results"][f"{pattern}/{name}"] = {
                "events_per_s": round(statistics.median(r["events_per_s"] for r in rs)),
                "cpu_us_per_event": round(statistics.median(r["cpu_us_per_event"] for r in rs), 2),
                "acked_min": min(r["acked"] for r in rs)}
        return out
    finally:
        for link in links:
            await link.stop()
        await kv.close()
        ctx.term()
        topo.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-ref", default="", help="commit of the 'before' link (default: merge-base with main)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--videos", type=int, default=200)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    result = asyncio.run(main(a))
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"baseline {result['baseline_ref'][:10]}, {a.rounds} rounds of {a.events} events, medians:")
        for key, r in result["results"].items():
            print(f"  {key:18s} {r['events_per_s']:>9,} events/s  {r['cpu_us_per_event']:>7} us CPU/event "
                  f"(bench process)  acked>={r['acked_min']}")
