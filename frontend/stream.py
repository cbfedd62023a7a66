"""One viewer's SSE stream once its response head is out: a raw non-blocking socket.

Theory of operation.  Tornado serves the request (routing, limits, tokens, the wait for the
owner's sync marker, the Last-Event-ID catch-up); then ``EventsHandler`` writes the response
head itself (``HTTP/1.1 200``, ``text/event-stream``, no chunked framing: the body ends when the
connection closes, which EventSource and curl accept), ``detach()``es the connection and hands
the socket to a ``ViewerStream``.  From then on the fan-out writes with ``socket.send``
directly: no ``RequestHandler.write``/``flush``, no chunk framing, no future per write, and no
Tornado objects per connection (a handler, a request, an HTTP connection and an IOStream with
their dicts cost ~14 KB per idle viewer and long full garbage-collector passes; a
``ViewerStream`` is one ``__slots__`` object plus the socket and its selector entry).  The same
design as nginx's or Go's ``net/http`` ``Flusher`` after the headers: bytes straight to the
kernel, one user-space buffer only when the kernel's is full.

* Writing: ``send`` tries the socket at once; what the kernel does not take waits in one
  ``bytearray`` and ``loop.add_writer`` drains it.  More than ``max_buffer_bytes`` unsent cuts
  the viewer (it reconnects with its Last-Event-ID and catches up from history).
* Closing: ``loop.add_reader`` watches the socket; ``recv`` returning ``b""`` or an error
  means the viewer left, and it is removed from the node's tables at once (``close``).  A write
  error does the same.
* Before the head is out (``sock`` is None) everything sent is kept in ``buf`` and goes out
  with the head; while a reconnecting viewer catches up from history, live events wait in
  ``held`` (with their decoded events, so the ones history already gave are dropped; what is
  left is encoded again, likes aggregated as the fan-out does, ``Fanout.encode``).  History
  can also be ahead of the live path (an event the frontend got but whose write waits for the
  video's next tick, or one still in flight from the owner; on another frontend, even the
  Last-Event-ID's own event): until the first live write that brings a local event past what
  the viewer has, live writes drop those too (``Given``).  Positions of different epochs are
  never compared: an epoch is one dispatcher incarnation's start time, and a backup that
  continues a chain may have started before the owner it replaces, so its larger positions
  can carry a smaller epoch.
* ``end()`` (graceful shutdown) closes after the buffer drained: the browser reconnects
  elsewhere after ``retry``.

No reference cycles: a stream refers to its ``StreamHooks`` (one per node, long-lived) and its
socket; the node's tables refer to the stream; closing removes it from them, and refcounting
frees it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable, NamedTuple

from mesh.core.sse import encode_reset, recv_nowait

log = logging.getLogger("mesh.app")

Position = tuple[int, int]

#: bytes read (and dropped) per readable event: a viewer has nothing to say after its request
RECV_BYTES = 4096


class StreamHooks(NamedTuple):
    """What a stream tells its node, and the one thing it asks of it; one per node, shared."""

    stats: dict
    #: a batch of events as one SSE write (``Fanout.encode``)
    encode: Callable[[list[dict]], bytes]
    #: a socket from the viewer's IP taken over / released (the connection limits count it)
    attached: Callable[[str], None]
    detached: Callable[[str], None]
    #: the stream is gone: it leaves the node's tables
    closed: Callable[["ViewerStream"], None]


class ViewerStream:
    __slots__ = ("hooks", "conn_id", "video", "user", "ip", "sock", "fd", "buf", "held",
                 "closed", "ending", "limit", "given")

    def __init__(self, hooks: StreamHooks, conn_id: int, video: str, user: str | None, ip: str,
                 catching_up: bool, limit: int):
        self.hooks = hooks
        self.conn_id = conn_id
        self.video = video
        self.user = user
        self.ip = ip
        self.sock: socket.socket | None = None
        self.fd = -1
        self.buf = bytearray()     # unsent bytes (before the head is out: all of them)
        self.held: list | None = [] if catching_up else None
        self.given: Given | None = None  # what history gave, while live writes may still bring it
        self.closed = False
        self.ending = False
        self.limit = limit         # max_buffer_bytes

    # --- the fan-out's side -------------------------------------------------------------------

    def send(self, data: bytes, events: list | None = None) -> None:
        """Queue ``data`` for this viewer; ``events`` is the decoded batch (None for resets,
        presence, heartbeats) so a viewer catching up can drop what history gave it."""
        if self.closed:
            return
        if self.held is not None:
            self.held.append((data, events))
            return
        if self.given is not None and events:
            data = self._without_given(data, events)
            if not data:
                return
        if self.buf or self.sock is None:
            self.buf += data
            if self.sock is not None and len(self.buf) > self.limit:
                self._cut()
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self.buf += memoryview(data)[sent:]
            if len(self.buf) > self.limit:
                self._cut()
                return
            asyncio.get_running_loop().add_writer(self.fd, self._drain)

    def end(self) -> None:
        """Graceful end (shutdown): close once everything queued is written."""
        if self.closed:
            return
        self.ending = True
        if self.sock is not None and not self.buf:
            self.close()

    # --- the handler's side -------------------------------------------------------------------

    def catch_up(self, chain: list[dict] | None, after: tuple[int, int] | None = None) -> None:
        """History after the viewer's Last-Event-ID (``after``) arrived (None: it cannot say):
        it goes first, then the live events held meanwhile, without the ones the viewer has."""
        hooks = self.hooks
        held, self.held = self.held or [], None
        if chain is None:
            hooks.stats["resets_sent"] += 1
            self.send(encode_reset(self.video, "history"))
        else:
            hooks.stats["events_recovered"] += len(chain)
            if chain:
                self.send(hooks.encode(chain))
            self.given = Given(after, chain)
        for data, events in held:
            self.send(data, events)

    def _without_given(self, data: bytes, events: list) -> bytes:
        """``data`` without the events the viewer already has (re-encoded when some were)."""
        fresh = [e for e in events if e.get("remote") or self.given.is_fresh(e)]
        if any(not e.get("remote") for e in fresh):  # the live path has passed history's end
            self.given = None
        if len(fresh) == len(events):
            return data
        return self.hooks.encode(fresh) if fresh else b""

    def attach(self, sock: socket.socket, head: bytes) -> None:
        """Take over the connection: write ``head`` and whatever was queued, watch for EOF."""
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.hooks.attached(self.ip)
        pending, self.buf = bytes(self.buf), bytearray()
        asyncio.get_running_loop().add_reader(self.fd, self._on_readable)
        self.send(head + pending)
        if self.ending and not self.buf and not self.closed:
            self.close()

    # --- I/O callbacks --------------------------------------------------------------------------

    def _drain(self) -> None:
        try:
            sent = self.sock.send(self.buf)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        del self.buf[:sent]
        if not self.buf:
            asyncio.get_running_loop().remove_writer(self.fd)
            if self.ending:
                self.close()

    def _on_readable(self) -> None:
        if recv_nowait(self.sock, RECV_BYTES) == b"":
            self.close()

    def _cut(self) -> None:
        self.hooks.stats["slow_viewers_cut"] += 1
        log.warning("viewer %s of %s is %d bytes behind; disconnecting it",
                    self.conn_id, self.video, len(self.buf))
        self.close()

    def close(self) -> None:
        """The viewer is gone (EOF, error, cut, end): release the socket and its place in
        the node's tables.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.held = None
        sock, self.sock = self.sock, None
        if sock is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.fd)
            if self.buf:
                loop.remove_writer(self.fd)
            self.hooks.detached(self.ip)
            sock.close()
        self.buf = bytearray()
        self.hooks.closed(self)


class Given:
    """What a viewer has after its catch-up: the chain up to its Last-Event-ID (``after``) and
    the events history gave after it; ``is_fresh`` tells a live event the viewer lacks from
    one it has.  Sans-IO.

    Within one epoch, seqs grow along the chain, so an event of an epoch the viewer holds is
    fresh when its seq is past the viewer's last one of that epoch.  An event of an epoch the
    viewer does not hold is either past history's end (a new owner after the fetch) or from
    before the Last-Event-ID (this frontend's live path lagging behind the frontend the viewer
    came from, across an owner change): its ``prev`` tells, since the live path delivers in
    chain order.  It is fresh when it starts a chain, when its predecessor is in an epoch the
    viewer holds, or once the live path has brought an event of an epoch the viewer holds
    (everything of older epochs precedes those).  A fresh event joins what the viewer holds:
    the events after it in the same write follow it (a new owner's ``e:1`` and ``e:2`` in one
    write, both past history's end)."""

    __slots__ = ("ids", "last_seq", "past_older")

    def __init__(self, after: Position | None, chain: list[dict]):
        self.ids = {e["id"] for e in chain}
        self.last_seq: dict[int, int] = {}  # epoch -> the viewer's last seq in it
        if after is not None:
            self.last_seq[after[0]] = after[1]
        for e in chain:
            if e["seq"] > self.last_seq.get(e["epoch"], -1):
                self.last_seq[e["epoch"]] = e["seq"]
        # the live path brought an event of an epoch the viewer holds (holding none: nothing is older)
        self.past_older = not self.last_seq

    def is_fresh(self, event: dict) -> bool:
        if event["id"] in self.ids:
            return False
        epoch, seq = event["epoch"], event["seq"]
        last = self.last_seq.get(epoch)
        if last is not None:
            self.past_older = True
            fresh = seq > last
        else:
            prev = event.get("prev")
            fresh = not prev or prev[0] in self.last_seq or self.past_older
        if fresh:
            self.last_seq[epoch] = seq
        return fresh
