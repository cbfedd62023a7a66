"""Server-Sent Events: the encoder the frontend uses and a spec-following parser for clients
(``meshctl``, tests, benchmarks).

Encoding follows the WHATWG HTML "server-sent events" section: fields ``id``, ``event``,
``data``, ``retry``; an event ends with a blank line; a line starting with ``:`` is a comment.
Our ``data`` is one JSON object serialised without raw newlines (JSON escapes CR and LF inside
strings), so multi-line comment text survives as one ``data:`` line and is byte-identical after
``JSON.parse`` in a browser.

Like aggregation (``encode_events`` with ``aggregate_above``): when one write carries more
than that many likes of our DC's chain, each run of consecutive such likes becomes one
``event: likes`` whose ``id`` is the last like's SSE id (a browser's Last-Event-ID resumes
after the run), data ``{"video", "count", "users", "first_id", "last_id", "ts"}``: ``users``
up to ``LIKES_SAMPLE_USERS`` distinct named likers, ``first_id`` / ``last_id`` the SSE ids of
the run's ends, ``ts`` the first (oldest) like's.  Every other event (comments, remote
events, which have no SSE id) keeps its own event and its place, so a run ends at them; a
run also ends where the epoch changes (an owner change), so ``first_id`` .. ``last_id`` is a
range of one epoch's sequence numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mesh.wire.protocol import sse_id


def event_data(event: dict) -> dict:
    data = {"id": event["id"], "video": event["video"], "kind": event["kind"],
            "user": event["user"], "ts": event["ts"], "seq": event["seq"]}
    if event.get("text") is not None:
        data["text"] = event["text"]
    return data


def encode_event(event: dict) -> bytes:
    data = json.dumps(event_data(event), ensure_ascii=False, separators=(",", ":"))
    if event.get("remote"):  # another DC's chain (frontend.link): not replayable here, no id
        return f"event: {event['kind']}\ndata: {data}\n\n".encode("utf-8")
    return f"id: {sse_id(event)}\nevent: {event['kind']}\ndata: {data}\n\n".encode("utf-8")


#: sample users named in an aggregated ``likes`` event
LIKES_SAMPLE_USERS = 5


def encode_events(events: list[dict], aggregate_above: int = 0) -> bytes:
    """A batch of chain events as SSE, in order; with more than ``aggregate_above`` (> 0)
    local likes in it, runs of consecutive local likes as ``likes`` events."""
    if aggregate_above <= 0 or sum(1 for e in events if _aggregable(e)) <= aggregate_above:
        return b"".join(encode_event(e) for e in events)
    out: list[bytes] = []
    run: list[dict] = []
    for event in events:
        if _aggregable(event):
            if run and run[-1]["epoch"] != event["epoch"]:  # a run is a range of one epoch
                out.append(encode_likes(run))
                run = []
            run.append(event)
            continue
        if run:
            out.append(encode_likes(run))
            run = []
        out.append(encode_event(event))
    if run:
        out.append(encode_likes(run))
    return b"".join(out)


def _aggregable(event: dict) -> bool:
    return event["kind"] == "like" and not event.get("remote")


def encode_likes(run: list[dict]) -> bytes:
    """A run of consecutive likes of one video as one ``event: likes``."""
    first, last = run[0], run[-1]
    users: list[str] = []
    for event in run:
        user = event.get("user")
        if user is not None and user not in users:
            users.append(user)
            if len(users) == LIKES_SAMPLE_USERS:
                break
    data = json.dumps({"video": first["video"], "count": len(run), "users": users,
                       "first_id": sse_id(first), "last_id": sse_id(last), "ts": first["ts"]},
                      ensure_ascii=False, separators=(",", ":"))
    return f"id: {sse_id(last)}\nevent: likes\ndata: {data}\n\n".encode("utf-8")


def encode_reset(video: str, reason: str) -> bytes:
    """``event: reset`` without an id (the browser keeps its Last-Event-ID): the client may
    have missed events and should resynchronise whatever it derives from them."""
    data = json.dumps({"video": video, "reason": reason}, separators=(",", ":"))
    return f"event: reset\ndata: {data}\n\n".encode("utf-8")


def encode_presence(video: str, events: list[dict]) -> bytes:
    """Presence events as SSE without ids (they are state, not part of the replayable chain):
    ``count`` (data ``{"video", "count"}``), ``join`` / ``leave`` (data ``{"video", "user"}``)."""
    out = []
    for ev in events:
        data = {"video": video, "count": ev["count"]} if ev["kind"] == "count" else \
            {"video": video, "user": ev["user"]}
        out.append(f"event: {ev['kind']}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n")
    return "".join(out).encode("utf-8")


def encode_comment(text: str = "") -> bytes:
    return f": {text}\n\n".encode("utf-8")


def encode_retry(ms: int) -> bytes:
    return f"retry: {ms}\n\n".encode("ascii")


def recv_nowait(sock, size: int) -> bytes | None:
    """What a non-blocking stream socket has now: None when nothing yet, ``b""`` when the
    peer closed or the connection failed (both ends of an SSE stream treat them alike)."""
    try:
        return sock.recv(size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


@dataclass
class SSEEvent:
    id: str
    event: str
    data: str

    def json(self):
        return json.loads(self.data)


class SSEParser:
    """Incremental parser: feed bytes, get complete events.  Comments are counted, not
    returned (``comments``); ``retry`` is kept in ``retry``."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""
        self.last_id = ""
        self.retry: int | None = None
        self.comments = 0
        self._first = True

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        out: list[SSEEvent] = []
        while True:
            # a line ends at CRLF, LF or CR; a CR at the very end may be the start of CRLF
            idx_n = self._buf.find(b"\n")
            idx_r = self._buf.find(b"\r")
            if idx_n < 0 and (idx_r < 0 or idx_r == len(self._buf) - 1):
                break
            if idx_r >= 0 and (idx_n < 0 or idx_r < idx_n):
                end, skip = idx_r, 2 if self._buf[idx_r + 1:idx_r + 2] == b"\n" else 1
            else:
                end, skip = idx_n, 1
            raw, self._buf = self._buf[:end], self._buf[end + skip:]
            line = raw.decode("utf-8", errors="replace")
            if self._first:
                line = line.removeprefix("\ufeff")
                self._first = False
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            ev = SSEEvent(self.last_id, self._event or "message", "\n".join(self._data))
            self._data, self._event = [], ""
            return ev
        if line.startswith(":"):
            self.comments += 1
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\x00" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None
