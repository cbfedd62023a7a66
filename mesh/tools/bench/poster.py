"""The load generator's publishing side, ``LikePoster``: one frontend URL's keep-alive
connections, each with one request in flight, answers read by ``add_reader`` callbacks
(``mesh.tools.bench`` runs the schedule that offers likes to them)."""

from __future__ import annotations

import asyncio
import collections
import math
import re
import socket
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from mesh.tools.bench import Plan


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


class LikePoster:
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
