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
and its time leave together, in C).  Retries of a publish carry the same event id: a
bounded LRU of recent ids returns the original placement instead of sequencing it twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

Position = tuple[int, int]  # (epoch, seq)


def position(event: dict) -> Position:
    return event["epoch"], event["seq"]


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
        self._recent: OrderedDict[str, dict] = OrderedDict()
        self.duplicates = 0

    def has_log(self, video: str) -> bool:
        return video in self.videos

    def accept(self, event: dict, now: float | None = None) -> tuple[dict, bool]:
        """Place ``event`` (mutated: epoch, seq, prev) at the end of its video's chain.
        Returns ``(event, is_new)``; a retry of a known event id returns the stored event with
        its original placement and ``is_new=False``."""
        new, _, placed = self.accept_many(event["video"], [event], now)
        return placed[0], bool(new)

    def accept_many(self, video: str, events: list[dict],
                    now: float | None = None) -> tuple[list[dict], list[dict], list[dict]]:
        """Append ``events`` (all of ``video``, in arrival order; mutated like ``accept``) to
        the video's chain in one go: one log lookup and one clock read for the batch.
        Returns ``(new, again, placed)``: the newly sequenced events; the retried events known
        here only as replicas (their owner may have died before publishing them: publish them
        again); and, per input event, the stored event with its placement."""
        now = time.monotonic() if now is None else now
        log = self._log(video)
        recent, epoch, dc, history, times = self._recent, self.epoch, self.dc, log.history, log.times
        new: list[dict] = []
        again: list[dict] = []
        placed: list[dict] = []
        seq, tail = log.seq, log.tail
        for event in events:  # _append, inlined: this loop runs for every published event
            seen = recent.get(event["id"])
            if seen is not None:
                self.duplicates += 1
                if seen["epoch"] != epoch and all(e is not seen for e in again):
                    again.append(seen)
                placed.append(seen)
                continue
            seq += 1
            event["epoch"], event["seq"], event["prev"] = epoch, seq, list(tail) if tail else None
            tail = (epoch, seq)
            if dc:
                event["dc"] = dc
            if self.dedupe_size:
                recent[event["id"]] = event
            if self.history_size:
                history.append(event)
                times.append(now)  # the same float for the whole batch: no allocation per event
            new.append(event)
            placed.append(event)
        log.seq, log.tail = seq, tail
        if self.dedupe_size:
            while len(recent) > self.dedupe_size:
                recent.popitem(last=False)
        return new, again, placed

    def store(self, events: list[dict], now: float | None = None) -> int:
        """Store events sequenced elsewhere (a replica from the owner, or a chain tail handed
        over by the previous owner), skipping known ones.  Returns how many were new."""
        added = 0
        for event in events:
            if event["id"] in self._recent:
                continue
            log = self._log(event["video"])
            self._append(log, event, now)
            added += 1
        return added

    def is_replica(self, event: dict) -> bool:
        return event["epoch"] != self.epoch

    def after(self, video: str, pos: Position | None, now: float | None = None) -> list[dict] | None:
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
        if events and events[0].get("prev") is not None and tuple(events[0]["prev"]) == pos:
            return events  # pos itself was pruned, but its successor is the oldest we keep
        for i, e in enumerate(events):
            if position(e) == pos:
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

    def _append(self, log: VideoLog, event: dict, now: float | None) -> None:
        log.tail = (event["epoch"], event["seq"])
        if self.dedupe_size:
            self._recent[event["id"]] = event
            if len(self._recent) > self.dedupe_size:
                self._recent.popitem(last=False)
        if self.history_size:
            log.history.append(event)
            log.times.append(time.monotonic() if now is None else now)
