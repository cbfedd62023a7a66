"""The frontend's HTTP API (Tornado): thin adapters from HTTP to the node's core.

Routes:

* ``GET  /v1/videos/{video}/events``    Server-Sent Events stream of the video
* ``POST /v1/videos/{video}/likes``     optional JSON body ``{"user": str}``
* ``POST /v1/videos/{video}/comments``  JSON body ``{"user": str, "text": str}``
* ``GET  /healthz``
* ``GET  /``, ``/static/{file}``, ``/metrics``: the page and metrics (``frontend/page.py``)

Every error is JSON: ``{"error": {"code": str, "message": str, "retryable": bool}}``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import unicodedata
from typing import TYPE_CHECKING

import tornado.web
from tornado.iostream import StreamClosedError

from mesh import protocol as P
from mesh.errors import ClientError
from mesh.sse import encode_event, encode_reset, encode_retry

from .page import page_routes
from .security import check_comment_text, check_json_depth

if TYPE_CHECKING:
    from .node import Frontend

log = logging.getLogger("mesh.app")

_conn_ids = itertools.count(1)


class JSONHandler(tornado.web.RequestHandler):
    """Base: errors as JSON, no HTML error pages."""

    def initialize(self, node: "Frontend") -> None:
        self.node = node

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
    """One viewer's SSE stream.

    A viewer that reconnects with ``Last-Event-ID`` (header, or ``?lastEventId=`` for clients
    that cannot set headers) first gets the events it missed from the owner's history; live
    events arriving meanwhile wait in ``_held`` and are passed on after the history, without
    the ones history already gave.  When history cannot say, the viewer gets ``reset``.
    """

    conn_id = None
    is_open = False
    closed = False
    catching_up = False

    async def get(self, video: str) -> None:
        check_video(video)
        self.node.security.admit_viewer(self, video)  # limits, private videos: sets auth_user
        node = self.node
        last_id = self.request.headers.get("Last-Event-ID") or self.get_query_argument("lastEventId", None)
        after = P.parse_sse_id(last_id) if last_id else None
        self.user = viewer_identity(self)
        self.video = video
        self.conn_id = next(_conn_ids)
        self.stream = self.request.connection.stream
        self.catching_up = bool(last_id)
        self._held: list[tuple[bytes, list | None]] = []
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self.write(encode_retry(node.cfg.frontend.retry_ms))
        self.done = asyncio.get_running_loop().create_future()
        node.add_viewer(self)
        synced = await node.link.wait_synced(video, node.cfg.frontend.sync_timeout)
        if self.closed:
            return
        if not synced:
            log.warning("viewer %s of %s opened before the owner confirmed the subscription",
                        self.conn_id, video)
        if self.catching_up:
            chain = None
            if after is not None:
                chain = await node.link.history(video, after, node.cfg.frontend.gap_timeout)
            if self.closed:
                return
            self._catch_up(chain)
        self.is_open = True
        self._flush()
        await self.done

    def _catch_up(self, chain: list[dict] | None) -> None:
        node = self.node
        if chain is None:
            node.stats["resets_sent"] += 1
            self.write(encode_reset(self.video, "history"))
            given: set[str] = set()
        else:
            node.stats["events_recovered"] += len(chain)
            self.write(b"".join(encode_event(e) for e in chain))
            given = {e["id"] for e in chain}
        held, self._held = self._held, []
        self.catching_up = False
        for data, events in held:
            if events is None or not given:
                self.write(data)
            else:
                fresh = [e for e in events if e["id"] not in given]
                if fresh:
                    self.write(b"".join(encode_event(e) for e in fresh))

    def send(self, data: bytes, events: list | None = None) -> None:
        """Queue ``data`` for this viewer (before open, it waits in the handler's buffer)."""
        if self.closed:
            return
        if self.catching_up:
            self._held.append((data, events))
            return
        self.write(data)
        if not self.is_open:
            return
        pending = len(self.stream._write_buffer) if hasattr(self.stream, "_write_buffer") else 0
        if pending > self.node.cfg.frontend.max_buffer_bytes:
            self.node.stats["slow_viewers_cut"] += 1
            log.warning("viewer %s of %s is %d bytes behind; disconnecting it",
                        self.conn_id, self.video, pending)
            self.stream.close()
            self.on_connection_close()
            return
        self._flush()

    def end_stream(self) -> None:
        """Finish the response (graceful shutdown): the browser reconnects after ``retry``."""
        if not self.closed and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _flush(self) -> None:
        fut = self.flush()
        fut.add_done_callback(_ignore_closed)

    def on_connection_close(self) -> None:
        if self.closed or self.conn_id is None:
            return
        self.closed = True
        self.node.remove_viewer(self)
        if not self.done.done():
            self.done.set_result(None)

    def on_finish(self) -> None:
        self.on_connection_close()


def _ignore_closed(fut) -> None:
    exc = fut.exception()
    if exc is not None and not isinstance(exc, StreamClosedError):
        log.warning("SSE write failed: %r", exc)


class PublishHandler(JSONHandler):
    kind = ""

    def initialize(self, node: "Frontend", kind: str) -> None:  # type: ignore[override]
        self.node = node
        self.kind = kind

    async def post(self, video: str) -> None:
        check_video(video)
        auth_user = self.node.security.check_publish(self, video, self.kind)  # origin, limits, JWT
        body = self.parse_body()
        user = body.get("user") if auth_user is None else auth_user  # the token's sub wins
        if user is not None:
            if not isinstance(user, str) or not 0 < len(user) <= P.USER_MAX or has_control(user):
                raise ClientError(400, "invalid_user",
                                  f"user must be a string of 1-{P.USER_MAX} printable characters")
        text = None
        if self.kind == P.KIND_COMMENT:
            text = body.get("text")
            if not isinstance(text, str):
                raise ClientError(400, "missing_text", "a comment needs a 'text' string")
            if not text.strip():
                raise ClientError(400, "empty_comment", "comment text is empty")
            limit = self.node.cfg.frontend.max_comment_chars
            if len(text) > limit:
                raise ClientError(400, "comment_too_long",
                                  f"comment text has {len(text)} characters; the limit is {limit}")
            check_comment_text(text)
        event = P.make_event(video, self.kind, user, text)
        result = await self.node.publish(event)
        self.set_status(202)
        self.write({"id": event["id"], "video": video, "epoch": result["epoch"], "seq": result["seq"],
                    "sse_id": f"{result['epoch']}:{result['seq']}"})

    def parse_body(self) -> dict:
        raw = self.request.body
        limit = self.node.cfg.frontend.max_body_bytes
        if len(raw) > limit:
            raise ClientError(413, "body_too_large", f"body has {len(raw)} bytes; the limit is {limit}")
        if not raw.strip():
            if self.kind == P.KIND_LIKE:
                return {}
            raise ClientError(400, "missing_body", "a comment needs a JSON body")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ClientError(400, "invalid_encoding", f"body is not UTF-8 (byte {exc.start})") from None
        check_json_depth(text, self.node.cfg.security.max_json_depth)
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
    (its DC's frontends and the summaries of the peer DCs it receives, ``mesh.presence``)."""

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


def has_control(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text)  # Cs: unpaired surrogates


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

