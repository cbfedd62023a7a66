"""The frontend's side of the mesh: the SUB socket (events in), the dispatcher links
(``mesh.io.peers``: publish requests and history fetches out), per-video chain following.

Theory of operation.  The SUB socket connects to every live dispatcher's XPUB; ZeroMQ replays
our subscriptions to a dispatcher whenever we (re)connect to it.  A subscription is only useful
once it has reached the video's owner (the ZeroMQ "slow joiner"): the owner answers each
subscribe with a sync marker on that very topic, and ``wait_synced`` holds a new viewer's
stream until the marker of the current owner has arrived, so a viewer that sees its stream open
receives every event published after that.

Incoming events pass through a ``ChainFollower`` per video (``mesh.core.ordering``): in order, no
duplicates; a gap (PUB/SUB drop, reconnect, owner change) is repaired from the owner's history
within ``gap_timeout``, or announced to viewers as ``reset``.

Publishes go to the owner by rendezvous hashing (``mesh.core.ownership``, cached per video until
the dispatcher set changes); publishes made in one loop turn to the same dispatcher travel in
one request (several when they exceed one message, ``protocol.chunked``), and
``publish_many`` hands a whole batch over with one future per owner, not one per event.  A publish whose ack does not come
within ``attempt_timeout`` is sent again -- always to the current owner, which changes once
discovery says the owner left -- until ``publish_timeout``; the event id makes the retry
idempotent.

Several datacenters (opt-in: only when the DC's KV lists a bridge).  The SUB socket also
connects to every bridge of our DC (``dispatcher.bridge``: its import XPUB carries peer DCs'
events); our subscriptions reach the bridge like a dispatcher and travel on to the peer DCs.
An event whose origin DC (``dc``) is not ours belongs to a remote owner's chain: it is followed
by its own ``ChainFollower`` per (video, origin DC), delivered in order and once.  A gap in it
is repaired like a local one, but through the bridges: ``HIST`` with the origin ``dc`` to our
DC's bridge (its relay ROUTER, KV ``router``), which relays it to the origin DC's bridge and
owner (``dispatcher.bridge``), within ``gap_timeout``; when that fails (or our bridge has no
relay) viewers get ``reset``.  Remote events are tagged ``remote`` so the SSE encoder gives
them no ``id:`` (the browser keeps the last id of its own DC's chain, which a reconnect can
replay).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Callable

import zmq
import zmq.asyncio

from mesh.wire import protocol as P
from mesh.errors import ClientError, RemoteProtocolError
from mesh.kv import KV, NodeInfo, ROLE_BRIDGE
from mesh.core.ordering import ChainFollower
from mesh.core.ownership import owner, rank
from mesh.io.history import HistoryUnavailable, fetch_history
from mesh.io.peers import PeerLinks, NodeWatcher, PeerGone
from mesh.io.pump import SocketPump
from mesh.io.curve import connect as curve_connect
from mesh.io.sockets import make_socket
from mesh.io.tasks import Tasks

log = logging.getLogger("mesh.app")
wire_log = logging.getLogger("mesh.wire")

#: most videos whose owner the publish path caches
OWNER_CACHE_MAX = 100000


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


class MeshLink:
    def __init__(self, ctx: zmq.asyncio.Context, kv: KV, name: str,
                 on_events: Callable[[str, list[dict]], None],
                 on_reset: Callable[[str, str], None] | None = None,
                 on_presence: Callable[[str, list[dict]], None] | None = None,
                 attempt_timeout: float = 1.0, publish_timeout: float = 3.0,
                 gap_timeout: float = 1.0, drop_every: int = 0, coalesce_max: int = 256, curve=None, dc: str = "",
                 event_rows: bool = True, history_deadline: float = 0.3):
        self.ctx = ctx
        self.name = name
        self.dc = dc  # our datacenter: events of another origin DC came through a bridge
        self.on_events = on_events
        self.on_reset = on_reset or (lambda video, reason: None)
        self.on_presence = on_presence or (lambda video, events: None)
        self.attempt_timeout = attempt_timeout
        self.publish_timeout = publish_timeout
        self.gap_timeout = gap_timeout
        self.history_deadline = history_deadline
        self.drop_every = drop_every  # fault injection: pretend PUB/SUB lost every Nth message
        self.coalesce_max = max(1, coalesce_max)
        self.event_rows = event_rows  # publish events as rows (protocol.event_row)
        self._received = 0
        self.curve = curve  # mesh.io.curve.CurveKeys (None: plaintext links)
        # a plain socket on the async context's shadow, served by a pump (mesh.io.pump: no future
        # per message; the fan-out arrives here at up to 100 k messages/s)
        self.sub = make_socket(zmq.Context.shadow(ctx.underlying), zmq.SUB, curve=curve)
        self.sub_pump = SocketPump(self.sub, self._on_fanout, self.coalesce_max, "SUB")
        self.dispatchers = PeerLinks(ctx, kv, on_connect=self._sub_connect,
                                           on_disconnect=self._sub_disconnect, curve=curve)
        self.bridges = NodeWatcher(kv, ROLE_BRIDGE, self._bridge_connect, self._bridge_disconnect)
        # DEALERs to our DC's bridges' relay ROUTERs (history of other DCs' chains), fed from
        # ``bridges`` (no discovery of their own)
        self.relays = PeerLinks(ctx, kv, curve=curve)
        self.stats = defaultdict(int)
        self.followers: dict[str, ChainFollower] = {}
        self.remote_followers: dict[str, dict[str, ChainFollower]] = {}  # video -> origin dc ->
        self._synced: dict[str, set[str]] = {}
        self._sync_waiters: dict[str, list[asyncio.Future]] = {}
        self._queues: dict[str, list[tuple[list[dict], asyncio.Future]]] = {}
        self._owners: dict[str, str | None] = {}  # publish: video -> owner (see owner_of)
        self._owners_for: asyncio.Event | None = None
        self.tasks = Tasks(log)

    @property
    def peers(self) -> dict:
        return self.dispatchers.peers

    async def start(self, first_discovery_timeout: float = 5.0) -> None:
        """Start serving; returns once the first discovery round is done (or timed out), so a
        node that announces readiness already knows the dispatchers registered before it."""
        self.sub_pump.start()
        await asyncio.gather(self.dispatchers.start(first_discovery_timeout),
                             self.bridges.start(first_discovery_timeout))

    async def stop(self) -> None:
        self.tasks.cancel()
        await self.dispatchers.stop()
        await self.bridges.stop()
        await self.relays.stop()
        self.sub_pump.close(linger=0)

    def _sub_connect(self, info: NodeInfo) -> None:
        curve_connect(self.sub, info.pub, info.name, self.curve)
        self.sub_pump.poke()
        self._wake_sync_waiters()

    def _bridge_connect(self, info: NodeInfo) -> None:
        self._sub_connect(info)
        self._sync_relays()

    def _bridge_disconnect(self, info: NodeInfo) -> None:
        self._sub_disconnect(info)
        self._sync_relays()

    def _sync_relays(self) -> None:
        self.relays.set_dispatchers([n for n in self.bridges.nodes.values() if n.router])

    def _sub_disconnect(self, info: NodeInfo) -> None:
        try:
            self.sub.disconnect(info.pub)
            self.sub_pump.poke()
        except zmq.ZMQError:
            pass
        for synced in self._synced.values():
            synced.discard(info.name)

    # --- subscriptions ----------------------------------------------------------------------

    def subscribe(self, video: str) -> None:
        self._synced[video] = set()
        self.followers[video] = ChainFollower()
        self.remote_followers[video] = {}
        self.sub.setsockopt(zmq.SUBSCRIBE, P.topic_for(video))
        self.sub_pump.poke()

    def unsubscribe(self, video: str) -> None:
        self._synced.pop(video, None)
        self.followers.pop(video, None)
        self.remote_followers.pop(video, None)
        self.sub.setsockopt(zmq.UNSUBSCRIBE, P.topic_for(video))
        self.sub_pump.poke()

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
            changed = asyncio.ensure_future(self.dispatchers.changed.wait())
            try:
                await asyncio.wait([fut, changed], timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
        return True

    def _wake_sync_waiters(self, video: str | None = None) -> None:
        videos = [video] if video is not None else list(self._sync_waiters)
        for v in videos:
            for fut in self._sync_waiters.pop(v, ()):
                if not fut.done():
                    fut.set_result(None)

    def _on_fanout(self, batch: list[list[bytes]]) -> None:
        """Fan-out messages (``SocketPump``).  Whatever is already queued on the socket (up to
        ``coalesce_max`` messages) comes in one burst and each video's ready events are
        delivered once: under load, several batches of a video become one write per viewer;
        at light load a message is delivered as soon as it arrives (no timer, no added delay)."""
        ready: dict[str, list[dict]] = {}
        for frames in batch:
            self._handle_fanout(frames, ready)
        if len(batch) > 1:
            self.stats["coalesced_msgs"] += len(batch) - len(ready)
        for video, events in ready.items():
            self._deliver(video, events)

    def _handle_fanout(self, frames: list[bytes], ready: dict[str, list[dict]]) -> None:
        try:
            msg = P.FanoutMessage.from_frames(frames)
        except RemoteProtocolError as exc:
            self.stats["malformed"] += 1
            wire_log.warning("dropped malformed fan-out message: %s", exc)
            return
        if msg.kind == P.FANOUT_SYNC:
            synced = self._synced.get(msg.video)
            if synced is not None:
                synced.add(msg.sender)
                self._wake_sync_waiters(msg.video)
            return
        if msg.kind == P.FANOUT_DC_PRESENCE:
            return  # our owner's summary for the peer DCs (our bridge relays it): not for viewers
        follower = self.followers.get(msg.video)
        if follower is None:
            return  # late message for a video we just left
        if msg.kind == P.FANOUT_PRESENCE:
            if msg.sender == owner(msg.video, self.peers):  # a former owner's board is stale
                self.on_presence(msg.video, msg.presence)
            return
        if msg.kind == P.FANOUT_TAIL:
            if msg.sender == owner(msg.video, self.peers):
                fetch_after = follower.check_tail(msg.tail)
                if fetch_after is not None:
                    self.stats["gaps"] += 1
                    self.tasks.spawn(self._repair(msg.video, follower, fetch_after))
            return
        self._received += 1
        if self.drop_every and self._received % self.drop_every == 0:
            self.stats["fault_dropped"] += 1
            return
        self.stats["events_in"] += len(msg.events)
        if self.dc and any(P.origin_dc(e, self.dc) != self.dc for e in msg.events):
            local = self._offer_remote(msg.video, msg.events)
            if not local:
                return
            msg.events = local
        events, fetch_after = follower.offer(msg.events)
        if events:
            ready.setdefault(msg.video, []).extend(events)
        if fetch_after is not None:
            self.stats["gaps"] += 1
            self.tasks.spawn(self._repair(msg.video, follower, fetch_after))

    def _offer_remote(self, video: str, events: list[dict]) -> list[dict]:
        """Deliver the events of other DCs' chains; return the local ones (if any)."""
        local, remote = [], {}
        for event in events:
            dc = P.origin_dc(event, self.dc)
            if dc == self.dc:
                local.append(event)
            else:
                remote.setdefault(dc, []).append(event)
        followers = self.remote_followers.get(video)
        for dc, batch in remote.items():
            if followers is None:
                break
            follower = followers.get(dc)
            if follower is None:
                follower = followers[dc] = ChainFollower()
            self.stats["remote_events_in"] += len(batch)
            if self.relays.peers or follower.repairing:  # repairable through the bridges
                ready, fetch_after = follower.offer(batch)
                if fetch_after is not None:
                    self.stats["remote_gaps"] += 1
                    self.tasks.spawn(self._repair(video, follower, fetch_after, dc))
            else:
                ready, reset = follower.offer_unrepairable(batch)
                self.stats["remote_duplicates"] += len(batch) - len(ready)
                if reset:
                    self.stats["remote_resets"] += 1
                    log.info("gap in %s from %s (another DC's chain; no bridge relay); reset", video, dc)
                    self.on_reset(video, "gap")
            self._deliver_remote(video, ready)
        return local

    def _deliver_remote(self, video: str, events: list[dict]) -> None:
        for event in events:
            event["remote"] = True  # no SSE id: not replayable from our DC's history
        self._deliver(video, events)

    def _deliver(self, video: str, events: list[dict]) -> None:
        if not events:
            return
        try:
            self.on_events(video, events)
        except Exception:  # noqa: BLE001 - one bad delivery must not stop the socket
            log.exception("delivering events of %s failed", video)

    async def _repair(self, video: str, follower: ChainFollower, after, dc: str | None = None) -> None:
        """Fill a gap after ``after``: from our owner's history, or for another DC's chain
        (``dc``) through the bridges."""
        if dc is None:
            chain = await self.history(video, after, self.gap_timeout)
            current = self.followers.get(video)
        else:
            chain = await self.remote_history(video, dc, after, self.gap_timeout)
            current = self.remote_followers.get(video, {}).get(dc)
        if current is not follower:
            return  # unsubscribed meanwhile
        events, reset = follower.repaired(chain)
        prefix = "" if dc is None else "remote_"
        if reset:
            self.stats[prefix + "resets"] += 1
            log.warning("gap in %s%s after %s could not be repaired from history; reset", video,
                        "" if dc is None else f" from {dc}", after)
            self.on_reset(video, "gap")
        else:
            self.stats[prefix + "gaps_repaired"] += 1
        if dc is None:
            self._deliver(video, events)
        else:
            self._deliver_remote(video, events)

    async def remote_history(self, video: str, dc: str, after, timeout: float) -> list[dict] | None:
        """Another DC's chain of ``video`` after ``after``, through our DC's bridge and the
        origin DC's (``dispatcher.bridge``); None when it cannot say within ``timeout``."""
        names = self.relays.names
        if not names:
            return None
        try:
            reply = await self.relays.request(names[0], P.MSG_HISTORY,
                                              P.relay_history_body(video, after, dc), timeout)
            return P.chain_reply(reply, video, dc)
        except (asyncio.TimeoutError, PeerGone, RemoteProtocolError) as exc:
            log.warning("history of %s from %s through bridge %s failed: %s", video, dc, names[0],
                        exc or type(exc).__name__)
            return None

    async def history(self, video: str, after, timeout: float) -> list[dict] | None:
        """The chain of ``video`` after ``after`` (``epoch, seq``) from its owner, or from its
        backup when the owner is silent for ``history_deadline`` (``mesh.io.history``); None
        when history cannot say or no replica answered within ``timeout``."""
        try:
            return await fetch_history(self.dispatchers, video, after, timeout, self.history_deadline)
        except HistoryUnavailable as exc:
            log.warning("history of %s after %s: no replica answered (%s)", video, after, exc)
            return None

    # --- presence ---------------------------------------------------------------------------

    async def send_presence(self, updates: list[dict], timeout: float) -> None:
        """Each update to its video's owner, one request per owner."""
        by_owner: dict[str, list[dict]] = {}
        for upd in updates:
            own = owner(upd["video"], self.peers)
            if own is not None:
                by_owner.setdefault(own, []).append(upd)
        for own, batch in by_owner.items():
            self.stats["presence_msgs"] += 1
            self.tasks.spawn(self._send_presence(own, batch, timeout))

    async def _send_presence(self, target: str, batch: list[dict], timeout: float) -> None:
        try:
            await self.dispatchers.request(target, P.MSG_PRESENCE,
                                           {"frontend": self.name, "updates": batch}, timeout)
        except (asyncio.TimeoutError, PeerGone) as exc:
            self.stats["presence_failures"] += 1
            log.info("presence update to %s failed (%s); the next snapshot repairs it",
                     target, exc or type(exc).__name__)

    async def presence_page(self, video: str, offset: int, limit: int, timeout: float) -> dict:
        order = rank(video, self.peers)
        if not order:
            raise ClientError(503, "no_dispatcher", "no dispatcher known", retryable=True)
        try:
            reply = await self.dispatchers.request(order[0], P.MSG_PRESENCE_QUERY,
                                                   {"video": video, "offset": offset, "limit": limit}, timeout)
        except (asyncio.TimeoutError, PeerGone):
            raise ClientError(503, "no_dispatcher", "the video's owner did not answer", retryable=True) from None
        if reply.msg_type != P.MSG_ACK:
            raise ClientError(503, "presence_unavailable", str(reply.body.get("message", "?")), retryable=True)
        return reply.body

    # --- publish ----------------------------------------------------------------------------

    async def publish_many(self, events: list[dict]) -> list[dict]:
        """Send ``events`` to their owners; one result per event, in order: the ack result
        ``{"id","epoch","seq"}``, or ``{"id","error": {"code","message"}}`` (the owner's
        rejection, or ``no_dispatcher`` when no ack came within ``publish_timeout``).

        Events are grouped by owner (computed once per video) and queued with whatever else
        this loop turn publishes to that owner: one PUB request per owner per loop turn, one
        future per group, not per event.  Unacknowledged events are sent again every
        ``attempt_timeout``, always to the current owner (a retry goes elsewhere only once
        discovery says the owner left: a slow owner retried elsewhere would sequence the event
        twice); the event id makes the retry idempotent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        results: list[dict | None] = [None] * len(events)
        pending = list(range(len(events)))
        while pending:
            left = deadline - loop.time()
            if left <= 0:
                break
            groups: dict[str, list[int]] = {}
            for i in pending:
                target = self.owner_of(events[i]["video"])
                if target is not None:
                    groups.setdefault(target, []).append(i)
            if not groups:
                # no dispatcher known yet: wait for discovery, within the deadline
                try:
                    await asyncio.wait_for(self.dispatchers.changed.wait(), left)
                except asyncio.TimeoutError:
                    break
                continue
            sent = {self._enqueue(target, [events[i] for i in idx]): idx for target, idx in groups.items()}
            done, late = await asyncio.wait(sent, timeout=min(self.attempt_timeout, left))
            for fut in late:  # a late reply or failure of a request we gave up on
                fut.add_done_callback(_consume)
            failed = False
            for fut in done:
                if fut.exception() is not None:
                    failed = True
                    continue
                for i, res in zip(sent[fut], fut.result()):
                    results[i] = res
            pending = [i for i in pending if results[i] is None]
            if pending:
                self.stats["publish_retries"] += len(pending)
                if failed:  # the link broke: give discovery a moment
                    await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
                else:
                    log.warning("no ack for %d events within %.2fs; retrying", len(pending), self.attempt_timeout)
        if pending:
            self.stats["publish_failures"] += len(pending)
            for i in pending:
                results[i] = {"id": events[i]["id"], "error": {
                    "code": "no_dispatcher", "message": "no dispatcher acknowledged the event in time"}}
        return results

    def owner_of(self, video: str) -> str | None:
        """The video's owner, cached until discovery changes the dispatcher set (each change
        replaces ``dispatchers.changed``): publishing computes no hash per event."""
        if self._owners_for is not self.dispatchers.changed or len(self._owners) > OWNER_CACHE_MAX:
            self._owners.clear()
            self._owners_for = self.dispatchers.changed
        try:
            return self._owners[video]
        except KeyError:
            own = self._owners[video] = owner(video, self.peers)
            return own

    def _enqueue(self, target: str, events: list[dict]) -> asyncio.Future:
        """Queue ``events`` for ``target``'s next request; the future gets one result per
        event (None for an event the ack did not cover)."""
        fut = asyncio.get_running_loop().create_future()
        queue = self._queues.get(target)
        if queue is None:
            queue = self._queues[target] = []
            asyncio.get_running_loop().call_soon(self._flush, target)
        queue.append((events, fut))
        return fut

    def _flush(self, target: str) -> None:
        batch = self._queues.pop(target, [])
        if batch:
            self.stats["publish_requests"] += 1
            self.tasks.spawn(self._send_batch(target, batch))

    async def _send_batch(self, target: str, batch: list[tuple[list[dict], asyncio.Future]]) -> None:
        # one request, or a few when the loop turn's events exceed one message (P.chunked)
        chunks = P.chunked([e for part, _ in batch for e in part])
        results: dict[str, dict] = {}
        try:
            replies = await asyncio.gather(*(self.dispatchers.request(
                target, P.MSG_PUBLISH, P.publish_body(c, compact_ack=True, rows=self.event_rows), self.publish_timeout) for c in chunks))
            for events, reply in zip(chunks, replies):
                if reply.msg_type == P.MSG_ERROR:
                    results.update((e["id"], {"id": e["id"], "error": reply.body}) for e in events)
                    continue
                for e, where in zip(events, P.ack_positions(reply, len(events))):  # either ACK form
                    results[e["id"]] = {"id": e["id"], "error": where} if type(where) is dict \
                        else {"id": e["id"], "epoch": where[0], "seq": where[1]}
        except asyncio.TimeoutError:
            return  # the publishers' own attempt deadlines have fired and retried
        except (PeerGone, RemoteProtocolError) as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(ConnectionError(str(exc)))
            return
        for part, fut in batch:
            if not fut.done():
                fut.set_result([results.get(e["id"]) for e in part])


def acked(result: dict) -> dict:
    """A ``publish_many`` result as the ack ``{"id","epoch","seq"}``, or ClientError(503): no
    dispatcher acknowledged within ``publish_timeout``, or the owner rejected the event."""
    error = result.get("error")
    if error is None:
        return result
    if error.get("code") == "no_dispatcher":
        raise ClientError(503, "no_dispatcher", error["message"], retryable=True)
    raise ClientError(503, "publish_rejected", f"dispatcher rejected the event: "
                      f"{error.get('message', '?')}", retryable=True)
