"""The frontend's guards: who may publish and watch, how fast, from which origins, and what
the access log says.  Connection caps and the accept loop are ``frontend.admission``'s.

Theory of operation.  Each guard is a small class with one job, given only the settings and
counters it needs; ``FrontendSecurity`` puts them together for the HTTP handlers
(``frontend/http.py``) and the publish fast path (``frontend/ingest.py``), which call in at a
few points.  The decisions are in the sans-IO cores (``mesh.core.auth``, ``mesh.core.ratelimit``):

* ``authorize_publish`` (every POST, the first of ``publish_checks``, ``mesh.core.checks``):
  browser origin (``Cors``), per-IP token bucket (``RateLimits``), JWT (``Auth``:
  ``Authorization: Bearer``), per-user-per-video token bucket; returns the verified user (or
  None when ``security.auth = off``).  The IP limit comes before the token so a flood of bad
  tokens costs no signature checks.
* ``admit_watcher`` (every SSE GET): per-IP and per-frontend stream limits
  (``frontend.admission.ViewerLimits``), then the video's subscribe policy (private videos need
  a token: ``Authorization`` header, or a short-lived subscribe token in ``?access_token=``,
  which ``Application`` redacts from the request URI before any handler runs, so no log line
  can carry it).
* ``cors_headers`` (every response): the CORS fields of an answer, from the request's fields;
  a refusal's own fields (``Retry-After``, ``WWW-Authenticate``) travel with its
  ``ClientError.headers``.
* ``log_access`` (every answer): ``AccessLog``, which sums rate-limited requests up instead
  of logging each.
* ``listen``: the accept loop and connection counting of ``frontend.admission``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import urllib.parse
from typing import Any, Callable

import tornado.httputil
import tornado.web
from tornado.log import access_log

from mesh.core.auth import ACTION_SUBSCRIBE, Grant, SubscribePolicy, TokenVerifier
from mesh.core.checks import PublishChecks
from mesh.core.ratelimit import PublishLimits
from mesh.errors import ClientError, ConfigError

from .admission import (SHED_LOG_INTERVAL, Acceptor, ConnectionLimits, CountingHTTPServer, Tally,
                        ViewerLimits, connection_limit, per_ip_connection_cap)

log = logging.getLogger("mesh.app")

#: the query parameter of a subscribe token (``mesh.core.auth``), and what a log reads instead
TOKEN_PARAM = "access_token"
REDACTED = "REDACTED"
#: query-string separators: ``&`` (how Tornado splits), and ``;`` (how some clients do)
_QUERY_SEPARATORS = re.compile("([&;])")
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


def request_summary(method: str, uri: str, remote_ip: str | None) -> str:
    """``METHOD URI (client)`` of a request for a log line, its subscribe tokens redacted."""
    return f"{method} {redact_query(uri)} ({remote_ip})"


class Application(tornado.web.Application):
    """Tornado's ``Application``, redacting every request (``redact_request``) as it is
    routed: before any handler runs, and so before any line about it is logged, whatever its
    route or status."""

    def find_handler(self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any):
        redact_request(request)
        return super().find_handler(request, **kwargs)


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


def bearer_token(headers) -> str | None:
    """The token of an ``Authorization: Bearer`` field (None: no such field)."""
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class Auth:
    """Tokens: the verifier built from ``security.*`` (None with ``auth = off``) and the
    subscribe policy of private videos.  Counts refusals in ``stats`` (``auth_401``,
    ``auth_403``); a 401 carries the ``WWW-Authenticate`` challenge of RFC 6750."""

    def __init__(self, sec, stats):
        self.stats = stats
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
        if self.policy.patterns and self.verifier is None:
            raise ConfigError("security.private_videos needs security.auth = jwt")

    @property
    def enabled(self) -> bool:
        return self.verifier is not None

    def authorize(self, token: str | None, video: str, action: str, subscribe_token: bool = False) -> Grant:
        try:
            return self.verifier.authorize(token, video, action, subscribe_token)
        except ClientError as err:
            self.stats[f"auth_{err.status}"] += 1
            if err.status == 401:
                err.headers["WWW-Authenticate"] = 'Bearer realm="livemesh"' if err.code == "missing_token" \
                    else 'Bearer realm="livemesh", error="invalid_token"'
            raise

    def watcher(self, headers, query_token: str | None, video: str) -> str | None:
        """The verified user of a new stream of ``video`` (None: anonymous).  A private video
        needs a token; a token sent for a public one is checked as well."""
        header_token = bearer_token(headers)
        if not (self.policy.is_private(video) or ((header_token or query_token) and self.verifier)):
            return None
        if header_token:
            return self.authorize(header_token, video, ACTION_SUBSCRIBE).user
        return self.authorize(query_token, video, ACTION_SUBSCRIBE, subscribe_token=True).user


class RateLimits:
    """The publish token buckets (``mesh.core.ratelimit``): per client IP, and per verified
    user per video.  A refusal is ``429 rate_limited`` with ``Retry-After`` in whole seconds,
    counted in ``stats["rate_limited"]``."""

    def __init__(self, sec, stats):
        self.sec = sec
        self.stats = stats
        self.limits = PublishLimits(sec.like_rate, sec.like_burst, sec.comment_rate, sec.comment_burst,
                                    sec.ip_rate, sec.ip_burst)

    def check_ip(self, ip: str, now: float) -> None:
        wait = self.limits.check_ip(ip, now)
        if wait:
            self._refuse(wait, f"too many publishes from your address (limit {self.sec.ip_rate:g}/s, "
                         f"burst {self.sec.ip_burst})")

    def check_user(self, user: str, video: str, kind: str, now: float) -> None:
        wait = self.limits.check_user(user, video, kind, now)
        if wait:
            rate, burst = ((self.sec.like_rate, self.sec.like_burst) if kind == "like"
                           else (self.sec.comment_rate, self.sec.comment_burst))
            self._refuse(wait, f"too many {kind}s by {user} on {video} (limit {rate:g}/s, burst {burst})")

    def _refuse(self, wait: float, message: str) -> None:
        self.stats["rate_limited"] += 1
        retry_after = max(1, math.ceil(wait))
        raise ClientError(429, "rate_limited", f"{message}; retry after {retry_after} s", retryable=True,
                          headers={"Retry-After": str(retry_after)})


class AccessLog:
    """One line per answer on ``tornado.access`` at Tornado's levels (info below 400, warning
    below 500, error above), except 429s: a flood of them is summed up in at most one line per
    ``SHED_LOG_INTERVAL``.  Every line reads the request through ``request_summary``, which
    redacts subscribe tokens."""

    def __init__(self):
        self.limited = Tally()

    def log(self, status: int, method: str, uri: str, remote_ip: str | None, seconds: float) -> None:
        """One answer of ``status`` to ``method uri`` from ``remote_ip``, ``seconds`` after
        the request arrived."""
        if status == 429:
            count = self.limited.add()
            if count is not None:
                access_log.warning("429: rate limited %d requests in the last %.0f s, the latest %s",
                                   count, SHED_LOG_INTERVAL, request_summary(method, uri, remote_ip))
            return
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
        if access_log.isEnabledFor(level):  # info is off by default: no summary made per request
            access_log.log(level, "%d %s %.2fms", status, request_summary(method, uri, remote_ip),
                           1000.0 * seconds)


class FrontendSecurity:
    """The guards of one frontend, put together for its request paths (module docstring).
    ``stats``: the node's counters; ``viewer_count()``: its open SSE streams."""

    def __init__(self, cfg, stats, viewer_count: Callable[[], int]):
        sec = self.sec = cfg.security
        self.frontend_settings = cfg.frontend
        self.header_timeout = sec.header_timeout
        self.stats = stats
        self.auth = Auth(sec, stats)
        self.rate_limits = RateLimits(sec, stats)
        self.cors = Cors(sec.cors_origins, sec.cors_credentials, cfg.frontend.public_origins, stats)
        self.access_log = AccessLog()
        max_connections = connection_limit(sec.fd_reserve)
        self.connections = ConnectionLimits(max_connections, per_ip_connection_cap(
            sec.max_connections_per_ip, sec.max_viewers_per_ip))
        self.viewers = ViewerLimits(sec.max_viewers, sec.max_viewers_per_ip, max_connections, viewer_count, stats)
        self.acceptor = Acceptor(self.connections, stats)

    # --- publishing -------------------------------------------------------------------------

    def publish_checks(self) -> PublishChecks:
        """Every check of a publish (``mesh.core.checks``), ``authorize_publish`` first."""
        f = self.frontend_settings
        return PublishChecks(authorize=self.authorize_publish, max_body_bytes=f.max_body_bytes,
                             max_json_depth=self.sec.max_json_depth, max_comment_chars=f.max_comment_chars)

    def authorize_publish(self, headers, ip: str, video: str, kind: str, now: float) -> str | None:
        """Origin, rate limits and token of one publish from ``ip``; the verified user (None:
        auth off).  Raises ``ClientError``, with the headers its answer needs."""
        self.cors.check_origin(headers)
        self.rate_limits.check_ip(ip, now)
        if not self.auth.enabled:
            return None
        user = self.auth.authorize(bearer_token(headers), video, kind).user
        self.rate_limits.check_user(user, video, kind, now)
        return user

    def log_request(self, handler: tornado.web.RequestHandler) -> None:
        """Tornado's ``log_function``: ``log_access`` of the request ``handler`` answered."""
        request = handler.request
        self.access_log.log(handler.get_status(), request.method, request.uri, request.remote_ip,
                            request.request_time())

    def log_access(self, status: int, method: str, uri: str, remote_ip: str | None, seconds: float) -> None:
        """The access log of every answer (``AccessLog``): Tornado's and the publish fast path's."""
        self.access_log.log(status, method, uri, remote_ip, seconds)

    # --- viewers ----------------------------------------------------------------------------

    def admit_watcher(self, headers, query_token: str | None, ip: str, video: str, now: float) -> str | None:
        """Stream limits and subscribe policy of a new stream of ``video`` from ``ip``; its
        verified user (None: anonymous).  Raises ``ClientError``, with the headers its answer needs."""
        self.viewers.admit(ip, now)
        return self.auth.watcher(headers, query_token, video)

    def track_viewer(self, viewer) -> None:
        self.viewers.track(viewer)

    def release_viewer(self, viewer) -> None:
        self.viewers.release(viewer)

    def stream_attached(self, ip: str) -> None:
        """A connection outside Tornado (a viewer's stream it handed over, or one on the
        publish fast path; ``HTTPServer`` does not count those) counts against ``ip`` and the
        connection limit until ``stream_detached``."""
        self.connections.opened(ip)

    def stream_detached(self, ip: str) -> None:
        self.connections.closed(ip)

    def open_connections(self) -> int:
        return self.connections.total

    # --- CORS -------------------------------------------------------------------------------

    def cors_headers(self, headers) -> list[tuple[str, str]]:
        """The CORS fields of the answer to a request with ``headers`` (``Cors``)."""
        return self.cors.response_headers(headers)

    def preflight(self, handler: tornado.web.RequestHandler) -> None:
        """``OPTIONS``: the CORS preflight of a browser about to publish."""
        self.cors.check_origin(handler.request.headers)
        handler.set_status(204)
        for name, value in PREFLIGHT_HEADERS:
            handler.set_header(name, value)
        handler.finish()

    # --- accepting connections ----------------------------------------------------------------

    def listen(self, server: CountingHTTPServer, port: int, host: str, on_connection):
        """Bind ``port`` on ``host`` with the accept loop of ``frontend.admission``; accepted
        connections go to ``on_connection(sock, address)``.  ``server`` counts Tornado's
        connections and gets the header and write deadline.  Returns the listening sockets
        (``stop_listening`` closes them)."""
        server.conn_params.header_timeout = self.header_timeout
        server.count_into(self.connections, self.header_timeout, self.stats)
        sockets = self.acceptor.listen(port, host, on_connection)
        self.cors.serve_on(host, sockets[0].getsockname()[1])
        return sockets

    def stop_listening(self) -> None:
        self.acceptor.stop()
