"""The frontend's HTTP API (Tornado): thin adapters from HTTP to the node's core.

Routes:

* ``GET  /v1/videos/{video}/events``    Server-Sent Events stream of the video
* ``POST /v1/videos/{video}/likes``     optional JSON body ``{"user": str[, "id": key]}``
* ``POST /v1/videos/{video}/comments``  JSON body ``{"user": str, "text": str[, "id": key]}``

A publish may name an idempotency key, in the ``Idempotency-Key`` field or as the body's
``id`` (``mesh.core.checks.idempotency_key``): its retries, on any frontend, are answered with the first
placement and delivered once.
* ``GET  /healthz``
* ``GET  /``, ``/static/{file}``, ``/metrics``: the page and metrics (``frontend/page.py``)

Every error is JSON: ``{"error": {"code": str, "message": str, "retryable": bool}}``.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import time
from typing import Any, Callable, NamedTuple

import tornado.web
from tornado.httputil import format_timestamp
from tornado.ioloop import IOLoop

from mesh.config import FrontendSection
from mesh.wire import protocol as P
from mesh.errors import ClientError
from mesh.core.checks import PublishRequest, check_user, check_video
from mesh.core.sse import encode_retry

from .link import acked
from .page import page_routes
from .security import TOKEN_PARAM
from .stream import ViewerStream

log = logging.getLogger("mesh.app")

_conn_ids = itertools.count(1)


class Api(NamedTuple):
    """What the HTTP handlers call, each handed in by the node (``frontend/node.py``)."""

    settings: FrontendSection
    #: ``security.auth = "off"``: a viewer's ``?user=`` names it
    auth_off: bool
    #: the CORS fields of an answer, from the request's fields
    cors_headers: Callable[[Any], list[tuple[str, str]]]
    #: answers an ``OPTIONS`` (CORS preflight) on the handler
    preflight: Callable[[tornado.web.RequestHandler], None]
    #: ``(headers, query_token, ip, video, now)`` -> the verified user (None: anonymous);
    #: raises ClientError (stream limits, private videos)
    admit_watcher: Callable[..., str | None]
    #: ``(conn_id, video, user, ip, catching_up)`` -> a ``ViewerStream`` not yet attached
    new_viewer: Callable[..., ViewerStream]
    add_viewer: Callable[[ViewerStream], None]
    wait_synced: Callable[..., Any]
    history: Callable[..., Any]
    presence_page: Callable[..., Any]
    #: ``(request, video, kind)`` -> the event, after every check (``mesh.core.checks``)
    publish_event: Callable[[PublishRequest, str, str], dict]
    #: ``(events, on_result)`` -> one result per event (``Publisher.publish_many``)
    publish_many: Callable[..., Any]
    health: Callable[[], dict]


class JSONHandler(tornado.web.RequestHandler):
    """Base: errors as JSON, no HTML error pages; CORS fields on every answer."""

    api: Api | None = None

    def initialize(self, api: Api) -> None:
        self.api = api
        self.set_default_headers()

    def set_default_headers(self) -> None:
        """Run when the handler starts and again by ``clear()`` before an error is sent, so
        every answer has these fields (before ``initialize`` there is no ``api`` yet)."""
        self.clear_header("Server")  # no version advertised
        if self.api is not None:
            for name, value in self.api.cors_headers(self.request.headers):
                if name == "Vary":
                    self.add_header(name, value)
                else:
                    self.set_header(name, value)

    def options(self, *args) -> None:
        self.api.preflight(self)  # CORS preflight

    def log_exception(self, typ, value, tb) -> None:
        """A ClientError is an answer, not a failure: only other exceptions are logged."""
        if not isinstance(value, ClientError):
            super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ClientError):
            err = exc
            self.set_status(err.status)
        elif status_code == 405:
            err = ClientError(405, "method_not_allowed",
                              f"{self.request.method} is not allowed on {self.request.path}")
        elif status_code == 404:
            err = ClientError(404, "not_found", f"no route for {self.request.path}")
        elif status_code < 500:
            reason = exc.reason if isinstance(exc, tornado.web.HTTPError) and exc.reason else None
            err = ClientError(status_code, "bad_request",
                              reason or http.client.responses.get(status_code, "Bad Request"))
        else:
            err = ClientError(status_code, "internal", "internal error", retryable=True)
        for name, value in err.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(err.to_json()))


class NotFoundHandler(JSONHandler):
    def prepare(self) -> None:
        raise ClientError(404, "not_found", f"no route for {self.request.path}")


class HealthHandler(JSONHandler):
    """200 while the frontend serves (status ``ok``, or ``degraded`` while it knows no
    dispatcher); 503 ``draining`` after SIGTERM, which takes it out of a load balancer's
    rotation while it still serves (``Frontend.shutdown``)."""

    def get(self) -> None:
        health = self.api.health()
        if health["status"] == "draining":
            self.set_status(503)
        self.write(health)


class EventsHandler(JSONHandler):
    """A viewer's SSE request, up to its response head; then the connection is handed to a
    ``ViewerStream`` (``frontend/stream.py``), which the fan-out writes to.

    The head waits until the owner confirmed the subscription (the slow joiner).  A viewer
    that reconnects with ``Last-Event-ID`` (header, or ``?lastEventId=`` for clients that
    cannot set headers) first gets the events it missed from the owner's history; live events
    arriving meanwhile are held by the stream and passed on after the history, without the
    ones history already gave.  When history cannot say, the viewer gets ``reset``.
    """

    viewer: ViewerStream | None = None

    async def get(self, video: str) -> None:
        check_video(video)
        api = self.api
        request = self.request
        ip = request.remote_ip or "?"
        # the query's token is redacted from the URI, kept in the parsed arguments
        auth_user = api.admit_watcher(request.headers, self.get_query_argument(TOKEN_PARAM, None), ip,
                                      video, time.monotonic())
        last_id = request.headers.get("Last-Event-ID") or self.get_query_argument("lastEventId", None)
        after = P.parse_sse_id(last_id) if last_id else None
        f = api.settings
        viewer = self.viewer = api.new_viewer(next(_conn_ids), video, self.viewer_identity(auth_user),
                                              ip, bool(last_id))
        viewer.send(encode_retry(f.retry_ms))
        api.add_viewer(viewer)
        synced = await api.wait_synced(video, f.sync_timeout)
        if viewer.closed:
            return
        if not synced:
            log.warning("viewer %s of %s opened before the owner confirmed the subscription",
                        viewer.conn_id, video)
        if viewer.held is not None:
            chain = None
            if after is not None:
                chain = await api.history(video, after, f.gap_timeout)
            if viewer.closed:
                return
            viewer.catch_up(chain, after)
        self._open(viewer)

    def viewer_identity(self, auth_user: str | None) -> str | None:
        """Who a viewer is, for presence: the verified ``sub`` of its token when it sent one;
        with ``security.auth = "off"`` the ``user`` query parameter (anonymous without).  With
        JWT auth on, a self-declared ``?user=`` is not trusted: such a viewer is anonymous."""
        if auth_user:
            return auth_user
        if not self.api.auth_off:
            return None
        user = self.get_query_argument("user", None)
        return None if user is None or user == "" else check_user(user)

    def _open(self, viewer: ViewerStream) -> None:
        """Write the response head ourselves and hand the socket to ``viewer``."""
        fields = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
                  ("X-Accel-Buffering", "no"),
                  ("Connection", "close"),  # the body ends when the connection does
                  ("Date", format_timestamp(time.time())),
                  *self.api.cors_headers(self.request.headers)]
        head = "".join(f"{k}: {v}\r\n" for k, v in fields)
        stream = self.detach()  # Tornado finishes no response it no longer owns
        self.ui = None  # what finish() would do: no cycle left for the collector
        sock, stream.socket = stream.socket, None
        if sock is None:  # closed just now; its close callback has not run yet
            viewer.close()
            return
        IOLoop.current().remove_handler(sock.fileno())  # the IOStream's EOF watch
        viewer.attach(sock, f"HTTP/1.1 200 OK\r\n{head}\r\n".encode("latin-1"))
        self.viewer = None  # the handler is done; the stream lives on in the node's tables

    def on_connection_close(self) -> None:
        if self.viewer is not None:  # the viewer left before its head went out
            self.viewer.close()

    def on_finish(self) -> None:
        self.on_connection_close()


class PublishHandler(JSONHandler):
    """A publish served by Tornado: what the fast path (``frontend/ingest.py``) hands over
    (chunked or ``Expect`` bodies, HTTP/1.0, ...) and every publish when it is off.  The
    checks are the fast path's (``mesh.core.checks``)."""

    kind = ""

    def initialize(self, api: Api, kind: str) -> None:  # type: ignore[override]
        self.kind = kind
        super().initialize(api)

    async def post(self, video: str) -> None:
        request = self.request
        event = self.api.publish_event(PublishRequest(request.method, request.uri, request.headers,
                                                      request.body, request.remote_ip or "?",
                                                      time.monotonic()), video, self.kind)
        (result,) = await self.api.publish_many([event])
        self.set_status(202)
        self.write(accepted(event, acked(result)))


def accepted(event: dict, ack: dict) -> dict:
    """The 202 body of a published event, from its owner's ack."""
    return {"id": event["id"], "video": event["video"], "epoch": ack["epoch"], "seq": ack["seq"],
            "sse_id": f"{ack['epoch']}:{ack['seq']}"}


class PresenceHandler(JSONHandler):
    """``GET /v1/videos/{video}/presence?offset=0&limit=100``: the owner's merged presence
    (its DC's frontends and the summaries of the peer DCs it receives, ``mesh.core.presence``)."""

    async def get(self, video: str) -> None:
        check_video(video)
        try:
            offset = int(self.get_query_argument("offset", "0"))
            limit = int(self.get_query_argument("limit", "100"))
        except ValueError:
            raise ClientError(400, "invalid_paging", "offset and limit must be integers") from None
        if offset < 0 or not 0 < limit <= 1000:
            raise ClientError(400, "invalid_paging", "offset >= 0 and 1 <= limit <= 1000")
        page = await self.api.presence_page(video, offset, limit, self.api.settings.gap_timeout)
        self.write({"video": video, "count": page["count"], "users": page["users"],
                    "total_users": page["total_users"], "offset": offset, "limit": limit,
                    "dcs": page.get("dcs", {})})


def routes(api: Api, metrics_registry) -> list:
    video = r"/v1/videos/([^/]+)"
    return [
        (video + r"/events", EventsHandler, {"api": api}),
        (video + r"/likes", PublishHandler, {"api": api, "kind": P.KIND_LIKE}),
        (video + r"/comments", PublishHandler, {"api": api, "kind": P.KIND_COMMENT}),
        (video + r"/presence", PresenceHandler, {"api": api}),
        (r"/healthz", HealthHandler, {"api": api}),
        *page_routes(metrics_registry),  # the page at /, its static files, /metrics
    ]
