"""The livemesh wire protocol: the one owner of frame layouts and protocol constants.

Two kinds of traffic cross ZeroMQ (docs/PROTOCOL.md says the same for other languages):

Control, DEALER (frontend) -> ROUTER (dispatcher) and back, four frames::

    [MAGIC_V1, msg_type, request_id, body]

    MAGIC_V1    b"LM\\x01": magic and protocol version (an unknown version is rejected)
    msg_type    b"PUB" publish request, b"ACK" the reply to any request, b"ERR" a rejected
                request, b"HIST" history of a video after a position, b"REPL" events
                replicated from a video's owner to its backup, b"PING"/b"PONG" liveness
    request_id  opaque bytes (1..32), chosen by the requester, echoed in the reply
    body        msgpack map (see the ``*_body`` helpers below)

Fan-out, XPUB (dispatcher) -> SUB (frontend), two frames::

    [topic, payload]

    topic       b"v/" + video id (UTF-8) + b"\\x00".  ZeroMQ matches subscriptions by byte
                prefix; the NUL terminator (never part of a video id) makes every topic
                self-delimiting, so a subscriber of ``a`` never receives ``ab``.
    payload     msgpack map {"v": 1, "k": kind, "from": dispatcher name, ...}
                k == "E": "events": [event, ...] (a batch, in sequence order)
                k == "S": a sync marker, published when a subscription reaches the dispatcher:
                          it tells the subscriber that everything published after it will
                          reach it (the cure for ZeroMQ's "slow joiner").
                k == "T": "tail": [epoch, seq], the owner's last event of a recently active
                          video, repeated every second, so that a subscriber that lost a
                          video's last event notices without waiting for the next one.
                k == "P": "presence": [{"kind": "count", "count": int} |
                          {"kind": "join"|"leave", "user": str}, ...] (mesh.core.presence)
                k == "D": "summary": one DC's own presence of the video, for the other DCs
                          (owner -> its DC's bridge -> peer bridges -> their owners, see
                          ``check_dc_summary``); frontends ignore it.

An event is a msgpack array, its fields in this order (an *event row*: no key strings, so
less than half the decoding cost of a map, docs/PROTOCOL.md)::

    [id: str, video: str, kind: "like"|"comment", user: str|None, text: str|None,
     ts: float (ms since the Unix epoch, stamped by the accepting frontend),
     epoch: int, seq: int, prev: [epoch, seq] | None(, dc: str)]

Every events list (PUB, REPL, fan-out, history) holds rows.  A dispatcher keeps them as full
rows (``check_row``) from decoding to fan-out; a frontend reads the ones it receives as maps
keyed by these field names (``row_event``: SSE encoding and chain following name the fields)
and sends the maps it makes as rows (``event_row``).

``epoch``/``seq``/``prev`` are assigned by the video's owner dispatcher (0/0/None before);
``prev`` is the position of the previous event of the video's chain (mesh.core.sequencing).
``dc`` is the origin datacenter, stamped by the owner that sequenced the event (optional on
the wire: a receiver treats an event without it as its own DC's).  Bridges (dispatcher.bridge)
export only events of their own DC and never re-export imported ones.
"""

from __future__ import annotations

import operator
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from mesh.errors import LocalProtocolError, RemoteProtocolError

MAGIC_V1 = b"LM\x01"
PROTOCOL_VERSION = 1

MSG_PUBLISH = b"PUB"
MSG_ACK = b"ACK"
MSG_ERROR = b"ERR"
MSG_PING = b"PING"
MSG_PONG = b"PONG"
MSG_HISTORY = b"HIST"
MSG_REPLICATE = b"REPL"
MSG_PRESENCE = b"PRES"
MSG_PRESENCE_QUERY = b"PRSQ"
MSG_PRESENCE_DC = b"PRDC"   # bridge -> owner dispatcher: a peer DC's presence summary
CONTROL_TYPES = frozenset({MSG_PUBLISH, MSG_ACK, MSG_ERROR, MSG_PING, MSG_PONG, MSG_HISTORY,
                           MSG_REPLICATE, MSG_PRESENCE, MSG_PRESENCE_QUERY, MSG_PRESENCE_DC})

FANOUT_EVENTS = "E"
FANOUT_SYNC = "S"
FANOUT_TAIL = "T"
FANOUT_PRESENCE = "P"
FANOUT_DC_PRESENCE = "D"
#: most users one DC's presence summary lists (beyond: counted, not listed; see mesh.core.presence)
MAX_SUMMARY_USERS = 10000
PRESENCE_KINDS = frozenset({"count", "join", "leave"})

KIND_LIKE = "like"
KIND_COMMENT = "comment"
EVENT_KINDS = frozenset({KIND_LIKE, KIND_COMMENT})

TOPIC_PREFIX = b"v/"
TOPIC_END = b"\x00"

VIDEO_ID_MAX = 64
VIDEO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
USER_MAX = 64
MAX_REQUEST_ID = 32
#: size bound of the per-process caches of validated video ids and their topics
KNOWN_VIDEOS_MAX = 100000


def valid_video_id(video: object) -> bool:
    """Video ids: 1..64 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit."""
    return isinstance(video, str) and VIDEO_ID_RE.match(video) is not None


_topics: dict[str, bytes] = {}


def topic_for(video: str) -> bytes:
    topic = _topics.get(video)
    if topic is None:
        if not valid_video_id(video):
            raise LocalProtocolError(f"invalid video id {video!r}")
        if len(_topics) >= KNOWN_VIDEOS_MAX:
            _topics.clear()
        topic = _topics[video] = TOPIC_PREFIX + video.encode("ascii") + TOPIC_END
    return topic


def video_from_topic(topic: bytes) -> str:
    if not (topic.startswith(TOPIC_PREFIX) and topic.endswith(TOPIC_END)):
        raise RemoteProtocolError(f"malformed topic {topic[:80]!r}")
    try:
        video = topic[len(TOPIC_PREFIX) : -1].decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"malformed topic {topic[:80]!r}") from None
    if not valid_video_id(video):
        raise RemoteProtocolError(f"malformed topic {topic[:80]!r}")
    return video


def new_event_id() -> str:
    """A mesh-wide unique, roughly time-ordered id: 11 hex digits of ms + 12 random hex."""
    return f"{int(time.time() * 1000):011x}{os.urandom(6).hex()}"


_packer = msgpack.Packer(use_bin_type=True)  # one, reused: every node packs on its loop thread


def pack(obj: Any) -> bytes:
    return _packer.pack(obj)


def unpack(data: bytes, what: str) -> Any:
    """Decode msgpack from a peer.  msgpack raises many exception types on garbage (ValueError,
    TypeError, ExtraData, StackError, ...): every one becomes a RemoteProtocolError here."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # noqa: BLE001 - the boundary: anything a peer sends us
        raise RemoteProtocolError(f"{what}: undecodable msgpack ({type(exc).__name__}: {exc})") from None


# --- events -----------------------------------------------------------------------------

def make_event(video: str, kind: str, user: str | None, text: str | None,
               event_id: str | None = None, ts: float | None = None) -> dict:
    """A new event as the accepting frontend holds it: a map (``event_row`` is its wire form)."""
    if kind not in EVENT_KINDS:
        raise LocalProtocolError(f"unknown event kind {kind!r}")
    return {
        "id": event_id or new_event_id(),
        "video": video,
        "kind": kind,
        "user": user,
        "text": text,
        "ts": time.time() * 1000.0 if ts is None else ts,
        "epoch": 0,
        "seq": 0,
        "prev": None,
    }


def valid_position(pos: Any, allow_none: bool = False) -> bool:
    if pos is None:
        return allow_none
    # no generator: every fan-out and REPL event's prev comes through here
    return (isinstance(pos, (list, tuple)) and len(pos) == 2
            and type(pos[0]) is int and type(pos[1]) is int and pos[0] >= 0 and pos[1] >= 0)


def parse_sse_id(text: str) -> tuple[int, int] | None:
    """``"epoch:seq"`` -> (epoch, seq); None when malformed."""
    epoch, sep, seq = text.strip().partition(":")
    if not sep or not epoch.isdigit() or not seq.isdigit() or len(text) > 40:
        return None
    return int(epoch), int(seq)


#: an event row's fields, in order (``event_row``); ``dc`` only when the event has one
EVENT_ROW_FIELDS = ("id", "video", "kind", "user", "text", "ts", "epoch", "seq", "prev", "dc")
EVENT_ROW_LEN = len(EVENT_ROW_FIELDS) - 1
#: indices of a row's fields
ROW_ID, ROW_VIDEO, ROW_KIND, ROW_USER, ROW_TEXT, ROW_TS, ROW_EPOCH, ROW_SEQ, ROW_PREV, ROW_DC = range(10)
#: video ids already validated (``check_row`` runs for every event in and out of a
#: dispatcher: a set lookup instead of a regex match); dropped whole past KNOWN_VIDEOS_MAX
_known_videos: set[str] = set()


def _known_video(video: Any) -> bool:
    if type(video) is not str:
        return False
    if video in _known_videos:
        return True
    if VIDEO_ID_RE.match(video) is None:
        return False
    if len(_known_videos) >= KNOWN_VIDEOS_MAX:
        _known_videos.clear()
    _known_videos.add(video)
    return True


def check_row(obj: Any) -> list:
    """Validate an event row received from a peer; returns it as a full row: all ten fields,
    ``dc`` None when it has none (the form a dispatcher keeps its events in).  A row from the
    wire is completed in place, not copied.  On the hot path of every node: exact type checks
    (msgpack makes exact types), a set lookup for known videos."""
    if type(obj) is not list:
        raise RemoteProtocolError(f"event is not a row: {type(obj).__name__}")
    n = len(obj)
    if n == EVENT_ROW_LEN:
        obj.append(None)
    elif n != EVENT_ROW_LEN + 1:
        raise RemoteProtocolError(f"event row has {n} fields, expected {EVENT_ROW_LEN} or {EVENT_ROW_LEN + 1}")
    event_id, video, kind, user, text, ts, epoch, seq, prev, dc = obj
    try:
        ok = (type(event_id) is str and 0 < len(event_id) <= 64
              and (video in _known_videos or _known_video(video))
              and kind in EVENT_KINDS
              and (user is None or type(user) is str)
              and (text is None or type(text) is str)
              and (type(ts) is float or type(ts) is int)
              and type(epoch) is int and type(seq) is int
              and (prev is None or valid_position(prev))
              and (dc is None or (type(dc) is str and 0 < len(dc) <= 64)))
    except TypeError:  # an unhashable video or kind
        ok = False
    if not ok:
        raise RemoteProtocolError(f"malformed event {str(obj[:n])[:200]}")
    return obj


def event_row(event: dict) -> list:
    """A frontend's event map as the row it sends: ``[id, video, kind, user, text, ts, epoch,
    seq, prev(, dc)]``."""
    row = [event["id"], event["video"], event["kind"], event["user"], event["text"], event["ts"],
           event["epoch"], event["seq"], event.get("prev")]
    dc = event.get("dc")
    if dc is not None:
        row.append(dc)
    return row


def row_event(row: list) -> dict:
    """A checked row as the map a frontend reads (the keys of EVENT_ROW_FIELDS; ``dc`` only
    when the event has one)."""
    event = {"id": row[0], "video": row[1], "kind": row[2], "user": row[3], "text": row[4], "ts": row[5],
             "epoch": row[6], "seq": row[7], "prev": row[8]}
    if len(row) > ROW_DC and row[ROW_DC] is not None:
        event["dc"] = row[ROW_DC]
    return event


# --- pre-packed events ------------------------------------------------------------------
#
# A dispatcher packs each sequenced batch of a video's events once, and the same bytes go into
# the fan-out message, and into the REPL request to the backup.  A msgpack array is a header
# (its length) followed by the concatenated encodings of its elements, so a message holding
# several pre-packed batches is a header and a join: byte for byte what packing the whole
# structure would give (tests/test_core.py checks it), so the wire format does not change.


class Packed(bytes):
    """A control body already encoded as a msgpack map: ``Control.to_frames`` sends it as is."""


_EVENTS_KEY = b"\x81" + _packer.pack("events")  # {"events": <array follows>}


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def pack_events(events: list[list]) -> list[tuple[int, bytes]]:
    """``events`` (rows) cut like ``chunked`` and packed: per batch, its length and its
    elements' encodings (the msgpack array without its header)."""
    out = []
    for batch in chunked(events):
        data = _packer.pack(batch)
        out.append((len(batch), data[len(_array_header(len(batch))):]))
    return out


def packed_events_body(batches: list[tuple[int, bytes]]) -> Packed:
    """The body ``{"events": [...]}`` of a PUB or REPL request made of pre-packed batches."""
    return Packed(_EVENTS_KEY + _array_header(sum(n for n, _ in batches)) + b"".join(b for _, b in batches))


def packed_batches(batches: list[tuple[int, bytes]]) -> list[list[tuple[int, bytes]]]:
    """Pre-packed batches grouped for messages of at most MAX_BATCH_EVENTS events and
    MAX_BATCH_BYTES bytes (a batch from ``pack_events`` fits one message on its own)."""
    out: list[list[tuple[int, bytes]]] = [[]]
    count = size = 0
    for n, data in batches:
        if out[-1] and (count + n > MAX_BATCH_EVENTS or size + len(data) > MAX_BATCH_BYTES):
            out.append([])
            count = size = 0
        out[-1].append((n, data))
        count += n
        size += len(data)
    return out


# --- control envelope -------------------------------------------------------------------

@dataclass
class Control:
    """One control message (DEALER <-> ROUTER), without the ROUTER's identity frame."""

    msg_type: bytes
    request_id: bytes
    body: dict = field(default_factory=dict)

    def to_frames(self) -> list[bytes]:
        if self.msg_type not in CONTROL_TYPES:
            raise LocalProtocolError(f"unknown control type {self.msg_type!r}")
        if not 0 < len(self.request_id) <= MAX_REQUEST_ID:
            raise LocalProtocolError("request id must be 1..32 bytes")
        body = self.body
        return [MAGIC_V1, self.msg_type, self.request_id, body if type(body) is Packed else pack(body)]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> "Control":
        if len(frames) != 4:
            raise RemoteProtocolError(f"control message has {len(frames)} frames, expected 4")
        magic, msg_type, request_id, body = (bytes(f) for f in frames)
        if magic != MAGIC_V1:
            if magic[:2] == MAGIC_V1[:2]:
                raise RemoteProtocolError(f"unsupported protocol version {magic[2:]!r}")
            raise RemoteProtocolError(f"bad magic {magic[:8]!r}")
        if msg_type not in CONTROL_TYPES:
            raise RemoteProtocolError(f"unknown control type {msg_type[:16]!r}")
        if not 0 < len(request_id) <= MAX_REQUEST_ID:
            raise RemoteProtocolError("request id must be 1..32 bytes")
        decoded = unpack(body, "control body")
        if not isinstance(decoded, dict):
            raise RemoteProtocolError("control body is not a map")
        return cls(msg_type, request_id, decoded)


def publish_body(events: list[list], expires: float | None = None) -> dict:
    """A PUB body: ``events`` as rows (``event_row``, or a dispatcher's ``check_row`` rows);
    ``expires``: the wall-clock time (ms since the Unix epoch) after which no dispatcher places
    these events (``publish_expiry``)."""
    body = {"events": events}
    if expires is not None:
        body["expires"] = expires
    return body


def publish_expiry(msg: Control) -> float | None:
    """A PUB's ``expires`` (ms since the Unix epoch), None when it has none."""
    expires = msg.body.get("expires")
    if expires is None:
        return None
    if type(expires) not in (int, float) or expires != expires:  # NaN compares false with every clock
        raise RemoteProtocolError(f"publish 'expires' must be a number of ms, not {str(expires)[:40]!r}")
    return float(expires)


def _body_events(msg: Control) -> list:
    events = msg.body.get("events")
    if not isinstance(events, list) or not events:
        raise RemoteProtocolError("publish body needs a non-empty 'events' list")
    return events


def publish_events(msg: Control) -> list[list]:
    """Every event of a PUB/REPL body, validated (``check_row``); one bad event rejects the
    message."""
    return [check_row(e) for e in _body_events(msg)]


def publish_items(msg: Control) -> tuple[list[tuple[int, list]], list[tuple[int, dict]]]:
    """The events of a PUB request, validated one by one: ``(events, rejected)``, each a list
    of ``(position, ...)``: the valid rows, and for each bad one its error map (code
    ``malformed``), so one bad event rejects just itself.  Raises RemoteProtocolError when
    the body has no events list at all."""
    events: list[tuple[int, list]] = []
    rejected: list[tuple[int, dict]] = []
    for i, event in enumerate(_body_events(msg)):
        try:
            events.append((i, check_row(event)))
        except RemoteProtocolError as exc:
            rejected.append((i, error_body("malformed", str(exc)[:200])))
    return events, rejected


#: most events, and most estimated bytes, in one PUB, REPL or fan-out message: a batch stays far
#: below the MAXMSGSIZE every node sets (mesh.io.sockets, 4 MiB), over which ZeroMQ drops the link
MAX_BATCH_EVENTS = 2000
MAX_BATCH_BYTES = 1024 * 1024


_text_of = operator.itemgetter(ROW_TEXT)


def chunked(events: list[list]) -> list[list[list]]:
    """``events`` (rows) cut into batches of at most MAX_BATCH_EVENTS events and about
    MAX_BATCH_BYTES (an event's size is estimated from its strings, 4 bytes per character at
    worst in UTF-8), in order.  Likes are small: one batch unless there are very many."""
    text_of = _text_of
    if len(events) <= MAX_BATCH_EVENTS and 4 * sum(map(len, filter(None, map(text_of, events)))) \
            + 400 * len(events) <= MAX_BATCH_BYTES:  # C-level loops: this runs for every batch
        return [events]
    out: list[list] = [[]]
    size = 0
    for event in events:
        cost = 400 + 4 * len(text_of(event) or "")
        if out[-1] and (len(out[-1]) >= MAX_BATCH_EVENTS or size + cost > MAX_BATCH_BYTES):
            out.append([])
            size = 0
        out[-1].append(event)
        size += cost
    return out


def ack_body(placed: list, epoch: int) -> dict:
    """The ACK of a PUB request from its events' placements, in request order::

        {"epoch": int, "seqs": [seq | [epoch, seq] | {"code", "message"(, "retryable")}, ...]}

    a ``seq`` (``int``, in ``epoch``: the common case, one small integer per event), an
    ``(epoch, seq)`` (an event placed in another epoch: a retry of one its previous owner
    sequenced), or an error map (``error_body``).  The requester knows its events' order, so
    the ACK names no event."""
    return {"epoch": epoch, "seqs": placed}


def _error_map(obj: Any) -> bool:
    return type(obj) is dict and type(obj.get("code")) is str and type(obj.get("message")) is str


def ack_positions(msg: Control, count: int) -> list[tuple[int, int] | dict]:
    """Per event of a PUB request of ``count`` events, from its ACK (``ack_body``): its
    ``(epoch, seq)``, or its error map ``{"code", "message"}``."""
    body = msg.body
    epoch, seqs = body.get("epoch"), body.get("seqs")
    if type(epoch) is not int or epoch < 0 or type(seqs) is not list or len(seqs) != count:
        raise RemoteProtocolError(f"ack of a publish needs an 'epoch' and {count} 'seqs'")
    out: list[tuple[int, int] | dict] = []
    for where in seqs:
        if type(where) is int and where >= 0:
            out.append((epoch, where))
        elif valid_position(where):
            out.append(tuple(where))
        elif _error_map(where):
            out.append(where)
        else:
            raise RemoteProtocolError(f"ack of a publish: malformed placement {str(where)[:80]}")
    return out


def check_presence(items: Any) -> list[dict]:
    if not isinstance(items, list):
        raise RemoteProtocolError("presence is not a list")
    for item in items:
        ok = isinstance(item, dict) and item.get("kind") in PRESENCE_KINDS and (
            (item["kind"] == "count" and type(item.get("count")) is int)
            or (item["kind"] != "count" and isinstance(item.get("user"), str)))
        if not ok:
            raise RemoteProtocolError(f"malformed presence item {str(item)[:120]}")
    return items


def presence_updates(msg: Control) -> tuple[str, list[dict]]:
    """The sending frontend and its per-video updates of a PRES message."""
    frontend, updates = msg.body.get("frontend"), msg.body.get("updates")
    if not isinstance(frontend, str) or not isinstance(updates, list):
        raise RemoteProtocolError("presence update needs 'frontend' and 'updates'")
    for u in updates:
        ok = (isinstance(u, dict) and valid_video_id(u.get("video"))
              and type(u.get("anon", 0)) is int
              and all(isinstance(x, str) for k in ("joined", "left", "users") for x in u.get(k, ())))
        if not ok:
            raise RemoteProtocolError(f"malformed presence update {str(u)[:120]}")
    return frontend, updates


def valid_dc(dc: object) -> bool:
    return isinstance(dc, str) and 0 < len(dc) <= 64


def _user_list(items: Any) -> bool:
    return (isinstance(items, list) and len(items) <= MAX_SUMMARY_USERS
            and all(isinstance(u, str) and 0 < len(u) <= USER_MAX for u in items))


def check_dc_summary(obj: Any) -> dict:
    """One DC's own presence of a video (``mesh.core.presence.PresenceBoard.export``)::

        {"dc": str, "from": owner dispatcher, "n": int (per owner and video, +1 per summary),
         "count": int (viewers of that DC), "full": bool,
         "users": [str, ...]                 # full: the DC's identified users (at most 10,000)
         "joined": [...], "left": [...]}     # not full: changes since summary n - 1
    """
    try:
        ok = (isinstance(obj, dict) and valid_dc(obj["dc"]) and isinstance(obj["from"], str)
              and type(obj["n"]) is int and obj["n"] >= 0
              and type(obj["count"]) is int and obj["count"] >= 0 and isinstance(obj["full"], bool)
              and (_user_list(obj["users"]) if obj["full"]
                   else _user_list(obj["joined"]) and _user_list(obj["left"])))
    except KeyError:
        ok = False
    if not ok:
        raise RemoteProtocolError(f"malformed DC presence summary {str(obj)[:200]}")
    return obj


def presence_dc_update(msg: Control) -> tuple[str, dict]:
    """The video and the summary of a ``PRDC`` message (bridge -> owner dispatcher)."""
    video = msg.body.get("video")
    if not valid_video_id(video):
        raise RemoteProtocolError("DC presence update needs a video")
    return video, check_dc_summary(msg.body.get("summary"))


def history_body(video: str, after: tuple[int, int] | None) -> dict:
    return {"video": video, "after": list(after) if after else None}


def history_request(msg: Control) -> tuple[str, tuple[int, int] | None]:
    video, after = msg.body.get("video"), msg.body.get("after")
    if not valid_video_id(video) or not valid_position(after, allow_none=True):
        raise RemoteProtocolError("history request needs a video and an 'after' position or nil")
    return video, tuple(after) if after else None


def relay_history_body(video: str, after: tuple[int, int] | None, dc: str) -> dict:
    """``HIST`` to a bridge: the chain of ``video`` sequenced in datacenter ``dc``."""
    return {**history_body(video, after), "dc": dc}


def relay_history_request(msg: Control) -> tuple[str, tuple[int, int] | None, str]:
    video, after = history_request(msg)
    dc = msg.body.get("dc")
    if not valid_dc(dc):
        raise RemoteProtocolError("history request to a bridge needs the chain's origin 'dc'")
    return video, after, dc


def history_reply(msg: Control) -> list[list] | None:
    """The events (checked rows) of a history reply, or None when the owner answered ``reset``."""
    if msg.msg_type != MSG_ACK:
        raise RemoteProtocolError(f"history reply of type {msg.msg_type!r}")
    if msg.body.get("reset"):
        return None
    events = msg.body.get("events")
    if not isinstance(events, list):
        raise RemoteProtocolError("history reply without events")
    return [check_row(e) for e in events]


def chain_reply(msg: Control, video: str, dc: str) -> list[list] | None:
    """``history_reply`` for another DC's chain (relayed by bridges): every event must be of
    ``video`` and sequenced in ``dc``."""
    events = history_reply(msg)
    for event in events or ():
        if event[ROW_VIDEO] != video or (event[ROW_DC] or dc) != dc:
            raise RemoteProtocolError(f"history of {video}@{dc} holds event {event[ROW_ID]!r} "
                                      f"of {event[ROW_VIDEO]}@{event[ROW_DC]}")
    return events


#: the error code of a dispatcher that serves no publish or history yet: it has just started
#: and does not know the dispatcher set, so it cannot tell which videos it owns (retry later)
ERR_NOT_READY = "not_ready"
#: an event result: the PUB's ``expires`` had passed, the event was not placed (retryable)
ERR_EXPIRED = "expired"


def error_body(code: str, message: str, retryable: bool = False) -> dict:
    """An ``ERR`` body, or an event's error result in an ``ACK``; ``retryable``: the same
    request can succeed later or at another dispatcher (the event was not placed)."""
    return {"code": code, "message": message, "retryable": True} if retryable else {"code": code, "message": message}


# --- fan-out envelope -------------------------------------------------------------------

@dataclass
class FanoutMessage:
    """One fan-out message (XPUB -> SUB); ``events`` are rows (``check_row`` rows once
    decoded)."""

    video: str
    kind: str
    sender: str
    events: list[list] = field(default_factory=list)
    tail: tuple[int, int] | None = None
    presence: list[dict] = field(default_factory=list)
    summary: dict | None = None

    def to_frames(self) -> list[bytes]:
        payload: dict[str, Any] = {"v": PROTOCOL_VERSION, "k": self.kind, "from": self.sender}
        if self.kind == FANOUT_EVENTS:
            payload["events"] = self.events
        elif self.kind == FANOUT_PRESENCE:
            payload["presence"] = self.presence
        elif self.kind == FANOUT_DC_PRESENCE:
            payload["summary"] = self.summary
        elif self.kind == FANOUT_TAIL:
            payload["tail"] = list(self.tail)
        elif self.kind != FANOUT_SYNC:
            raise LocalProtocolError(f"unknown fan-out kind {self.kind!r}")
        return [topic_for(self.video), pack(payload)]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> "FanoutMessage":
        if len(frames) != 2:
            raise RemoteProtocolError(f"fan-out message has {len(frames)} frames, expected 2")
        video = video_from_topic(bytes(frames[0]))
        payload = unpack(bytes(frames[1]), "fan-out payload")
        if not isinstance(payload, dict):
            raise RemoteProtocolError("fan-out payload is not a map")
        if payload.get("v") != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"unsupported fan-out version {payload.get('v')!r}")
        kind, sender = payload.get("k"), payload.get("from")
        if not isinstance(sender, str):
            raise RemoteProtocolError("fan-out payload has no sender")
        if kind == FANOUT_SYNC:
            return cls(video, kind, sender)
        if kind == FANOUT_PRESENCE:
            return cls(video, kind, sender, presence=check_presence(payload.get("presence")))
        if kind == FANOUT_DC_PRESENCE:
            return cls(video, kind, sender, summary=check_dc_summary(payload.get("summary")))
        if kind == FANOUT_TAIL:
            if not valid_position(payload.get("tail")):
                raise RemoteProtocolError("tail announcement without a valid position")
            return cls(video, kind, sender, tail=tuple(payload["tail"]))
        if kind != FANOUT_EVENTS:
            raise RemoteProtocolError(f"unknown fan-out kind {kind!r}")
        events = payload.get("events")
        if not isinstance(events, list):
            raise RemoteProtocolError("fan-out events is not a list")
        events = [check_row(e) for e in events]
        for event in events:
            if event[ROW_VIDEO] != video:
                raise RemoteProtocolError("event video does not match its topic")
        return cls(video, kind, sender, events)


_events_prefixes: dict[str, bytes] = {}


def packed_fanout_events(video: str, sender: str, count: int, data: bytes) -> list[bytes]:
    """The frames of ``FanoutMessage(video, FANOUT_EVENTS, sender, events).to_frames()`` from one batch
    of ``pack_events``: the same bytes, without packing the events again."""
    prefix = _events_prefixes.get(sender)
    if prefix is None:  # {"v": 1, "k": "E", "from": sender, "events": <array follows>}
        prefix = _events_prefixes[sender] = b"\x84" + b"".join(
            _packer.pack(x) for x in ("v", PROTOCOL_VERSION, "k", FANOUT_EVENTS, "from", sender, "events"))
    return [topic_for(video), prefix + _array_header(count) + data]


def origin_dc(event: dict, default: str) -> str:
    """The datacenter whose owner dispatcher sequenced ``event`` (a frontend's map;
    ``default`` when unstamped)."""
    return event.get("dc") or default


def sse_id(event: dict) -> str:
    """The SSE ``id:`` of an event: ``epoch:seq`` of its owner dispatcher."""
    return f"{event['epoch']}:{event['seq']}"
