"""The frontend's guards: who may publish and watch, how fast, from which origins, and how many
connections a frontend takes before it sheds them.

Theory of operation.  The HTTP handlers (``frontend/http.py``) call in at a few points; the
decisions are in the sans-IO cores (``mesh.core.auth``, ``mesh.core.ratelimit``):

* ``check_publish`` (every POST): browser origin, per-IP token bucket, JWT (``Authorization:
  Bearer``), per-user-per-video token bucket; returns the verified user (or None when
  ``security.auth = off``).  The IP limit comes before the token so a flood of bad tokens costs
  no signature checks.
* ``admit_viewer`` (every SSE GET): per-IP and per-frontend viewer limits, then the video's
  subscribe policy (private videos need a token: ``Authorization`` header, or a short-lived
  subscribe token in ``?access_token=``, which is redacted from the request URI at once so no
  log line can carry it).
* ``before_headers`` (every response): CORS headers, plus the ``Retry-After`` /
  ``WWW-Authenticate`` of the error being sent (``clear()`` in the error path wipes headers set
  earlier, so they are stashed on the handler and applied when the headers go out).
* ``listen``: Tornado's own accept loop logs every failed ``accept()``: at the open-file limit
  (EMFILE) the listening socket stays readable, so it spins at 100 % CPU writing a log line per
  turn.  Ours (1) sheds connections past ``open-file limit - fd_reserve`` with a canned 503 before
  that happens, and (2) at EMFILE uses the reserve-descriptor trick of libuv and nginx: close a
  spare descriptor kept for this, accept the waiting connection, answer 503, close it, take the
  spare back -- the backlog drains, the client gets a clean answer instead of a hang, and the
  loop stays quiet.  Both log at most one line per ``SHED_LOG_INTERVAL``, and so do
  rate-limited publishes (``log_request``: a flood of 429s is counted, not logged line by line,
  which cost a flooded frontend ~8 % more CPU and its disk).  Viewer streams stop
  well below that (``max_viewers`` is clamped under the connection limit), so ``/healthz`` keeps
  answering when the frontend is full.
* Slowloris: Tornado applies one deadline to a request's whole header block and uses the same
  deadline for an idle keep-alive connection (``HTTP1ConnectionParameters.header_timeout``,
  which ``HTTPServer`` derives from ``idle_connection_timeout``); ``listen`` sets it to
  ``security.header_timeout``.  A started SSE response has no deadline: it is not idle.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import math
import os
import re
import resource
import socket
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web
from tornado.ioloop import IOLoop
from tornado.log import access_log

from mesh.core.auth import ACTION_SUBSCRIBE, Grant, SubscribePolicy, TokenVerifier
from mesh.errors import ClientError, ConfigError
from mesh.core.ratelimit import PublishLimits

if TYPE_CHECKING:
    from .node import Frontend

log = logging.getLogger("mesh.app")

#: at most one log line per this many seconds about shed connections
SHED_LOG_INTERVAL = 10.0
#: seconds accepting pauses when even the reserve descriptor cannot be had
ACCEPT_PAUSE = 0.1
#: connections accepted per readable event (Tornado's ``_DEFAULT_BACKLOG`` heuristic)
ACCEPT_BACKLOG = 4096
ACCEPT_BATCH = 128
#: connections under the connection limit kept for health checks and publishes when full
VIEWER_HEADROOM = 20
#: a viewer-table sweep (closed streams of idle IPs) at most this often
SWEEP_INTERVAL = 10.0

_SHED_BODY = (b'{"error": {"code": "overloaded", "message": "frontend is at its connection limit; '
              b'retry", "retryable": true}}\n')
SHED_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(_SHED_BODY), _SHED_BODY))

# control characters (Unicode Cc) other than \t \n \r, and unpaired surrogates (JSON's \ud800
# escapes make them; they cannot be encoded as UTF-8 for the wire)
_BAD_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
#: the query parameter of a subscribe token (``mesh.core.auth``), and what a log reads instead
TOKEN_PARAM = "access_token"
REDACTED = "REDACTED"
#: query-string separators: ``&`` (how Tornado splits), and ``;`` (how some clients do)
_QUERY_SEPARATORS = re.compile("([&;])")
#: what the depth check keeps of a body: ``(`` opens a container, ``)`` closes one, ``"``
#: delimits a string (whose content is kept only where it holds brackets)
_SHAPE = bytes.maketrans(b"[{]}", b"(())")
_NOT_SHAPE = bytes(sorted(set(range(256)) - set(b'[]{}"')))


@functools.lru_cache(maxsize=8)
def _nesting_within(limit: int) -> re.Pattern:
    """A regex that matches, from the start of a body's shape (``_SHAPE``), the longest prefix
    nested at most ``limit`` deep: strings and closed groups of depth <= k (``closed``), then at
    most one group left open whose content is nested at most k - 1 deep.  Every alternative
    starts with its own byte and every quantifier is possessive, so nothing backtracks: one
    pass, whatever the limit."""
    string = rb'"[^"]*+"'
    closed = rb"(?:" + string + rb")*+"
    opened = closed
    for _ in range(limit):
        closed = rb"(?:" + string + rb"|\(" + closed + rb"\))*+"
        opened = closed + rb"(?:\(" + opened + rb")?"
    return re.compile(opened)


def json_deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests arrays/objects more than ``limit`` deep (brackets in
    strings do not count), without parsing it.  Linear in ``len(text)`` for any ``limit``:
    C-level counting, replacing, translating and one backtracking-free regex match, so a
    megabyte body costs milliseconds of loop time, never seconds.  Invalid JSON gets some
    answer and is refused by the parser after."""
    if text.count("[") + text.count("{") <= limit:
        return False  # every ordinary body: a few containers at most
    # escapes pair up from the left: dropping every \\ and then every \" leaves only the
    # quotes that delimit strings; two quotes side by side then delimit nothing that counts
    shape = text.encode("utf-8", "surrogatepass").replace(b"\\\\", b"").replace(b'\\"', b"")
    shape = shape.translate(_SHAPE, _NOT_SHAPE).replace(b'""', b"")
    end = _nesting_within(limit).match(shape).end()
    return shape[end:end + 1] == b"("  # a group opened one level past the limit


def check_json_depth(text: str, limit: int) -> None:
    if json_deeper_than(text, limit):
        # the code stays invalid_json (the API's contract for "nested too deeply"); the
        # message names the limit
        raise ClientError(400, "invalid_json", f"JSON nested too deeply: more than {limit} "
                          f"levels; the limit is {limit} (security.max_json_depth)")


def redact_query(uri: str) -> str:
    """``uri`` with the value of every ``access_token`` query parameter replaced by
    ``REDACTED``, however its name is spelled: percent-encoding of any character (hex digits
    in either case), ``+`` for a space, any letter case.  Names are decoded as Tornado decodes
    them (``urllib.parse.unquote_plus``), so whatever Tornado reads as the token is redacted;
    one pass over the query."""
    path, sep, query = uri.partition("?")
    if not sep:
        return uri
    pieces = _QUERY_SEPARATORS.split(query)  # fields at even indices, separators between
    for i in range(0, len(pieces), 2):
        name, eq, _ = pieces[i].partition("=")
        if eq and urllib.parse.unquote_plus(name, "latin-1").lower() == TOKEN_PARAM:
            pieces[i] = f"{name}={REDACTED}"
    return f"{path}?{''.join(pieces)}"


def redact_request(request: tornado.httputil.HTTPServerRequest) -> None:
    """Redact subscribe tokens from ``request`` before anything can log it: Tornado's lines
    (errors, uncaught exceptions) print ``request.uri``.  The parsed arguments keep the token
    for ``admit_viewer``, except that a value that is not UTF-8 is replaced by one that is:
    Tornado's error for it would quote the bytes into a log line."""
    if "?" not in request.uri:
        return
    request.uri = redact_query(request.uri)
    request.query = request.uri.partition("?")[2]
    for args in (request.query_arguments, request.arguments):
        for name, values in args.items():
            if name.lower() == TOKEN_PARAM:
                args[name] = [v.decode("utf-8", "replace").encode("utf-8") for v in values]


def request_summary(request) -> str:
    """``METHOD URI (client)`` of a request for a log line, its subscribe tokens redacted."""
    return f"{request.method} {redact_query(request.uri)} ({request.remote_ip})"


class Application(tornado.web.Application):
    """Tornado's ``Application``, redacting every request (``redact_request``) as it is
    routed: before any handler runs, and so before any line about it is logged, whatever its
    route or status."""

    def find_handler(self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any):
        redact_request(request)
        return super().find_handler(request, **kwargs)


def check_comment_text(text: str) -> None:
    bad = _BAD_TEXT.search(text)
    if bad:
        ch = bad.group()
        what = "an unpaired surrogate" if "\ud800" <= ch <= "\udfff" else "control character"
        raise ClientError(400, "invalid_text", f"comment text contains {what} U+{ord(ch):04X} at "
                          f"position {bad.start()}; only \\n \\r \\t are allowed")


def bearer_token(handler: tornado.web.RequestHandler) -> str | None:
    value = handler.request.headers.get("Authorization", "")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


#: the answer to a CORS preflight from an allowed origin
PREFLIGHT_HEADERS = (("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                     ("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID"),
                     ("Access-Control-Max-Age", "600"), ("Allow", "GET, POST, OPTIONS"))
#: names a frontend bound to a loopback or wildcard address is reached under on this host
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def listening_origins(host: str, port: int) -> frozenset[str]:
    """The origins of a frontend listening on ``host``:``port`` (plain HTTP): its own address,
    and the loopback names when it listens on a loopback or wildcard address.  What a page
    served straight from the frontend has as its ``Origin``; a load balancer's origin is
    configured (``frontend.public_origins``)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    local = host in ("", "localhost") or (address is not None and (address.is_loopback or address.is_unspecified))
    names = set(LOOPBACK_HOSTS) if local else set()
    if address is not None and not address.is_unspecified:
        names.add(f"[{address}]" if address.version == 6 else str(address))
    elif address is None and host:
        names.add(host.lower())
    return frozenset(f"http://{name}:{port}" for name in names)


class Cors:
    """Which browser origins may call the API, and the CORS headers of each answer.

    A request without ``Origin`` is not a browser's and passes.  The frontend's own origins
    (``listening_origins`` and ``frontend.public_origins``) pass without CORS headers: the
    page at ``/`` publishes through them.  They are configured, never read from the request:
    a DNS-rebinding page at ``http://evil.example`` sends ``Host: evil.example`` and
    ``Origin: http://evil.example``, which match each other but no origin of ours.  Other
    origins pass when ``security.cors_origins`` lists them (``*``: any, except for a request
    with a ``Cookie``); the rest get ``403 origin_not_allowed``.  Reads headers only
    (anything with ``get`` and ``in``, as Tornado's ``HTTPHeaders``)."""

    def __init__(self, cors_origins, credentials: bool, public_origins, stats):
        self.listed = frozenset(o for o in cors_origins if o != "*")
        self.any_origin = "*" in cors_origins
        self.credentials = credentials
        self.public = frozenset(public_origins)
        self.own = self.public
        self.stats = stats

    def serve_on(self, host: str, port: int) -> None:
        """The frontend listens on ``host``:``port``: a page served from there is ours too."""
        self.own = self.public | listening_origins(host, port)

    def allowed_origin(self, headers) -> str | None:
        """The Access-Control-Allow-Origin value for this request (None: no CORS headers)."""
        origin = headers.get("Origin")
        if origin is None:
            return None
        if origin in self.listed:
            return origin
        if self.any_origin and "Cookie" not in headers:
            return "*"  # never for a credentialed request
        return None

    def check_origin(self, headers) -> None:
        """Raises ``403 origin_not_allowed`` for a browser origin that may not call the API."""
        origin = headers.get("Origin")
        if origin is None or origin in self.own or self.allowed_origin(headers) is not None:
            return
        self.stats["origin_refused"] += 1
        raise ClientError(403, "origin_not_allowed",
                          f"origin {origin[:100]!r} may not call this API: it is not this frontend's "
                          f"(frontend.public_origins) nor listed in security.cors_origins")

    def response_headers(self, headers) -> list[tuple[str, str]]:
        """The CORS headers of the answer to this request (``Vary`` is added, the rest set)."""
        allowed = self.allowed_origin(headers)
        if allowed is None:
            return []
        out = [("Access-Control-Allow-Origin", allowed)]
        if allowed != "*":
            out.append(("Vary", "Origin"))
            if self.credentials:
                out.append(("Access-Control-Allow-Credentials", "true"))
        out.append(("Access-Control-Expose-Headers", "Retry-After, WWW-Authenticate"))
        return out


def open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class FrontendSecurity:
    def __init__(self, cfg, node: "Frontend"):
        self.cfg = cfg
        sec = self.sec = cfg.security
        self.node = node
        self.stats = node.stats
        self.verifier: TokenVerifier | None = None
        if sec.auth == "jwt":
            pem = None
            if sec.jwt_public_key:
                try:
                    with open(sec.jwt_public_key, "rb") as fh:
                        pem = fh.read()
                except OSError as exc:
                    raise ConfigError(f"security.jwt_public_key: {sec.jwt_public_key}: {exc.strerror}") from None
            self.verifier = TokenVerifier(sec.jwt_secret, pem, audience=sec.jwt_audience,
                                          issuer=sec.jwt_issuer, leeway=sec.jwt_leeway,
                                          subscribe_ttl=sec.subscribe_token_ttl,
                                          max_lifetime=sec.jwt_max_lifetime)
            log.info("publishing needs a JWT (%s)", ", ".join(self.verifier.algorithms))
        else:
            log.warning("publishing is UNAUTHENTICATED (security.auth = off): anyone who reaches "
                        "this frontend may like and comment under any name; set security.auth = jwt "
                        "outside local development")
        self.policy = SubscribePolicy(sec.private_videos)
        _nesting_within(sec.max_json_depth)  # compiled here, not during the first publish
        if self.policy.patterns and self.verifier is None:
            raise ConfigError("security.private_videos needs security.auth = jwt")
        self.limits = PublishLimits(sec.like_rate, sec.like_burst, sec.comment_rate, sec.comment_burst,
                                    sec.ip_rate, sec.ip_burst)
        self.cors = Cors(sec.cors_origins, sec.cors_credentials, cfg.frontend.public_origins, self.stats)
        nofile = open_file_limit()
        unlimited = nofile == resource.RLIM_INFINITY or nofile <= sec.fd_reserve
        self.max_connections = nofile - sec.fd_reserve if sec.fd_reserve and not unlimited else None
        self.max_viewers = sec.max_viewers
        if self.max_connections is not None and self.max_viewers > self.max_connections - VIEWER_HEADROOM:
            self.max_viewers = max(1, self.max_connections - VIEWER_HEADROOM)
            log.warning("security.max_viewers %d lowered to %d: the open-file limit is %d "
                        "(fd_reserve %d)", sec.max_viewers, self.max_viewers, nofile, sec.fd_reserve)
        self._by_ip: dict[str, set] = {}  # ip -> its open SSE streams (released on close)
        self.raw_streams = 0  # streams handed over from Tornado to frontend.stream
        self._swept = 0.0
        self._reserve_fd: int | None = None
        self._shed_since_log = 0
        self._shed_logged_at = -1e9
        self._limited_since_log = 0
        self._limited_logged_at = -1e9
        self._server = None  # counts Tornado's connections (``open_connections``)
        self.sockets: list[socket.socket] = []
        self._stop_accepting: list = []

    # --- publishing -------------------------------------------------------------------------

    def check_publish(self, handler: tornado.web.RequestHandler, video: str, kind: str) -> str | None:
        """Origin, rate limits and token of one publish; the verified user (None: auth off)."""
        self.cors.check_origin(handler.request.headers)
        now = time.monotonic()
        wait = self.limits.check_ip(handler.request.remote_ip or "?", now)
        if wait:
            self._rate_limited(handler, wait, f"too many publishes from your address (limit "
                               f"{self.sec.ip_rate:g}/s, burst {self.sec.ip_burst})")
        if self.verifier is None:
            return None
        grant = self._authorize(handler, bearer_token(handler), video, kind, False)
        wait = self.limits.check_user(grant.user, video, kind, now)
        if wait:
            rate, burst = ((self.sec.like_rate, self.sec.like_burst) if kind == "like"
                           else (self.sec.comment_rate, self.sec.comment_burst))
            self._rate_limited(handler, wait, f"too many {kind}s by {grant.user} on {video} "
                               f"(limit {rate:g}/s, burst {burst})")
        return grant.user

    def _authorize(self, handler, token, video: str, action: str, subscribe_token: bool) -> Grant:
        try:
            return self.verifier.authorize(token, video, action, subscribe_token)
        except ClientError as err:
            self.stats[f"auth_{err.status}"] += 1
            if err.status == 401:
                hint = 'Bearer realm="livemesh"' if err.code == "missing_token" else \
                    'Bearer realm="livemesh", error="invalid_token"'
                handler._security_headers = {"WWW-Authenticate": hint}
            raise

    def _rate_limited(self, handler, wait: float, message: str) -> None:
        self.stats["rate_limited"] += 1
        retry_after = max(1, math.ceil(wait))
        handler._security_headers = {"Retry-After": str(retry_after)}
        raise ClientError(429, "rate_limited", f"{message}; retry after {retry_after} s", retryable=True)

    def log_request(self, handler) -> None:
        """The access log (Tornado's ``log_function``, and the publish fast path's: what
        Tornado logs, at its levels), except for 429s: counted in ``rate_limited`` and summed
        up in at most one line per ``SHED_LOG_INTERVAL``.  Every line reads the request
        through ``request_summary``, which redacts subscribe tokens."""
        status = handler.get_status()
        if status == 429:
            self._limited_since_log += 1
            now = time.monotonic()
            if now - self._limited_logged_at >= SHED_LOG_INTERVAL:
                access_log.warning("429: rate limited %d requests in the last %.0f s, the latest %s",
                                   self._limited_since_log, SHED_LOG_INTERVAL, request_summary(handler.request))
                self._limited_logged_at = now
                self._limited_since_log = 0
            return
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
        if access_log.isEnabledFor(level):  # info is off by default: no summary made per request
            access_log.log(level, "%d %s %.2fms", status, request_summary(handler.request),
                           1000.0 * handler.request.request_time())

    # --- viewers ----------------------------------------------------------------------------

    def admit_viewer(self, handler: tornado.web.RequestHandler, video: str) -> str:
        """Connection limits and subscribe policy of a new SSE stream (raises ClientError).
        Sets ``handler.auth_user`` (the verified user, or None); returns the client IP, which
        the stream counts against once ``track_viewer`` sees it."""
        request = handler.request
        query_token = handler.get_query_argument(TOKEN_PARAM, None)  # redacted from the URI
        handler.auth_user = None
        ip = request.remote_ip or "?"
        now = time.monotonic()
        if now - self._swept >= SWEEP_INTERVAL:
            self._sweep(now)
        mine = self._by_ip.get(ip)
        if mine and len(mine) >= self.sec.max_viewers_per_ip:
            mine.difference_update([v for v in mine if v.closed])  # only at the limit: O(1) per admit
        if mine and len(mine) >= self.sec.max_viewers_per_ip:
            self.stats["viewers_refused_ip"] += 1
            handler._security_headers = {"Retry-After": "10"}
            raise ClientError(429, "too_many_streams", f"your address has {len(mine)} open streams; "
                              f"the limit is {self.sec.max_viewers_per_ip}", retryable=True)
        if len(self.node.table) >= self.max_viewers:
            self.stats["viewers_refused_full"] += 1
            handler._security_headers = {"Retry-After": "5"}
            raise ClientError(503, "frontend_full", f"this frontend serves its maximum of "
                              f"{self.max_viewers} streams; try another", retryable=True)
        header_token = bearer_token(handler)
        if self.policy.is_private(video) or ((header_token or query_token) and self.verifier):
            if header_token:
                grant = self._authorize(handler, header_token, video, ACTION_SUBSCRIBE, False)
            else:
                grant = self._authorize(handler, query_token, video, ACTION_SUBSCRIBE, True)
            handler.auth_user = grant.user
        return ip

    def track_viewer(self, viewer) -> None:
        """An admitted stream (``frontend.stream.ViewerStream``) counts against its address."""
        self._by_ip.setdefault(viewer.ip, set()).add(viewer)

    def release_viewer(self, viewer) -> None:
        """A stream closed: it no longer counts against its address."""
        mine = self._by_ip.get(viewer.ip)
        if mine is not None:
            mine.discard(viewer)
            if not mine:
                del self._by_ip[viewer.ip]

    def stream_attached(self) -> None:
        """A connection outside Tornado (a viewer's stream it handed over, or one on the
        publish fast path; ``HTTPServer`` does not count those): count it here, so the
        connection limit still sees every socket."""
        self.raw_streams += 1

    def stream_detached(self) -> None:
        self.raw_streams -= 1

    def open_connections(self) -> int:
        return self._server.open_connections + self.raw_streams

    def _sweep(self, now: float) -> None:
        self._swept = now
        for ip in list(self._by_ip):
            alive = {v for v in self._by_ip[ip] if not v.closed}
            if alive:
                self._by_ip[ip] = alive
            else:
                del self._by_ip[ip]

    # --- CORS -------------------------------------------------------------------------------

    def before_headers(self, handler: tornado.web.RequestHandler) -> None:
        for name, value in getattr(handler, "_security_headers", {}).items():
            handler.set_header(name, value)
        for name, value in self.cors.response_headers(handler.request.headers):
            if name == "Vary":
                handler.add_header(name, value)
            else:
                handler.set_header(name, value)

    def preflight(self, handler: tornado.web.RequestHandler) -> None:
        """``OPTIONS``: the CORS preflight of a browser about to publish."""
        self.cors.check_origin(handler.request.headers)
        handler.set_status(204)
        for name, value in PREFLIGHT_HEADERS:
            handler.set_header(name, value)
        handler.finish()

    # --- accepting connections ----------------------------------------------------------------

    def listen(self, server, port: int, host: str, on_connection) -> list[socket.socket]:
        """Bind ``port`` on ``host`` with our accept loop and header deadline; accepted
        connections go to ``on_connection(sock, address)``.  ``server`` counts Tornado's
        connections (``open_connections``).  Returns the listening sockets
        (``stop_listening`` closes them)."""
        server.conn_params.header_timeout = self.sec.header_timeout
        self._server = server
        self._reserve_fd = _open_reserve()
        # a deep accept queue: bursts of viewers (a live event starting) wait in the kernel
        # instead of being dropped and retried after 1 s, 3 s, ... (Tornado's default is 128)
        self.sockets = tornado.netutil.bind_sockets(port, address=host, backlog=ACCEPT_BACKLOG)
        self.cors.serve_on(host, self.sockets[0].getsockname()[1])
        self._stop_accepting = [self._add_accept_handler(sock, on_connection) for sock in self.sockets]
        return self.sockets

    def stop_listening(self) -> None:
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
                if self.max_connections is not None and self.open_connections() >= self.max_connections:
                    self._shed(conn, "the connection limit")
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
                self._shed(conn, "the open-file limit")
        finally:
            self._reserve_fd = _open_reserve()
        return self._reserve_fd is not None

    def _shed(self, conn: socket.socket, why: str) -> None:
        try:
            conn.setblocking(False)
            conn.send(SHED_RESPONSE)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the client is gone already: nothing to tell it
        finally:
            conn.close()
        self._count_shed(why, 1)

    def _count_shed(self, why: str, n: int) -> None:
        self.stats["connections_shed"] += n
        self._shed_since_log += n
        now = time.monotonic()
        if now - self._shed_logged_at >= SHED_LOG_INTERVAL:
            log.warning("at %s (%d open connections, open-file limit %d): shed %d new connections "
                        "in the last %.0f s with 503", why, self.open_connections(),
                        open_file_limit(), self._shed_since_log, SHED_LOG_INTERVAL)
            self._shed_logged_at = now
            self._shed_since_log = 0


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None

