"""Per-video sequencing, history and publish idempotency: the dispatcher's sans-IO core.

The owner dispatcher of a video gives each accepted event ``epoch`` (this dispatcher
incarnation's id: its start time in ms, so a restarted or new owner always has a larger one)
and ``seq`` (1, 2, 3, ... per video within an epoch).  ``(epoch, seq)`` is the SSE id, so a
viewer's position in a video is totally ordered.  History keeps the last ``history_size``
events per video no older than ``history_age`` seconds, for Last-Event-ID recovery and gap
repair.  Retries of a publish carry the same event id: a bounded LRU of recent ids returns
the original (epoch, seq) instead of sequencing it twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class VideoLog:
    seq: int = 0
    history: deque = field(default_factory=deque)


class Sequencer:
    def __init__(self, epoch: int | None = None, history_size: int = 1000,
                 history_age: float = 300.0, dedupe_size: int = 100000):
        self.epoch = epoch if epoch is not None else int(time.time() * 1000)
        self.history_size = history_size
        self.history_age = history_age
        self.dedupe_size = dedupe_size
        self.videos: dict[str, VideoLog] = {}
        self._recent: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.duplicates = 0

    def accept(self, event: dict, now: float | None = None) -> tuple[dict, bool]:
        """Sequence ``event`` (mutated in place).  Returns ``(event, is_new)``; a retry of an
        event seen before returns it with its original epoch/seq and ``is_new=False``."""
        seen = self._recent.get(event["id"])
        if seen is not None:
            self.duplicates += 1
            event["epoch"], event["seq"] = seen
            return event, False
        log = self.videos.get(event["video"])
        if log is None:
            log = self.videos[event["video"]] = VideoLog()
        log.seq += 1
        event["epoch"], event["seq"] = self.epoch, log.seq
        if self.dedupe_size:
            self._recent[event["id"]] = (self.epoch, log.seq)
            if len(self._recent) > self.dedupe_size:
                self._recent.popitem(last=False)
        if self.history_size:
            log.history.append((time.monotonic() if now is None else now, event))
            if len(log.history) > self.history_size:
                log.history.popleft()
        return event, True

    def since(self, video: str, epoch: int, seq: int, now: float | None = None) -> list[dict] | None:
        """Events of ``video`` after ``epoch:seq``, or None when they cannot all be given
        (another epoch, or the history no longer reaches back that far)."""
        log = self.videos.get(video)
        if epoch != self.epoch:
            return None
        if log is None:
            return [] if seq == 0 else None
        self.prune(video, now)
        if seq >= log.seq:
            return []
        if not log.history or log.history[0][1]["seq"] > seq + 1:
            return None
        return [e for _, e in log.history if e["seq"] > seq]

    def prune(self, video: str, now: float | None = None) -> None:
        log = self.videos.get(video)
        if log is None or not self.history_age:
            return
        cutoff = (time.monotonic() if now is None else now) - self.history_age
        while log.history and log.history[0][0] < cutoff:
            log.history.popleft()
