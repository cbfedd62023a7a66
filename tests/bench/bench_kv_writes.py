"""Benchmark: Consul KV writes one frontend makes under a subscribe/unsubscribe churn.

    python tests/bench/bench_kv_writes.py [--rate 1000] [--seconds 10] [--videos 100] [--open 400]

Starts a real Consul dev agent, one dispatcher and two frontends on loopback: one with the
default coalescing (``count_flush_interval`` 1 s) and one with coalescing off (interval 0: every
count change written, transitions and all).  The same churn -- ``rate`` operations per second,
each opening an SSE viewer of a random video or closing a random open one, around ``open``
open viewers over ``videos`` videos -- runs against each frontend in turn, and the Consul
transactions each frontend sent (``kv_requests`` in ``/healthz``) are reported per second.
Bounded: ``seconds`` per phase, ``rate * seconds`` operations at most.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from mesh.tools.consul_agent import ConsulAgent, consul_binary  # noqa: E402
from mesh.tools.sse_client import SSEClient  # noqa: E402
from mesh.tools.topology import Topology  # noqa: E402
from tornado.httpclient import AsyncHTTPClient  # noqa: E402


async def health(url: str) -> dict:
    resp = await AsyncHTTPClient().fetch(url + "/healthz")
    return json.loads(resp.body)


async def churn(url: str, rate: int, seconds: float, videos: int, target_open: int, seed: int) -> dict:
    rnd = random.Random(seed)
    open_viewers: list[SSEClient] = []
    before = (await health(url))["stats"]["kv_requests"]
    ops = opens = closes = 0
    t0 = time.monotonic()
    interval = 1.0 / rate
    max_ops = int(rate * seconds)
    pending: set[asyncio.Task] = set()

    async def open_one():
        v = SSEClient(f"{url}/v1/videos/vid-{rnd.randrange(videos)}/events")
        await v.connect()
        open_viewers.append(v)

    while ops < max_ops and time.monotonic() - t0 < seconds:
        due = t0 + ops * interval
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(open_viewers) < target_open * rnd.uniform(0.5, 1.5) or not open_viewers:
            task = asyncio.ensure_future(open_one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            opens += 1
        else:
            open_viewers.pop(rnd.randrange(len(open_viewers))).close()
            closes += 1
        ops += 1
    elapsed = time.monotonic() - t0
    if pending:
        await asyncio.wait(pending, timeout=10)
    # let the last coalesced write happen, then count
    await asyncio.sleep(1.5)
    after = (await health(url))["stats"]["kv_requests"]
    for v in open_viewers:
        v.close()
    return {"ops": ops, "opens": opens, "closes": closes, "seconds": elapsed,
            "ops_per_s": ops / elapsed, "kv_writes": after - before,
            "kv_writes_per_s": (after - before) / elapsed}


async def main_async(args) -> None:
    tmp = tempfile.mkdtemp(prefix="livemesh-bench-")
    agent = ConsulAgent(consul_binary(), os.path.join(tmp, "consul")).start()
    topo = Topology(kv={"backend": "consul", "consul_addr": agent.http_addr}, log_dir=tmp)
    try:
        topo.dispatcher("d1")
        coalesced = topo.frontend("f-coalesced", **{"frontend.count_flush_interval": "1.0"})
        every = topo.frontend("f-every-change", **{"frontend.count_flush_interval": "0"})
        results = {}
        for name, node in (("coalesced (interval 1 s)", coalesced), ("every change (interval 0)", every)):
            results[name] = await churn(node.url, args.rate, args.seconds, args.videos, args.open, args.seed)
        print(f"churn: target {args.rate} ops/s for {args.seconds:g} s, {args.videos} videos, "
              f"~{args.open} open viewers")
        print(f"{'frontend':28} {'ops/s':>8} {'opens':>6} {'closes':>6} {'consul writes':>14} {'writes/s':>9}")
        for name, r in results.items():
            print(f"{name:28} {r['ops_per_s']:8.0f} {r['opens']:6d} {r['closes']:6d} "
                  f"{r['kv_writes']:14d} {r['kv_writes_per_s']:9.1f}")
        a, b = results.values()
        if a["kv_writes"]:
            print(f"ratio (every change / coalesced): {b['kv_writes_per_s'] / a['kv_writes_per_s']:.1f}x")
        if args.json:
            print(json.dumps(results))
    finally:
        topo.close()
        agent.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--videos", type=int, default=100)
    ap.add_argument("--open", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (1 <= args.rate <= 20000 and 0 < args.seconds <= 120):
        ap.error("rate must be 1..20000 and seconds 0..120")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
