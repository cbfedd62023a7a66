"""A frontend's subscription bookkeeping: sans-IO.

``SubscriptionTable`` is the in-memory ``connection-id -> video`` table with its reverse index;
``add``/``remove`` report the 0->1 and 1->0 transitions that (un)subscribe the frontend's SUB
socket.  ``CountSync`` decides what to write to the KV and when: a transition between zero and
non-zero is urgent (written at once: a dispatcher or operator must see a new or vanished
subscription promptly), any other change of a count is coalesced and written at most once per
``interval``.  It never does I/O: the owner calls ``take()`` when ``due()`` says so, writes, and
reports ``done()`` or ``failed()``.
"""

from __future__ import annotations

from typing import Any, Hashable


class SubscriptionTable:
    def __init__(self) -> None:
        self.by_conn: dict[Hashable, str] = {}
        self.by_video: dict[str, dict[Hashable, Any]] = {}

    def add(self, conn_id: Hashable, video: str, conn: Any = None) -> bool:
        """Add a viewer; True when it is the video's first local viewer."""
        if conn_id in self.by_conn:
            raise ValueError(f"connection {conn_id!r} already subscribed")
        self.by_conn[conn_id] = video
        viewers = self.by_video.get(video)
        first = viewers is None
        if first:
            viewers = self.by_video[video] = {}
        viewers[conn_id] = conn
        return first

    def remove(self, conn_id: Hashable) -> tuple[str, bool] | None:
        """Remove a viewer; returns ``(video, was_last)`` or None if unknown."""
        video = self.by_conn.pop(conn_id, None)
        if video is None:
            return None
        viewers = self.by_video[video]
        del viewers[conn_id]
        if viewers:
            return video, False
        del self.by_video[video]
        return video, True

    def viewers(self, video: str) -> dict[Hashable, Any]:
        return self.by_video.get(video, {})

    def count(self, video: str) -> int:
        return len(self.by_video.get(video, ()))

    def counts(self) -> dict[str, int]:
        return {v: len(c) for v, c in self.by_video.items()}

    def __len__(self) -> int:
        return len(self.by_conn)


class CountSync:
    def __init__(self, interval: float):
        self.interval = interval
        self.desired: dict[str, int] = {}
        self.written: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}   # taken, neither done nor failed yet
        self.dirty: set[str] = set()
        self.urgent = False
        self.last_flush = float("-inf")

    def set(self, video: str, count: int) -> None:
        if count > 0:
            self.desired[video] = count
        else:
            self.desired.pop(video, None)
        # compare with what the KV will hold once a write in flight lands, not with what it
        # held before: a change back during that write must still be written
        target = self.in_flight.get(video, self.written.get(video, 0))
        if target == max(count, 0):
            self.dirty.discard(video)
            return
        self.dirty.add(video)
        if (target > 0) != (count > 0):
            self.urgent = True

    def due(self, now: float) -> float | None:
        """Seconds until the next write should happen (0: now), None when nothing is dirty."""
        if not self.dirty:
            return None
        if self.urgent:
            return 0.0
        return max(0.0, self.last_flush + self.interval - now)

    def take(self, now: float) -> dict[str, int]:
        """The changes to write now (video -> count, 0 meaning delete)."""
        changes = {v: self.desired.get(v, 0) for v in self.dirty}
        self.dirty.clear()
        self.urgent = False
        self.last_flush = now
        self.in_flight.update(changes)
        return changes

    def done(self, changes: dict[str, int]) -> None:
        for video, count in changes.items():
            self.in_flight.pop(video, None)
            if count > 0:
                self.written[video] = count
            else:
                self.written.pop(video, None)

    def failed(self, changes: dict[str, int]) -> None:
        for video in changes:
            self.in_flight.pop(video, None)
        for video in changes:
            self.set(video, self.desired.get(video, 0))

    def reset(self) -> None:
        """The KV lost what we wrote (a new registration): write everything again."""
        self.written.clear()
        self.dirty = set(self.desired)
        self.urgent = bool(self.dirty)
