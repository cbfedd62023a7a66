"""Bridges find their peer DCs' bridges in the WAN-federated Consul catalog.

Theory of operation.  Each DC is its own Consul datacenter; its bridge registers there as
service ``livemesh-bridge`` with its export XPUB endpoint and its history relay ROUTER in the
service Meta (``export``, ``router``).
WAN federation lets any agent read any datacenter's catalog (``?dc=``), so with
``bridge.peers = "consul"`` (or no peers at all on ``kv.backend = "consul"``) a bridge needs
no peer list: every ``DISCOVERY_INTERVAL`` seconds it lists the datacenters
(``/v1/catalog/datacenters``) and reads every other DC's bridges, and :class:`PeerBridges` (no
I/O) turns successive readings into links to open and links to drop.  A new DC -- its agent
joined the WAN pool and its bridge registered -- is linked within one interval; a bridge that
moved to another endpoint is relinked.

Each livemesh DC's ``node.dc`` must be its Consul datacenter's name (the key prefix
``livemesh/<dc>/`` and ``?dc=<dc>`` are the same name); a bridge never links to one of its own
DC's bridges.

Rules: a DC that answers without a healthy bridge (none registered, or its TTL check critical)
loses its link; a DC that cannot be read (its servers unreachable, our agent down) KEEPS its
link, since ZeroMQ reconnects by itself and a Consul outage must not cut cross-DC traffic.
Several healthy bridges in one DC (one per DC is the rule): the first by name.

Limits: polling, not blocking queries (``/v1/catalog/datacenters`` cannot block): a change is
seen within ``DISCOVERY_INTERVAL`` plus one WAN round trip, at 1 + (DCs - 1) reads per interval
per bridge.  A bridge SIGKILLed keeps its catalog entry until its TTL check fails
(``kv.session_ttl``); meanwhile its peers keep the link (ZeroMQ retries it).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, NamedTuple

from mesh.errors import ConfigError, KVError
from mesh.kv import ROLE_BRIDGE

log = logging.getLogger("mesh.app")

#: ``bridge.peers`` value that asks for discovery through the federated catalog
CONSUL_PEERS = "consul"
#: seconds between two readings of the federated catalog
DISCOVERY_INTERVAL = 2.0


class PeerEndpoints(NamedTuple):
    """What a bridge links to in a peer DC: its export XPUB and its history relay ROUTER
    (None: that bridge has no relay, so gaps in that DC's chains reset)."""
    export: str
    relay: str | None


Links = dict[str, PeerEndpoints]  # dc -> its bridge's endpoints


def discovers_peers(peers: tuple | list, kv_backend: str) -> bool:
    """True when a bridge configured with ``peers`` on ``kv_backend`` finds its peers in the
    federated catalog (``peers = ["consul"]``, or no peers on Consul)."""
    if list(peers) == [CONSUL_PEERS]:
        if kv_backend != "consul":
            raise ConfigError(f'bridge.peers = "{CONSUL_PEERS}" needs kv.backend = "consul" '
                              f"(got {kv_backend!r}): list the peers as dc=tcp://host:port")
        return True
    return not peers and kv_backend == "consul"


class PeerBridges:
    """The links a bridge holds to its peer DCs, updated from catalog readings."""

    def __init__(self, our_dc: str):
        self.our_dc = our_dc
        self.linked: Links = {}

    def update(self, found: dict) -> tuple[Links, Links]:
        """``found``: DC -> endpoints of its healthy bridge, or None when it has none;
        a DC missing from ``found`` (unreadable) keeps its link.  Returns ``(to_link,
        to_unlink)``: a moved bridge is in both (old endpoint out, new one in)."""
        link: Links = {}
        unlink: Links = {}
        for dc, endpoint in sorted(found.items()):
            old = self.linked.get(dc)
            if dc == self.our_dc or old == endpoint:
                continue
            if old is not None:
                unlink[dc] = self.linked.pop(dc)
            if endpoint is not None:
                link[dc] = self.linked[dc] = endpoint
        return link, unlink


async def read_peer_bridges(kv, views: dict) -> tuple[dict[str, PeerEndpoints | None], dict[str, str]]:
    """``(dc -> its bridge's endpoints or None, dc -> why it could not be read)`` for every other DC
    ``kv`` (a ``ConsulKV``) knows; ``views`` caches one read-only view per DC (close them)."""
    others = [dc for dc in await kv.datacenters() if dc != kv.dc]
    for dc in others:
        if dc not in views:
            views[dc] = kv.in_datacenter(dc)
    readings = await asyncio.gather(*(views[dc].nodes(ROLE_BRIDGE) for dc in others),
                                    return_exceptions=True)
    found: dict[str, PeerEndpoints | None] = {}
    errors: dict[str, str] = {}
    for dc, bridges in zip(others, readings):
        if isinstance(bridges, KVError):
            errors[dc] = str(bridges)
        elif isinstance(bridges, BaseException):
            raise bridges
        else:
            healthy = [b for b in bridges if b.healthy and b.export and b.dc != kv.dc]
            found[dc] = PeerEndpoints(healthy[0].export, healthy[0].router or None) if healthy else None
    return found, errors


async def follow_peer_bridges(kv, on_change: Callable[[Links, Links], None],
                              interval: float = DISCOVERY_INTERVAL) -> None:
    """Forever: read the federated catalog and call ``on_change(to_link, to_unlink)`` when a
    peer DC's bridge appears, moves or goes.  Failures are logged once per change of state."""
    peers = PeerBridges(kv.dc)
    views: dict = {}
    failing: dict[str, str] = {}
    try:
        while True:
            try:
                found, errors = await read_peer_bridges(kv, views)
            except KVError as exc:
                found, errors = {}, {"*": str(exc)}
            except Exception as exc:  # noqa: BLE001 - a bug here must not end discovery for good
                log.exception("peer discovery: unexpected error")
                found, errors = {}, {"*": repr(exc)}
            for dc in sorted(errors.keys() - failing.keys()):
                log.warning("peer discovery: cannot read %s (keeping its link): %s",
                            "the datacenters" if dc == "*" else dc, errors[dc])
            for dc in sorted(failing.keys() - errors.keys()):
                log.info("peer discovery: %s readable again", "catalog" if dc == "*" else dc)
            failing = errors
            link, unlink = peers.update(found)
            if link or unlink:
                on_change(link, unlink)
            await asyncio.sleep(interval)
    finally:
        for view in views.values():
            await view.close()
