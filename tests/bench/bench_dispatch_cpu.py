"""Microbenchmark: the dispatcher's publish path in one process, without sockets.

    python tests/bench/bench_dispatch_cpu.py [--tree DIR] [--bursts 100] [--callgrind]

``Dispatcher._handle_batch`` of the tree ``--tree`` (default: this one) is fed ``bursts`` bursts
of 20 ``PUB`` requests x 100 likes over 100 videos (each request touches every video, like
``bench_dispatcher.py``), built and packed before the timed part, as that tree's frontends send them (a tree whose
``publish_body`` still takes ``compact_ack`` gets ``"ack": "seqs"``, the compact ACK its
frontends ask for); its ROUTER and XPUB are sinks that count messages.  Every video's chain exists beforehand, so
everything takes the fast path: decode, check, group, sequence, pack, acknowledge, and the
dedupe window's evictions once it is full (100 k ids: 50 bursts).

Time on this shared VM drifts by 2x within a minute, so two measures:

* CPU time per like: the median over groups of 10 bursts (after the first 10);
* ``--callgrind``: instructions per like, counted by valgrind (deterministic, ~50x slower):
  two runs of the script under callgrind, ``bursts`` and ``bursts + 40``, differenced, so
  start-up and building the requests cancel out.  Compare trees with ``--tree`` (a
  ``git worktree`` or ``git archive`` of another commit).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import pickle
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
REQUESTS, BATCH, VIDEOS = 20, 100, 100
#: built requests, kept between runs (under callgrind, loading them costs next to nothing)
CACHE = os.path.join("/tmp", "livemesh-bench-dispatch-cpu")


class Sink:
    """A socket that counts what it is given."""

    def __init__(self) -> None:
        self.sent = 0

    def send_multipart(self, frames, *args, **kwargs) -> None:
        self.sent += 1


def _asks_for_compact_ack(P) -> bool:
    return "compact_ack" in P.publish_body.__code__.co_varnames


def bursts(P, count: int) -> list[list[list[bytes]]]:
    """The requests of ``count`` bursts (from the cache when built before)."""
    path = os.path.join(CACHE, f"{'pub-ack-seqs' if _asks_for_compact_ack(P) else 'pub'}-{count}.pickle")
    if os.path.exists(path):
        with open(path, "rb") as fh:
            return pickle.load(fh)
    out = build(P, count)
    os.makedirs(CACHE, exist_ok=True)
    with open(path + ".tmp", "wb") as fh:
        pickle.dump(out, fh)
    os.replace(path + ".tmp", path)
    return out


def build(P, count: int) -> list[list[list[bytes]]]:
    videos = [f"bv{i}" for i in range(VIDEOS)]
    form = {"compact_ack": True, "rows": True} if _asks_for_compact_ack(P) else {}
    out, n = [], 0
    for _ in range(count):
        burst = []
        for r in range(REQUESTS):
            events = [P.event_row(P.make_event(videos[(n + i) % VIDEOS], P.KIND_LIKE, "bench", None,
                                               event_id=f"01l{n + i:014x}", ts=0.0)) for i in range(BATCH)]
            n += BATCH
            body = P.pack(P.publish_body(events, **form))
            burst.append([b"peer%d" % (r % 2), P.MAGIC_V1, P.MSG_PUBLISH, b"r%d" % r, body])
        out.append(burst)
    return out


async def run(args) -> None:
    from dispatcher.node import Dispatcher
    from mesh.wire import protocol as P
    from mesh.config import load_config

    cfg = load_config(None, env={})
    cfg.node.name = "d1"
    node = Dispatcher(cfg, None, None)
    node.router, node.xpub, node.peers = Sink(), Sink(), None
    if hasattr(node, "pipeline"):  # a tree with mesh.core.pipeline: ready as after its discovery
        node.pipeline.ready = True
    for i in range(VIDEOS):
        node.seq._log(f"bv{i}")
    work = bursts(P, args.bursts)
    gc.collect()
    gc.freeze()
    gc.set_threshold(50000, 20, 100)  # as mesh.io.node.settle_gc
    times = []
    for burst in work:
        t0 = time.process_time()
        node._handle_batch(burst)
        times.append(time.process_time() - t0)
    likes = args.bursts * REQUESTS * BATCH
    if node.stats["events_in"] != likes or node.router.sent != args.bursts * REQUESTS:
        raise SystemExit(f"not every like was sequenced and acknowledged: {dict(node.stats)}")
    groups = [statistics.mean(times[i:i + 10]) for i in range(10, len(times), 10)] or times
    print(f"{statistics.median(groups) / (REQUESTS * BATCH) * 1e6:.2f} us of CPU per like (median of "
          f"{len(groups)} groups of 10 bursts), {likes:,} likes, {node.xpub.sent:,} fan-out messages")


def instructions(args, count: int) -> int:
    from mesh.wire import protocol as P
    bursts(P, count)  # built and cached outside the count
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
           os.path.abspath(__file__), "--tree", args.tree, "--bursts", str(count)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode or not found:
        raise SystemExit(f"valgrind failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=ROOT, help="source tree whose dispatcher runs")
    ap.add_argument("--bursts", type=int, default=100, help="bursts of 2,000 likes (20..500)")
    ap.add_argument("--callgrind", action="store_true", help="instructions per like, under valgrind")
    args = ap.parse_args()
    if not 20 <= args.bursts <= 500:
        ap.error("bounds: bursts 20..500")
    args.tree = os.path.abspath(args.tree)
    sys.path.insert(0, args.tree)
    if not args.callgrind:
        asyncio.run(run(args))
        return
    low, high = instructions(args, args.bursts), instructions(args, args.bursts + 40)
    print(f"{(high - low) / (40 * REQUESTS * BATCH):,.0f} instructions per like ({args.tree}, "
          f"bursts {args.bursts} and {args.bursts + 40} differenced)")


if __name__ == "__main__":
    main()
