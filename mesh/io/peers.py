"""Links to the dispatchers of the mesh: discovery from the KV and one DEALER per dispatcher
for control requests.  Frontends use it to publish and fetch history; dispatchers use it to
replicate to their backups, hand chains over and forward misrouted publishes.

Theory of operation.  ``PeerLinks`` follows the registry with ``KV.watch_nodes``;
ownership (rendezvous hashing) is computed over ``peers``, the dispatchers the registry lists
now.  A dispatcher that leaves the registry moves to ``retired``: its links stay open for
``LINK_LINGER`` seconds, so a registry hiccup (a Consul agent restarting, nodes
re-registering one by one) does not cut a running dispatcher off.  ``request`` sends one
control message and waits for its reply with a deadline; replies are matched by request id,
and a late reply to an abandoned request is dropped.  A peer that timed out is "suspect" for
``SUSPECT_FOR`` seconds: callers that can do without it (replication) skip it meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict
from typing import Callable

import zmq
import zmq.asyncio

from mesh.wire import protocol as P
from mesh.errors import KVError, RemoteProtocolError
from mesh.kv import KV, NodeInfo, ROLE_DISPATCHER
from mesh.io.curve import CurveError, connect as curve_connect
from mesh.io.sockets import make_socket

log = logging.getLogger("mesh.app")
wire_log = logging.getLogger("mesh.wire")

#: seconds the links of a dispatcher that left the registry stay open
LINK_LINGER = 60.0
#: seconds a peer that missed a deadline is skipped by optional requests
SUSPECT_FOR = 2.0


class PeerGone(ConnectionError):
    pass


class Peer:
    def __init__(self, info: NodeInfo, dealer: zmq.asyncio.Socket):
        self.info = info
        self.dealer = dealer
        self.task: asyncio.Task | None = None
        self.retired_at = 0.0
        self.suspect_until = 0.0

    @property
    def name(self) -> str:
        return self.info.name


def _endpoints(info: NodeInfo) -> tuple[str, str]:
    return info.router, info.pub


class PeerLinks:
    """DEALER links to every registered node of one role (the dispatchers, or the peer
    bridges' relays), kept in step with the registry: a node that joins is linked, one that
    leaves lingers in ``retired`` for ``LINK_LINGER`` seconds before its link closes."""

    def __init__(self, ctx: zmq.asyncio.Context, kv: KV, me: str | None = None,
                 on_connect: Callable[[NodeInfo], None] | None = None,
                 on_disconnect: Callable[[NodeInfo], None] | None = None, curve=None):
        self.ctx = ctx
        self.kv = kv
        self.me = me  # a dispatcher's own name: never linked to itself
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.curve = curve  # mesh.io.curve.CurveKeys: links are CURVE clients; None: plaintext
        self.peers: dict[str, Peer] = {}
        self.retired: dict[str, Peer] = {}
        self.stats = defaultdict(int)
        self.changed = asyncio.Event()
        self._req_ids = itertools.count(1)
        self._pending: dict[bytes, asyncio.Future] = {}
        self._task: asyncio.Task | None = None
        self._first: asyncio.Future | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self.peers)

    @property
    def discovered(self) -> bool:
        """Whether the first round of discovery is done (``peers`` is the registry's list)."""
        return self._first is not None and self._first.done()

    async def first_round(self) -> None:
        """Returns once the first round of discovery is done."""
        await asyncio.shield(self._first)

    async def start(self, first_timeout: float = 5.0) -> None:
        """Start following the registry; returns after the first round (or ``first_timeout``)."""
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._discover())
        try:
            await asyncio.wait_for(asyncio.shield(self._first), first_timeout)
        except asyncio.TimeoutError:
            log.warning("no dispatcher list within %.1fs; going on", first_timeout)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for peer in [*self.peers.values(), *self.retired.values()]:
            self._close(peer)
        self.peers.clear()
        self.retired.clear()

    async def _discover(self) -> None:
        index, backoff = 0, 0.2
        while True:
            try:
                index, nodes = await self.kv.watch_nodes(ROLE_DISPATCHER, index, wait=30.0)
                backoff = 0.2
            except KVError as exc:
                log.warning("dispatcher discovery failed (%s); keeping %d known dispatchers, "
                            "retrying in %.1fs", exc, len(self.peers), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self.set_dispatchers([n for n in nodes if n.healthy])
            if not self._first.done():
                self._first.set_result(None)

    def set_dispatchers(self, nodes: list[NodeInfo]) -> None:
        now = time.monotonic()
        wanted = {n.name: n for n in nodes if n.name != self.me}
        for name in list(self.peers):
            if name not in wanted:
                peer = self.peers.pop(name)
                peer.retired_at = now
                self.retired[name] = peer
                log.info("dispatcher %s left the registry; its links linger %.0fs", name, LINK_LINGER)
            elif _endpoints(wanted[name]) != _endpoints(self.peers[name].info):
                self._close(self.peers.pop(name))
        for name, info in wanted.items():
            if name in self.peers:
                self.peers[name].info = info
                continue
            old = self.retired.pop(name, None)
            if old is not None and _endpoints(old.info) == _endpoints(info):
                old.info = info
                self.peers[name] = old
                log.info("dispatcher %s is back in the registry", name)
                continue
            if old is not None:
                self._close(old)
            dealer = make_socket(self.ctx, zmq.DEALER, curve=self.curve)
            try:
                curve_connect(dealer, info.router, name, self.curve)
            except CurveError as exc:
                dealer.close(linger=0)
                log.error("not linking to dispatcher %s: %s", name, exc)
                continue
            peer = self.peers[name] = Peer(info, dealer)
            peer.task = asyncio.create_task(self._serve(peer))
            if self.on_connect:
                self.on_connect(info)
            log.info("connected to dispatcher %s (router %s, pub %s)", name, info.router, info.pub)
        for name, peer in list(self.retired.items()):
            if now - peer.retired_at > LINK_LINGER:
                self._close(self.retired.pop(name))
        self.changed.set()
        self.changed = asyncio.Event()

    def _close(self, peer: Peer) -> None:
        if peer.task:
            peer.task.cancel()
        peer.dealer.close(linger=0)
        if self.on_disconnect:
            self.on_disconnect(peer.info)
        log.info("disconnected from dispatcher %s", peer.name)

    def is_suspect(self, name: str) -> bool:
        peer = self.peers.get(name)
        return peer is None or peer.suspect_until > time.monotonic()

    async def request(self, name: str, msg_type: bytes, body: dict, timeout: float) -> P.Control:
        """Send one request to dispatcher ``name``; its reply, or TimeoutError / PeerGone."""
        peer = self.peers.get(name) or self.retired.get(name)
        if peer is None:
            raise PeerGone(f"no link to dispatcher {name}")
        req_id = next(self._req_ids).to_bytes(8, "big")
        fut = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            # awaited: a NOBLOCK send that fails (no pipe yet, e.g. a CURVE handshake that never
            # completes) fails its future, which nobody would otherwise read
            await peer.dealer.send_multipart(P.Control(msg_type, req_id, body).to_frames(), flags=zmq.NOBLOCK)
            self.stats["requests"] += 1
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            peer.suspect_until = time.monotonic() + SUSPECT_FOR
            self.stats["request_timeouts"] += 1
            raise
        except zmq.ZMQError as exc:
            raise PeerGone(f"send to {name} failed: {exc}") from None
        finally:
            self._pending.pop(req_id, None)

    async def _serve(self, peer: Peer) -> None:
        while True:
            frames = await peer.dealer.recv_multipart()
            try:
                msg = P.Control.from_frames(frames)
            except RemoteProtocolError as exc:
                self.stats["malformed"] += 1
                wire_log.warning("dropped malformed reply from %s: %s", peer.name, exc)
                continue
            peer.suspect_until = 0.0
            fut = self._pending.pop(msg.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)


class NodeWatcher:
    """Follows the registered nodes of one role and reports each one arriving
    (``on_connect``) and leaving (``on_disconnect``; an endpoint change is a leave and an
    arrival).  Frontends use it for their DC's bridges (``ROLE_BRIDGE``): they connect their
    SUB socket to a bridge's import XPUB like to a dispatcher's XPUB.  Unlike
    ``PeerLinks`` nothing lingers: a bridge carries no chain and no request, so a link
    cut during a registry hiccup only costs remote events until it is back."""

    def __init__(self, kv: KV, role: str, on_connect: Callable[[NodeInfo], None],
                 on_disconnect: Callable[[NodeInfo], None]):
        self.kv = kv
        self.role = role
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.nodes: dict[str, NodeInfo] = {}
        self._task: asyncio.Task | None = None

    async def start(self, first_timeout: float = 5.0) -> None:
        first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._watch(first))
        try:
            await asyncio.wait_for(asyncio.shield(first), first_timeout)
        except asyncio.TimeoutError:
            log.warning("no %s list within %.1fs; going on", self.role, first_timeout)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.nodes.clear()

    async def _watch(self, first: asyncio.Future) -> None:
        index, backoff = 0, 0.2
        while True:
            try:
                index, nodes = await self.kv.watch_nodes(self.role, index, wait=30.0)
                backoff = 0.2
            except KVError as exc:
                log.warning("%s discovery failed (%s); retrying in %.1fs", self.role, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self.set_nodes([n for n in nodes if n.healthy])
            if not first.done():
                first.set_result(None)

    def set_nodes(self, nodes: list[NodeInfo]) -> None:
        wanted = {n.name: n for n in nodes}
        for name, info in list(self.nodes.items()):
            new = wanted.get(name)
            if new is None or new.pub != info.pub:
                del self.nodes[name]
                self.on_disconnect(info)
                log.info("%s %s left (%s)", self.role, name, info.pub)
        for name, info in wanted.items():
            if name not in self.nodes:
                self.nodes[name] = info
                try:
                    self.on_connect(info)
                except CurveError as exc:
                    del self.nodes[name]
                    log.error("not linking to %s %s: %s", self.role, name, exc)
                    continue
                log.info("connected to %s %s (%s)", self.role, name, info.pub)
            else:
                self.nodes[name] = info
