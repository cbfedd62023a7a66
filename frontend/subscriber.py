"""The frontend's events in: the SUB socket, subscription sync, chain following and repair.

Theory of operation.  The SUB socket connects to every live dispatcher's XPUB; ZeroMQ replays
our subscriptions to a dispatcher whenever we (re)connect to it.  A subscription is only useful
once it has reached the video's owner (the ZeroMQ "slow joiner"): the owner answers each
subscribe with a sync marker on that very topic, and ``wait_synced`` holds a new viewer's
stream until the marker of the current owner has arrived, so a viewer that sees its stream open
receives every event published after that.

Events arrive as rows, in fan-out messages and history replies alike, and are read as maps
here, once (``protocol.row_event``): everything after the SUB socket names their fields.
Incoming events pass through a ``ChainFollower`` per video (``mesh.core.ordering``): in order, no
duplicates; a gap (PUB/SUB drop, reconnect, owner change) is repaired from history
(``mesh.io.history``: the owner, or its backup when the owner is silent) within
``gap_timeout``, or announced to viewers as ``reset``.

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
from typing import Callable

import zmq
import zmq.asyncio

from mesh.wire import protocol as P
from mesh.errors import RemoteProtocolError
from mesh.kv import NodeInfo
from mesh.core.ordering import ChainFollower
from mesh.io.curve import connect as curve_connect
from mesh.io.history import HistoryUnavailable, fetch_history
from mesh.io.peers import PeerGone, PeerLinks
from mesh.io.pump import SocketPump
from mesh.io.sockets import make_socket
from mesh.io.tasks import Tasks

log = logging.getLogger("mesh.app")
wire_log = logging.getLogger("mesh.wire")


class Subscriber:
    def __init__(self, ctx: zmq.asyncio.Context, dispatchers: PeerLinks, relays: PeerLinks,
                 owner_of: Callable[[str], str | None], stats: dict, tasks: Tasks, *,
                 on_events: Callable[[str, list[dict]], None], on_reset: Callable[[str, str], None],
                 on_presence: Callable[[str, list[dict]], None], gap_timeout: float,
                 history_deadline: float, coalesce_max: int = 256, drop_every: int = 0,
                 curve=None, dc: str = ""):
        self.dispatchers = dispatchers
        self.relays = relays  # DEALERs to our DC's bridges' relays (history of other DCs' chains)
        self.owner_of = owner_of
        self.stats = stats
        self.tasks = tasks
        self.on_events = on_events
        self.on_reset = on_reset
        self.on_presence = on_presence
        self.gap_timeout = gap_timeout
        self.history_deadline = history_deadline
        self.drop_every = drop_every  # fault injection: pretend PUB/SUB lost every Nth message
        self.curve = curve  # mesh.io.curve.CurveKeys (None: plaintext links)
        self.dc = dc  # our datacenter: events of another origin DC came through a bridge
        self._received = 0
        # a plain socket on the async context's shadow, served by a pump (mesh.io.pump: no future
        # per message; the fan-out arrives here at up to 100 k messages/s)
        self.sub = make_socket(zmq.Context.shadow(ctx.underlying), zmq.SUB, curve=curve)
        self.pump = SocketPump(self.sub, self._on_fanout, max(1, coalesce_max), "SUB")
        self.followers: dict[str, ChainFollower] = {}
        self.remote_followers: dict[str, dict[str, ChainFollower]] = {}  # video -> origin dc ->
        self._synced: dict[str, set[str]] = {}
        self._sync_waiters: dict[str, list[asyncio.Future]] = {}

    def start(self) -> None:
        self.pump.start()

    def close(self) -> None:
        self.pump.close(linger=0)

    # --- publishers coming and going ----------------------------------------------------------

    def connect(self, info: NodeInfo) -> None:
        """A dispatcher's (or a bridge's import) XPUB to receive from."""
        curve_connect(self.sub, info.pub, info.name, self.curve)
        self.pump.poke()
        self._wake_sync_waiters()

    def disconnect(self, info: NodeInfo) -> None:
        try:
            self.sub.disconnect(info.pub)
            self.pump.poke()
        except zmq.ZMQError:
            pass  # never connected (its CURVE key is missing)
        for synced in self._synced.values():
            synced.discard(info.name)

    # --- subscriptions ----------------------------------------------------------------------

    def subscribe(self, video: str) -> None:
        self._synced[video] = set()
        self.followers[video] = ChainFollower()
        self.remote_followers[video] = {}
        self.sub.setsockopt(zmq.SUBSCRIBE, P.topic_for(video))
        self.pump.poke()

    def unsubscribe(self, video: str) -> None:
        self._synced.pop(video, None)
        self.followers.pop(video, None)
        self.remote_followers.pop(video, None)
        self.sub.setsockopt(zmq.UNSUBSCRIBE, P.topic_for(video))
        self.pump.poke()

    def is_synced(self, video: str) -> bool:
        own = self.owner_of(video)
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

    # --- fan-out in ---------------------------------------------------------------------------

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
            if msg.sender == self.owner_of(msg.video):  # a former owner's board is stale
                self.on_presence(msg.video, msg.presence)
            return
        if msg.kind == P.FANOUT_TAIL:
            if msg.sender == self.owner_of(msg.video):
                fetch_after = follower.check_tail(msg.tail)
                if fetch_after is not None:
                    self.stats["gaps"] += 1
                    self.tasks.spawn(self._repair(msg.video, follower, fetch_after))
            return
        self._received += 1
        if self.drop_every and self._received % self.drop_every == 0:
            self.stats["fault_dropped"] += 1
            return
        events = list(map(P.row_event, msg.events))
        self.stats["events_in"] += len(events)
        if self.dc and any(P.origin_dc(e, self.dc) != self.dc for e in events):
            events = self._offer_remote(msg.video, events)
            if not events:
                return
        events, fetch_after = follower.offer(events)
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

    # --- repair -----------------------------------------------------------------------------

    async def _repair(self, video: str, follower: ChainFollower, after, dc: str | None = None) -> None:
        """Fill a gap after ``after``: from our DC's history, or for another DC's chain
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

    async def history(self, video: str, after, timeout: float) -> list[dict] | None:
        """The chain of ``video`` after ``after`` (``epoch, seq``) from its owner, or from its
        backup when the owner is silent for ``history_deadline`` (``mesh.io.history``); None
        when history cannot say or no replica answered within ``timeout``."""
        try:
            chain = await fetch_history(self.dispatchers, video, after, timeout, self.history_deadline)
        except HistoryUnavailable as exc:
            log.warning("history of %s after %s: no replica answered (%s)", video, after, exc)
            return None
        return None if chain is None else list(map(P.row_event, chain))

    async def remote_history(self, video: str, dc: str, after, timeout: float) -> list[dict] | None:
        """Another DC's chain of ``video`` after ``after``, through our DC's bridge and the
        origin DC's (``dispatcher.bridge``); None when it cannot say within ``timeout``."""
        names = self.relays.names
        if not names:
            return None
        try:
            reply = await self.relays.request(names[0], P.MSG_HISTORY,
                                              P.relay_history_body(video, after, dc), timeout)
            chain = P.chain_reply(reply, video, dc)
        except (asyncio.TimeoutError, PeerGone, RemoteProtocolError) as exc:
            log.warning("history of %s from %s through bridge %s failed: %s", video, dc, names[0],
                        exc or type(exc).__name__)
            return None
        return None if chain is None else list(map(P.row_event, chain))
