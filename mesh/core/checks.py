"""The checks of a publish request, as pure functions: what they read of a request in, an event
or a ``ClientError`` (status, code, message and the header fields of its answer) out.

Theory of operation.  A publish is checked in this order (``PublishChecks.event``):

1. the video id;
2. origin, the per-IP token bucket, the token and the per-user-per-video token bucket, in
   that order (the frontend's ``FrontendSecurity.authorize_publish``, handed in: its
   policies hold state, the token buckets and the verified-token cache);
3. the body: size, UTF-8, nesting depth, JSON object;
4. the user (the token's ``sub`` wins over the body's) and the comment text;
5. the idempotency key (the ``Idempotency-Key`` field or the body's ``id``), which with the
   video and the user makes the event id (``mesh.core.sequencing.event_id_for_key``), so a
   retry on any frontend is the same event.

Each check reads a ``PublishRequest`` (method, path, header fields, body, peer address and the
time) and nothing else: no handler, socket or loop.  The same functions serve every path that
answers a publish (Tornado's handler and the raw-socket fast path, ``frontend/ingest.py``),
and a test runs them without a server.  Header fields are read with ``get`` and ``in`` with
any letter case, as Tornado's ``HTTPHeaders`` reads them.

One check says which characters a user name and a comment may hold (``invalid_char``): none
of Unicode's control characters (Cc) or unpaired surrogates (Cs, which JSON's ``\\ud800``
escapes make and UTF-8 cannot carry); a comment may also hold ``\\t \\n \\r``.  Every check on
the untrusted body is one linear pass (``json_deeper_than`` says how, for the depth).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Callable, NamedTuple

from mesh.core.sequencing import IDEMPOTENCY_KEY_MAX, event_id_for_key, parse_idempotency_key
from mesh.errors import ClientError
from mesh.wire import protocol as P

#: characters no user name holds: Unicode Cc (control characters) and Cs (unpaired surrogates)
_NOT_IN_NAME = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: characters no comment holds: the same, except tab and line breaks
_NOT_IN_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
#: what the depth check keeps of a body: ``(`` opens a container, ``)`` closes one, ``"``
#: delimits a string (whose content is kept only where it holds brackets)
_SHAPE = bytes.maketrans(b"[{]}", b"(())")
_NOT_SHAPE = bytes(sorted(set(range(256)) - set(b'[]{}"')))


class PublishRequest(NamedTuple):
    """What the checks read of one publish request."""

    method: str
    path: str     # the request target as sent: path and query
    headers: Any  # header fields: ``get`` and ``in``, any letter case (``HTTPHeaders``)
    body: bytes
    peer: str     # the client's IP address
    now: float    # ``time.monotonic()`` when it arrived (the token buckets' clock)


# --- characters, users, text ------------------------------------------------------------------

def invalid_char(text: str, line_breaks: bool = False) -> int:
    """The index of the first character ``text`` may not hold, or -1: Unicode Cc and Cs,
    except ``\\t \\n \\r`` when ``line_breaks`` (a comment's text).  One pass."""
    bad = (_NOT_IN_TEXT if line_breaks else _NOT_IN_NAME).search(text)
    return -1 if bad is None else bad.start()


def valid_user(user: object) -> bool:
    """A user name: a string of 1 to ``USER_MAX`` characters, none of them invalid."""
    return isinstance(user, str) and 0 < len(user) <= P.USER_MAX and invalid_char(user) < 0


def check_user(user: object) -> str:
    if not valid_user(user):
        raise ClientError(400, "invalid_user",
                          f"user must be a string of 1-{P.USER_MAX} printable characters")
    return user  # type: ignore[return-value]


def check_comment_text(text: str) -> None:
    """Refuses ``text`` when it holds a character a comment may not hold (``invalid_char``)."""
    at = invalid_char(text, line_breaks=True)
    if at >= 0:
        ch = text[at]
        what = "an unpaired surrogate" if "\ud800" <= ch <= "\udfff" else "control character"
        raise ClientError(400, "invalid_text", f"comment text contains {what} U+{ord(ch):04X} at "
                          f"position {at}; only \\n \\r \\t are allowed")


def check_comment(text: object, max_chars: int) -> str:
    """A comment's ``text``: a non-blank string of at most ``max_chars`` valid characters."""
    if not isinstance(text, str):
        raise ClientError(400, "missing_text", "a comment needs a 'text' string")
    if not text.strip():
        raise ClientError(400, "empty_comment", "comment text is empty")
    if len(text) > max_chars:
        raise ClientError(400, "comment_too_long",
                          f"comment text has {len(text)} characters; the limit is {max_chars}")
    check_comment_text(text)
    return text


def check_video(video: str) -> str:
    if not P.valid_video_id(video):
        raise ClientError(400, "invalid_video",
                          "video id must be 1-64 characters of A-Z a-z 0-9 . _ -, "
                          "starting with a letter or digit")
    return video


# --- the body ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def nesting_within(limit: int) -> re.Pattern:
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
    end = nesting_within(limit).match(shape).end()
    return shape[end:end + 1] == b"("  # a group opened one level past the limit


def check_json_depth(text: str, limit: int) -> None:
    if json_deeper_than(text, limit):
        # the code stays invalid_json (the API's contract for "nested too deeply"); the
        # message names the limit
        raise ClientError(400, "invalid_json", f"JSON nested too deeply: more than {limit} "
                          f"levels; the limit is {limit} (security.max_json_depth)")


def parse_body(raw: bytes, kind: str, max_bytes: int, max_depth: int) -> dict:
    """A publish body: at most ``max_bytes``, UTF-8, nested at most ``max_depth`` deep, a JSON
    object (a like's may be empty)."""
    if len(raw) > max_bytes:
        raise ClientError(413, "body_too_large", f"body has {len(raw)} bytes; the limit is {max_bytes}")
    if not raw.strip():
        if kind == P.KIND_LIKE:
            return {}
        raise ClientError(400, "missing_body", "a comment needs a JSON body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientError(400, "invalid_encoding", f"body is not UTF-8 (byte {exc.start})") from None
    check_json_depth(text, max_depth)
    try:
        body = json.loads(text)
    except RecursionError:
        raise ClientError(400, "invalid_json", "JSON nested too deeply") from None
    except ValueError as exc:
        raise ClientError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ClientError(400, "invalid_body", "body must be a JSON object")
    return body


def idempotency_key(header: str | None, body_id: object) -> str | None:
    """The publish's idempotency key: the ``Idempotency-Key`` field (``parse_idempotency_key``)
    or the body's ``id`` (a JSON string, the key as it is); both given, they must agree."""
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


# --- all of them -----------------------------------------------------------------------------

class PublishChecks:
    """Every check of a publish, configured once per frontend (``event`` runs them in order).

    ``authorize(headers, ip, video, kind, now)`` is the frontend's origin, rate-limit and token
    check (``FrontendSecurity.authorize_publish``): the verified user (None: auth off), or a
    ClientError with the header fields its answer needs (``Retry-After``, ``WWW-Authenticate``)."""

    def __init__(self, *, authorize: Callable[[Any, str, str, str, float], str | None],
                 max_body_bytes: int, max_json_depth: int, max_comment_chars: int):
        self.authorize = authorize
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth
        self.max_comment_chars = max_comment_chars
        nesting_within(max_json_depth)  # compiled here, not during the first publish

    def event(self, req: PublishRequest, video: str, kind: str) -> dict:
        """The event ``req`` publishes (``video`` and ``kind`` as its route names them), or
        the ClientError that refuses it."""
        if req.method != "POST":
            raise ClientError(405, "method_not_allowed", f"{req.method} is not allowed on {req.path.split('?')[0]}")
        check_video(video)
        auth_user = self.authorize(req.headers, req.peer, video, kind, req.now)
        body = parse_body(req.body, kind, self.max_body_bytes, self.max_json_depth)
        user = body.get("user") if auth_user is None else auth_user  # the token's sub wins
        if user is not None:
            check_user(user)
        text = check_comment(body.get("text"), self.max_comment_chars) if kind == P.KIND_COMMENT else None
        key = idempotency_key(req.headers.get("Idempotency-Key"), body.get("id"))
        return P.make_event(video, kind, user, text, None if key is None else event_id_for_key(video, user, key))
