"""The frontend's side of the mesh, wired from three parts that share the dispatcher links:

* ``Subscriber`` (``frontend/subscriber.py``): the SUB socket, subscription sync, chain
  following and repair from history -- events in;
* ``Publisher`` (``frontend/publisher.py``): publishes to their owners, batched, acknowledged,
  retried -- events out;
* ``PresenceLink`` (``frontend/presence.py``): presence to the owners and viewer lists back.

Endpoints (bind|connect TYPE for PURPOSE):

* connect SUB    every dispatcher's XPUB and every bridge's import XPUB   events in
* connect DEALER every dispatcher's ROUTER    publishes, history, presence (``mesh.io.peers``)
* connect DEALER every bridge's relay ROUTER  history of other DCs' chains

Discovery (``mesh.io.peers``) connects the SUB socket as dispatchers and bridges come and go.
All three parts ask one ``OwnerCache`` (``mesh.core.publishing``) for a video's owner: one hash
per video per dispatcher set, whatever the number of events.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Callable

import zmq.asyncio

from mesh.config import FrontendSection
from mesh.kv import KV, NodeInfo, ROLE_BRIDGE
from mesh.core.publishing import OwnerCache, acked
from mesh.io.peers import NodeWatcher, PeerLinks
from mesh.io.tasks import Tasks

from .presence import PresenceLink
from .publisher import Publisher
from .subscriber import Subscriber

__all__ = ["MeshLink", "acked"]

log = logging.getLogger("mesh.app")


class MeshLink:
    def __init__(self, ctx: zmq.asyncio.Context, kv: KV, name: str, settings: FrontendSection, *,
                 on_events: Callable[[str, list[dict]], None],
                 on_reset: Callable[[str, str], None] = lambda video, reason: None,
                 on_presence: Callable[[str, list[dict]], None] = lambda video, events: None,
                 curve=None, dc: str = ""):
        self.stats: defaultdict[str, int] = defaultdict(int)
        self.tasks = Tasks(log)
        self.dispatchers = PeerLinks(ctx, kv, on_connect=self._dispatcher_up,
                                     on_disconnect=self._dispatcher_gone, curve=curve)
        self.bridges = NodeWatcher(kv, ROLE_BRIDGE, self._bridge_up, self._bridge_gone)
        # DEALERs to our DC's bridges' relay ROUTERs, fed from ``bridges`` (no discovery of their own)
        self.relays = PeerLinks(ctx, kv, curve=curve)
        self._owners = OwnerCache()
        self.subscriber = Subscriber(
            ctx, self.dispatchers, self.relays, self.owner_of, self.stats, self.tasks,
            on_events=on_events, on_reset=on_reset, on_presence=on_presence,
            gap_timeout=settings.gap_timeout, history_deadline=settings.history_deadline,
            coalesce_max=settings.coalesce_max, drop_every=settings.fault_drop_every, curve=curve, dc=dc)
        self.publisher = Publisher(self.dispatchers, self._owners, self.stats, self.tasks,
                                   settings.attempt_timeout, settings.publish_timeout)
        self.presence = PresenceLink(self.dispatchers, name, self.owner_of, self.stats, self.tasks)
        # what the node calls, each served by one part
        self.subscribe = self.subscriber.subscribe
        self.unsubscribe = self.subscriber.unsubscribe
        self.wait_synced = self.subscriber.wait_synced
        self.history = self.subscriber.history
        self.publish_many = self.publisher.publish_many
        self.send_presence = self.presence.send_presence
        self.presence_page = self.presence.presence_page

    @property
    def peers(self) -> dict:
        """The dispatchers the registry lists now."""
        return self.dispatchers.peers

    @property
    def retired(self) -> dict:
        """Links of dispatchers that left the registry, still open (``mesh.io.peers.LINK_LINGER``)."""
        return self.dispatchers.retired

    def owner_of(self, video: str) -> str | None:
        """The video's owner among the registered dispatchers, cached per dispatcher set."""
        return self._owners.owner_of(video, self.dispatchers.changed, self.dispatchers.peers)

    async def start(self, first_discovery_timeout: float = 5.0) -> None:
        """Start serving; returns once the first discovery round is done (or timed out), so a
        node that announces readiness already knows the dispatchers registered before it."""
        self.subscriber.start()
        await asyncio.gather(self.dispatchers.start(first_discovery_timeout),
                             self.bridges.start(first_discovery_timeout))

    async def stop(self) -> None:
        self.tasks.cancel()
        await self.dispatchers.stop()
        await self.bridges.stop()
        await self.relays.stop()
        self.subscriber.close()

    def _dispatcher_up(self, info: NodeInfo) -> None:
        self.subscriber.connect(info)

    def _dispatcher_gone(self, info: NodeInfo) -> None:
        self.subscriber.disconnect(info)

    def _bridge_up(self, info: NodeInfo) -> None:
        self.subscriber.connect(info)
        self._sync_relays()

    def _bridge_gone(self, info: NodeInfo) -> None:
        self.subscriber.disconnect(info)
        self._sync_relays()

    def _sync_relays(self) -> None:
        self.relays.set_dispatchers([n for n in self.bridges.nodes.values() if n.router])
