"""``meshctl bench``: a bounded load generator for livemesh frontends (or any server with the
same SSE and publish API, such as the naive baseline in ``tests/bench/naive_broadcaster.py``).

Theory of operation.  ``clients`` child processes (past the per-process open-file limit) open
``connections`` SSE streams, spread over source addresses 127.0.0.1..127.0.0.K (past the
ephemeral-port limit of one address pair) and over the target URLs, on ``videos`` videos (or
all on one hot video).  Once all are open, the driver publishes ``rate`` likes/s through the
HTTP API for ``duration`` seconds, on keep-alive connections with one request in flight each
(a new TCP connection per like costs the server more than the like; the pool grows while likes
wait for a connection, ``PUBLISH_CONNECTIONS``; raw sockets read by ``add_reader`` callbacks,
``LikePoster``: the load generator shares the cores it measures), and counts the acknowledged
ones per video.
Readers stay cheap so they can keep up: each stream is a plain ``add_reader`` callback on a
raw socket (no coroutine or StreamReader per read; ``recv`` asks for 64 KiB, below glibc's
mmap threshold: ``RECV_BYTES``), they count ``event: like`` lines and SSE ids in raw bytes
(C-speed ``bytes.count`` and a regex, no per-event JSON or Python loop: a read whose first and
last ids span exactly its number of ids, after the stream's last id, is one contiguous run),
check per stream that ids strictly increase (a repeat is a duplicate), and parse the server
timestamp of the oldest, middle and newest like of each read (of its one event, when it holds
one) for the publish-to-viewer latency, kept as a uniform sample of the whole run (``sample``;
``ts`` is stamped by the accepting frontend; clients and servers share this machine's clock).  Lost = acknowledged events of a stream's video minus
those it received.

Aggregated likes (``event: likes``, ``frontend.aggregate_likes_above``) count as ``count``
deliveries, and the bench checks that claim: the bench publishes only likes, so a run's
``first_id`` .. ``last_id`` are consecutive positions of one chain and ``count`` must equal
their span (else ``aggregate_mismatch``); the run must start after the stream's last id (else
its overlap counts as duplicates).  Latency of an aggregated event is taken from its ``ts``,
the run's oldest like: under load each sample is the worst like of its write, so percentiles
are an upper bound on the per-like ones.  A read holding exactly one ``likes`` event (the
common read under load) is parsed in one match (``ONE_RUN_RE``).  ``bytes_received`` (body
bytes) compares encodings.  Progress is printed every second; a table (or ``--json``) at the
end.

Layout: this module holds the plan, the client processes and their stream readers, and the
driver (``run``); ``publisher`` the publishing connections; ``report`` the result and its
table; ``mesh.tools.meshctl.bench`` the command line.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import random
import re
import resource
import socket
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from mesh.core.sse import recv_nowait
from mesh.tools.bench import report
from mesh.tools.bench.poster import (PUBLISH_BACKLOG, PUBLISH_CONNECTIONS, PUBLISH_GROW_EVERY,
                                     PUBLISH_LATENCY_ALLOWED, PUBLISH_TIMEOUT, LikePoster)
from mesh.tools.probes import health_fields

ID_RE = re.compile(rb"(?:^|\n)id: (\d+):(\d+)\n")
TS_RE = re.compile(rb'"(?:kind":"like"|first_id").*?"ts":([0-9.]+)')
#: an aggregated like run: count, first id, last id (``mesh.core.sse.encode_likes``)
LIKES_RE = re.compile(rb'\nevent: likes\ndata: \{"video":"[^"]*","count":(\d+),.*?'
                      rb'"first_id":"(\d+):(\d+)","last_id":"(\d+):(\d+)"')
#: a read holding exactly one ``likes`` event (the common read under load): its position,
#: count, first and last id, and ts, in one match
ONE_RUN_RE = re.compile(rb'id: (\d+):(\d+)\nevent: likes\ndata: \{"video":"[^"]*","count":(\d+),.*?'
                        rb'"first_id":"(\d+):(\d+)","last_id":"(\d+):(\d+)","ts":([0-9.]+)\}\n\n')
#: a like's and a likes event's header line, and a likes event's id line
LIKE_MARK = b"\nevent: like\n"
LIKES_MARK = b"\nevent: likes\n"
ID_LINE_RE = re.compile(rb"id: (\d+):(\d+)$")
#: samples kept per client process (latencies, heartbeat gaps): a uniform sample of the run's
#: (``sample``), not its first seconds -- a fan-out run reaches 200 k samples within ~3 s
MAX_LATENCY_SAMPLES = 200000
#: bytes asked of one ``recv``: CPython allocates that much for each call before shrinking it,
#: and past glibc's mmap threshold (128 KiB) that can be an mmap and an munmap per read: 256 KiB
#: cost 28.7 us of CPU per read against 9.1 us for 64 KiB (``tests/bench/bench_reader.py``)
RECV_BYTES = 65536
HEARTBEAT = b": hb\n"


@dataclass
class Plan:
    urls: list[str]
    connections: int = 1000
    videos: int = 10
    hot: bool = False
    rate: float = 100.0
    duration: float = 10.0
    clients: int = 0          # 0: one per 15,000 connections
    sources: int = 0          # 0: one 127.0.0.x per 20,000 connections
    open_rate: float = 2000.0
    settle: float = 2.0
    client_nice: int = 0      # niceness of the client processes (the load generator)

    def video(self, i: int) -> str:
        return "bench-0" if self.hot else f"bench-{i % self.videos}"


@dataclass
class ClientResult:
    connected: int = 0
    failed: int = 0
    why_failed: dict = field(default_factory=dict)  # reason -> count
    held_by_url: dict = field(default_factory=dict)  # url -> streams open
    received: dict = field(default_factory=dict)   # video -> list of per-stream counts
    duplicates: int = 0
    reordered: int = 0
    aggregated: int = 0            # ``likes`` events received
    aggregated_likes: int = 0      # the likes they stand for
    aggregate_mismatch: int = 0    # ``likes`` events whose count is not their id span
    bytes_received: int = 0
    latencies: list = field(default_factory=list)  # ms, a uniform sample (``sample``)
    latency_seen: int = 0          # latencies observed, sampled or not
    heartbeats: int = 0
    heartbeat_gaps: list = field(default_factory=list)  # s between a stream's heartbeats (sampled)
    heartbeat_gap_seen: int = 0
    measure_from: float = math.inf  # monotonic time publishing began (heartbeat gaps after it)
    cpu_s: float = 0.0             # this client process's CPU from then until the end


def sample(kept: list, seen: int, value: float, cap: int | None = None) -> int:
    """Reservoir sampling (Vitter's algorithm R): ``kept`` stays a uniform sample of at most
    ``cap`` (``MAX_LATENCY_SAMPLES``) of the ``seen + 1`` values observed so far; returns the
    new ``seen``."""
    if len(kept) < (MAX_LATENCY_SAMPLES if cap is None else cap):
        kept.append(value)
    else:
        j = random.randrange(seen + 1)
        if j < len(kept):
            kept[j] = value
    return seen + 1


def merge_samples(parts: list[tuple[list, int]]) -> list:
    """One uniform sample from several (``kept``, ``seen``) reservoirs: each is thinned so that
    a kept value stands for as many observed ones in every part."""
    weight = max((seen / len(kept) for kept, seen in parts if kept), default=1.0)
    out: list = []
    for kept, seen in parts:
        n = min(len(kept), round(seen / weight))
        out += kept if n == len(kept) else random.sample(kept, n)
    return out


# --- client processes ---------------------------------------------------------------------

def _client_main(idx: int, plan: Plan, indices: list[int], progress, stop, measuring, results) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if plan.client_nice:  # the load generator yields the cores to the nodes it measures
        os.nice(plan.client_nice)
    res = asyncio.run(_client(idx, plan, indices, progress, stop, measuring))
    results.put((idx, asdict(res)))


#: Linux: choose the source port at connect() (per destination), not at bind(): thousands of
#: streams from one 127.0.0.x to several frontends, and runs back to back despite TIME_WAIT
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def _open_stream(loop, host: str, port: int, source: str, request: bytes) -> tuple[socket.socket, bytes]:
    """A connected non-blocking socket whose SSE response head (200) has been read, and the
    body bytes that came with it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(sock, request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise ConnectionError("closed before the response head")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        return sock, rest
    except BaseException:
        sock.close()
        raise


class _Reader:
    """One stream's reader: a plain ``add_reader`` callback (no coroutine per read), so one
    client process keeps up with thousands of streams."""

    __slots__ = ("sock", "res", "video", "count", "last", "carry", "last_hb")

    def __init__(self, sock: socket.socket, res: ClientResult, video: str):
        self.sock, self.res, self.video = sock, res, video
        self.count, self.last, self.carry = 0, (0, 0), b""
        self.last_hb = 0.0

    def on_readable(self) -> None:
        data = recv_nowait(self.sock, RECV_BYTES)
        if data == b"":
            self.close()
        elif data:
            self.feed(data)

    def feed(self, data: bytes) -> None:
        self.res.bytes_received += len(data)
        data = self.carry + data
        end = data.rfind(b"\n\n")
        if end < 0:
            self.carry = data
            return
        block, self.carry = data[:end + 2], data[end + 2:]
        res = self.res
        run = ONE_RUN_RE.fullmatch(block)
        if run is not None:  # the common read under load, all in one match
            pe, ps, count, fe, fs, le, ls = map(int, run.group(1, 2, 3, 4, 5, 6, 7))
            self._run((pe, ps), count, (fe, fs), (le, ls))
            res.latency_seen = sample(res.latencies, res.latency_seen, time.time() * 1000.0 - float(run.group(8)))
            return
        if HEARTBEAT in block:
            now = time.monotonic()
            res.heartbeats += 1
            if self.last_hb >= res.measure_from:
                res.heartbeat_gap_seen = sample(res.heartbeat_gaps, res.heartbeat_gap_seen, now - self.last_hb)
            self.last_hb = now
        n = block.count(LIKE_MARK)
        aggregated = LIKES_MARK in block
        if not n and not aggregated:
            return
        if aggregated:
            self._feed_aggregated(block)
        else:
            self._feed_likes(block, n)
        now = time.time() * 1000.0
        # one event (a like at light load, a run of likes under load): one sample
        if n + aggregated == 1 and block.count(b"\ndata: ") == 1:
            m = TS_RE.search(block)
            if m:
                res.latency_seen = sample(res.latencies, res.latency_seen, now - float(m.group(1)))
            return
        newest = max(block.rfind(b'"kind":"like"'), block.rfind(b'"first_id"'))
        sampled = set()
        for start in (0, len(block) // 2, newest):  # oldest, middle, newest; each once
            m = TS_RE.search(block, max(0, start))
            if m and m.start() not in sampled:
                sampled.add(m.start())
                res.latency_seen = sample(res.latencies, res.latency_seen, now - float(m.group(1)))

    def _feed_likes(self, block: bytes, n: int) -> None:
        """A block of single ``like`` events: count them, check their ids."""
        self.count += n
        # the common case in O(1) Python: the first and the last id, and the number of ids
        # counted in C, make one contiguous run after the last id seen
        m_first = ID_RE.search(block)
        if m_first is None:
            return
        m_last = ID_RE.search(block, max(0, block.rfind(b"\nid: ")))
        first = (int(m_first.group(1)), int(m_first.group(2)))
        last = (int(m_last.group(1)), int(m_last.group(2)))
        n_ids = block.count(b"\nid: ") + block.startswith(b"id: ")
        if not (first > self.last and first[0] == last[0] and last[1] - first[1] + 1 == n_ids):
            self._check_order(ID_RE.findall(block))  # not one contiguous run: look closer
        self.last = last

    def _feed_aggregated(self, block: bytes) -> None:
        """A block with ``likes`` events: each counts as its ``count``, its claimed range is
        checked; the stretches of single likes between them go through ``_feed_likes`` (O(1)
        Python each), so the cost is per ``likes`` event, not per event.  Events are found
        with ``bytes.find`` (a regex starting ``(?:^|\n)`` tries every position)."""
        res = self.res
        done = 0  # the block up to here is accounted for
        mark = block.find(LIKES_MARK)
        while mark >= 0:
            start = block.rfind(b"\n", 0, mark) + 1  # the likes event's id line
            if start > done:
                singles = block[done:start]
                self._feed_likes(singles, singles.count(LIKE_MARK))
            end = block.find(b"\n\n", mark)
            done = len(block) if end < 0 else end + 2
            m, run = ID_LINE_RE.match(block, start, mark), LIKES_RE.match(block, mark)
            mark = block.find(LIKES_MARK, done)
            if m is None or run is None:  # no parsable id or run: claims nothing checkable
                res.aggregate_mismatch += 1
                continue
            self._run((int(m.group(1)), int(m.group(2))), int(run.group(1)),
                      (int(run.group(2)), int(run.group(3))), (int(run.group(4)), int(run.group(5))))
        if done < len(block):
            singles = block[done:]
            self._feed_likes(singles, singles.count(LIKE_MARK))

    def _run(self, pos: tuple[int, int], count: int, first: tuple[int, int], last_id: tuple[int, int]) -> None:
        """One ``likes`` event at chain position ``pos``, standing for ``count`` likes
        ``first`` .. ``last_id``: counted, its claim checked, its overlap with what the stream
        had (a duplicate) or a step back (reordered) noted."""
        res, last = self.res, self.last
        res.aggregated += 1
        res.aggregated_likes += count
        self.count += count
        self.last = pos
        if first[0] != pos[0] or pos[1] - first[1] + 1 != count or last_id != pos:
            res.aggregate_mismatch += 1
        elif first <= last and first[0] == last[0]:
            res.duplicates += min(count, last[1] - first[1] + 1)
            return
        if first <= last:
            if first == last:
                res.duplicates += 1
            else:
                res.reordered += 1

    def _check_order(self, ids: list[tuple[bytes, bytes]]) -> None:
        last = self.last
        for epoch, seq in ids:
            pos = (int(epoch), int(seq))
            if pos <= last:
                if pos == last:
                    self.res.duplicates += 1
                else:
                    self.res.reordered += 1
            last = pos

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


async def _client(idx: int, plan: Plan, indices: list[int], progress, stop, measuring) -> ClientResult:
    res = ClientResult()
    streams: list[_Reader] = []
    sources = plan.sources or max(1, math.ceil(plan.connections / 20000))
    loop = asyncio.get_running_loop()

    async def one(i: int) -> None:
        url = urlsplit(plan.urls[i % len(plan.urls)])
        video = plan.video(i)
        request = f"GET /v1/videos/{video}/events HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode()
        try:
            sock, rest = await asyncio.wait_for(
                _open_stream(loop, url.hostname, url.port, f"127.0.0.{1 + i % sources}", request), 30)
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            res.failed += 1
            why = str(exc) if isinstance(exc, ConnectionError) and str(exc).startswith("HTTP") else type(exc).__name__
            res.why_failed[why] = res.why_failed.get(why, 0) + 1
            return
        res.connected += 1
        res.held_by_url[url.geturl()] = res.held_by_url.get(url.geturl(), 0) + 1
        reader = _Reader(sock, res, video)
        streams.append(reader)
        reader.feed(rest)
        loop.add_reader(sock.fileno(), reader.on_readable)

    tasks = []
    per_sec = max(1.0, plan.open_rate / max(1, plan.clients))
    t0 = loop.time()
    for k, i in enumerate(indices):
        delay = t0 + k / per_sec - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
    last_report = 0.0
    while not stop.is_set():
        if res.measure_from == math.inf and measuring.is_set():
            res.measure_from = time.monotonic()
            res.cpu_s = -time.process_time()
        if loop.time() - last_report >= 0.5:
            progress.put((idx, res.connected, res.failed, sum(r.count for r in streams)))
            last_report = loop.time()
        await asyncio.sleep(0.1)
    if res.measure_from != math.inf:
        res.cpu_s += time.process_time()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for reader in streams:
        reader.close()
        res.received.setdefault(reader.video, []).append(reader.count)
    return res


# --- the driver ---------------------------------------------------------------------------

async def _publish(plan: Plan, echo) -> tuple[dict[str, int], int, int]:
    """``rate`` likes/s for ``duration`` s through the HTTP API, on keep-alive connections
    (``PUBLISH_CONNECTIONS``; a new TCP connection per like would cost the server and the
    bench more than the like itself; ``LikePoster``).  Likes are offered on schedule until
    ``duration`` + 5 s (the server cannot keep up: the rest is not published); a like unanswered
    within ``PUBLISH_TIMEOUT`` is an error, and what is still waiting or unanswered
    ``PUBLISH_TIMEOUT`` + 5 s after the last one was offered is dropped uncounted (neither
    acknowledged nor expected)."""
    acked: dict[str, int] = {}
    total = int(plan.rate * plan.duration)
    loop = asyncio.get_running_loop()
    lo, hi = PUBLISH_CONNECTIONS
    per_url = max(lo, min(hi, math.ceil(plan.rate * PUBLISH_LATENCY_ALLOWED / len(plan.urls))))
    backlog = max(1, plan.rate * PUBLISH_BACKLOG / len(plan.urls))  # likes waiting: one more connection
    pubs = {u: LikePoster(u, plan, acked) for u in plan.urls}
    try:
        for pub in pubs.values():
            for _ in range(per_url):
                pub.open()
        t0 = expired = loop.time()
        for k in range(total):
            delay = t0 + k / plan.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            if now - t0 > plan.duration + 5:
                break  # bounded in time even when the server cannot keep up
            pub = pubs[plan.urls[k % len(plan.urls)]]
            pub.offer(k)
            if len(pub.waiting) > backlog and pub.size < hi and now >= pub.grown + PUBLISH_GROW_EVERY:
                pub.grown = now
                pub.open()
            if now - expired >= 0.5:
                expired = now
                for p in pubs.values():
                    p.expire(time.monotonic())
        end = loop.time() + PUBLISH_TIMEOUT + 5
        while any(p.pending() for p in pubs.values()) and loop.time() < end:
            await asyncio.sleep(0.01)
            for p in pubs.values():
                p.expire(time.monotonic())
    finally:
        for pub in pubs.values():
            pub.close()
    return acked, sum(p.errors for p in pubs.values()), sum(p.opened for p in pubs.values())


async def run(plan: Plan, echo=print, during=None) -> dict:
    """One bench run; ``during`` (an async callable) runs beside the publishing, e.g. to
    disturb the servers while the latency is being measured."""
    if not 1 <= plan.connections <= 200000 or not 0 < plan.duration <= 600 or not 0 < plan.rate <= 100000:
        raise ValueError("bench bounds: 1..200000 connections, 0..600 s, 0..100000 likes/s")
    plan.clients = plan.clients or max(1, math.ceil(plan.connections / 15000))
    ctx = mp.get_context("spawn")
    progress, results, stop, measuring = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    rss_before = await health_fields(plan.urls, "rss_kb")
    shares = [list(range(c, plan.connections, plan.clients)) for c in range(plan.clients)]
    procs = [ctx.Process(target=_client_main, args=(c, plan, shares[c], progress, stop, measuring, results), daemon=True)
             for c in range(plan.clients)]
    for p in procs:
        p.start()
    state: dict[int, tuple] = {}
    loop = asyncio.get_running_loop()

    def drain() -> tuple[int, int, int]:
        while not progress.empty():
            msg = progress.get_nowait()
            state[msg[0]] = msg[1:]
        return tuple(sum(v[i] for v in state.values()) for i in range(3)) if state else (0, 0, 0)

    try:
        deadline = loop.time() + plan.connections / plan.open_rate + 60
        while True:
            connected, failed, _ = drain()
            if connected + failed >= plan.connections:
                break
            if loop.time() > deadline:
                echo(f"bench: only {connected} of {plan.connections} streams opened in time")
                break
            await asyncio.sleep(0.5)
            echo(f"bench: opening streams: {connected} open, {failed} failed")
        await asyncio.sleep(1.0)  # subscriptions settle (the server holds headers until they do)
        rss_after = await health_fields(plan.urls, "rss_kb")
        cpu_before = await health_fields(plan.urls, "cpu_s")
        echo(f"bench: {connected} streams open; publishing {plan.rate:g} likes/s for {plan.duration:g} s")
        measuring.set()  # heartbeat gaps count from here: not while streams are being opened
        pub = asyncio.ensure_future(_publish(plan, echo))
        side = asyncio.ensure_future(during()) if during is not None else None
        t0 = loop.time()
        last_events = 0
        last_report = t0
        while not pub.done():  # progress every second; the publishing's end when it comes
            await asyncio.wait({pub}, timeout=max(0.0, last_report + 1.0 - loop.time()))
            if loop.time() - last_report >= 1.0:
                _, _, events = drain()
                echo(f"bench: {loop.time() - t0:5.1f} s  {events - last_events:>10,} deliveries/s")
                last_events, last_report = events, loop.time()
        publish_s = loop.time() - t0
        acked, errors, publish_connections = pub.result()
        if side is not None:
            await side
        settle_deadline = loop.time() + plan.settle + 10
        expected = sum(acked.get(plan.video(i), 0) for i in range(plan.connections) if True)
        while loop.time() < settle_deadline:
            _, _, events = drain()
            if events >= expected * (connected / max(1, plan.connections)):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(plan.settle / 4)
        cpu_after = await health_fields(plan.urls, "cpu_s")
    finally:
        stop.set()
    merged = merge_results([results.get(timeout=60)[1] for _ in procs])
    for p in procs:
        p.join(10)
    return report.summary(asdict(plan), merged, acked, errors, publish_connections, publish_s,
                          rss_before, rss_after, cpu_before, cpu_after)


def merge_results(parts: list[dict]) -> ClientResult:
    """The client processes' results (``asdict(ClientResult)`` each) as one: counts summed,
    samples merged into one uniform sample (``merge_samples``)."""
    merged = ClientResult()
    latency_parts, gap_parts = [], []
    for r in parts:
        merged.connected += r["connected"]
        merged.failed += r["failed"]
        for why, n in r["why_failed"].items():
            merged.why_failed[why] = merged.why_failed.get(why, 0) + n
        for u, n in r["held_by_url"].items():
            merged.held_by_url[u] = merged.held_by_url.get(u, 0) + n
        merged.duplicates += r["duplicates"]
        merged.reordered += r["reordered"]
        merged.aggregated += r["aggregated"]
        merged.aggregated_likes += r["aggregated_likes"]
        merged.aggregate_mismatch += r["aggregate_mismatch"]
        merged.bytes_received += r["bytes_received"]
        latency_parts.append((r["latencies"], r["latency_seen"]))
        merged.heartbeats += r["heartbeats"]
        gap_parts.append((r["heartbeat_gaps"], r["heartbeat_gap_seen"]))
        merged.cpu_s += r["cpu_s"]
        for video, counts in r["received"].items():
            merged.received.setdefault(video, []).extend(counts)
    merged.latencies, merged.heartbeat_gaps = merge_samples(latency_parts), merge_samples(gap_parts)
    merged.latency_seen = sum(seen for _, seen in latency_parts)
    merged.heartbeat_gap_seen = sum(seen for _, seen in gap_parts)
    return merged
