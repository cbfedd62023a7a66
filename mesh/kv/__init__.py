"""The KV interface: subscription counts and the node registry.

Data model (the same for every backend):

* ``video -> frontend -> count``: how many local viewers a frontend has for a video.  Only
  counts > 0 are stored; writing 0 deletes the entry.
* a node registry: every live node (frontend, dispatcher, bridge) with its endpoints.

Liveness: a node calls :meth:`KV.register` once; the backend then keeps that registration alive
(Consul: a session with a TTL and ``behavior=delete``; embedded: a heartbeat row) until
:meth:`KV.deregister` or the process dies.  Counts written by a node are bound to its
registration: when the node dies without deregistering, its counts disappear within the
backend's liveness bound, so no stale count outlives its frontend.

Backends: ``kv_memory.MemoryKV`` (one process only: the unit-test fake), ``kv_embedded.EmbeddedKV``
(SQLite file shared by the processes of one host, no external service), ``kv_consul.ConsulKV``.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Mapping

ROLE_FRONTEND = "frontend"
ROLE_DISPATCHER = "dispatcher"
ROLE_BRIDGE = "bridge"
ROLES = (ROLE_FRONTEND, ROLE_DISPATCHER, ROLE_BRIDGE)

Counts = dict[str, dict[str, int]]  # video -> frontend -> count


@dataclass(frozen=True)
class NodeInfo:
    """A registered node and the endpoints other nodes and operators reach it on."""

    name: str
    role: str
    dc: str = "dc1"
    http: str = ""    # base URL of the node's HTTP server (health, metrics, API)
    router: str = ""  # dispatcher: ROUTER endpoint (publish in)
    pub: str = ""     # dispatcher: XPUB endpoint (fan-out out); bridge: import XPUB (peer DCs' events)
    export: str = ""  # bridge: export XPUB endpoint (this DC's events to peer DCs' bridges)
    healthy: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "NodeInfo":
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**fields)


class KV(abc.ABC):
    """Subscription counts and node registry.  Every method may raise ``KVError``."""

    #: seconds within which a dead node's registration and counts disappear
    liveness_bound: float = 0.0
    #: bumped whenever the backend had to recreate this process's registration (e.g. its
    #: Consul session expired during an outage): everything written before is gone, and the
    #: owner must write its full state again.
    generation: int = 0

    async def open(self) -> None:
        """Connect / open files.  Idempotent."""

    async def close(self) -> None:
        """Stop renewing and release resources (does not deregister)."""

    @abc.abstractmethod
    async def register(self, node: NodeInfo) -> None:
        """Register ``node`` as this process's identity and keep it alive from now on."""

    @abc.abstractmethod
    async def deregister(self) -> None:
        """Remove this process's node and every count it wrote."""

    @abc.abstractmethod
    async def write_counts(self, frontend: str, counts: Mapping[str, int]) -> None:
        """Set ``video -> count`` for ``frontend`` (this process's registered node); a count
        <= 0 deletes the entry.  Atomic per call where the backend allows it."""

    @abc.abstractmethod
    async def read_counts(self, video: str | None = None) -> Counts:
        """Counts of live frontends, for one video or all."""

    @abc.abstractmethod
    async def nodes(self, role: str | None = None) -> list[NodeInfo]:
        """Live registered nodes, optionally of one role, sorted by name."""

    @abc.abstractmethod
    async def watch_nodes(self, role: str | None, index: int, wait: float) -> tuple[int, list[NodeInfo]]:
        """Return ``(new_index, nodes)`` once the node set may differ from the one seen at
        ``index`` (``0``: return at once), or after ``wait`` seconds.  A return does not
        prove a change; compare the lists."""
