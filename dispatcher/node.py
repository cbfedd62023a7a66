"""The dispatcher process: thin I/O around ``mesh.sequencing.Sequencer``.

Publish path, per video (one ``asyncio.Lock`` each, so a video's events keep their order while
different videos proceed concurrently):

1. A publish for a video another live dispatcher owns (views of the dispatcher set differ
   for a moment after a change) is forwarded to that owner, once (``fwd``).
2. A video this dispatcher has no chain for yet starts with a tail fetch from the dispatcher
   that owned it before (the next in rendezvous order): the chain continues across owners.
3. New events are sequenced, replicated to the backup (the next dispatcher in rendezvous
   order) and only then published on XPUB and acknowledged: an acknowledged event is held by
   two dispatchers.  A backup that misses the replication deadline is skipped (and counted)
   for ``SUSPECT_FOR`` seconds: availability first, the window documented in the README.
4. A retried event already known from a replica (its owner died after replicating it) is
   published again; frontends drop what they already delivered by event id.

On SIGTERM the dispatcher leaves the registry first, then keeps serving ``drain_seconds``:
publishes that still reach it are forwarded to the new owners, history requests answered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import tornado.web
import zmq
import zmq.asyncio

from mesh import protocol as P
from mesh.config import Config
from mesh.curve import secure_links
from mesh.errors import RemoteProtocolError
from mesh.kv import KV, NodeInfo, ROLE_DISPATCHER
from mesh.metrics import MetricsHandler, dispatcher_registry
from mesh.node import release, rss_kb, serve
from mesh.ownership import owner, rank
from mesh.peers import DispatcherPeers, PeerGone
from mesh.presence import PresenceBoard
from mesh.sequencing import Sequencer
from mesh.sockets import bind, make_socket

log = logging.getLogger("mesh.app")
wire_log = logging.getLogger("mesh.wire")

#: most messages taken from the ROUTER before their publishes are grouped per video
DRAIN_MAX = 1000
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
                             dedupe_size=d.dedupe_size, dc=cfg.node.dc)
        self.name = cfg.node.name
        self.stats = defaultdict(int)
        self.router: zmq.asyncio.Socket | None = None
        self.xpub: zmq.asyncio.Socket | None = None
        self.peers: DispatcherPeers | None = None
        self.http_server = None
        self.endpoints: dict[str, str] = {}
        self.leaving = False
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: list[asyncio.Task] = []
        self._inflight: set[asyncio.Task] = set()
        self._active: dict[str, float] = {}  # video -> loop time of its last publish here
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
        self.router = make_socket(self.ctx, zmq.ROUTER, curve=self.curve, curve_server=True)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.xpub = make_socket(self.ctx, zmq.XPUB, sndhwm=d.pub_hwm, curve=self.curve, curve_server=True)
        # every subscribe reaches us (not only a topic's first), so each new subscriber gets
        # its own sync marker
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        router_ep = bind(self.router, d.host, d.router_port)
        pub_ep = bind(self.xpub, d.host, d.pub_port)
        app = tornado.web.Application(self.http_routes())
        self.http_server = app.listen(d.http_port, address=d.host, xheaders=False)
        http_port = next(iter(self.http_server._sockets.values())).getsockname()[1]
        if not self.name:
            self.name = f"dispatcher-{router_ep.rsplit(':', 1)[1]}"
        self.endpoints = {"router": router_ep, "pub": pub_ep, "http": f"http://{d.host}:{http_port}"}
        self._tasks = [asyncio.create_task(self._serve_router()),
                       asyncio.create_task(self._serve_subscriptions()),
                       asyncio.create_task(self._announce_tails()),
                       asyncio.create_task(self._presence_ticks())]
        await self.kv.open()
        self.peers = DispatcherPeers(self.ctx, self.kv, me=self.name, curve=self.curve)
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
        if self.peers:
            await self.peers.stop()
        await release(self.kv, deregister=not self.leaving, http_server=self.http_server,
                      sockets=(self.router, self.xpub), zap=getattr(self, "zap", None))

    def live(self) -> list[str]:
        """The dispatcher set ownership is computed over (without us once we are leaving)."""
        names = self.peers.names if self.peers else []
        return names if self.leaving else [*names, self.name]

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    # --- the ROUTER -------------------------------------------------------------------------

    async def _serve_router(self) -> None:
        router = self.router
        while True:
            batch = [await router.recv_multipart(copy=True)]
            while len(batch) < DRAIN_MAX and router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                batch.append(await router.recv_multipart(copy=True))
            try:
                self._handle_batch(batch)
            except Exception:  # noqa: BLE001 - a bug must not kill the serving loop
                log.exception("request batch failed")

    def _handle_batch(self, batch: list[list[bytes]]) -> None:
        groups: dict[tuple[str, bool], list[tuple[dict, asyncio.Future]]] = {}
        loop = asyncio.get_running_loop()
        for frames in batch:
            peer = frames[0]
            try:
                msg = P.Control.from_frames(frames[1:])
            except RemoteProtocolError as exc:
                self.stats["malformed"] += 1
                wire_log.warning("dropped malformed control message from %r: %s", peer[:16], exc)
                continue
            if msg.msg_type == P.MSG_PING:
                self._reply(peer, P.Control(P.MSG_PONG, msg.request_id, {"name": self.name}))
            elif msg.msg_type == P.MSG_HISTORY:
                self._spawn(self._handle_history(peer, msg))
            elif msg.msg_type == P.MSG_REPLICATE:
                self._handle_replicate(peer, msg)
            elif msg.msg_type in (P.MSG_PRESENCE, P.MSG_PRESENCE_DC):
                self._handle_presence(peer, msg)
            elif msg.msg_type == P.MSG_PRESENCE_QUERY:
                self._handle_presence_query(peer, msg)
            elif msg.msg_type == P.MSG_PUBLISH:
                try:
                    events = P.publish_events(msg)
                except RemoteProtocolError as exc:
                    self._reject(peer, msg, "malformed", exc)
                    continue
                fwd = bool(msg.body.get("fwd"))
                futures = []
                for event in events:
                    fut = loop.create_future()
                    futures.append(fut)
                    groups.setdefault((event["video"], fwd), []).append((event, fut))
                self._spawn(self._ack_when_done(peer, msg.request_id, futures))
            else:
                self._reject(peer, msg, "unexpected_type", RemoteProtocolError(f"{msg.msg_type!r} is not a request"))
        for (video, fwd), items in groups.items():
            self._spawn(self._publish_video(video, items, fwd))

    def _reject(self, peer: bytes, msg: P.Control, code: str, exc: Exception) -> None:
        self.stats["malformed"] += 1
        wire_log.warning("rejected %s from %r: %s", msg.msg_type.decode(errors="replace"), peer[:16], exc)
        self._reply(peer, P.Control(P.MSG_ERROR, msg.request_id, P.error_body(code, str(exc))))

    def _reply(self, peer: bytes, msg: P.Control) -> None:
        try:
            self.router.send_multipart([peer, *msg.to_frames()], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the requester went away
            self.stats["unroutable"] += 1
            wire_log.info("reply to %r not routable: %s", peer[:16], exc)

    async def _ack_when_done(self, peer: bytes, request_id: bytes, futures: list[asyncio.Future]) -> None:
        results = await asyncio.gather(*futures, return_exceptions=True)
        out = []
        for r in results:
            if isinstance(r, BaseException):
                log.error("publish failed: %r", r)
                out.append({"id": "?", "error": {"code": "internal", "message": str(r)}})
            else:
                out.append(r)
        self._reply(peer, P.Control(P.MSG_ACK, request_id, P.ack_body(out)))

    # --- publish ----------------------------------------------------------------------------

    async def _publish_video(self, video: str, items: list[tuple[dict, asyncio.Future]], fwd: bool) -> None:
        try:
            async with self._locks[video]:
                own = owner(video, self.live())
                if own is not None and own != self.name and not fwd and await self._forward(own, video, items):
                    return
                await self._ensure_chain(video)
                new, again, results = [], [], []
                for event, _ in items:
                    stored, is_new = self.seq.accept(event)
                    if is_new:
                        new.append(stored)
                    elif self.seq.is_replica(stored) and stored not in again:
                        again.append(stored)  # its owner may have died before publishing it
                    results.append({"id": stored["id"], "epoch": stored["epoch"], "seq": stored["seq"]})
                if new:
                    await self._replicate(video, new)
                if again or new:
                    self._active[video] = asyncio.get_running_loop().time()
                    await self.xpub.send_multipart(P.Fanout(video, P.FANOUT_EVENTS, self.name,
                                                            again + new).to_frames())
                    self.stats["events_in"] += len(new)
                    self.stats["republished"] += len(again)
                    self.stats["fanout_msgs"] += 1
                for (_, fut), result in zip(items, results):
                    if not fut.done():
                        fut.set_result(result)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets an answer
            log.exception("publishing to %s failed", video)
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(exc)

    async def _forward(self, target: str, video: str, items) -> bool:
        try:
            reply = await self.peers.request(target, P.MSG_PUBLISH,
                                             {"events": [e for e, _ in items], "fwd": True}, FORWARD_TIMEOUT)
            results = {r["id"]: r for r in P.ack_results(reply)} if reply.msg_type == P.MSG_ACK else {}
        except (asyncio.TimeoutError, PeerGone, RemoteProtocolError) as exc:
            log.warning("forwarding %s to its owner %s failed (%s); sequencing it here", video, target,
                        exc or type(exc).__name__)
            return False
        if not all(e["id"] in results and "error" not in results[e["id"]] for e, _ in items):
            return False
        self.stats["forwarded"] += len(items)
        for event, fut in items:
            if not fut.done():
                fut.set_result(results[event["id"]])
        return True

    async def _ensure_chain(self, video: str) -> None:
        """Before sequencing a video for the first time, fetch its chain from the dispatcher
        that held it before us, so the chain (and history) continues across owners."""
        if self.seq.has_log(video):
            return
        others = [d for d in rank(video, self.live()) if d != self.name]
        chain: list[dict] = []
        if others:
            try:
                reply = await self.peers.request(others[0], P.MSG_HISTORY,
                                                 {**P.history_body(video, None), "peer": True}, TAIL_TIMEOUT)
                chain = P.history_reply(reply) or []
                self.stats["chains_taken_over"] += bool(chain)
            except (asyncio.TimeoutError, PeerGone, RemoteProtocolError) as exc:
                self.stats["chain_fetch_failures"] += 1
                log.warning("could not fetch the chain of %s from %s (%s); starting a new one",
                            video, others[0], exc)
        self.seq.store(chain)
        self.seq._log(video)

    async def _replicate(self, video: str, events: list[dict]) -> None:
        backups = [d for d in rank(video, self.live()) if d != self.name]
        if not backups:
            return
        backup = backups[0]
        if self.peers.is_suspect(backup):
            self.stats["replication_skipped"] += len(events)
            return
        try:
            await self.peers.request(backup, P.MSG_REPLICATE, {"events": events}, REPLICATE_TIMEOUT)
            self.stats["replicated"] += len(events)
        except (asyncio.TimeoutError, PeerGone) as exc:
            self.stats["replication_failures"] += len(events)
            log.warning("replicating %d events of %s to %s failed (%s)", len(events), video, backup,
                        exc or type(exc).__name__)

    def _handle_replicate(self, peer: bytes, msg: P.Control) -> None:
        try:
            events = P.publish_events(msg)
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
            else {"events": chain}
        self._reply(peer, P.Control(P.MSG_ACK, msg.request_id, body))

    # --- presence ---------------------------------------------------------------------------

    def _handle_presence(self, peer: bytes, msg: P.Control) -> None:
        """A frontend's updates (``PRES``), or a peer DC's summary of its own presence
        relayed by our bridge (``PRDC``, mesh.bridging)."""
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
        self._send_fanout(P.Fanout(video, P.FANOUT_PRESENCE, self.name, presence=events))

    def _export_presence(self, video: str, summary: dict) -> None:
        """Our DC's own presence of ``video``, on its topic: only subscribers get it, i.e.
        our frontends (which ignore it) and our bridge while a peer DC watches the video."""
        self.stats["presence_dc_exports"] += 1
        self._send_fanout(P.Fanout(video, P.FANOUT_DC_PRESENCE, self.name, summary={**summary, "from": self.name}))

    def _send_fanout(self, msg: P.Fanout) -> None:
        try:
            self.xpub.send_multipart(msg.to_frames(), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.stats["presence_dropped"] += 1
            wire_log.warning("presence of %s not sent: %s", msg.video, exc)

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
        """Every TAIL_INTERVAL, the tail of each video published here in the last
        TAIL_ACTIVE seconds: subscribers that lost a video's last event repair it now."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TAIL_INTERVAL)
            cutoff = loop.time() - TAIL_ACTIVE
            for video, at in list(self._active.items()):
                if at < cutoff:
                    del self._active[video]
                    continue
                tail = self.seq.tail(video)
                if tail is not None:
                    await self.xpub.send_multipart(
                        P.Fanout(video, P.FANOUT_TAIL, self.name, tail=tail).to_frames())

    # --- subscriptions ----------------------------------------------------------------------

    async def _serve_subscriptions(self) -> None:
        while True:
            msg = await self.xpub.recv()
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
            await self.xpub.send_multipart(P.Fanout(video, P.FANOUT_SYNC, self.name).to_frames())


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
