"""Benchmark: published likes/s through one dispatcher process to its frontends.

    python tests/bench/bench_dispatcher.py [--frontends 2] [--videos 1000] [--hot]
        [--rate 150000] [--duration 5] [--batch 100] [--window 32] [--watched 1.0] [--backup]
        [--feeder link|light] [--baseline-ref REF | --no-baseline] [--rounds 1] [--json]

HTTP cannot offer 100 k likes/s on two cores (Tornado parses ~5 k requests/s per process), so
the load reaches the dispatcher the way frontends send it: batched ``PUB`` requests over
DEALER.  Each emulated frontend is a separate process (this file with ``--emulate``) that runs
the project's own ``frontend.link.MeshLink`` -- discovery from the KV, ``publish_many`` (the
frontend's publish path: one request per owner per loop turn, retries, deadlines), the SUB
socket with its chain followers (order, duplicates, gap repair) -- and nothing else: no HTTP,
no viewers.  Frontend i publishes ``rate / frontends`` likes/s for ``duration`` seconds in
batches of ``batch`` events (``window`` batches in flight at most: beyond it the publisher
waits, so an overloaded dispatcher shows as fewer likes/s, not as an unbounded queue), spread
round-robin over ``videos`` videos (``--hot``: all on one), and watches its share of the
videos (video j is watched by frontend j mod N), so every acknowledged like of a watched video
is delivered to exactly one emulated frontend.  ``--watched F`` leaves all but the first
share F of the videos unwatched: the dispatcher sequences, replicates and encodes their events
all the same (its XPUB drops them for want of a subscriber), so the load generator can offer
more than it could receive on the same two cores.  All video ids are chosen so that the first dispatcher owns
them; ``--backup`` starts a second dispatcher, which then is their backup (every acknowledged
batch is replicated to it first: the replication cost).

``--feeder light`` replaces MeshLink by a feeder that costs next to nothing (``emulate_light``:
requests built and packed before the timed part; ACKs counted, fan-out decoded once, ids into
a set): what one dispatcher process can do when its feeders are cheap.

Side by side in one run: the dispatcher of ``--baseline-ref`` (default: the merge-base of
``HEAD`` and ``main``; its tree is exported with ``git archive`` to a temporary directory and
run from there) and the dispatcher of this tree, each against fresh emulated frontends of its
own tree (this file of that tree with ``--emulate``: feeders speak their dispatcher's wire
format, whatever it is); ``--rounds N`` alternates them N times
and shows each one's median run (the machine is shared: load from elsewhere hits both).  Reported per variant: acknowledged
likes/s, fan-out events/s received, ack latency p50/p99 (per batch), lost / duplicated /
gaps repaired / resets, dispatcher CPU (cores, from /proc) and the ratio.  Bounded: ``duration``
seconds of publishing, then at most ``SETTLE_MAX`` seconds for the last deliveries; every
process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, ROOT)

from mesh.core.ownership import owner  # noqa: E402
from mesh.tools.topology import NodeProcess  # noqa: E402
from tests.helpers import wait_until  # noqa: E402

#: seconds to wait, after the last ack, for deliveries to stop arriving (quiet for SETTLE_QUIET)
SETTLE_MAX = 10.0
SETTLE_QUIET = 1.0
DISPATCHERS = ("bench-d1", "bench-d2")


def bench_videos(count: int, dispatchers: list[str]) -> list[str]:
    """``count`` video ids the first of ``dispatchers`` owns (the same in every process)."""
    out, i = [], 0
    while len(out) < count:
        video = f"bv{i}"
        if owner(video, dispatchers) == dispatchers[0]:
            out.append(video)
        i += 1
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# --- the emulated frontend (a child process) ---------------------------------------------------

def emulated_videos(args) -> tuple[list[str], list[str]]:
    """The videos emulated frontend ``args.index`` publishes to (all) and watches (its share)."""
    videos = bench_videos(1 if args.hot else args.videos, list(DISPATCHERS[: args.dispatchers]))
    watched = [v for j, v in enumerate(videos)
               if j % args.frontends == args.index and j < max(1, round(args.watched * len(videos)))]
    return videos, watched


def emulate_light(args) -> None:
    """The light feeder (``--feeder light``): plain synchronous sockets, no MeshLink.  Every
    PUB request of the run is built (``mesh.wire.protocol`` encoders, a fresh id per event) and
    packed before the timed part; then requests leave on time (``window`` in flight at most),
    ACK results are counted, and fan-out messages get one plain msgpack decode with event ids
    into a set (loss and duplicates), no validation or chain following: what one dispatcher
    process does when its feeders cost next to nothing."""
    import msgpack
    import zmq

    from mesh.wire import protocol as P
    from mesh.io.node import settle_gc

    videos, watched = emulated_videos(args)
    total = int(args.rate * args.duration)
    requests: list[tuple[list[bytes], list[str]]] = []
    for r in range(0, (total + args.batch - 1) // args.batch):
        events = [P.make_event(videos[n % len(videos)], P.KIND_LIKE, "bench", None,
                               event_id=f"{args.index:02d}l{n:014x}", ts=0.0)
                  for n in range(r * args.batch, min(total, (r + 1) * args.batch))]
        msg = P.Control(P.MSG_PUBLISH, b"r%d" % r, P.publish_body(list(map(P.event_row, events))))
        requests.append((msg.to_frames(), [e["video"] for e in events]))
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    sub = ctx.socket(zmq.SUB)
    try:
        dealer.connect(args.router)
        sub.connect(args.pub)
        for video in watched:
            sub.setsockopt(zmq.SUBSCRIBE, P.topic_for(video))
        unsynced, deadline = set(watched), time.monotonic() + 10
        while unsynced and sub.poll(max(1, int(1000 * (deadline - time.monotonic())))):
            topic, payload = sub.recv_multipart()
            if msgpack.unpackb(payload)["k"] == P.FANOUT_SYNC:
                unsynced.discard(P.video_from_topic(topic))
        settle_gc()
        print(json.dumps({"ready": True, "synced": len(watched) - len(unsynced), "watched": len(watched)}),
              flush=True)
        start_at = float(sys.stdin.readline())

        seen: set[str] = set()
        received: dict[str, int] = {}
        acked: dict[str, int] = {}
        errors: dict[str, int] = {}
        latencies: list[float] = []
        sent_at: dict[bytes, tuple[float, list[str]]] = {}
        result = {"published": 0, "acked": 0, "first_ack": 0.0, "last_ack": 0.0, "duplicates": 0,
                  "last_delivery": 0.0}
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        time.sleep(max(0.0, start_at - time.time()))  # sleep-ok: paced start at a shared instant
        cpu0 = time.process_time()
        t0 = time.monotonic()
        interval = args.batch / args.rate
        next_req = 0
        publish_end = 0.0
        drain_until = None
        while True:
            now = time.monotonic()
            while next_req < len(requests) and len(sent_at) < args.window and t0 + next_req * interval <= now:
                frames, vids = requests[next_req]
                dealer.send_multipart(frames)
                sent_at[frames[2]] = (time.time(), vids)
                result["published"] += len(vids)
                next_req += 1
            if not publish_end and (next_req == len(requests) or now - t0 >= args.duration):
                del requests[next_req:]  # an overloaded dispatcher: fewer likes/s, not a longer run
                publish_end = time.time()
            if publish_end and not sent_at:
                if drain_until is None:
                    cpu = time.process_time() - cpu0  # publishing and receiving, until the last ack
                    drain_until = time.time() + SETTLE_MAX
                if time.time() > drain_until or time.time() - max(result["last_delivery"], publish_end) > SETTLE_QUIET:
                    break
            elif publish_end and time.time() - publish_end > 10:
                cpu = time.process_time() - cpu0
                break  # acks that never came: reported as published but not acknowledged
            due = t0 + next_req * interval if next_req < len(requests) and len(sent_at) < args.window else now + 0.05
            for sock, _ in poller.poll(max(0, int(1000 * (due - time.monotonic())) + 1)):
                if sock is dealer:
                    while dealer.poll(0):
                        _, _, request_id, body = dealer.recv_multipart()
                        sent, vids = sent_at.pop(request_id)
                        t = time.time()
                        latencies.append((t - sent) * 1000.0)
                        reply = P.Control(P.MSG_ACK, request_id, msgpack.unpackb(body))
                        for video, where in zip(vids, P.ack_positions(reply, len(vids))):
                            if type(where) is dict:
                                errors[where["code"]] = errors.get(where["code"], 0) + 1
                            else:
                                acked[video] = acked.get(video, 0) + 1
                                result["acked"] += 1
                        result["first_ack"] = result["first_ack"] or t
                        result["last_ack"] = t
                else:
                    while sub.poll(0):
                        topic, payload = sub.recv_multipart()
                        msg = msgpack.unpackb(payload)
                        if msg["k"] != P.FANOUT_EVENTS:
                            continue
                        n = len(seen)
                        seen.update(row[P.ROW_ID] for row in msg["events"])
                        fresh = len(seen) - n
                        result["duplicates"] += len(msg["events"]) - fresh
                        video = P.video_from_topic(topic)
                        received[video] = received.get(video, 0) + fresh
                        result["last_delivery"] = time.time()
        latencies.sort()
        print(json.dumps({
            **result, "errors": errors, "acked_by_video": acked, "watched_videos": watched, "cpu": cpu,
            "received_by_video": received, "received": sum(received.values()), "publish_end": publish_end,
            "latencies": latencies[:: max(1, len(latencies) // 2000)],
            "link": {"gaps": 0, "gaps_repaired": 0, "resets": 0, "publish_retries": 0,
                     "publish_requests": next_req, "malformed": 0},
        }), flush=True)
    finally:
        dealer.close(linger=0)
        sub.close(linger=0)
        ctx.term()


async def emulate(args) -> None:
    import zmq.asyncio

    from frontend.link import MeshLink
    from mesh.config import FrontendSection
    from mesh.wire import protocol as P
    from mesh.kv.embedded import EmbeddedKV
    from mesh.io.node import settle_gc

    videos, watched = emulated_videos(args)
    dispatchers = list(DISPATCHERS[: args.dispatchers])
    received: dict[str, int] = {}
    seen: set[str] = set()
    counts = {"duplicates": 0, "last_delivery": 0.0}

    def on_events(video: str, events: list[dict]) -> None:
        n = 0
        for event in events:
            if event["id"] in seen:
                counts["duplicates"] += 1
            else:
                seen.add(event["id"])
                n += 1
        received[video] = received.get(video, 0) + n
        counts["last_delivery"] = time.time()

    ctx = zmq.asyncio.Context()
    kv = EmbeddedKV(args.kv_path)
    link = MeshLink(ctx, kv, f"bench-f{args.index}", FrontendSection(attempt_timeout=1.0, publish_timeout=3.0),
                    on_events=on_events)
    loop = asyncio.get_running_loop()
    try:
        await kv.open()
        await link.start()
        deadline = loop.time() + 20
        while sorted(link.peers) != dispatchers and loop.time() < deadline:
            await asyncio.wait_for(link.dispatchers.changed.wait(), max(0.01, deadline - loop.time()))
        for video in watched:
            link.subscribe(video)
        synced = await asyncio.gather(*(link.wait_synced(v, 10.0) for v in watched))
        settle_gc()  # as a frontend process does once it serves
        print(json.dumps({"ready": True, "synced": sum(synced), "watched": len(watched)}), flush=True)
        start_at = float(await loop.run_in_executor(None, sys.stdin.readline))

        acked: dict[str, int] = {}
        errors: dict[str, int] = {}
        latencies: list[float] = []
        inflight: set[asyncio.Task] = set()
        window = asyncio.Semaphore(args.window)
        result = {"published": 0, "acked": 0, "first_ack": 0.0, "last_ack": 0.0}

        async def publish(events: list[dict]) -> None:
            sent = time.time()
            try:
                replies = await link.publish_many(events)
            finally:
                window.release()
            now = time.time()
            latencies.append((now - sent) * 1000.0)
            for event, reply in zip(events, replies):
                if "error" in reply:
                    code = reply["error"].get("code", "?")
                    errors[code] = errors.get(code, 0) + 1
                else:
                    acked[event["video"]] = acked.get(event["video"], 0) + 1
                    result["acked"] += 1
            result["first_ack"] = result["first_ack"] or now
            result["last_ack"] = now

        await asyncio.sleep(max(0.0, start_at - time.time()))
        cpu0 = time.process_time()
        t0 = loop.time()
        interval = args.batch / args.rate
        n = 0
        tick = 0
        while loop.time() - t0 < args.duration:
            due = t0 + tick * interval
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            await window.acquire()
            tick += 1
            events = []
            ts = time.time() * 1000.0
            for _ in range(args.batch):
                video = videos[n % len(videos)]
                events.append(P.make_event(video, P.KIND_LIKE, "bench", None,
                                           event_id=f"{args.index:02d}b{n:014x}", ts=ts))
                n += 1
            result["published"] += len(events)
            task = asyncio.ensure_future(publish(events))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        publish_end = time.time()
        if inflight:
            await asyncio.wait(inflight, timeout=10)
        cpu = time.process_time() - cpu0  # publishing and receiving, until the last ack
        settle_deadline = time.time() + SETTLE_MAX
        while time.time() < settle_deadline and time.time() - max(counts["last_delivery"], publish_end) < SETTLE_QUIET:
            await asyncio.sleep(0.1)
        latencies.sort()
        print(json.dumps({
            **result, "errors": errors, "acked_by_video": acked, "watched_videos": watched, "cpu": cpu, "received_by_video": received,
            "received": sum(received.values()), "duplicates": counts["duplicates"],
            "last_delivery": counts["last_delivery"], "publish_end": publish_end,
            "latencies": latencies[:: max(1, len(latencies) // 2000)],
            "link": {k: link.stats.get(k, 0) for k in ("gaps", "gaps_repaired", "resets", "publish_retries",
                                                       "publish_requests", "malformed")},
        }), flush=True)
    finally:
        await link.stop()
        await kv.close()
        ctx.destroy(linger=0)


# --- the parent: dispatchers, emulators, the table ---------------------------------------------

def export_tree(ref: str, into: str) -> str:
    """The source tree of ``ref`` (``git archive``: no worktree, nothing changed in the repo)."""
    os.makedirs(into, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


def start_dispatcher(tree: str, name: str, kv_path: str, log_dir: str) -> NodeProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEMESH_")}
    env.update({"LIVEMESH_KV_BACKEND": "embedded", "LIVEMESH_KV_PATH": kv_path, "PYTHONUNBUFFERED": "1"})
    args = ["--set", f"node.name={name}", "--set", "dispatcher.host=127.0.0.1"]
    node = NodeProcess("dispatcher", name, args, env, os.path.join(log_dir, f"{name}.log"))
    with open(node.log_path, "ab") as log:
        # python -m runs the package found in the working directory: the tree under test
        node.proc = subprocess.Popen([sys.executable, "-m", "dispatcher", *args], cwd=tree, env=env,
                                     stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    return node


def start_emulator(args, tree: str, index: int, kv_path: str, log_dir: str, node: NodeProcess) -> subprocess.Popen:
    """Emulated frontend ``index``: this file of ``tree``, run from there."""
    cmd = [sys.executable, os.path.join(tree, "tests", "bench", os.path.basename(__file__)), "--emulate", "--index", str(index), "--feeder", args.feeder,
           "--kv-path", kv_path, "--router", node.info["router"], "--pub", node.info["pub"], "--frontends", str(args.frontends), "--videos", str(args.videos),
           "--rate", str(args.rate / args.frontends), "--duration", str(args.duration),
           "--batch", str(args.batch), "--window", str(args.window), "--watched", str(args.watched),
           "--dispatchers", str(2 if args.backup else 1)] + (["--hot"] if args.hot else [])
    with open(os.path.join(log_dir, f"emulator-{index}.log"), "ab") as log:
        return subprocess.Popen(cmd, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)


def health(node: NodeProcess) -> dict:
    with urllib.request.urlopen(node.url + "/healthz", timeout=5) as resp:
        return json.loads(resp.read())


def read_json_line(proc: subprocess.Popen, timeout: float) -> dict:
    """The next JSON line a child bench process prints, within ``timeout`` seconds."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise RuntimeError(f"child {proc.pid}: no report within {timeout}s")
        line = proc.stdout.readline()
    finally:
        sel.close()
    if not line:
        raise RuntimeError(f"child {proc.pid} exited with {proc.wait(5)}")
    return json.loads(line)


def run_variant(args, label: str, tree: str, tmp: str) -> dict:
    log_dir = os.path.join(tmp, label)
    kv_path = os.path.join(log_dir, "kv.db")
    os.makedirs(log_dir, exist_ok=True)
    nodes: list[NodeProcess] = []
    emulators: list[subprocess.Popen] = []
    try:
        for name in DISPATCHERS[: 2 if args.backup else 1]:  # one by one: both create the KV file
            nodes.append(start_dispatcher(tree, name, kv_path, log_dir))
            nodes[-1].wait_ready()
        if args.feeder == "light":  # no MeshLink waits for the dispatcher set: the backup must be known
            asyncio.run(wait_until(lambda: len(health(nodes[0])["dispatchers"]) == len(nodes), 20,
                                   what="the dispatchers to see each other"))
        emulators = [start_emulator(args, tree, i, kv_path, log_dir, nodes[0]) for i in range(args.frontends)]
        ready = [read_json_line(p, 40) for p in emulators]
        start_at = time.time() + 0.5
        cpu0 = [cpu_seconds(n.proc.pid) for n in nodes]
        for p in emulators:
            p.stdin.write(f"{start_at}\n".encode())
            p.stdin.flush()
        reports = [read_json_line(p, args.duration + SETTLE_MAX + 30) for p in emulators]
        cpu = [cpu_seconds(n.proc.pid) - c for n, c in zip(nodes, cpu0)]
        stats = health(nodes[0]).get("stats", {})
    finally:
        for p in emulators:
            if p.poll() is None:
                p.terminate()
        for p in emulators:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for node in nodes:
            node.close()
    watched = {v for r in reports for v in r["watched_videos"]}
    acked_by_video: dict[str, int] = {}
    received_by_video: dict[str, int] = {}
    for r in reports:
        for v, c in r["acked_by_video"].items():
            acked_by_video[v] = acked_by_video.get(v, 0) + c
        for v, c in r["received_by_video"].items():
            received_by_video[v] = received_by_video.get(v, 0) + c
    acked = sum(r["acked"] for r in reports)
    received = sum(r["received"] for r in reports)
    ack_span = max(r["last_ack"] for r in reports) - start_at
    last_delivery = max(r["last_delivery"] for r in reports) or start_at
    latencies = sorted(x for r in reports for x in r["latencies"])
    errors: dict[str, int] = {}
    for r in reports:
        for code, c in r["errors"].items():
            errors[code] = errors.get(code, 0) + c
    link = {k: sum(r["link"][k] for r in reports) for k in reports[0]["link"]}
    wall = max(r["publish_end"] for r in reports) - start_at
    return {
        "label": label, "published": sum(r["published"] for r in reports), "acked": acked,
        "errors": errors, "acked_per_s": acked / ack_span if ack_span > 0 else 0.0,
        "received": received, "received_per_s": received / max(1e-9, last_delivery - start_at),
        "latency_p50_ms": percentile(latencies, 0.50), "latency_p99_ms": percentile(latencies, 0.99),
        "lost": sum(max(0, c - received_by_video.get(v, 0)) for v, c in acked_by_video.items() if v in watched),
        "duplicates": sum(r["duplicates"] for r in reports),
        "gaps_repaired": link["gaps_repaired"], "resets": link["resets"],
        "publish_retries": link["publish_retries"], "publish_requests": link["publish_requests"],
        "synced": sum(r["synced"] for r in ready), "watched": sum(r["watched"] for r in ready),
        "dispatcher_cores": cpu[0] / max(1e-9, ack_span),
        "frontend_cores": sum(r["cpu"] for r in reports) / max(1e-9, ack_span),
        "backup_cores": cpu[1] / max(1e-9, ack_span) if len(cpu) > 1 else None,
        "publish_seconds": wall,
        "events_per_burst": stats.get("events_in", 0) / max(1, stats.get("publish_bursts", 0)),
        "events_per_fanout_msg": stats.get("events_in", 0) / max(1, stats.get("fanout_msgs", 0)),
    }


ROWS = [
    ("likes acknowledged", lambda r: f"{r['acked']:,} of {r['published']:,}"),
    ("acknowledged likes/s", lambda r: f"{r['acked_per_s']:,.0f}"),
    ("  each round", lambda r: " ".join(f"{x / 1000:.1f}k" for x in r.get("acked_per_s_runs", ())) or "-"),
    ("fan-out events/s received", lambda r: f"{r['received_per_s']:,.0f}"),
    ("ack latency p50 / p99 ms", lambda r: f"{r['latency_p50_ms']:.1f} / {r['latency_p99_ms']:.1f}"),
    ("lost / duplicated", lambda r: f"{r['lost']} / {r['duplicates']}"),
    ("gaps repaired / resets", lambda r: f"{r['gaps_repaired']} / {r['resets']}"),
    ("publish requests / retries", lambda r: f"{r['publish_requests']:,} / {r['publish_retries']}"),
    ("events per burst / fan-out msg", lambda r: f"{r['events_per_burst']:.0f} / {r['events_per_fanout_msg']:.1f}"),
    ("dispatcher CPU (cores)", lambda r: f"{r['dispatcher_cores']:.2f}"),
    ("dispatcher CPU per like (us)", lambda r: f"{1e6 * r['dispatcher_cores'] / max(r['acked_per_s'], 1e-9):.1f}"),
    ("backup CPU (cores)", lambda r: "-" if r["backup_cores"] is None else f"{r['backup_cores']:.2f}"),
    ("emulated frontends CPU (cores)", lambda r: f"{r['frontend_cores']:.2f}"),
    ("errors", lambda r: ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "-"),
]


def print_table(results: list[dict]) -> None:
    width = max(len(r["label"]) + 2 for r in results)
    width = max(width, *(len(cell(r)) + 3 for _, cell in ROWS for r in results))
    print(f"{'':28}" + "".join(f"{r['label']:>{width}}" for r in results))
    for name, cell in ROWS:
        print(f"{name:28}" + "".join(f"{cell(r):>{width}}" for r in results))
    if len(results) == 2 and results[0]["acked_per_s"]:
        a, b = results
        print(f"ratio {b['label']} / {a['label']}: {b['acked_per_s'] / a['acked_per_s']:.2f}x acknowledged likes/s, "
              f"{(b['acked_per_s'] / max(b['dispatcher_cores'], 1e-9)) / max(1e-9, a['acked_per_s'] / max(a['dispatcher_cores'], 1e-9)):.2f}x "
              f"likes per dispatcher CPU-second")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frontends", type=int, default=2, help="emulated frontend processes")
    ap.add_argument("--videos", type=int, default=1000)
    ap.add_argument("--hot", action="store_true", help="every like on one video")
    ap.add_argument("--rate", type=float, default=150000.0, help="likes/s offered, all frontends together")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of publishing (at most 60)")
    ap.add_argument("--batch", type=int, default=100, help="events per publish call of a frontend")
    ap.add_argument("--window", type=int, default=32, help="publish calls in flight per frontend")
    ap.add_argument("--watched", type=float, default=1.0,
                    help="share of the videos the frontends watch (the rest reach no subscriber)")
    ap.add_argument("--backup", action="store_true", help="a second dispatcher: the videos' backup")
    ap.add_argument("--baseline-ref", default="", help="git ref of the baseline dispatcher (default: merge-base with main)")
    ap.add_argument("--no-baseline", action="store_true", help="only this tree's dispatcher")
    ap.add_argument("--rounds", type=int, default=1, help="runs per variant, alternating; the median is shown")
    ap.add_argument("--feeder", choices=("link", "light"), default="link",
                    help="link: emulated frontends run MeshLink (realistic); light: pre-built requests, "
                         "plain decode of the fan-out (what the dispatcher alone can do)")
    ap.add_argument("--json", action="store_true")
    # child mode
    ap.add_argument("--emulate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--kv-path", help=argparse.SUPPRESS)
    ap.add_argument("--dispatchers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--router", help=argparse.SUPPRESS)
    ap.add_argument("--pub", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.emulate:
        if args.feeder == "light":
            emulate_light(args)
        else:
            asyncio.run(emulate(args))
        return
    if not (0 < args.duration <= 60 and 0 < args.rate <= 1e6 and 1 <= args.frontends <= 16
            and 1 <= args.batch <= 10000 and 1 <= args.videos <= 100000 and 0 < args.watched <= 1 and 1 <= args.rounds <= 9):
        ap.error("bounds: duration 0..60 s, rate <= 1e6/s, 1..16 frontends, batch 1..10000, "
                 "videos 1..100000, watched 0..1, rounds 1..9")
    args.baseline_ref = args.baseline_ref or subprocess.run(
        ["git", "-C", ROOT, "merge-base", "HEAD", "main"], check=True, capture_output=True, text=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="livemesh-bench-disp-")
    variants = [] if args.no_baseline else [
        ("baseline", export_tree(args.baseline_ref, os.path.join(tmp, "baseline-tree")))]
    variants.append(("optimised", ROOT))
    runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
    try:
        for round_no in range(args.rounds):  # variants alternate: load from elsewhere hits both
            for label, tree in variants:
                print(f"== round {round_no + 1}/{args.rounds}, {label}"
                      f"{' ' + args.baseline_ref if label == 'baseline' else ''}: {args.frontends} frontends, "
                      f"{1 if args.hot else args.videos} video(s), {args.rate:,.0f} likes/s offered for "
                      f"{args.duration:g} s in batches of {args.batch}{', with a backup' if args.backup else ''}, "
                      f"{args.feeder} feeder, "
                      f"{args.watched:.0%} of the videos watched", file=sys.stderr, flush=True)
                runs[label].append(run_variant(args, label, tree, os.path.join(tmp, f"r{round_no}")))
    finally:
        shutil.rmtree(os.path.join(tmp, "baseline-tree"), ignore_errors=True)
    # per variant, the run with the median acknowledged likes/s
    results = [sorted(r, key=lambda x: x["acked_per_s"])[len(r) // 2] for r in runs.values()]
    if args.rounds > 1:
        for r, label in zip(results, runs):
            r["label"] = f"{label} (median of {args.rounds})"
            r["acked_per_s_runs"] = [round(x["acked_per_s"]) for x in runs[label]]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    print(f"logs: {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
