"""The dispatcher process: thin I/O around ``mesh.core.sequencing.Sequencer``.

Publish path (theory of operation).  The ROUTER is served by a ``mesh.io.pump.SocketPump``:
every burst of readable requests (up to ``DRAIN_MAX`` messages) is handled as one batch,
synchronously, with no future, task or lock per event:

1. Each PUB request is decoded once; its events are validated one by one (a bad event gets
   its own error result, the others go on) and grouped per video over the whole burst.  Events
   stay the rows they arrive as (``protocol.check_row``; a map is turned into one), through
   the sequencer and history to the fan-out's packing: no map is built per event.
2. Fast path -- a video this dispatcher owns (or that was forwarded to it), whose chain it
   already holds, with no slow-path work pending: its events are appended to the chain at
   once (``Sequencer.accept_many``: one chain append per video), packed once
   (``protocol.pack_events``: the same bytes go into the ``REPL`` and the XPUB message), and
   each event's placement -- its bare ``seq`` -- is written into its request's ``_PendingAck``
   (the compact ACK carries the epoch once and one integer per event: no map per event).
3. The burst then commits as a unit: its new events go to each backup (the next dispatcher
   in rendezvous order) in one ``REPL`` request per backup; once the backups answered (or were
   skipped: a backup that misses ``REPLICATE_TIMEOUT`` is suspect for ``SUSPECT_FOR`` seconds,
   counted), each video's events leave in one XPUB message and every request gets one ACK.
   Bursts commit in arrival order (a burst waits for the one before it), so a video's events
   reach the XPUB in chain order while the next burst is already being sequenced.  An
   acknowledged event is held by two dispatchers.
4. Slow path -- a publish for a video another live dispatcher owns (views of the dispatcher
   set differ for a moment after a change) is forwarded there, once (``fwd``); a video with no
   chain here yet first fetches its tail from the dispatcher that owned it before.  It runs as
   a task under the video's ``asyncio.Lock``, after the bursts received before it have
   committed; while it is pending, later events of that video take the slow path too, joining
   the video's slow publish that has not started yet (``_SlowBatch``: one more round under
   sustained load, not one slow publish per burst for ever).
5. A retried event already known from a replica (its owner died after replicating it) is
   published again; frontends drop what they already delivered by event id.

On SIGTERM the dispatcher leaves the registry first, then keeps serving ``drain_seconds``:
publishes that still reach it are forwarded to the new owners, history requests answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

import tornado.web
import zmq
import zmq.asyncio

from mesh.wire import protocol as P
from mesh.config import Config
from mesh.io.curve import secure_links
from mesh.errors import RemoteProtocolError
from mesh.kv import KV, NodeInfo, ROLE_DISPATCHER
from mesh.io.metrics import MetricsHandler, dispatcher_registry
from mesh.io.node import release, rss_kb, serve
from mesh.core.ownership import owner, rank
from mesh.io.peers import PeerLinks, PeerGone
from mesh.core.presence import PresenceBoard
from mesh.io.pump import SocketPump
from mesh.core.sequencing import Sequencer
from mesh.io.sockets import bind, make_socket
from mesh.io.tasks import Tasks

log = logging.getLogger("mesh.app")
wire_log = logging.getLogger("mesh.wire")

#: most messages taken from the ROUTER before their publishes are grouped per video
DRAIN_MAX = 1000
#: most videos whose rendezvous order is cached (the cache is dropped when the set changes)
RANK_CACHE_MAX = 100000
REPLICATE_TIMEOUT = 0.25
FORWARD_TIMEOUT = 0.5
TAIL_TIMEOUT = 0.3
TAIL_INTERVAL = 1.0   # seconds between tail announcements of an active video
TAIL_ACTIVE = 30.0    # a video is announced this long after its last publish
PRESENCE_TICK = 0.1   # seconds between presence board ticks (leaves, counts, expiry)


class Dispatcher:
    def __init__(self, cfg: Config, kv: KV, ctx: zmq.asyncio.Context):
        self.cfg = cfg
        self.kv = kv
        self.ctx = ctx
        d = cfg.dispatcher
        self.seq = Sequencer(history_size=d.history_size, history_age=d.history_age,
                             dedupe_size=d.dedupe_size, dc=cfg.node.dc, rows=True)
        self.name = cfg.node.name
        self.event_rows = cfg.node.event_rows  # events sent as rows (protocol.event_row)
        self.stats = defaultdict(int)
        self.router: SocketPump | None = None
        self.xpub: SocketPump | None = None
        self.peers: PeerLinks | None = None
        self.http_server = None
        self.endpoints: dict[str, str] = {}
        self.leaving = False
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._slow: dict[str, int] = {}  # video -> slow-path publishes pending (forward, chain fetch)
        self._slow_open: dict[tuple[str, bool], _SlowBatch] = {}  # (video, fwd) -> one not started yet
        self._last_commit: asyncio.Task | None = None  # the newest burst still committing
        self._ranks: dict[str, list[str]] = {}  # video -> rendezvous order over _ranks_for
        self._ranks_for: list[str] = []
        self._tasks: list[asyncio.Task] = []
        self.tasks = Tasks(log)
        # video -> (loop time, position) of the last event published on the XPUB here: tails
        # announce what subscribers can have seen, never events still awaiting replication
        self._active: dict[str, tuple[float, tuple[int, int]]] = {}
        pr = cfg.presence
        self.presence = PresenceBoard(grace=pr.grace, expiry=pr.expiry, count_interval=pr.count_interval,
                                      broadcast_max=pr.broadcast_max, dc=cfg.node.dc, dc_flush=pr.dc_flush,
                                      dc_refresh=pr.dc_refresh, dc_expiry=pr.dc_expiry)

    def http_routes(self) -> list:
        return [(r"/healthz", HealthHandler, {"node": self}),
                (r"/metrics", MetricsHandler, {"registry": dispatcher_registry(self)})]

    async def start(self) -> None:
        d = self.cfg.dispatcher
        self.curve, self.zap = secure_links(self.ctx, self.cfg, self.stats)  # before any bind
        # plain sockets on the async context's shadow, served by pumps (mesh.io.pump: no future
        # per message); the pumps close them
        sync_ctx = zmq.Context.shadow(self.ctx.underlying)
        router = make_socket(sync_ctx, zmq.ROUTER, curve=self.curve, curve_server=True)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        xpub = make_socket(sync_ctx, zmq.XPUB, sndhwm=d.pub_hwm, curve=self.curve, curve_server=True)
        # every subscribe reaches us (not only a topic's first), so each new subscriber gets
        # its own sync marker
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.router = SocketPump(router, self._handle_batch, DRAIN_MAX, "ROUTER")
        self.xpub = SocketPump(xpub, self._handle_subscriptions, DRAIN_MAX, "XPUB")
        router_ep = bind(router, d.host, d.router_port)
        pub_ep = bind(xpub, d.host, d.pub_port)
        app = tornado.web.Application(self.http_routes())
        self.http_server = app.listen(d.http_port, address=d.host, xheaders=False)
        http_port = next(iter(self.http_server._sockets.values())).getsockname()[1]
        if not self.name:
            self.name = f"dispatcher-{router_ep.rsplit(':', 1)[1]}"
        self.endpoints = {"router": router_ep, "pub": pub_ep, "http": f"http://{d.host}:{http_port}"}
        self.router.start()
        self.xpub.start()
        self._tasks = [asyncio.create_task(self._announce_tails()),
                       asyncio.create_task(self._presence_ticks())]
        await self.kv.open()
        self.peers = PeerLinks(self.ctx, self.kv, me=self.name, curve=self.curve)
        await self.peers.start()
        await self.kv.register(NodeInfo(self.name, ROLE_DISPATCHER, self.cfg.node.dc,
                                        http=self.endpoints["http"], router=router_ep, pub=pub_ep))
        log.info("dispatcher %s serving: router %s, pub %s, http %s, epoch %d",
                 self.name, router_ep, pub_ep, self.endpoints["http"], self.seq.epoch)

    async def shutdown(self) -> None:
        """Graceful exit, step one: leave the registry so the others take the videos over,
        then keep serving (forwarding, history) for ``drain_seconds``."""
        log.info("dispatcher %s leaving (drain %.1fs)", self.name, self.cfg.dispatcher.drain_seconds)
        self.leaving = True
        try:
            await self.kv.deregister()
        except Exception as exc:  # noqa: BLE001 - shutting down: report, keep going
            log.warning("deregister failed: %s", exc)
        await asyncio.sleep(self.cfg.dispatcher.drain_seconds)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.tasks.cancel()
        if self.peers:
            await self.peers.stop()
        await release(self.kv, deregister=not self.leaving, http_server=self.http_server,
                      sockets=(self.router, self.xpub), zap=getattr(self, "zap", None))

    def live(self) -> list[str]:
        """The dispatcher set ownership is computed over (without us once we are leaving)."""
        names = self.peers.names if self.peers else []
        return names if self.leaving else [*names, self.name]

    # --- the ROUTER -------------------------------------------------------------------------

    def _handle_batch(self, batch: list[list[bytes]]) -> None:
        """One burst of ROUTER messages (``SocketPump``): control requests answered, publishes
        grouped per (video, forwarded) and published together."""
        # forwarded-to-us or not -> video -> (request's ACK, position in it, event)
        groups: dict[bool, dict[str, list[tuple[_PendingAck, int, list]]]] = {False: {}, True: {}}
        acks: list[_PendingAck] = []
        for frames in batch:
            peer = frames[0]
            try:
                msg = P.Control.from_frames(frames[1:])
            except RemoteProtocolError as exc:
                self.stats["malformed"] += 1
                wire_log.warning("dropped malformed control message from %r: %s", peer[:16], exc)
                continue
            if msg.msg_type == P.MSG_PUBLISH:
                self._take_publish(peer, msg, groups, acks)
            elif msg.msg_type == P.MSG_PING:
                self._reply(peer, P.Control(P.MSG_PONG, msg.request_id, {"name": self.name}))
            elif msg.msg_type == P.MSG_HISTORY:
                self.tasks.spawn(self._handle_history(peer, msg))
            elif msg.msg_type == P.MSG_REPLICATE:
                self._handle_replicate(peer, msg)
            elif msg.msg_type in (P.MSG_PRESENCE, P.MSG_PRESENCE_DC):
                self._handle_presence(peer, msg)
            elif msg.msg_type == P.MSG_PRESENCE_QUERY:
                self._handle_presence_query(peer, msg)
            else:
                self._reject(peer, msg, "unexpected_type", RemoteProtocolError(f"{msg.msg_type!r} is not a request"))
        if acks:
            self._publish(groups, acks)

    def _take_publish(self, peer: bytes, msg: P.Control, groups: dict, acks: list["_PendingAck"]) -> None:
        try:
            events, rejected = P.publish_items(msg, P.check_row)
            if not events:  # nothing usable: the whole request is rejected
                raise RemoteProtocolError(rejected[0][1]["error"]["message"])
        except RemoteProtocolError as exc:
            self._reject(peer, msg, "malformed", exc)
            return
        # a requester that did not ask for the compact ACK gets the per-event maps (needs the ids)
        legacy = None if msg.body.get("ack") == P.ACK_SEQS else msg.body["events"]
        ack = _PendingAck(self, peer, msg.request_id, len(events) + len(rejected), legacy)
        acks.append(ack)
        if rejected:  # one line per request, not per event
            self.stats["malformed"] += 1
            self.stats["events_rejected"] += len(rejected)
            wire_log.warning("rejected %d of %d events of a publish from %r: %s", len(rejected),
                             len(events) + len(rejected), peer[:16], rejected[0][1]["error"]["message"])
            for i, result in rejected:
                ack.fill(i, result["error"])
        by_video = groups[bool(msg.body.get("fwd"))]
        for i, event in events:  # rows (P.check_row): what the sequencer keeps
            group = by_video.get(event[P.ROW_VIDEO])
            if group is None:
                group = by_video[event[P.ROW_VIDEO]] = []
            group.append((ack, i, event))

    def _reject(self, peer: bytes, msg: P.Control, code: str, exc: Exception) -> None:
        self.stats["malformed"] += 1
        wire_log.warning("rejected %s from %r: %s", msg.msg_type.decode(errors="replace"), peer[:16], exc)
        self._reply(peer, P.Control(P.MSG_ERROR, msg.request_id, P.error_body(code, str(exc))))

    def _reply(self, peer: bytes, msg: P.Control) -> None:
        try:
            self.router.send_multipart([peer, *msg.to_frames()])
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the requester went away
            self.stats["unroutable"] += 1
            wire_log.info("reply to %r not routable: %s", peer[:16], exc)

    # --- publish ----------------------------------------------------------------------------

    def _rank(self, video: str, live: list[str]) -> list[str]:
        """The video's rendezvous order over ``live`` (cached until the set changes)."""
        if live != self._ranks_for or len(self._ranks) > RANK_CACHE_MAX:
            self._ranks.clear()
            self._ranks_for = live
        order = self._ranks.get(video)
        if order is None:
            order = self._ranks[video] = rank(video, live)
        return order

    def _publish(self, groups: dict[bool, dict[str, list[tuple["_PendingAck", int, list]]]],
                 acks: list["_PendingAck"]) -> None:
        """Sequence a burst's events (fast path) and commit them; hand the rest to the slow
        path (see the module docstring)."""
        live = self.live()
        burst = _Burst(acks)
        slow = []
        now = time.monotonic()
        for fwd, by_video in groups.items():
            for video, items in by_video.items():
                order = self._rank(video, live)
                moved = bool(order) and order[0] != self.name and not fwd
                if moved or video in self._slow or not self.seq.has_log(video):
                    self._slow[video] = self._slow.get(video, 0) + 1
                    slow.append((video, items, fwd))
                else:
                    self._sequence(video, items, order, burst, now)
        if burst.placed:
            prev = self._last_commit
            if not burst.replicas and (prev is None or prev.done()):
                self._finish(burst)  # nothing to wait for: publish and acknowledge now
            else:
                self._last_commit = self.tasks.spawn(self._commit(burst, prev))
        for video, items, fwd in slow:  # after this burst: a video's events may be in both
            batch = self._slow_open.get((video, fwd))
            if batch is not None and len(batch.items) + len(items) <= P.MAX_BATCH_EVENTS:
                # joins the video's pending slow publish that has not started yet: under
                # sustained load a video leaves the slow path after one more round, instead of
                # queueing one slow publish (with its own REPL) per burst for ever
                batch.items.extend(items)
                batch.prev = self._last_commit
                self._slow[video] -= 1
                continue
            batch = self._slow_open[(video, fwd)] = _SlowBatch(items, fwd, self._last_commit)
            self.tasks.spawn(self._publish_slow(video, batch))

    def _sequence(self, video: str, items: list[tuple["_PendingAck", int, list]], order: list[str],
                  burst: "_Burst", now: float) -> None:
        new, again, placed = self.seq.accept_many(video, [event for _, _, event in items], now)
        if burst.deferred is None:  # sent when the burst commits (_finish)
            for (ack, i, _), where in zip(items, placed):
                ack.results[i] = where
        else:
            burst.deferred.extend((ack, i, where) for (ack, i, _), where in zip(items, placed))
        burst.placed += len(placed)
        if not (again or new):
            return
        # each batch packed once: the same bytes go to the backup and to the fan-out
        batches = burst.fanout.setdefault(video, [])
        if again:
            batches.extend(P.pack_events(again, self.event_rows))
            burst.again += len(again)
        if new:
            packed = P.pack_events(new, self.event_rows)
            batches.extend(packed)
            backup = next((d for d in order if d != self.name), None)
            if backup is not None:
                burst.replicas.setdefault(backup, []).extend(packed)
            burst.new += len(new)
        last = (new or again)[-1]
        burst.tails[video] = (last[P.ROW_EPOCH], last[P.ROW_SEQ])

    async def _commit(self, burst: "_Burst", prev: asyncio.Task | None) -> None:
        """Replicate, then -- once the burst before this one committed -- publish and ack."""
        try:
            await self._replicate(burst)
        except Exception:  # noqa: BLE001 - a bug: count it like a replication failure, go on
            self.stats["replication_failures"] += burst.new
            log.exception("replicating a burst failed")
        if prev is not None:
            await asyncio.wait([prev])  # its outcome is its own: only its order matters here
        self._finish(burst)

    def _finish(self, burst: "_Burst") -> None:
        at = asyncio.get_running_loop().time()
        for video, batches in burst.fanout.items():
            self._active[video] = (at, burst.tails[video])
            for count, data in batches:
                self._send_fanout_frames(P.packed_fanout_events(video, self.name, count, data), P.FANOUT_EVENTS, video)
            self.stats["fanout_msgs"] += len(batches)
        self.stats["events_in"] += burst.new
        self.stats["republished"] += burst.again
        self.stats["publish_bursts"] += 1
        for ack in burst.acks:
            ack.settle()
        for ack, i, result in burst.deferred or ():
            ack.fill(i, result)

    def _send_fanout(self, msg: P.FanoutMessage) -> None:
        self._send_fanout_frames(msg.to_frames(), msg.kind, msg.video)

    def _send_fanout_frames(self, frames: list[bytes], kind: str, video: str) -> None:
        try:
            self.xpub.send_multipart(frames)
        except zmq.ZMQError as exc:  # XPUB drops at its high-water mark; this is a local failure
            presence = kind in (P.FANOUT_PRESENCE, P.FANOUT_DC_PRESENCE)
            self.stats["presence_dropped" if presence else "fanout_send_errors"] += 1
            wire_log.warning("%s of %s not sent: %s", "presence" if presence else "fan-out", video, exc)

    async def _publish_slow(self, video: str, batch: "_SlowBatch") -> None:
        items, fwd = batch.items, batch.fwd
        try:
            async with self._locks[video]:
                while batch.prev is not None and not batch.prev.done():
                    await asyncio.wait([batch.prev])  # the bursts received before us are published first
                if self._slow_open.get((video, fwd)) is batch:
                    del self._slow_open[(video, fwd)]  # from here on, later publishes wait for us
                live = self.live()
                own = owner(video, live)
                if own is not None and own != self.name and not fwd and await self._forward(own, video, items):
                    return
                await self._ensure_chain(video)
                burst = _Burst([], deferred=[])  # other slow publishes may settle these requests
                self._sequence(video, items, rank(video, live), burst, time.monotonic())
                await self._replicate(burst)
                self._finish(burst)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets an answer
            log.exception("publishing to %s failed", video)
            for ack, i, _ in items:
                ack.fail(i, {"code": "internal", "message": str(exc)[:200]})
        finally:
            left = self._slow.pop(video, 1) - 1
            if left:
                self._slow[video] = left

    async def _forward(self, target: str, video: str, items: list[tuple["_PendingAck", int, list]]) -> bool:
        try:
            body = {**P.publish_body([e for _, _, e in items], compact_ack=True, rows=self.event_rows), "fwd": True}
            reply = await self.peers.request(target, P.MSG_PUBLISH, body, FORWARD_TIMEOUT)
            placed = P.ack_positions(reply, len(items)) if reply.msg_type == P.MSG_ACK else None
        except (asyncio.TimeoutError, PeerGone, RemoteProtocolError) as exc:
            log.warning("forwarding %s to its owner %s failed (%s); sequencing it here", video, target,
                        exc or type(exc).__name__)
            return False
        if placed is None or any(type(where) is dict for where in placed):  # an error result
            return False
        self.stats["forwarded"] += len(items)
        for (ack, i, _), where in zip(items, placed):
            ack.fill(i, where)
        return True

    async def _ensure_chain(self, video: str) -> None:
        """Before sequencing a video for the first time, fetch its chain from the dispatcher
        that held it before us, so the chain (and history) continues across owners."""
        if self.seq.has_log(video):
            return
        others = [d for d in rank(video, self.live()) if d != self.name]
        chain: list[list] = []
        if others:
            try:
                reply = await self.peers.request(others[0], P.MSG_HISTORY,
                                                 {**P.history_body(video, None), "peer": True}, TAIL_TIMEOUT)
                chain = P.history_reply(reply, P.check_row) or []
                self.stats["chains_taken_over"] += bool(chain)
            except (asyncio.TimeoutError, PeerGone, RemoteProtocolError) as exc:
                self.stats["chain_fetch_failures"] += 1
                log.warning("could not fetch the chain of %s from %s (%s); starting a new one",
                            video, others[0], exc)
        self.seq.store(chain)
        self.seq._log(video)

    async def _replicate(self, burst: "_Burst") -> None:
        """A burst's new events to their backups, one REPL request per backup, concurrently."""
        if burst.replicas:
            await asyncio.gather(*(self._replicate_to(backup, group) for backup, batches in burst.replicas.items()
                                   for group in P.packed_batches(batches)))

    async def _replicate_to(self, backup: str, batches: list[tuple[int, bytes]]) -> None:
        count = sum(n for n, _ in batches)
        if self.peers.is_suspect(backup):
            self.stats["replication_skipped"] += count
            return
        try:
            await self.peers.request(backup, P.MSG_REPLICATE, P.packed_events_body(batches), REPLICATE_TIMEOUT)
            self.stats["replicated"] += count
            self.stats["replication_msgs"] += 1
        except (asyncio.TimeoutError, PeerGone) as exc:
            self.stats["replication_failures"] += count
            log.warning("replicating %d events to %s failed (%s)", count, backup,
                        exc or type(exc).__name__)

    def _handle_replicate(self, peer: bytes, msg: P.Control) -> None:
        try:
            events = P.publish_events(msg, P.check_row)
        except RemoteProtocolError as exc:
            self._reject(peer, msg, "malformed", exc)
            return
        stored = self.seq.store(events)
        self.stats["replicas_stored"] += stored
        self._reply(peer, P.Control(P.MSG_ACK, msg.request_id, {"stored": stored}))

    async def _handle_history(self, peer: bytes, msg: P.Control) -> None:
        try:
            video, after = P.history_request(msg)
        except RemoteProtocolError as exc:
            self._reject(peer, msg, "malformed", exc)
            return
        if not msg.body.get("peer") and owner(video, self.live()) == self.name:
            async with self._locks[video]:
                await self._ensure_chain(video)
        chain = self.seq.after(video, after)
        self.stats["history_requests"] += 1
        body = {"reset": True, "tail": list(self.seq.tail(video) or ()) or None} if chain is None \
            else {"events": P.wire_events(chain, self.event_rows)}
        self._reply(peer, P.Control(P.MSG_ACK, msg.request_id, body))

    # --- presence ---------------------------------------------------------------------------

    def _handle_presence(self, peer: bytes, msg: P.Control) -> None:
        """A frontend's updates (``PRES``), or a peer DC's summary of its own presence
        relayed by our bridge (``PRDC``, mesh.core.bridging)."""
        now = asyncio.get_running_loop().time()
        try:
            if msg.msg_type == P.MSG_PRESENCE_DC:
                video, summary = P.presence_dc_update(msg)
                self.stats["presence_dc_updates"] += 1
                merged = [(video, self.presence.update_dc(video, summary, now))]
            else:
                frontend, updates = P.presence_updates(msg)  # all checked before any is merged
                self.stats["presence_updates"] += len(updates)
                merged = [(upd["video"], self.presence.update(frontend, upd, now)) for upd in updates]
        except RemoteProtocolError as exc:
            self._reject(peer, msg, "malformed", exc)
            return
        for video, events in merged:
            if events:
                self._publish_presence(video, events)
        self._reply(peer, P.Control(P.MSG_ACK, msg.request_id, {}))

    def _handle_presence_query(self, peer: bytes, msg: P.Control) -> None:
        video = msg.body.get("video")
        offset, limit = msg.body.get("offset", 0), msg.body.get("limit", 100)
        if not P.valid_video_id(video) or type(offset) is not int or type(limit) is not int \
                or offset < 0 or not 0 < limit <= 1000:
            self._reject(peer, msg, "malformed", RemoteProtocolError("presence query needs video, offset, limit"))
            return
        page = self.presence.page(video, offset, limit)
        page["dcs"] = self.presence.dcs(video)
        self._reply(peer, P.Control(P.MSG_ACK, msg.request_id, page))

    def _publish_presence(self, video: str, events: list[dict]) -> None:
        self.stats["presence_msgs"] += 1
        self._send_fanout(P.FanoutMessage(video, P.FANOUT_PRESENCE, self.name, presence=events))

    def _export_presence(self, video: str, summary: dict) -> None:
        """Our DC's own presence of ``video``, on its topic: only subscribers get it, i.e.
        our frontends (which ignore it) and our bridge while a peer DC watches the video."""
        self.stats["presence_dc_exports"] += 1
        self._send_fanout(P.FanoutMessage(video, P.FANOUT_DC_PRESENCE, self.name, summary={**summary, "from": self.name}))

    async def _presence_ticks(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PRESENCE_TICK)
            now = loop.time()
            for video, events in self.presence.tick(now).items():
                self._publish_presence(video, events)
            live = self.live()
            for video, summary in self.presence.export(now, lambda v: owner(v, live) == self.name).items():
                self._export_presence(video, summary)

    async def _announce_tails(self) -> None:
        """Every TAIL_INTERVAL, the last published event of each video published here in the
        last TAIL_ACTIVE seconds: subscribers that lost a video's last event repair it now."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TAIL_INTERVAL)
            cutoff = loop.time() - TAIL_ACTIVE
            for video, (at, tail) in list(self._active.items()):
                if at < cutoff:
                    del self._active[video]
                    continue
                self._send_fanout(P.FanoutMessage(video, P.FANOUT_TAIL, self.name, tail=tail))

    # --- subscriptions ----------------------------------------------------------------------

    def _handle_subscriptions(self, batch: list[list[bytes]]) -> None:
        """Subscription messages from the XPUB (``SocketPump``): a sync marker per subscribe."""
        for frames in batch:
            msg = frames[0] if len(frames) == 1 else b""
            if not msg or msg[0] != 1:
                continue  # an unsubscribe (or noise): ZeroMQ already updated its filter
            try:
                video = P.video_from_topic(msg[1:])
            except RemoteProtocolError as exc:
                self.stats["malformed"] += 1
                wire_log.warning("subscription to a non-video topic: %s", exc)
                continue
            self.stats["subscribes"] += 1
            self.presence.want_full_export(video)  # a peer DC's bridge may be the new subscriber
            self._send_fanout(P.FanoutMessage(video, P.FANOUT_SYNC, self.name))


class _PendingAck:
    """The ACK of one PUB request: sent once every event has its result (fast-path events
    when their burst commits, slow-path ones when their forward or chain fetch is done).

    ``results`` holds per event its placement as ``protocol.ack_body`` takes it (a ``seq`` in
    our epoch, an ``(epoch, seq)``, or an error map), None until it has one.
    On the fast path ``_sequence`` writes a placed event's result straight into ``results``
    (no per-event bookkeeping); the burst calls ``settle`` once it committed.  That cannot send
    a result early: a request's events are all in one burst, and its slow-path events are
    sequenced only after that burst committed.  Slow-path bursts defer their results to their
    own commit (``fill``): two of them, for two videos of one request, run concurrently."""

    __slots__ = ("node", "peer", "request_id", "results", "sent", "legacy")

    def __init__(self, node: Dispatcher, peer: bytes, request_id: bytes, size: int, legacy: list | None = None):
        self.node = node
        self.peer = peer
        self.request_id = request_id
        self.results: list[int | tuple[int, int] | dict | None] = [None] * size
        self.sent = False
        self.legacy = legacy  # the request's events when it wants the per-event ACK form

    def fill(self, i: int, result: int | tuple[int, int] | dict) -> None:
        """Event ``i``'s result, unless it has one; sends the ACK once all have one."""
        if self.results[i] is None:
            self.results[i] = result
            self.settle()

    def fail(self, i: int, result: dict) -> None:
        """Event ``i``'s error result, replacing a placement not yet acknowledged."""
        if not self.sent:
            self.results[i] = result
            self.settle()

    def settle(self) -> None:
        if not self.sent and None not in self.results:
            self.sent = True
            body = P.ack_body(self.results, self.node.seq.epoch, self.legacy)
            self.node._reply(self.peer, P.Control(P.MSG_ACK, self.request_id, body))


class _SlowBatch:
    """A video's slow-path publishes, joined until the task serving them starts: the items,
    whether they were forwarded to us, and the burst commit they must wait for."""

    __slots__ = ("items", "fwd", "prev")

    def __init__(self, items: list[tuple[_PendingAck, int, list]], fwd: bool, prev: asyncio.Task | None):
        self.items = items
        self.fwd = fwd
        self.prev = prev


class _Burst:
    """What one burst of publishes commits: replicas per backup and fan-out per video (both as
    batches of pre-packed events, ``protocol.pack_events``), each video's last event, the
    requests whose placed events it acknowledges."""

    __slots__ = ("replicas", "fanout", "tails", "acks", "deferred", "placed", "new", "again")

    def __init__(self, acks: list[_PendingAck], deferred: list | None = None) -> None:
        self.replicas: dict[str, list[tuple[int, bytes]]] = {}
        self.fanout: dict[str, list[tuple[int, bytes]]] = {}
        self.tails: dict[str, tuple[int, int]] = {}
        self.acks = acks  # settled on commit: their fast-path results are written in place
        self.deferred = deferred  # slow path: (ack, position, result), filled on commit
        self.placed = 0
        self.new = 0
        self.again = 0


class HealthHandler(tornado.web.RequestHandler):
    def initialize(self, node: Dispatcher) -> None:
        self.node = node

    def get(self) -> None:
        node = self.node
        self.write({"status": "leaving" if node.leaving else "ok", "role": ROLE_DISPATCHER,
                    "name": node.name, "epoch": node.seq.epoch, "videos": len(node.seq.videos),
                    "dispatchers": node.live(), "rss_kb": rss_kb(),
                    "stats": {**node.stats, **(node.peers.stats if node.peers else {})},
                    **node.endpoints})


async def run(cfg: Config) -> None:
    await serve(cfg, Dispatcher, ROLE_DISPATCHER)


def main(cfg: Config) -> None:
    asyncio.run(run(cfg))
