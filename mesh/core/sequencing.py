"""Per-video event chains, history, replicas and publish idempotency: the dispatcher's
sans-IO core.

Theory of operation.  A video's events form one chain: the owner dispatcher gives each
accepted event ``epoch`` (this dispatcher incarnation's id: its start time in ms),
``seq`` (1, 2, 3, ... per video within the epoch) and ``prev`` (the ``[epoch, seq]`` of the
event before it in the video, or None at the start of a chain).  ``epoch:seq`` is the SSE id.
``prev`` lets a receiver check continuity across owners: when an owner dies, its backup
(the next dispatcher in rendezvous order, which received every event before it was
acknowledged) becomes the owner and continues the chain from the last replicated event
under its own epoch; when a dispatcher joins and takes videos over, it first fetches the
chain's tail from the previous owner.  A receiver that holds the event ``prev`` names has
missed nothing; otherwise it asks the owner for the events after its last one
(:meth:`Sequencer.after`), or tells its viewers to ``reset`` when history no longer reaches.

History keeps the last ``history_size`` events per video, none older than ``history_age``
seconds; replicas live in the same logs (two deques bounded by ``maxlen``: the oldest event
and its time leave together, in C).

Idempotency.  Retries of a publish carry the same event id: a window of the last
``dedupe_size`` ids placed here returns the original placement instead of sequencing it
twice.  Every event a dispatcher stores joins the same window -- replicas from the owner, a
chain handed over or synced by a new owner -- so the backup that takes a video over, and an
owner restarted with nothing, answer a retry with the placement the first writer gave it.
An id already placed on another video's chain is refused (``id_conflict``), never answered
with that video's placement.  A client's ``Idempotency-Key`` becomes an event id with
``event_id_for_key``: the same key, user and video give the same id on every frontend.

Cost per event (``accept_many`` runs for every published like): the dedupe window is a plain
dict plus the batches in insertion order, evicted a whole batch at a time (an ``OrderedDict``
with one ``popitem`` per event costs a quarter of the sequencing time in a profile);
history and arrival times are extended once per batch, in C; the placement returned per event
is its bare ``seq`` (an ``int``) when it was placed in this epoch, which is what the
``ACK`` carries (mesh.wire.protocol ``ack_body``).

Events are ``mesh.wire.protocol.check_row``'s full rows, as they come off the wire: no map is
built per event, and the fan-out packs them as they are; the sequencer reads and writes their
fields by index (``protocol.ROW_*``).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter

from mesh.wire import protocol as P

Position = tuple[int, int]  # (epoch, seq)
_consume = deque(maxlen=0).extend
#: where ``accept_many`` placed an event: its seq in this sequencer's epoch, or (epoch, seq)
Placement = int | Position
Row = list  # a full event row (protocol.check_row)
_ID, _VIDEO, _EPOCH, _SEQ, _PREV, _DC = P.ROW_ID, P.ROW_VIDEO, P.ROW_EPOCH, P.ROW_SEQ, P.ROW_PREV, P.ROW_DC
_id_of = itemgetter(_ID)


#: longest ``Idempotency-Key`` accepted (the IETF httpapi draft leaves it to the server)
IDEMPOTENCY_KEY_MAX = 255
#: prefix of event ids derived from a key (``new_event_id`` ids never start with it)
KEYED_ID_PREFIX = "k"


def event_id_for_key(video: str, user: str | None, key: str) -> str:
    """The event id of a publish made with idempotency key ``key`` by ``user`` on ``video``:
    33 characters, the same on every node, distinct per (video, user, key).  Raises
    ValueError for a key that is empty, longer than IDEMPOTENCY_KEY_MAX or not printable
    ASCII (the draft's key is a structured-field string)."""
    if not isinstance(key, str) or not 0 < len(key) <= IDEMPOTENCY_KEY_MAX \
            or not key.isascii() or not key.isprintable():
        raise ValueError(f"an idempotency key is 1..{IDEMPOTENCY_KEY_MAX} printable ASCII characters")
    scope = f"{video}\x00{user or ''}\x00{key}".encode()
    return KEYED_ID_PREFIX + hashlib.blake2b(scope, digest_size=16).hexdigest()


#: the characters of a bare (unquoted) ``Idempotency-Key``: visible ASCII without DQUOTE,
#: backslash, comma or semicolon, so a list or a parameter is refused, never read as a key
_BARE_KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - set('"\\,;')


def parse_idempotency_key(value: str) -> str:
    """The key an ``Idempotency-Key`` field value names (IETF httpapi draft: an RFC 8941
    String item).  Accepted: a quoted String -- ``"..."`` of printable ASCII (0x20-0x7E),
    with ``\\"`` and ``\\\\`` the only escapes, nothing after the closing quote -- or the
    key bare, of ``_BARE_KEY_CHARS``.  Either way the key is 1..IDEMPOTENCY_KEY_MAX
    characters.  One pass over the value; raises ValueError with the reason."""
    if len(value) > 2 * IDEMPOTENCY_KEY_MAX + 2:  # longer than any escaped key: refused unread
        raise ValueError(f"an idempotency key is at most {IDEMPOTENCY_KEY_MAX} characters")
    if not value.startswith('"'):
        if value and not all(c in _BARE_KEY_CHARS for c in value):
            raise ValueError('a bare idempotency key is visible ASCII without " \\ , or ; '
                             '(quote it as an RFC 8941 string for other characters)')
        key = value
    else:
        chars: list[str] = []
        i, n = 1, len(value)
        while True:
            if i >= n:
                raise ValueError("the quoted idempotency key has no closing quote")
            c = value[i]
            if c == "\\":
                if i + 1 >= n or value[i + 1] not in '"\\':
                    raise ValueError('in a quoted idempotency key only \\" and \\\\ are escapes')
                chars.append(value[i + 1])
                i += 2
                continue
            if c == '"':
                break
            if not " " <= c <= "~":
                raise ValueError("a quoted idempotency key is printable ASCII")
            chars.append(c)
            i += 1
        if i != n - 1:
            raise ValueError("nothing may follow the quoted idempotency key (no list, no parameters)")
        key = "".join(chars)
    if not 0 < len(key) <= IDEMPOTENCY_KEY_MAX:
        raise ValueError(f"an idempotency key is 1..{IDEMPOTENCY_KEY_MAX} characters")
    return key


@dataclass
class VideoLog:
    seq: int = 0                   # last seq this dispatcher assigned in its own epoch
    tail: Position | None = None   # last event of the chain known here (own or replicated)
    history: deque = field(default_factory=deque)  # events, chain order (Sequencer._log bounds both)
    times: deque = field(default_factory=deque)    # their monotonic arrival times (pruning by age)


class Sequencer:
    def __init__(self, epoch: int | None = None, history_size: int = 1000,
                 history_age: float = 300.0, dedupe_size: int = 100000, dc: str = ""):
        self.dc = dc  # stamped on every event sequenced here: its origin DC (multi-DC bridges)
        self.epoch = epoch if epoch is not None else int(time.time() * 1000)
        self.history_size = history_size
        self.history_age = history_age
        self.dedupe_size = dedupe_size
        self.videos: dict[str, VideoLog] = {}
        # dedupe window: event id -> stored event, and the same events batch by batch in
        # insertion order; whole batches leave once the newer ones hold dedupe_size ids
        self._recent: dict[str, Row] = {}
        self._recent_batches: deque[list[Row]] = deque()
        self.duplicates = 0
        self.conflicts = 0

    def has_log(self, video: str) -> bool:
        return video in self.videos

    def ensure_log(self, video: str) -> None:
        """The video has a chain here from now on (empty when nothing was stored)."""
        self._log(video)

    def accept(self, event: Row, now: float | None = None) -> tuple[Row, bool]:
        """Place ``event`` (mutated: epoch, seq, prev) at the end of its video's chain.
        Returns ``(event, is_new)``; a retry of a known event id returns the stored event with
        its original placement and ``is_new=False``."""
        new, _, _ = self.accept_many(event[_VIDEO], [event], now)
        return (new[0], True) if new else (self._recent[event[_ID]], False)

    def conflict(self, event_id: str, video: str) -> dict:
        """The error result of an id already placed on another video's chain."""
        self.conflicts += 1
        return P.error_body("id_conflict", f"event id {event_id[:64]!r} is already placed on another video "
                                           f"than {video}")

    def accept_many(self, video: str, events: list[Row],
                    now: float | None = None) -> tuple[list[Row], list[Row], list[Placement]]:
        """Append ``events`` (all of ``video``, in arrival order; mutated like ``accept``) to
        the video's chain in one go: one log lookup and one clock read for the batch.
        Returns ``(new, again, placed)``: the newly sequenced events; the retried events known
        here only as replicas (their owner may have died before publishing them: publish them
        again); and, per input event, where it is placed: its ``seq`` when that is in this
        sequencer's epoch (every new event, and retries of them), else ``(epoch, seq)``; an id
        placed on another video gets the error map of ``conflict``."""
        now = time.monotonic() if now is None else now
        log = self._log(video)
        recent, epoch, dc = self._recent, self.epoch, self.dc
        recent_get = recent.get
        new: list[Row] = []
        again: list[Row] = []
        placed: list[Placement] = []
        new_append, placed_append = new.append, placed.append
        seq = start = log.seq
        prev = list(log.tail) if log.tail else None
        for event in events:  # runs for every published event: no helper call, no tuple per event
            event_id = event[_ID]
            seen = recent_get(event_id)
            if seen is None:
                seq += 1
                event[_EPOCH] = epoch
                event[_SEQ] = seq
                event[_PREV] = prev
                prev = [epoch, seq]
                if dc:
                    event[_DC] = dc
                recent[event_id] = event  # a later copy of the id in this batch is a retry
                new_append(event)
                placed_append(seq)
                continue
            if seen[_VIDEO] != video:
                placed_append(self.conflict(event_id, video))
                continue
            self.duplicates += 1
            if seen[_EPOCH] == epoch:
                placed_append(seen[_SEQ])
            else:
                placed_append((seen[_EPOCH], seen[_SEQ]))
                if all(e is not seen for e in again):
                    again.append(seen)
        if seq != start:
            log.seq, log.tail = seq, (epoch, seq)
            log.history.extend(new)  # bounded by maxlen (0: no history)
            log.times.extend(repeat(now, len(new)))
            self._remember(new)
        return new, again, placed

    def store(self, events: list[Row], now: float | None = None) -> int:
        """Store events sequenced elsewhere (a replica from the owner, or a chain tail handed
        over by the previous owner), skipping known ones.  Returns how many were new."""
        now = time.monotonic() if now is None else now
        recent, videos = self._recent, self.videos
        added = []
        for event in events:  # a backup runs this for every replicated event
            event_id = event[_ID]
            if event_id in recent:
                continue
            log = videos.get(event[_VIDEO]) or self._log(event[_VIDEO])
            log.tail = (event[_EPOCH], event[_SEQ])
            log.history.append(event)
            log.times.append(now)
            recent[event_id] = event
            added.append(event)
        self._remember(added)
        return len(added)

    def holds(self, video: str, pos: Position) -> bool:
        """Whether ``pos`` is the video's tail here or an event of its history."""
        log = self.videos.get(video)
        if log is None:
            return False
        return log.tail == pos or any(self.position(e) == pos for e in log.history)

    def is_replica(self, event: Row) -> bool:
        return event[_EPOCH] != self.epoch

    @staticmethod
    def position(event: Row) -> Position:
        return event[_EPOCH], event[_SEQ]

    def after(self, video: str, pos: Position | None, now: float | None = None) -> list[Row] | None:
        """The chain of ``video`` after the event at ``pos`` (``None``: the whole history), or
        None when history cannot say (``pos`` unknown here or already forgotten)."""
        log = self.videos.get(video)
        if log is None:
            return None if pos is not None else []
        self.prune(video, now)
        if pos is None:
            return list(log.history)
        if log.tail == pos:
            return []
        events = list(log.history)
        first_prev = events and events[0][_PREV]
        if first_prev and tuple(first_prev) == pos:
            return events  # pos itself was pruned, but its successor is the oldest we keep
        for i, e in enumerate(events):
            if self.position(e) == pos:
                return events[i + 1:]
        return None

    def tail(self, video: str) -> Position | None:
        log = self.videos.get(video)
        return log.tail if log else None

    def prune(self, video: str, now: float | None = None) -> None:
        log = self.videos.get(video)
        if log is None or not self.history_age:
            return
        cutoff = (time.monotonic() if now is None else now) - self.history_age
        while log.times and log.times[0] < cutoff:
            log.history.popleft()
            log.times.popleft()

    def _log(self, video: str) -> VideoLog:
        log = self.videos.get(video)
        if log is None:
            log = self.videos[video] = VideoLog(history=deque(maxlen=self.history_size),
                                                times=deque(maxlen=self.history_size))
        return log

    def _remember(self, events: list[Row]) -> None:
        """``events`` (already in ``_recent``) join the dedupe window; the oldest batches
        leave while the newer ones hold at least ``dedupe_size`` ids (0: none kept)."""
        if events:
            self._recent_batches.append(events)
        recent, batches, size = self._recent, self._recent_batches, self.dedupe_size
        while batches and len(recent) - len(batches[0]) >= size:
            _consume(map(recent.pop, map(_id_of, batches.popleft())))  # C-level loops
