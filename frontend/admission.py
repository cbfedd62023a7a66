"""Admission: which connections and viewer streams a frontend takes, and the accept loop that
answers the rest.

Theory of operation.  Every TCP connection counts in ``ConnectionLimits`` from its first byte
to its close, whoever serves it: Tornado (``CountingHTTPServer``'s public delegate hooks), the
publish fast path and the viewer streams (``opened``/``closed`` when they take a socket over
and let it go).  Two caps apply when a connection is accepted:

* the open-file limit: Tornado's own accept loop logs every failed ``accept()``, and at the
  open-file limit (EMFILE) the listening socket stays readable, so it spins at 100 % CPU
  writing a log line per turn.  ``Acceptor`` (1) sheds connections past ``open-file limit -
  security.fd_reserve`` with a canned 503 before that happens, and (2) at EMFILE uses the
  reserve-descriptor trick of libuv and nginx: close a spare descriptor kept for this, accept
  the waiting connection, answer 503, close it, take the spare back -- the backlog drains, the
  client gets a clean answer instead of a hang, and the loop stays quiet;
* ``security.max_connections_per_ip``: an address holding that many connections gets a canned
  ``429 too_many_connections`` for the next one (as nginx's ``limit_conn``).  It counts every
  kind of connection, so idle keep-alive connections or requests in flight cannot take the
  descriptors the viewers need.

Either logs at most one line per ``SHED_LOG_INTERVAL`` (``Tally``).  Viewer streams stop well
below the open-file cap (``ViewerLimits``: ``max_viewers`` is clamped under it, and
``max_viewers_per_ip`` under the per-address cap), so ``/healthz`` keeps answering when the
frontend is full.

Deadlines.  Tornado applies one deadline to a request's whole header block and uses it for an
idle keep-alive connection too (``HTTP1ConnectionParameters.header_timeout``): the
frontend sets it to ``security.header_timeout``.  It has none for writing: a client that
pipelines requests and never reads its answers keeps its connection busy forever, the
answers queued in the kernel and in ``IOStream``.  ``CountingHTTPServer`` cuts a connection
whose answer it finds waiting to be written (``IOStream.writing``) at every look, once a
second, for ``header_timeout`` (as nginx's ``send_timeout``; the answers here are at most a
few kilobytes, which a reading client takes in milliseconds); the fast path cuts one whose
pending answer made no progress for as long (``frontend.ingest``).  A started SSE
response has neither deadline: it is not idle, and a viewer that stops reading is cut by
``frontend.max_buffer_bytes``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import socket
import time
from typing import Callable

import tornado.httpserver
import tornado.netutil
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from mesh.errors import ClientError

log = logging.getLogger("mesh.app")

#: at most one log line per this many seconds about shed connections
SHED_LOG_INTERVAL = 10.0
#: seconds accepting pauses when even the reserve descriptor cannot be had
ACCEPT_PAUSE = 0.1
#: connections accepted per readable event (Tornado's ``_DEFAULT_BACKLOG`` heuristic)
ACCEPT_BACKLOG = 4096
ACCEPT_BATCH = 128
#: connections under a connection cap kept for health checks and publishes when viewers fill it
VIEWER_HEADROOM = 20
#: what ``security.max_connections_per_ip = 0`` stands for: this many above ``max_viewers_per_ip``
CONNECTIONS_OVER_VIEWERS = 100
#: a viewer-table sweep (closed streams of idle IPs) at most this often
SWEEP_INTERVAL = 10.0
#: seconds between looks for connections whose answers wait to be written
STALL_SWEEP_EVERY = 1.0


def canned_response(status: int, reason: str, err: ClientError, retry_after: int) -> bytes:
    """A whole HTTP/1.1 error answer with ``err``'s JSON body, closing the connection: what the
    accept loop sends to a connection it does not take (no request of it was read)."""
    body = json.dumps(err.to_json()).encode() + b"\n"
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nRetry-After: %d\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (status, reason.encode(), retry_after, len(body), body))


SHED_RESPONSE = canned_response(503, "Service Unavailable", ClientError(
    503, "overloaded", "frontend is at its connection limit; retry", retryable=True), 1)


def open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_limit(fd_reserve: int) -> int | None:
    """The open connections a frontend takes: the open-file limit less ``fd_reserve`` (None:
    no limit, or no reserve asked for)."""
    nofile = open_file_limit()
    if not fd_reserve or nofile == resource.RLIM_INFINITY or nofile <= fd_reserve:
        return None
    return nofile - fd_reserve


class Tally:
    """Counts events and says when a summary line about them is due: at most one per
    ``interval``, so a flood is counted, not logged line by line (that cost a flooded
    frontend ~8 % more CPU and its disk)."""

    def __init__(self, interval: float = SHED_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self.since_line = 0
        self.line_at = -float("inf")

    def add(self, n: int = 1) -> int | None:
        """Count ``n`` more; the count since the last line when a line is due now, else None."""
        self.since_line += n
        now = self.clock()
        if now - self.line_at < self.interval:
            return None
        self.line_at = now
        count, self.since_line = self.since_line, 0
        return count


class ConnectionLimits:
    """The frontend's open connections, in all and per client address, and the caps on them:
    ``max_connections`` in all (None: none), ``max_per_ip`` per address."""

    def __init__(self, max_connections: int | None, max_per_ip: int):
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.total = 0
        self.by_ip: dict[str, int] = {}

    def opened(self, ip: str) -> None:
        self.total += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1

    def closed(self, ip: str) -> None:
        self.total -= 1
        left = self.by_ip.get(ip, 0) - 1
        if left > 0:
            self.by_ip[ip] = left
        else:
            self.by_ip.pop(ip, None)

    def full(self) -> bool:
        return self.max_connections is not None and self.total >= self.max_connections

    def over_ip_cap(self, ip: str) -> ClientError | None:
        """The refusal of one more connection from ``ip`` (None: it may connect)."""
        held = self.by_ip.get(ip, 0)
        if held < self.max_per_ip:
            return None
        return ClientError(429, "too_many_connections",
                           f"your address has {held} open connections; the limit is {self.max_per_ip} "
                           f"(security.max_connections_per_ip)", retryable=True)


def per_ip_connection_cap(max_connections_per_ip: int, max_viewers_per_ip: int) -> int:
    """``security.max_connections_per_ip``, 0 standing for room above the viewer cap: an
    address's streams are connections too, and its publishes and health checks need some."""
    return max_connections_per_ip or max_viewers_per_ip + CONNECTIONS_OVER_VIEWERS


class ViewerLimits:
    """The SSE streams a frontend takes: ``max_viewers`` in all (clamped under the connection
    limit, so health checks and publishes still get in) and ``max_viewers_per_ip`` per
    address.  ``viewer_count()`` is the number of streams open now."""

    def __init__(self, max_viewers: int, max_per_ip: int, max_connections: int | None,
                 viewer_count: Callable[[], int], stats):
        self.max_per_ip = max_per_ip
        self.max_viewers = max_viewers
        if max_connections is not None and max_viewers > max_connections - VIEWER_HEADROOM:
            self.max_viewers = max(1, max_connections - VIEWER_HEADROOM)
            log.warning("security.max_viewers %d lowered to %d: the connection limit (open-file "
                        "limit less security.fd_reserve) is %d", max_viewers, self.max_viewers,
                        max_connections)
        self.viewer_count = viewer_count
        self.stats = stats
        self.by_ip: dict[str, set] = {}  # ip -> its open streams (released on close)
        self.swept = 0.0

    def admit(self, ip: str, now: float) -> None:
        """Room for one more stream from ``ip``? Raises ``ClientError`` (with ``Retry-After``)."""
        if now - self.swept >= SWEEP_INTERVAL:
            self._sweep(now)
        mine = self.by_ip.get(ip)
        if mine and len(mine) >= self.max_per_ip:
            mine.difference_update([v for v in mine if v.closed])  # only at the limit: O(1) per admit
        if mine and len(mine) >= self.max_per_ip:
            self.stats["viewers_refused_ip"] += 1
            raise ClientError(429, "too_many_streams", f"your address has {len(mine)} open streams; "
                              f"the limit is {self.max_per_ip}", retryable=True, headers={"Retry-After": "10"})
        if self.viewer_count() >= self.max_viewers:
            self.stats["viewers_refused_full"] += 1
            raise ClientError(503, "frontend_full", f"this frontend serves its maximum of "
                              f"{self.max_viewers} streams; try another", retryable=True,
                              headers={"Retry-After": "5"})

    def track(self, viewer) -> None:
        """An admitted stream (``frontend.stream.ViewerStream``) counts against its address."""
        self.by_ip.setdefault(viewer.ip, set()).add(viewer)

    def release(self, viewer) -> None:
        """A stream closed: it no longer counts against its address."""
        mine = self.by_ip.get(viewer.ip)
        if mine is not None:
            mine.discard(viewer)
            if not mine:
                del self.by_ip[viewer.ip]

    def _sweep(self, now: float) -> None:
        self.swept = now
        for ip in list(self.by_ip):
            alive = {v for v in self.by_ip[ip] if not v.closed}
            if alive:
                self.by_ip[ip] = alive
            else:
                del self.by_ip[ip]


class CountingHTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server, counting the connections it serves in ``connections``
    (``ConnectionLimits``) through its public delegate hooks (``handle_stream`` and
    ``HTTPServerConnectionDelegate.on_close``), and cutting a connection whose answer has
    waited ``write_timeout`` seconds to be written (``IOStream.writing``): its client does not
    read.  ``count_into`` sets both before the server takes a connection."""

    connections: ConnectionLimits | None = None
    write_timeout = 10.0
    open_connections = 0
    stats: dict | None = None

    def count_into(self, connections: ConnectionLimits, write_timeout: float, stats) -> None:
        self.connections = connections
        self.write_timeout = write_timeout
        self.stats = stats
        self.peers: dict[IOStream, str] = {}      # connection -> its client's address
        self.stalled: dict[IOStream, float] = {}  # connection -> when its answer was first seen waiting
        self.sweeping = False

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        self.open_connections += 1
        if self.connections is not None:
            ip = address[0] if address else "?"
            self.peers[stream] = ip
            self.connections.opened(ip)
            if not self.sweeping:
                self.sweeping = True
                IOLoop.current().call_later(STALL_SWEEP_EVERY, self.sweep_unread)
        super().handle_stream(stream, address)

    def on_close(self, server_conn) -> None:
        self.open_connections -= 1
        if self.connections is not None:
            stream = server_conn.stream
            self.stalled.pop(stream, None)
            ip = self.peers.pop(stream, None)
            if ip is not None:
                self.connections.closed(ip)
        super().on_close(server_conn)

    def sweep_unread(self) -> None:
        now = time.monotonic()
        for stream in list(self.peers):
            if not stream.writing():
                self.stalled.pop(stream, None)
            elif now - self.stalled.setdefault(stream, now) >= self.write_timeout:
                self.stats["connections_cut_unread"] += 1
                stream.close()  # on_close releases it
        self.sweeping = bool(self.peers)
        if self.sweeping:
            IOLoop.current().call_later(STALL_SWEEP_EVERY, self.sweep_unread)


class Acceptor:
    """The accept loop of the frontend's listening sockets (see the module docstring): takes
    what ``connections`` has room for and hands it to ``on_connection(sock, address)``; the
    rest gets a canned answer and is closed."""

    def __init__(self, connections: ConnectionLimits, stats):
        self.connections = connections
        self.stats = stats
        self.sockets: list[socket.socket] = []
        self._reserve_fd: int | None = None
        self._stop_accepting: list = []
        self._shed = Tally()
        self._refused_ip = Tally()

    def listen(self, port: int, host: str, on_connection) -> list[socket.socket]:
        """Bind ``port`` on ``host``; returns the listening sockets (``stop`` closes them)."""
        self._reserve_fd = _open_reserve()
        # a deep accept queue: bursts of viewers (a live event starting) wait in the kernel
        # instead of being dropped and retried after 1 s, 3 s, ... (Tornado's default is 128)
        self.sockets = tornado.netutil.bind_sockets(port, address=host, backlog=ACCEPT_BACKLOG)
        self._stop_accepting = [self._add_accept_handler(sock, on_connection) for sock in self.sockets]
        return self.sockets

    def stop(self) -> None:
        """No new connections: the accept handlers go, the listening sockets close."""
        for remove in self._stop_accepting:
            remove()
        self._stop_accepting = []
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def _add_accept_handler(self, sock: socket.socket, callback):
        loop = IOLoop.current()
        state = {"removed": False, "registered": True}

        def resume() -> None:
            if not state["removed"] and not state["registered"]:
                loop.add_handler(sock, on_readable, IOLoop.READ)
                state["registered"] = True

        def on_readable(fd, events) -> None:
            for _ in range(ACCEPT_BATCH):
                if state["removed"]:
                    return
                try:
                    conn, address = sock.accept()
                except BlockingIOError:
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        raise
                    if not self._shed_with_reserve(sock):
                        loop.remove_handler(sock)  # the socket stays readable: do not spin
                        state["registered"] = False
                        loop.call_later(ACCEPT_PAUSE, resume)
                    return
                if self.connections.full():
                    self._answer_and_close(conn, SHED_RESPONSE)
                    self._count_shed("the connection limit", 1)
                    continue
                refusal = self.connections.over_ip_cap(address[0])
                if refusal is not None:
                    self._answer_and_close(conn, canned_response(429, "Too Many Requests", refusal, 5))
                    self._count_refused_ip(address[0], refusal)
                    continue
                callback(conn, address)

        def remove() -> None:
            if state["registered"]:
                loop.remove_handler(sock)
            state["removed"] = True
            if self._reserve_fd is not None:
                os.close(self._reserve_fd)
                self._reserve_fd = None

        loop.add_handler(sock, on_readable, IOLoop.READ)
        return remove

    def _shed_with_reserve(self, sock: socket.socket) -> bool:
        """At EMFILE: free the reserve descriptor, accept and shed what waits, take it back.
        False when no reserve could be had (accepting must pause)."""
        if self._reserve_fd is None:
            self._reserve_fd = _open_reserve()
            self._count_shed("the open-file limit", 0)
            return False
        os.close(self._reserve_fd)
        self._reserve_fd = None
        try:
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    break
                except OSError:
                    break  # the freed descriptor went elsewhere meanwhile
                self._answer_and_close(conn, SHED_RESPONSE)
                self._count_shed("the open-file limit", 1)
        finally:
            self._reserve_fd = _open_reserve()
        return self._reserve_fd is not None

    @staticmethod
    def _answer_and_close(conn: socket.socket, response: bytes) -> None:
        """Send ``response`` and close, reading what the client has sent so far first: a
        socket closed with unread input resets the connection, and the client could lose the
        answer with it."""
        try:
            conn.setblocking(False)
            conn.send(response)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(65536)
        except OSError:
            pass  # nothing sent yet (BlockingIOError), or the client is gone already
        finally:
            conn.close()

    def _count_shed(self, why: str, n: int) -> None:
        self.stats["connections_shed"] += n
        count = self._shed.add(n)
        if count is not None:
            log.warning("at %s (%d open connections, open-file limit %d): shed %d new connections "
                        "in the last %.0f s with 503", why, self.connections.total,
                        open_file_limit(), count, SHED_LOG_INTERVAL)

    def _count_refused_ip(self, ip: str, refusal: ClientError) -> None:
        self.stats["connections_refused_ip"] += 1
        count = self._refused_ip.add()
        if count is not None:
            log.warning("refused %d new connections in the last %.0f s with 429, the latest from "
                        "%s: %s", count, SHED_LOG_INTERVAL, ip, refusal.message)


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
