"""In-memory KV backend.  One process only: the unit-test fake; it cannot be shared between
processes and it has no liveness (a node exists until it deregisters)."""

from __future__ import annotations

import asyncio
from typing import Mapping

from mesh.kv import KV, Counts, NodeInfo


class MemoryKV(KV):
    def __init__(self, store: "MemoryStore | None" = None):
        self.store = store or MemoryStore()
        self.node: NodeInfo | None = None

    async def register(self, node: NodeInfo) -> None:
        self.node = node
        self.store.nodes[node.name] = node
        self.store.changed()

    async def deregister(self) -> None:
        if self.node is None:
            return
        self.store.nodes.pop(self.node.name, None)
        for frontends in self.store.counts.values():
            frontends.pop(self.node.name, None)
        self.store.prune()
        self.store.changed()
        self.node = None

    async def write_counts(self, frontend: str, counts: Mapping[str, int]) -> None:
        for video, count in counts.items():
            if count > 0:
                self.store.counts.setdefault(video, {})[frontend] = count
            else:
                self.store.counts.get(video, {}).pop(frontend, None)
        self.store.prune()
        self.store.writes += 1

    async def read_counts(self, video: str | None = None) -> Counts:
        items = self.store.counts.items() if video is None else [(video, self.store.counts.get(video, {}))]
        return {v: dict(f) for v, f in items if f}

    async def nodes(self, role: str | None = None) -> list[NodeInfo]:
        return sorted((n for n in self.store.nodes.values() if role is None or n.role == role),
                      key=lambda n: n.name)

    async def watch_nodes(self, role, index, wait):
        if index == self.store.index:
            try:
                async with self.store.cond:
                    await asyncio.wait_for(self.store.cond.wait(), wait)
            except asyncio.TimeoutError:
                pass
        return self.store.index, await self.nodes(role)


class MemoryStore:
    """The state several MemoryKV handles of one process share."""

    def __init__(self):
        self.counts: Counts = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.index = 1
        self.writes = 0
        self.cond = asyncio.Condition()

    def prune(self) -> None:
        for video in [v for v, f in self.counts.items() if not f]:
            del self.counts[video]

    def changed(self) -> None:
        self.index += 1

        async def notify():
            async with self.cond:
                self.cond.notify_all()

        try:
            asyncio.get_running_loop().create_task(notify())
        except RuntimeError:
            pass
