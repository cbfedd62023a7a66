"""Local fan-out: events of a video to every local viewer of it.

Each batch of a video's events is SSE-encoded once (``mesh.sse``) and the same bytes are
written to every viewer: one write per viewer per batch, never one encode per viewer.  A video
with more viewers than ``slice_size`` is written in slices, yielding to the loop between
slices so that one hot video never blocks the loop for long (one event to ~20 k connections in
one turn blocked it ~0.9 s on our machines); batches that arrive meanwhile are queued behind,
so per-video order holds.

Latency: when ``observe_latency`` is set (``mesh.metrics`` installs it), each batch reports
the ``ts`` of its oldest event once, when it is written to the video's viewers (for a sliced
delivery: its first slice) -- once per batch, never per viewer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol

from mesh.sse import encode_event, encode_presence, encode_reset
from mesh.subscriptions import SubscriptionTable

log = logging.getLogger("mesh.app")


class Viewer(Protocol):
    def send(self, data: bytes, events: list | None) -> None: ...


class Fanout:
    def __init__(self, table: SubscriptionTable, slice_size: int = 500):
        self.table = table
        self.slice_size = slice_size
        self._backlog: dict[str, list[tuple[bytes, list, float | None]]] = {}  # data, events, oldest ts
        self.deliveries = 0
        self.events_out = 0
        #: ``f(ts_ms)`` called once per written batch with its oldest event's ``ts``
        self.observe_latency: Callable[[float], None] | None = None

    def deliver(self, video: str, events: list[dict]) -> None:
        data = b"".join(encode_event(e) for e in events)
        self.events_out += len(events)
        oldest = min((e["ts"] for e in events if isinstance(e.get("ts"), (int, float))), default=None)
        backlog = self._backlog.get(video)
        if backlog is not None:  # a sliced delivery of this video is in progress
            backlog.append((data, events, oldest))
            return
        viewers = self.table.viewers(video)
        if len(viewers) <= self.slice_size:
            self._write(list(viewers.values()), data, events)
            self._observe(oldest, viewers)
            return
        self._backlog[video] = [(data, events, oldest)]
        asyncio.get_running_loop().create_task(self._sliced(video))

    def broadcast(self, data: bytes) -> asyncio.Task:
        """Write ``data`` (e.g. a heartbeat comment) to every local viewer, in slices."""
        async def run():
            viewers = [v for conns in list(self.table.by_video.values()) for v in conns.values()]
            for i in range(0, len(viewers), self.slice_size):
                self._write(viewers[i:i + self.slice_size], data, None)
                await asyncio.sleep(0)
        return asyncio.get_running_loop().create_task(run())

    async def _sliced(self, video: str) -> None:
        try:
            while self._backlog.get(video):
                batches, self._backlog[video] = self._backlog[video], []
                data = b"".join(d for d, _, _ in batches)
                events = [e for _, evs, _ in batches for e in evs]
                oldest = min((ts for _, _, ts in batches if ts is not None), default=None)
                viewers = list(self.table.viewers(video).values())
                for i in range(0, len(viewers), self.slice_size):
                    self._write(viewers[i:i + self.slice_size], data, events)
                    if i == 0:
                        self._observe(oldest, viewers)
                    await asyncio.sleep(0)
        finally:
            self._backlog.pop(video, None)

    def _observe(self, oldest_ts: float | None, viewers) -> None:
        if self.observe_latency is not None and oldest_ts is not None and viewers:
            self.observe_latency(oldest_ts)

    def presence(self, video: str, events: list[dict]) -> None:
        """Presence events (count, join, leave) of ``video`` to its local viewers."""
        self._write(list(self.table.viewers(video).values()), encode_presence(video, events), None)

    def reset(self, video: str, reason: str) -> None:
        """Tell every viewer of ``video`` that continuity is lost (SSE ``reset``, no id)."""
        self._write(list(self.table.viewers(video).values()), encode_reset(video, reason), None)

    def _write(self, viewers: list, data: bytes, events: list | None) -> None:
        """``data`` to each viewer; ``events`` (the decoded batch, None for comments and
        resets) lets a viewer still catching up from history drop what it already has."""
        for viewer in viewers:
            try:
                viewer.send(data, events)
            except Exception:  # noqa: BLE001 - one broken viewer must not stop the rest
                log.exception("write to a viewer failed")
        if events:
            self.deliveries += len(events) * len(viewers)
