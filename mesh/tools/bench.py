"""``meshctl bench``: a bounded load generator for livemesh frontends (or any server with the
same SSE and publish API, such as the naive baseline in ``tests/bench/naive_broadcaster.py``).

Theory of operation.  ``clients`` child processes (past the per-process open-file limit) open
``connections`` SSE streams, spread over source addresses 127.0.0.1..127.0.0.K (past the
ephemeral-port limit of one address pair) and over the target URLs, on ``videos`` videos (or
all on one hot video).  Once all are open, the driver publishes ``rate`` likes/s through the
HTTP API for ``duration`` seconds, on keep-alive connections with one request in flight each
(a new TCP connection per like costs the server more than the like; the pool grows while likes
wait for a connection, ``PUBLISH_CONNECTIONS``; raw sockets read by ``add_reader`` callbacks,
``_Publisher``: the load generator shares the cores it measures), and counts the acknowledged
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
"""

from __future__ import annotations

import asyncio
import collections
import json
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

async def _get_json(url: str) -> dict | None:
    from tornado.httpclient import AsyncHTTPClient
    try:
        resp = await AsyncHTTPClient().fetch(url, request_timeout=5)
        return json.loads(resp.body)
    except Exception:  # noqa: BLE001 - a node that does not answer is reported as such
        return None


async def _health_field(urls: list[str], key: str) -> dict[str, float | None]:
    """``key`` of each server's ``/healthz`` (``rss_kb``, ``cpu_s``); None when it has none."""
    out = {}
    for u in urls:
        h = await _get_json(u.rstrip("/") + "/healthz")
        out[u] = h.get(key) if h else None
    return out


#: publishing connections per frontend URL, each with one request in flight at a time: at
#: first enough for ``rate`` likes/s at ``PUBLISH_LATENCY_ALLOWED`` s per request; then, while
#: more than ``PUBLISH_BACKLOG`` s of likes wait for a free connection, one more every
#: ``PUBLISH_GROW_EVERY`` s (as a proxy's upstream pool grows), up to the bound.  Viewers' likes
#: come from as many browsers, none waiting for another's answer, so the offered rate must not
#: fall when answers are slow: a frontend busy fanning out to 10 k viewers answers a publish in
#: ~0.2 s, at which 20 connections offer only ~105 of 200 likes/s.  Growth waits for a
#: backlog of ``PUBLISH_BACKLOG`` s, not any short one: every connection costs the frontend
#: too, and at 2 k x 1,000 the 420-1,024 connections a short backlog opens cost more than they
#: give (p99 274-840 ms, against 187 ms with 100)
PUBLISH_LATENCY_ALLOWED = 0.1
PUBLISH_BACKLOG = 0.5
PUBLISH_GROW_EVERY = 0.01
PUBLISH_CONNECTIONS = (4, 1024)
PUBLISH_TIMEOUT = 10.0


class _Publisher:
    """One frontend URL's publishing connections: raw non-blocking sockets with one request in
    flight each, answers read by an ``add_reader`` callback -- no task, future or stream per
    like, so the load generator's own cost per like stays small (it shares the machine's
    cores with the nodes it measures).  A like waits in ``waiting`` while every connection is
    busy; a connection that closes (an answer with ``Connection: close``, an error, no answer
    within ``PUBLISH_TIMEOUT``) is replaced."""

    def __init__(self, url: str, plan: Plan, acked: dict[str, int]):
        self.parts = urlsplit(url)
        self.plan = plan
        self.acked = acked
        self.errors = 0
        self.opened = 0          # connections opened, replacements included
        self.size = 0            # connections open or opening
        self.idle: list[socket.socket] = []
        self.busy: dict[int, tuple[socket.socket, str, float]] = {}  # fd -> (sock, video, sent at)
        self.bufs: dict[int, bytes] = {}
        self.waiting: collections.deque[int] = collections.deque()
        self.requests: dict[str, bytes] = {}  # video -> its request bytes
        self.closed = False
        self.grown = -math.inf   # loop time a connection was last added

    def pending(self) -> int:
        return len(self.waiting) + len(self.busy)

    def open(self) -> None:
        self.size += 1
        self.opened += 1
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (self.parts.hostname, self.parts.port)), PUBLISH_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            sock.close()
            self.size -= 1
            self.errors += 1
            return
        if self.closed:
            sock.close()
            return
        loop.add_reader(sock.fileno(), self._readable, sock)
        self._next(sock)

    def offer(self, k: int) -> None:
        if self.idle:
            self._send(self.idle.pop(), k)
        else:
            self.waiting.append(k)

    def _next(self, sock: socket.socket) -> None:
        if self.waiting:
            self._send(sock, self.waiting.popleft())
        else:
            self.idle.append(sock)

    def _send(self, sock: socket.socket, k: int) -> None:
        video = self.plan.video(k)
        request = self.requests.get(video)
        if request is None:
            body = b'{"user":"bench"}'
            request = self.requests[video] = (
                f"POST {self.parts.path.rstrip('/')}/v1/videos/{video}/likes HTTP/1.1\r\n"
                f"Host: {self.parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        try:
            sent = sock.send(request)  # ~150 bytes: an idle connection's buffer takes them
        except OSError:
            sent = -1
        if sent != len(request):
            self.errors += 1
            self._drop(sock)
            return
        self.busy[sock.fileno()] = (sock, video, time.monotonic())

    def _readable(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # closed: an error if a request was waiting for its answer
            if fd in self.busy:
                self.errors += 1
            self._drop(sock)
            return
        buf = self.bufs.pop(fd, b"") + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.bufs[fd] = buf
            return
        head = buf[:end]
        length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
        if len(buf) < end + 4 + (int(length.group(1)) if length else 0):
            self.bufs[fd] = buf
            return
        entry = self.busy.pop(fd, None)
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = 0
        if entry is None or status != 202:
            self.errors += 1
        else:
            self.acked[entry[1]] = self.acked.get(entry[1], 0) + 1
        if re.search(rb"\r\nconnection: *close", head, re.IGNORECASE):  # answered, then closing
            self._drop(sock)
        else:
            self._next(sock)

    def expire(self, now: float) -> None:
        for sock, _, sent_at in [e for e in self.busy.values() if now - e[2] > PUBLISH_TIMEOUT]:
            self.errors += 1  # a server too busy to answer: an error, not a wait without end
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        """Close ``sock`` and open its replacement."""
        fd = sock.fileno()
        self.busy.pop(fd, None)
        self.bufs.pop(fd, None)
        if sock in self.idle:
            self.idle.remove(sock)
        asyncio.get_running_loop().remove_reader(fd)
        sock.close()
        self.size -= 1
        if not self.closed:
            self.open()

    def close(self) -> None:
        self.closed = True
        for sock in self.idle + [e[0] for e in self.busy.values()]:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        self.idle, self.busy, self.waiting = [], {}, collections.deque()


async def _publish(plan: Plan, echo) -> tuple[dict[str, int], int, int]:
    """``rate`` likes/s for ``duration`` s through the HTTP API, on keep-alive connections
    (``PUBLISH_CONNECTIONS``; a new TCP connection per like would cost the server and the
    bench more than the like itself; ``_Publisher``).  Likes are offered on schedule until
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
    pubs = {u: _Publisher(u, plan, acked) for u in plan.urls}
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


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100.0 * len(values)))]


async def run(plan: Plan, echo=print, during=None) -> dict:
    """One bench run; ``during`` (an async callable) runs beside the publishing, e.g. to
    disturb the servers while the latency is being measured."""
    if not 1 <= plan.connections <= 200000 or not 0 < plan.duration <= 600 or not 0 < plan.rate <= 100000:
        raise ValueError("bench bounds: 1..200000 connections, 0..600 s, 0..100000 likes/s")
    plan.clients = plan.clients or max(1, math.ceil(plan.connections / 15000))
    ctx = mp.get_context("spawn")
    progress, results, stop, measuring = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    rss_before = await _health_field(plan.urls, "rss_kb")
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
        rss_after = await _health_field(plan.urls, "rss_kb")
        cpu_before = await _health_field(plan.urls, "cpu_s")
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
        cpu_after = await _health_field(plan.urls, "cpu_s")
    finally:
        stop.set()
    merged = ClientResult()
    latency_parts, gap_parts = [], []
    for _ in procs:
        _, r = results.get(timeout=60)
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
    for p in procs:
        p.join(10)
    merged.latencies, merged.heartbeat_gaps = merge_samples(latency_parts), merge_samples(gap_parts)
    deliveries = sum(sum(c) for c in merged.received.values())
    lost = sum(max(0, acked.get(v, 0) - c) for v, counts in merged.received.items() for c in counts)
    lat = merged.latencies
    rss_per_conn = {u: (round((rss_after[u] - rss_before[u]) * 1024 / max(1, merged.held_by_url.get(u, 0)))
                        if rss_after.get(u) is not None and rss_before.get(u) is not None else None)
                    for u in plan.urls}
    cpu = [cpu_after[u] - cpu_before[u] for u in plan.urls
           if cpu_after.get(u) is not None and cpu_before.get(u) is not None]
    return {
        "plan": {k: v for k, v in asdict(plan).items()},
        "connections_held": merged.connected, "connections_failed": merged.failed,
        "connections_failed_why": merged.why_failed,
        "published_acked": sum(acked.values()), "publish_errors": errors,
        "publish_connections": publish_connections,
        "publish_seconds": round(publish_s, 2),
        "deliveries": deliveries, "deliveries_per_s": round(deliveries / max(publish_s, 1e-9)),
        # SSE events the viewers received: a ``likes`` event is one, however many it counts
        "events_received": (events := deliveries - merged.aggregated_likes + merged.aggregated),
        "events_per_s": round(events / max(publish_s, 1e-9)),
        "lost": lost, "duplicates": merged.duplicates, "reordered": merged.reordered,
        "aggregated_events": merged.aggregated, "aggregate_mismatch": merged.aggregate_mismatch,
        "bytes_received": merged.bytes_received,
        "bytes_per_delivery": round(merged.bytes_received / deliveries, 1) if deliveries else None,
        "latency_ms": {name: (round(percentile(lat, q), 2) if lat else None)
                       for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))},
        "latency_samples": len(lat), "latencies_observed": sum(seen for _, seen in latency_parts),
        "heartbeats": merged.heartbeats,
        "heartbeat_gap_s": {name: (round(percentile(merged.heartbeat_gaps, q), 3) if merged.heartbeat_gaps else None)
                            for name, q in (("p50", 50), ("p99", 99), ("max", 100))},
        "rss_bytes_per_connection": rss_per_conn,
        "rss_kb_after_connect": rss_after,
        # CPU the servers spent from the first publish until the last delivery: robust to
        # other load on the machine, unlike deliveries/s and latency
        "server_cpu_s": round(sum(cpu), 3) if cpu else None,
        "server_cpu_us_per_delivery": round(sum(cpu) * 1e6 / deliveries, 3) if cpu and deliveries else None,
        # the load generator's readers (all client processes) over the same span, and per delivery
        "client_cpu_s": round(merged.cpu_s, 3),
        "client_cpu_us_per_delivery": round(merged.cpu_s * 1e6 / deliveries, 3) if deliveries else None,
    }


def print_table(r: dict, echo=print) -> None:
    lat = r["latency_ms"]
    rows = [
        ("connections held", f"{r['connections_held']:,} ({r['connections_failed']} failed)"),
        ("likes acknowledged", f"{r['published_acked']:,} in {r['publish_seconds']} s ({r['publish_errors']} errors, {r['publish_connections']} connections)"),
        ("deliveries", f"{r['deliveries']:,}"),
        ("deliveries/s", f"{r['deliveries_per_s']:,}"),
        ("SSE events received (/s)", f"{r['events_received']:,} ({r['events_per_s']:,})"),
        ("latency p50/p90/p99/p99.9 ms", " / ".join("-" if v is None else f"{v:.1f}" for v in lat.values())),
        ("lost / duplicated / reordered", f"{r['lost']:,} / {r['duplicates']:,} / {r['reordered']:,}"),
        ("aggregated likes events (mismatched)", f"{r['aggregated_events']:,} ({r['aggregate_mismatch']:,})"),
        ("bytes received (per delivery)", f"{r['bytes_received']:,} ({r['bytes_per_delivery'] or '-'})"),
        ("server CPU s (us per delivery)", "-" if r["server_cpu_s"] is None else
         f"{r['server_cpu_s']:.2f} ({r['server_cpu_us_per_delivery'] or '-'} us)"),
    ]
    rows.append(("client CPU s (us per delivery)", f"{r['client_cpu_s']:.2f} ({r['client_cpu_us_per_delivery'] or '-'} us)"))
    for url, b in r["rss_bytes_per_connection"].items():
        rows.append((f"RSS per connection {url}", "-" if b is None else f"{b / 1024:.1f} KiB"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        echo(f"{k:<{width}}  {v}")


def bench_command():
    import click

    from mesh.tools.kvsession import run_with_kv
    from mesh.tools.probes import frontend_urls

    @click.command(name="bench")
    @click.option("--frontend", "urls", multiple=True, metavar="URL",
                  help="frontend base URL (repeatable; default: every healthy frontend in the KV)")
    @click.option("--connections", "-n", default=1000, show_default=True, type=click.IntRange(1, 200000))
    @click.option("--videos", "-v", default=10, show_default=True, type=click.IntRange(1, 100000))
    @click.option("--hot", is_flag=True, help="all streams on one hot video")
    @click.option("--rate", "-r", default=100.0, show_default=True, type=click.FloatRange(0.1, 100000),
                  help="likes published per second")
    @click.option("--duration", "-d", default=10.0, show_default=True, type=click.FloatRange(0.5, 600))
    @click.option("--clients", default=0, type=click.IntRange(0, 64),
                  help="client processes (0: one per 15,000 streams)")
    @click.option("--sources", default=0, type=click.IntRange(0, 250),
                  help="source addresses 127.0.0.1..K (0: one per 20,000 streams)")
    @click.option("--client-nice", default=0, show_default=True, type=click.IntRange(0, 19),
                  help="niceness of the client processes: on the nodes' own machine, >0 keeps "
                       "the load generator from delaying the nodes it measures")
    @click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
    @click.pass_context
    def bench(ctx, urls, connections, videos, hot, rate, duration, clients, sources, client_nice, as_json):
        """Open N SSE streams, publish R likes/s for D seconds, report deliveries/s, latency
        percentiles, lost and duplicated events, and RSS per connection."""
        if not urls:
            urls = run_with_kv(ctx, frontend_urls)
        plan = Plan(list(urls), connections, videos, hot, rate, duration, clients, sources,
                    client_nice=client_nice)
        echo = (lambda msg: click.echo(msg, err=True))
        result = asyncio.run(run(plan, echo))
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            print_table(result, click.echo)

    return bench
