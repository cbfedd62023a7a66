"""Local fan-out: events of a video to every local viewer of it.

Each batch of a video's events is SSE-encoded once (``mesh.sse``) and the same bytes are
written to every viewer: one write per viewer per batch, never one encode per viewer.  A video
with more viewers than ``slice_size`` is written in slices, yielding to the loop between
slices so that one hot video never blocks the loop for long (one event to ~20 k connections in
one turn blocked it ~0.9 s on our machines); batches that arrive meanwhile are queued behind,
so per-video order holds.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from mesh.sse import encode_event
from mesh.subscriptions import SubscriptionTable

log = logging.getLogger("mesh.app")


class Viewer(Protocol):
    def send(self, data: bytes) -> None: ...


class Fanout:
    def __init__(self, table: SubscriptionTable, slice_size: int = 500):
        self.table = table
        self.slice_size = slice_size
        self._backlog: dict[str, list[bytes]] = {}
        self.deliveries = 0
        self.events_out = 0

    def deliver(self, video: str, events: list[dict]) -> None:
        data = b"".join(encode_event(e) for e in events)
        self.events_out += len(events)
        backlog = self._backlog.get(video)
        if backlog is not None:  # a sliced delivery of this video is in progress
            backlog.append(data)
            return
        viewers = self.table.viewers(video)
        if len(viewers) <= self.slice_size:
            self._write(list(viewers.values()), data, len(events))
            return
        self._backlog[video] = [data]
        asyncio.get_running_loop().create_task(self._sliced(video, len(events)))

    def broadcast(self, data: bytes) -> asyncio.Task:
        """Write ``data`` (e.g. a heartbeat comment) to every local viewer, in slices."""
        async def run():
            viewers = [v for conns in list(self.table.by_video.values()) for v in conns.values()]
            for i in range(0, len(viewers), self.slice_size):
                self._write(viewers[i:i + self.slice_size], data, 0)
                await asyncio.sleep(0)
        return asyncio.get_running_loop().create_task(run())

    async def _sliced(self, video: str, n_events: int) -> None:
        try:
            while self._backlog.get(video):
                data = b"".join(self._backlog[video])
                self._backlog[video] = []
                viewers = list(self.table.viewers(video).values())
                for i in range(0, len(viewers), self.slice_size):
                    self._write(viewers[i:i + self.slice_size], data, n_events)
                    await asyncio.sleep(0)
        finally:
            self._backlog.pop(video, None)

    def _write(self, viewers: list, data: bytes, n_events: int) -> None:
        for viewer in viewers:
            try:
                viewer.send(data)
            except Exception:  # noqa: BLE001 - one broken viewer must not stop the rest
                log.exception("write to a viewer failed")
        self.deliveries += n_events * len(viewers)
