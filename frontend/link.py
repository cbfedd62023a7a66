"""The frontend's side of the mesh: dispatcher discovery, the SUB socket (events in) and one
DEALER per dispatcher (publish requests out, acks in).

Theory of operation.  The SUB socket connects to every live dispatcher's XPUB; ZeroMQ replays
our subscriptions to a dispatcher whenever we (re)connect to it.  A subscription is only useful
once it has reached the video's owner (the ZeroMQ "slow joiner"): the owner answers each
subscribe with a sync marker on that very topic, and ``wait_synced`` holds a new viewer's
stream until the marker of the current owner has arrived, so a viewer that sees its stream open
receives every event published after that.

Publishes go to the owner by rendezvous hashing (``mesh.ownership``); publishes made in one
loop turn to the same dispatcher travel in one request.  A publish whose ack does not come
within ``attempt_timeout`` is sent again, to the next dispatcher in rendezvous order if the set
changed, until ``publish_timeout``; the event id makes the retry idempotent at the owner.
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

from mesh import protocol as P
from mesh.errors import ClientError, KVError, RemoteProtocolError
from mesh.kv import KV, NodeInfo, ROLE_DISPATCHER
from mesh.ownership import owner, rank
from mesh.sockets import make_socket

log = logging.getLogger("mesh.app")
wire_log = logging.getLogger("mesh.wire")

#: seconds the links of a dispatcher that left the registry stay open
LINK_LINGER = 60.0


class Peer:
    """One dispatcher we are connected to."""

    def __init__(self, info: NodeInfo, dealer: zmq.asyncio.Socket):
        self.info = info
        self.dealer = dealer
        self.queue: list[tuple[dict, asyncio.Future]] = []
        self.task: asyncio.Task | None = None
        self.retired_at = 0.0


def _endpoints(info: NodeInfo) -> tuple[str, str]:
    return info.router, info.pub


class MeshLink:
    def __init__(self, ctx: zmq.asyncio.Context, kv: KV, name: str,
                 on_events: Callable[[str, list[dict]], None],
                 attempt_timeout: float = 1.0, publish_timeout: float = 3.0):
        self.ctx = ctx
        self.kv = kv
        self.name = name
        self.on_events = on_events
        self.attempt_timeout = attempt_timeout
        self.publish_timeout = publish_timeout
        self.sub = make_socket(ctx, zmq.SUB)
        self.peers: dict[str, Peer] = {}       # in the registry now: ownership is over these
        self.retired: dict[str, Peer] = {}     # left the registry, links still open
        self.stats = defaultdict(int)
        self._req_ids = itertools.count(1)
        self._pending: dict[bytes, list[tuple[str, asyncio.Future]]] = {}
        self._synced: dict[str, set[str]] = {}
        self._sync_waiters: dict[str, list[asyncio.Future]] = {}
        self._flush_scheduled: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self.peers_changed = asyncio.Event()

    async def start(self, first_discovery_timeout: float = 5.0) -> None:
        """Start serving; returns once the first discovery round is done (or timed out), so a
        node that announces readiness already knows the dispatchers registered before it."""
        self._first_discovery = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._serve_sub()),
                       asyncio.create_task(self._discover())]
        try:
            await asyncio.wait_for(asyncio.shield(self._first_discovery), first_discovery_timeout)
        except asyncio.TimeoutError:
            log.warning("no dispatcher list within %.1fs; serving anyway", first_discovery_timeout)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for peer in [*self.peers.values(), *self.retired.values()]:
            self._close_link(peer)
        self.peers.clear()
        self.retired.clear()
        self.sub.close(linger=0)

    # --- discovery --------------------------------------------------------------------------

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
            if not self._first_discovery.done():
                self._first_discovery.set_result(None)

    def set_dispatchers(self, nodes: list[NodeInfo]) -> None:
        """Adopt the registry's dispatcher set.  Ownership follows the set at once; the ZeroMQ
        links of a dispatcher that left it linger for ``LINK_LINGER`` seconds, so a registry
        hiccup (a Consul agent restarting, nodes re-registering one by one) costs no events:
        whatever a still-running dispatcher publishes keeps reaching us."""
        now = time.monotonic()
        wanted = {n.name: n for n in nodes}
        for name in list(self.peers):
            if name not in wanted:
                peer = self.peers.pop(name)
                peer.retired_at = now
                self.retired[name] = peer
                self._fail_queue(peer, f"dispatcher {name} left the registry")
                log.info("dispatcher %s left the registry; its links linger %.0fs", name, LINK_LINGER)
            elif _endpoints(wanted[name]) != _endpoints(self.peers[name].info):
                self._close_link(self.peers.pop(name))
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
                self._close_link(old)
            dealer = make_socket(self.ctx, zmq.DEALER)
            dealer.connect(info.router)
            self.sub.connect(info.pub)
            peer = self.peers[name] = Peer(info, dealer)
            peer.task = asyncio.create_task(self._serve_dealer(peer))
            log.info("connected to dispatcher %s (router %s, pub %s)", name, info.router, info.pub)
        for name, peer in list(self.retired.items()):
            if now - peer.retired_at > LINK_LINGER:
                self._close_link(self.retired.pop(name))
        self.peers_changed.set()
        self.peers_changed = asyncio.Event()
        self._wake_sync_waiters()

    def _fail_queue(self, peer: Peer, why: str) -> None:
        queue, peer.queue = peer.queue, []
        for _, fut in queue:
            if not fut.done():
                fut.set_exception(ConnectionError(why))

    def _close_link(self, peer: Peer) -> None:
        if peer.task:
            peer.task.cancel()
        try:
            self.sub.disconnect(peer.info.pub)
        except zmq.ZMQError:
            pass
        peer.dealer.close(linger=0)
        for synced in self._synced.values():
            synced.discard(peer.info.name)
        self._fail_queue(peer, f"dispatcher {peer.info.name} left")
        log.info("disconnected from dispatcher %s", peer.info.name)

    # --- subscriptions ----------------------------------------------------------------------

    def subscribe(self, video: str) -> None:
        self._synced[video] = set()
        self.sub.setsockopt(zmq.SUBSCRIBE, P.topic_for(video))

    def unsubscribe(self, video: str) -> None:
        self._synced.pop(video, None)
        self.sub.setsockopt(zmq.UNSUBSCRIBE, P.topic_for(video))

    def is_synced(self, video: str) -> bool:
        own = owner(video, self.peers)
        return own is not None and own in self._synced.get(video, ())

    async def wait_synced(self, video: str, timeout: float) -> bool:
        """True once the video's owner confirmed our subscription; False after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.is_synced(video):
            left = deadline - loop.time()
            if left <= 0:
                self.stats["sync_timeouts"] += 1
                return False
            fut = loop.create_future()
            self._sync_waiters.setdefault(video, []).append(fut)
            try:
                await asyncio.wait_for(fut, left)
            except asyncio.TimeoutError:
                pass
        return True

    def _wake_sync_waiters(self, video: str | None = None) -> None:
        videos = [video] if video is not None else list(self._sync_waiters)
        for v in videos:
            for fut in self._sync_waiters.pop(v, ()):
                if not fut.done():
                    fut.set_result(None)

    async def _serve_sub(self) -> None:
        while True:
            frames = await self.sub.recv_multipart()
            try:
                msg = P.Fanout.from_frames(frames)
            except RemoteProtocolError as exc:
                self.stats["malformed"] += 1
                wire_log.warning("dropped malformed fan-out message: %s", exc)
                continue
            if msg.kind == P.FANOUT_SYNC:
                synced = self._synced.get(msg.video)
                if synced is not None:
                    synced.add(msg.sender)
                    self._wake_sync_waiters(msg.video)
                continue
            if msg.video not in self._synced:
                continue  # late message for a video we just left
            self.stats["events_in"] += len(msg.events)
            try:
                self.on_events(msg.video, msg.events)
            except Exception:  # noqa: BLE001 - one bad delivery must not stop the socket
                log.exception("delivering events of %s failed", msg.video)

    # --- publish ----------------------------------------------------------------------------

    async def publish(self, event: dict) -> dict:
        """Send ``event`` to its owner and return the ack result ``{"id","epoch","seq"}``.
        Raises ClientError(503) when no dispatcher acknowledges within ``publish_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                break
            order = rank(event["video"], self.peers)
            if not order:
                # no dispatcher known yet: wait for discovery, within the deadline
                try:
                    await asyncio.wait_for(self.peers_changed.wait(), left)
                except asyncio.TimeoutError:
                    break
                continue
            # always the current owner: a retry goes elsewhere only once discovery says the
            # owner left (a slow owner retried elsewhere would sequence the event twice)
            target = order[0]
            fut = self._enqueue(target, event)
            try:
                result = await asyncio.wait_for(asyncio.shield(fut), min(self.attempt_timeout, left))
            except asyncio.TimeoutError:
                self.stats["publish_retries"] += 1
                log.warning("no ack from %s for event %s within %.2fs; retrying", target, event["id"],
                            self.attempt_timeout)
                continue
            except ConnectionError:
                self.stats["publish_retries"] += 1
                continue
            if "error" in result:
                raise ClientError(503, "publish_rejected", f"dispatcher rejected the event: "
                                  f"{result['error'].get('message', '?')}", retryable=True)
            return result
        self.stats["publish_failures"] += 1
        raise ClientError(503, "no_dispatcher", "no dispatcher acknowledged the event in time",
                          retryable=True)

    def _enqueue(self, target: str, event: dict) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        peer = self.peers[target]
        peer.queue.append((event, fut))
        if target not in self._flush_scheduled:
            self._flush_scheduled.add(target)
            asyncio.get_running_loop().call_soon(self._flush, target)
        return fut

    def _flush(self, target: str) -> None:
        self._flush_scheduled.discard(target)
        peer = self.peers.get(target)
        if peer is None or not peer.queue:
            return
        batch, peer.queue = peer.queue, []
        req_id = next(self._req_ids).to_bytes(8, "big")
        frames = P.Control(P.MSG_PUBLISH, req_id, P.publish_body([e for e, _ in batch])).to_frames()
        self._pending[req_id] = [(e["id"], f) for e, f in batch]
        try:
            peer.dealer.send_multipart(frames, flags=zmq.NOBLOCK)
            self.stats["publish_requests"] += 1
        except zmq.ZMQError as exc:
            del self._pending[req_id]
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(ConnectionError(f"send to {target} failed: {exc}"))

    async def _serve_dealer(self, peer: Peer) -> None:
        while True:
            frames = await peer.dealer.recv_multipart()
            try:
                msg = P.Control.from_frames(frames)
                waiting = self._pending.pop(msg.request_id, None)
                if waiting is None:
                    continue  # an ack for an attempt we already gave up on
                if msg.msg_type == P.MSG_ERROR:
                    err = {"error": msg.body}
                    results = {eid: err for eid, _ in waiting}
                elif msg.msg_type == P.MSG_ACK:
                    results = {r["id"]: r for r in P.ack_results(msg)}
                else:
                    raise RemoteProtocolError(f"unexpected reply type {msg.msg_type!r}")
            except RemoteProtocolError as exc:
                self.stats["malformed"] += 1
                wire_log.warning("dropped malformed reply from %s: %s", peer.info.name, exc)
                continue
            for eid, fut in waiting:
                if not fut.done():
                    res = results.get(eid)
                    if res is None:
                        fut.set_exception(ConnectionError("ack did not cover the event"))
                    else:
                        fut.set_result(res)
