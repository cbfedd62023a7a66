"""The publish fast path: ``POST /v1/videos/{video}/likes`` and ``/comments`` answered on the raw
socket, off Tornado's HTTP stack.

Why.  A like is a small request, and Tornado spends most of a publish's cost around it: its
``IOStream`` (futures per read, an ``epoll_ctl`` pair per request), ``HTTP1Connection`` and
``RequestHandler``.  A bare Tornado handler cost 515-642 us of server CPU per request on the
2-core machine, the same request on a plain asyncio protocol 168-175 us (1,000 requests/s over
100 keep-alive connections, alternated); the frontend's own figures, this path against
Tornado's side by side, are in the README ("HTTP ingest", ``tests/bench/bench_fanout.py``).
At thousands of likes/s into one frontend, that is CPU the fan-out needs.  Requests read in
one loop turn are checked one by one and published together in one ``publish_many`` call,
which groups them by owner once (``frontend/publisher.py``).

Theory of operation.  Every accepted connection starts here (``adopt``).  Its bytes are
*peeked* (``MSG_PEEK``), not read, until a whole request is in the kernel's buffer, and framed
by llhttp (``httptools``, the parser uvicorn and Node.js use; ``parse_publish``); then:

* a request this path serves -- ``POST /v1/videos/{video}/likes|comments`` over HTTP/1.1, with
  a ``Content-Length`` body (or none) no larger than ``frontend.max_body_bytes``, no
  ``Transfer-Encoding``, ``Expect`` or ``Upgrade``, none of the fields it reads repeated, no
  percent-encoding in the path, a head of at most ``MAX_HEAD`` bytes of plain CRLF lines -- is
  read (exactly its bytes) and answered here by the same checks as Tornado's handler
  (``mesh.core.checks``: origin, rate limits, JWT, body), then the mesh publish, the answer
  with its CORS and ``Retry-After`` fields, the access log.  The connection stays here for its next request;
* anything else hands the connection as it is, unread bytes included, to Tornado
  (``HTTPServer.handle_stream`` on a new ``IOStream``), which serves it from then on: SSE streams, the page,
  health, metrics, CORS preflights, and every error about HTTP framing itself.  Tornado
  stays the reference; this path only ever answers the common case.

A request arriving in pieces (a client writing its head and body in two ``send`` calls) is
waited for with ``SO_RCVLOWAT``: the kernel wakes the loop once the whole request is there,
so the loop neither spins on a readable socket nor reads anything it may have to hand over.
One request at a time per connection: the next is not looked at before this one is answered
(pipelined requests are answered in order).  A connection gets ``security.header_timeout``
for its next request, as under Tornado (idle keep-alive and slowloris alike); connections
here count against the connection limits (the ``attached`` / ``detached`` callbacks), and one
whose answer waits that long to be written (its client does not read) is cut.
"""

from __future__ import annotations

import asyncio
import email.utils
import http.client
import json
import logging
import socket
import time
from typing import Any, Callable, NamedTuple

import httptools
from tornado.escape import json_encode

from mesh.core.checks import PublishRequest
from mesh.wire import protocol as P
from mesh.errors import ClientError

from .http import accepted
from .link import acked

log = logging.getLogger("mesh.app")

#: largest request head served here (Tornado's ``max_header_size`` for the rest)
MAX_HEAD = 16384
#: bytes peeked per readable event: a whole head and body fit
PEEK_BYTES = 65536
#: seconds a lingering close discards the client's input before closing
LINGER_SECONDS = 2.0
#: seconds between sweeps for connections past their deadline
SWEEP_EVERY = 1.0

_PREFIX = b"POST /v1/videos/"
_KINDS = {b"likes": P.KIND_LIKE, b"comments": P.KIND_COMMENT}
#: fields that make a request Tornado's: chunked or ``Expect`` bodies, upgrades
_HANDOFF_HEADERS = frozenset({"transfer-encoding", "expect", "upgrade"})
#: the fields this path reads (the checks': ``mesh.core.checks``, the idempotency key included)
_READ = frozenset({"content-length", "connection", "host", "origin", "cookie", "authorization",
                   "idempotency-key"})


class Headers(dict):
    """The request's fields this path reads (``_READ``) by lower-cased name, read as Tornado's
    ``HTTPHeaders`` are."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name):
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())


class _Head:
    """httptools' callbacks for one request head: the URL and the fields this path reads."""

    __slots__ = ("url", "headers", "handoff", "done")

    def __init__(self):
        self.url = b""
        self.headers = Headers()
        self.handoff = False  # a field that makes the request Tornado's, or one repeated
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower().decode("latin-1")
        if key in _HANDOFF_HEADERS or dict.__contains__(self.headers, key):
            self.handoff = True
        elif key in _READ:
            # llhttp keeps a field value's trailing whitespace; RFC 9110 (5.5) and Tornado drop it
            self.headers[key] = value.decode("latin-1").strip(" \t")

    def on_headers_complete(self) -> None:
        self.done = True


class TooLarge(NamedTuple):
    """A publish whose ``Content-Length`` is over ``frontend.max_body_bytes``."""
    path: str
    headers: Headers
    length: int


def parse_publish(data: bytes, max_body: int):
    """The publish request at the head of ``data``, framed by llhttp (``httptools``): (video,
    kind, path, headers, body, length); a ``TooLarge`` for a body over ``max_body``; an int when it is incomplete (the bytes to wait for, in
    all); None when it is not this path's (anything else, or what llhttp refuses: Tornado
    answers it)."""
    end = data.find(b"\r\n\r\n", 0, MAX_HEAD)
    if end < 0:
        if len(data) >= MAX_HEAD or not (data.startswith(_PREFIX) or _PREFIX.startswith(data[:len(_PREFIX)])):
            return None
        partial = _Head()
        try:  # what llhttp refuses already (a bare LF, a control character) waits for nothing
            httptools.HttpRequestParser(partial).feed_data(data)
        except httptools.HttpParserError:
            return None
        return None if partial.done else len(data) + 1
    head_len = end + 4
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(data[:head_len])
    except httptools.HttpParserError:  # HttpParserUpgrade included
        return None
    if not head.done or head.handoff or parser.get_method() != b"POST" \
            or parser.get_http_version() != "1.1":
        return None
    try:
        url = httptools.parse_url(head.url)
    except httptools.HttpParserInvalidURLError:
        return None
    if url.schema or url.fragment or b"%" in url.path:
        return None
    parts = url.path.split(b"/")  # "", "v1", "videos", video, kind
    if len(parts) != 5 or parts[1] != b"v1" or parts[2] != b"videos" or parts[4] not in _KINDS \
            or not parts[3].isascii():
        return None
    length = dict.get(head.headers, "content-length")
    if length is None:
        length = 0
    elif not length.isdigit() or not length.isascii():
        return None  # Tornado's 400
    elif int(length) > max_body:  # refused before a byte of the body is read
        return TooLarge(head.url.decode("ascii").split("?", 1)[0], head.headers, int(length))
    elif head_len + int(length) > PEEK_BYTES:
        return None  # a body larger than one peek: Tornado reads it
    else:
        length = int(length)
    if len(data) < head_len + length:
        return head_len + length
    path = head.url.decode("ascii")
    return (parts[3].decode("ascii"), _KINDS[parts[4]], path, head.headers,
            data[head_len:head_len + length], head_len + length)


class Conn:
    """One connection while it is served here."""

    __slots__ = ("sock", "fd", "address", "ip", "since", "want", "busy", "paused", "closing", "linger", "out")

    def __init__(self, sock: socket.socket, address):
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.ip = address[0] if address else "?"
        # its next request is due header_timeout after this; while an answer waits to be
        # written, its client must read some of it within header_timeout of this
        self.since = time.monotonic()
        self.want = 0                  # bytes SO_RCVLOWAT waits for (0: not waiting)
        self.busy = False              # a request is being answered
        self.paused = False            # its reader is off until the answer is out
        self.closing = False           # close once the answer is out
        self.linger = False            # ... lingering (``_linger``): unread input follows
        self.out = b""                 # answer bytes the kernel has not taken yet


class PublishPath:
    """The fast path's connections, given what it calls:

    * ``handoff(sock, address)``: Tornado serves the connection from here on;
    * ``publish_event(request, video, kind)``: the event, after every check (``mesh.core.checks``);
    * ``publish_many(events, on_result)``: the events to their owners (``Publisher.publish_many``);
    * ``cors_headers(headers)``: the CORS fields of an answer;
    * ``log_access(status, method, uri, ip, seconds)``: the access log;
    * ``attached(ip)`` / ``detached(ip)``: a connection from ``ip`` taken / released (the
      connection limits);
    * ``stats``: the node's counters."""

    def __init__(self, *, handoff: Callable[[socket.socket, Any], None],
                 publish_event: Callable[[PublishRequest, str, str], dict],
                 publish_many: Callable[..., Any], cors_headers: Callable[[Any], list],
                 log_access: Callable[..., None], attached: Callable[[str], None],
                 detached: Callable[[str], None], stats: dict, header_timeout: float, max_body: int):
        self.handoff_to = handoff
        self.publish_event = publish_event
        self.publish_many = publish_many
        self.cors_headers = cors_headers
        self.log_access = log_access
        self.attached = attached
        self.detached = detached
        self.stats = stats
        self.conns: dict[int, Conn] = {}
        self.header_timeout = header_timeout
        self.max_body = max_body
        self.stopping = False
        self._sweeping = False
        self._date = (0, "")
        self._batch: list = []  # requests read this loop turn (``_flush``)

    # --- connections --------------------------------------------------------------------------

    def adopt(self, sock: socket.socket, address) -> None:
        """A newly accepted connection: served here until it asks for something else."""
        if self.stopping:
            sock.close()
            return
        sock.setblocking(False)
        conn = Conn(sock, address)
        self.conns[conn.fd] = conn
        self.attached(conn.ip)
        asyncio.get_running_loop().add_reader(conn.fd, self._readable, conn)
        if not self._sweeping:
            self._sweeping = True
            asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep)

    def _release(self, conn: Conn) -> None:
        if self.conns.get(conn.fd) is not conn:  # released already (its fd may be another's now)
            return
        del self.conns[conn.fd]
        loop = asyncio.get_running_loop()
        loop.remove_reader(conn.fd)
        loop.remove_writer(conn.fd)
        if conn.want:
            conn.want = 0
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass
        self.detached(conn.ip)

    def _close(self, conn: Conn) -> None:
        self._release(conn)
        conn.sock.close()

    def _handoff(self, conn: Conn) -> None:
        """Tornado serves the connection from here on, its unread bytes included."""
        self._release(conn)
        self.stats["ingest_handoffs"] += 1
        self.handoff_to(conn.sock, conn.address)

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.conns.values()
                     if (c.out or not c.busy) and now - c.since > self.header_timeout]:
            if conn.out:  # a client that does not read its answers (pipelining, say)
                self.stats["connections_cut_unread"] += 1
            self._close(conn)  # idle keep-alive, a request that never completed, an answer not read
        self._sweeping = bool(self.conns)
        if self._sweeping:
            asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep)

    def stop(self) -> None:
        """Shutdown: no new connections; idle ones close now, busy ones once answered."""
        self.stopping = True
        for conn in list(self.conns.values()):
            if conn.busy:
                conn.closing = True
            else:
                self._close(conn)

    # --- reading ------------------------------------------------------------------------------

    def _readable(self, conn: Conn) -> None:
        if conn.busy:  # more bytes (a pipelined request, or EOF) while one is being answered:
            asyncio.get_running_loop().remove_reader(conn.fd)  # look again once it is answered
            conn.paused = True
            return
        try:
            data = conn.sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        woken_for, conn.want = conn.want, 0
        request = parse_publish(data, self.max_body)
        if isinstance(request, TooLarge):
            self._refuse_too_large(conn, request)
        elif request is None:
            self._handoff(conn)
        elif isinstance(request, int):  # incomplete: wait until the kernel holds ``request`` bytes
            if woken_for and len(data) < woken_for:
                self._handoff(conn)  # woken short of it: the peer closed; Tornado reads what came
                return
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, request)
            except OSError:
                self._handoff(conn)
                return
            conn.want = request
        else:
            self._take(conn, *request)

    def _take(self, conn: Conn, video: str, kind: str, path: str, headers: Headers, body: bytes,
              length: int) -> None:
        """Read the request's bytes (what follows stays in the kernel) and queue it for this
        loop turn's batch."""
        try:
            got = conn.sock.recv(length)
        except OSError:
            got = b""
        if len(got) != length:
            self._close(conn)
            return
        conn.busy = True
        if "close" in (t.strip() for t in dict.get(headers, "connection", "").lower().split(",")):
            conn.closing = True
        self.stats["ingest_fast"] += 1
        request = PublishRequest("POST", path, headers, body, conn.ip, time.monotonic())
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush)
        self._batch.append((conn, request, video, kind))

    # --- answering ----------------------------------------------------------------------------

    def _flush(self) -> None:
        """The loop turn's requests: checked one by one (a refusal is answered at once), the
        accepted events published together in one ``publish_many`` call, which groups them by
        owner and answers each owner's share as soon as it acks (a slow owner delays only its
        own videos' answers)."""
        batch, self._batch = self._batch, []
        items = []
        for conn, request, video, kind in batch:
            try:
                event = self.publish_event(request, video, kind)
            except ClientError as err:
                self._answer_error(conn, request, err)
                continue
            except Exception:  # noqa: BLE001 - a bug answers 500, like Tornado, and the node goes on
                log.exception("publish on the fast path failed")
                self._answer_error(conn, request, _internal())
                continue
            items.append((conn, request, event))
        if items:
            asyncio.get_running_loop().create_task(self._publish(items))

    async def _publish(self, items: list) -> None:
        answered = [False] * len(items)

        def answer(indices: list[int], results: list[dict]) -> None:
            for i, result in zip(indices, results):
                answered[i] = True
                conn, request, event = items[i]
                try:
                    body = json_encode(accepted(event, acked(result)))
                except ClientError as err:
                    self._answer_error(conn, request, err)
                    continue
                self._answer(conn, request, 202, [], body, "application/json; charset=UTF-8")

        try:
            await self.publish_many([event for _, _, event in items], answer)
        except ClientError as err:  # no mesh yet (the node is starting)
            for (conn, request, _), done in zip(items, answered):
                if not done:
                    self._answer_error(conn, request, err)
        except Exception:  # noqa: BLE001 - as in _flush
            log.exception("publish on the fast path failed")
            for (conn, request, _), done in zip(items, answered):
                if not done:
                    self._answer_error(conn, request, _internal())

    def _answer_error(self, conn: Conn, request: PublishRequest, err: ClientError) -> None:
        self._answer(conn, request, err.status, list(err.headers.items()), json.dumps(err.to_json()),
                     "application/json")

    def _answer(self, conn: Conn, request: PublishRequest, status: int, fields: list[tuple[str, str]],
                body: str, ctype: str) -> None:
        """The answer with its own ``fields`` and the request's CORS fields; logged."""
        fields = [*self.cors_headers(request.headers), *fields]
        self.log_access(status, request.method, request.path, request.peer, time.monotonic() - request.now)
        self._write(conn, self._response(status, fields, body.encode(), ctype, conn.closing))

    def _response(self, status: int, fields: list[tuple[str, str]], body: bytes, ctype: str,
                  close: bool) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        lines = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'Unknown')}",
                 f"Date: {self._date[1]}", f"Content-Type: {ctype}", f"Content-Length: {len(body)}"]
        if close:
            lines.append("Connection: close")
        lines.extend(f"{k}: {v}" for k, v in fields)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _write(self, conn: Conn, data: bytes) -> None:
        if self.conns.get(conn.fd) is not conn:  # closed meanwhile (the peer left, shutdown)
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < len(data):
            conn.out = data[sent:]
            conn.since = time.monotonic()
            asyncio.get_running_loop().add_writer(conn.fd, self._drain, conn)
            return
        self._done(conn)

    def _drain(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        conn.since = time.monotonic()
        if not conn.out:
            asyncio.get_running_loop().remove_writer(conn.fd)
            self._done(conn)

    def _refuse_too_large(self, conn: Conn, request: TooLarge) -> None:
        """A JSON 413 at once, then a lingering close: the body is never read whole."""
        conn.busy = conn.closing = conn.linger = True
        self._answer_error(conn, PublishRequest("POST", request.path, request.headers, b"", conn.ip,
                                                time.monotonic()), ClientError(
            413, "body_too_large", f"body has {request.length} bytes; the limit is {self.max_body}"))

    def _linger(self, conn: Conn) -> None:
        """Lingering close (as nginx's ``lingering_close``): no more output, the client's unread
        input discarded for at most ``LINGER_SECONDS``, then close, so closing with unread
        bytes does not reset the connection before the client has read the answer."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(conn.fd)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        loop.add_reader(conn.fd, self._discard, conn)
        loop.call_later(LINGER_SECONDS, self._close, conn)

    def _discard(self, conn: Conn) -> None:
        try:
            if conn.sock.recv(PEEK_BYTES):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(conn)  # the client closed (or the connection broke): done

    def _done(self, conn: Conn) -> None:
        """The answer is out: close, or look at the next request."""
        if conn.linger:
            self._linger(conn)
            return
        if conn.closing or self.stopping:
            self._close(conn)
            return
        conn.busy = False
        conn.since = time.monotonic()
        if conn.paused:  # bytes came while answering: look at them now
            conn.paused = False
            asyncio.get_running_loop().add_reader(conn.fd, self._readable, conn)


def _internal() -> ClientError:
    """What a bug answers, as Tornado's handler would (``JSONHandler.write_error``)."""
    return ClientError(500, "internal", "internal error", retryable=True)
