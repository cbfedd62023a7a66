"""The frontend's HTTP API (Tornado): thin adapters from HTTP to the node's core.

Routes:

* ``GET  /v1/videos/{video}/events``    Server-Sent Events stream of the video
* ``POST /v1/videos/{video}/likes``     optional JSON body ``{"user": str[, "id": key]}``
* ``POST /v1/videos/{video}/comments``  JSON body ``{"user": str, "text": str[, "id": key]}``

A publish may name an idempotency key, in the ``Idempotency-Key`` field or as the body's
``id`` (``idempotency_key``): its retries, on any frontend, are answered with the first
placement and delivered once.
* ``GET  /healthz``
* ``GET  /``, ``/static/{file}``, ``/metrics``: the page and metrics (``frontend/page.py``)

Every error is JSON: ``{"error": {"code": str, "message": str, "retryable": bool}}``.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from typing import TYPE_CHECKING

import tornado.web
from tornado.ioloop import IOLoop

from mesh.wire import protocol as P
from mesh.errors import ClientError
from mesh.core.sequencing import IDEMPOTENCY_KEY_MAX, event_id_for_key, parse_idempotency_key
from mesh.core.sse import encode_retry

from .link import acked
from .page import page_routes
from .security import check_comment_text, check_json_depth
from .stream import ViewerStream

if TYPE_CHECKING:
    from .node import Frontend

log = logging.getLogger("mesh.app")

_conn_ids = itertools.count(1)


class JSONHandler(tornado.web.RequestHandler):
    """Base: errors as JSON, no HTML error pages."""

    def initialize(self, node: "Frontend") -> None:
        self.node = node

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # no version advertised

    def flush(self, include_footers: bool = False):
        if not self._headers_written:  # CORS, Retry-After, WWW-Authenticate: frontend/security.py
            self.node.security.before_headers(self)
        return super().flush(include_footers)

    def options(self, *args) -> None:
        self.node.security.preflight(self)  # CORS preflight

    def send_client_error(self, err: ClientError) -> None:
        self.clear()
        self.set_status(err.status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(err.to_json()))

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ClientError):
            err = exc
        elif status_code == 405:
            err = ClientError(405, "method_not_allowed",
                              f"{self.request.method} is not allowed on {self.request.path}")
        elif status_code == 404:
            err = ClientError(404, "not_found", f"no route for {self.request.path}")
        elif status_code < 500:
            err = ClientError(status_code, "bad_request", self._reason)
        else:
            err = ClientError(status_code, "internal", "internal error", retryable=True)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(err.to_json()))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, ClientError):
            if not self._finished:
                self.send_client_error(e)
            return
        super()._handle_request_exception(e)


class NotFoundHandler(JSONHandler):
    def prepare(self) -> None:
        raise ClientError(404, "not_found", f"no route for {self.request.path}")


def check_video(video: str) -> str:
    if not P.valid_video_id(video):
        raise ClientError(400, "invalid_video",
                          "video id must be 1-64 characters of A-Z a-z 0-9 . _ -, "
                          "starting with a letter or digit")
    return video


class HealthHandler(JSONHandler):
    def get(self) -> None:
        self.write(self.node.health())


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
        node = self.node
        ip = node.security.admit_viewer(self, video)  # limits, private videos: sets auth_user
        last_id = self.request.headers.get("Last-Event-ID") or self.get_query_argument("lastEventId", None)
        after = P.parse_sse_id(last_id) if last_id else None
        f = node.cfg.frontend
        viewer = self.viewer = ViewerStream(node, next(_conn_ids), video, viewer_identity(self), ip,
                                            bool(last_id), f.max_buffer_bytes)
        viewer.send(encode_retry(f.retry_ms))
        node.add_viewer(viewer)
        synced = await node.link.wait_synced(video, f.sync_timeout)
        if viewer.closed:
            return
        if not synced:
            log.warning("viewer %s of %s opened before the owner confirmed the subscription",
                        viewer.conn_id, video)
        if viewer.held is not None:
            chain = None
            if after is not None:
                chain = await node.link.history(video, after, f.gap_timeout)
            if viewer.closed:
                return
            viewer.catch_up(chain, after)
        self._open(viewer)

    def _open(self, viewer: ViewerStream) -> None:
        """Write the response head ourselves and hand the socket to ``viewer``."""
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self.set_header("Connection", "close")  # the body ends when the connection does
        self.node.security.before_headers(self)  # CORS
        head = "".join(f"{k}: {v}\r\n" for k, v in self._headers.get_all())
        stream = self.detach()
        self._finished = True  # Tornado must not finish a response it no longer owns
        self._break_cycles()  # what finish() would do: no cycle left for the collector
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
    (chunked or ``Expect`` bodies, HTTP/1.0, ...) and every publish when it is off."""

    kind = ""

    def initialize(self, node: "Frontend", kind: str) -> None:  # type: ignore[override]
        self.node = node
        self.kind = kind

    async def post(self, video: str) -> None:
        result = await publish(self.node, self, video, self.kind, self.request.body)
        self.set_status(202)
        self.write(result)


async def publish(node: "Frontend", call, video: str, kind: str, raw: bytes) -> dict:
    """One publish request: checks, the event to its owner, and the 202 body.  ``call`` is the
    ``RequestHandler`` the guards read the request from (``frontend/security.py``); errors
    raise ClientError.  The fast path (``frontend/ingest.py``) runs the same two halves,
    ``prepare_publish`` and ``accepted``, for a loop turn's requests at once."""
    event = prepare_publish(node, call, video, kind, raw)
    return accepted(event, acked((await node.publish_many([event]))[0]))


def prepare_publish(node: "Frontend", call, video: str, kind: str, raw: bytes) -> dict:
    """The event a publish request asks for, after every check (raises ClientError)."""
    check_video(video)
    auth_user = node.security.check_publish(call, video, kind)  # origin, limits, JWT
    body = parse_body(node, kind, raw)
    user = body.get("user") if auth_user is None else auth_user  # the token's sub wins
    if user is not None:
        if not isinstance(user, str) or not 0 < len(user) <= P.USER_MAX or has_control(user):
            raise ClientError(400, "invalid_user",
                              f"user must be a string of 1-{P.USER_MAX} printable characters")
    text = None
    if kind == P.KIND_COMMENT:
        text = body.get("text")
        if not isinstance(text, str):
            raise ClientError(400, "missing_text", "a comment needs a 'text' string")
        if not text.strip():
            raise ClientError(400, "empty_comment", "comment text is empty")
        limit = node.cfg.frontend.max_comment_chars
        if len(text) > limit:
            raise ClientError(400, "comment_too_long",
                              f"comment text has {len(text)} characters; the limit is {limit}")
        check_comment_text(text)
    key = idempotency_key(call.request.headers.get("Idempotency-Key"), body.get("id"))
    return P.make_event(video, kind, user, text, None if key is None else event_id_for_key(video, user, key))


def idempotency_key(header: str | None, body_id: object) -> str | None:
    """The publish's idempotency key: the ``Idempotency-Key`` field (``parse_idempotency_key``)
    or the body's ``id`` (a JSON string, the key as it is); both given, they must agree.  The
    key, the user and the video make the event id (``event_id_for_key``), so a retry on any
    frontend is the same event."""
    key = None
    if header is not None:
        try:
            key = parse_idempotency_key(header)
        except ValueError as exc:
            raise ClientError(400, "invalid_idempotency_key", f"Idempotency-Key: {exc}") from None
    if body_id is not None:
        if not isinstance(body_id, str) or not 0 < len(body_id) <= IDEMPOTENCY_KEY_MAX \
                or not all(" " <= c <= "~" for c in body_id):
            raise ClientError(400, "invalid_idempotency_key",
                              f"id must be a string of 1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters")
        if key is not None and key != body_id:
            raise ClientError(400, "idempotency_key_mismatch",
                              "the Idempotency-Key field and the body's id name different keys")
        key = body_id
    return key


def accepted(event: dict, ack: dict) -> dict:
    """The 202 body of a published event, from its owner's ack."""
    return {"id": event["id"], "video": event["video"], "epoch": ack["epoch"], "seq": ack["seq"],
            "sse_id": f"{ack['epoch']}:{ack['seq']}"}


def parse_body(node: "Frontend", kind: str, raw: bytes) -> dict:
    limit = node.cfg.frontend.max_body_bytes
    if len(raw) > limit:
        raise ClientError(413, "body_too_large", f"body has {len(raw)} bytes; the limit is {limit}")
    if not raw.strip():
        if kind == P.KIND_LIKE:
            return {}
        raise ClientError(400, "missing_body", "a comment needs a JSON body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientError(400, "invalid_encoding", f"body is not UTF-8 (byte {exc.start})") from None
    check_json_depth(text, node.cfg.security.max_json_depth)
    try:
        body = json.loads(text)
    except RecursionError:
        raise ClientError(400, "invalid_json", "JSON nested too deeply") from None
    except ValueError as exc:
        raise ClientError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ClientError(400, "invalid_body", "body must be a JSON object")
    return body


def viewer_identity(handler: "EventsHandler") -> str | None:
    """Who a viewer is, for presence: the verified ``sub`` of its token when it sent one;
    with ``security.auth = "off"`` the ``user`` query parameter (anonymous without).  With
    JWT auth on, a self-declared ``?user=`` is not trusted: such a viewer is anonymous."""
    if getattr(handler, "auth_user", None):
        return handler.auth_user
    if handler.node.cfg.security.auth != "off":
        return None
    user = handler.get_query_argument("user", None)
    if user is None or user == "":
        return None
    if len(user) > P.USER_MAX or has_control(user):
        raise ClientError(400, "invalid_user", f"user must be 1-{P.USER_MAX} printable characters")
    return user


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
        page = await self.node.link.presence_page(video, offset, limit, self.node.cfg.frontend.gap_timeout)
        self.write({"video": video, "count": page["count"], "users": page["users"],
                    "total_users": page["total_users"], "offset": offset, "limit": limit,
                    "dcs": page.get("dcs", {})})


#: Unicode categories Cc (control characters) and Cs (unpaired surrogates)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def routes(node: "Frontend") -> list:
    video = r"/v1/videos/([^/]+)"
    return [
        (video + r"/events", EventsHandler, {"node": node}),
        (video + r"/likes", PublishHandler, {"node": node, "kind": P.KIND_LIKE}),
        (video + r"/comments", PublishHandler, {"node": node, "kind": P.KIND_COMMENT}),
        (video + r"/presence", PresenceHandler, {"node": node}),
        (r"/healthz", HealthHandler, {"node": node}),
        *page_routes(node),  # the page at /, its static files, /metrics
    ]

