"""The dispatcher process: the I/O shell around ``mesh.core.pipeline.Pipeline``.

The shell owns the sockets, the peer links, the KV registration and the timers; the pipeline
(sans-IO) decides everything about publishes and returns effects, which ``_apply`` carries
out: ROUTER replies, XPUB messages, and requests to peer dispatchers (``REPL`` to a backup,
a forwarded ``PUB`` to a video's owner, a ``HIST`` chain fetch), whose outcome goes back to
the pipeline.  The ROUTER is served by a ``mesh.io.pump.SocketPump``: every burst of readable
requests (up to ``DRAIN_MAX`` messages) is decoded here, its publishes handed to the pipeline
as one batch, synchronously, with no future, task or lock per event.

On SIGTERM the dispatcher leaves the registry first, then keeps serving ``drain_seconds``:
publishes that still reach it are forwarded to the new owners, history requests answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

import tornado.httpserver
import tornado.netutil
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
from mesh.core.ownership import owner
from mesh.core.pipeline import Broadcast, FetchChain, Forward, Pipeline, Replicate, Reply, rejection
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
REPLICATE_TIMEOUT = 0.25
FORWARD_TIMEOUT = 0.5
TAIL_TIMEOUT = 0.3
TAIL_INTERVAL = 1.0   # seconds between tail announcements of an active video
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
        self.router: SocketPump | None = None
        self.xpub: SocketPump | None = None
        self.peers: PeerLinks | None = None
        self.http_server = None
        self.endpoints: dict[str, str] = {}
        self.leaving = False
        # not ready (publishes and history answered "not_ready") until the first discovery
        # round: before it, live() is ourselves alone and every video would look like ours
        self.pipeline = Pipeline(self.name, self.seq, self.stats, self.live, time.monotonic,
                                 ready=False, wall=time.time)
        self._tasks: list[asyncio.Task] = []
        self.tasks = Tasks(log)
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
        await self.kv.open()  # before binding: from the bind on, the discovery round is all we wait for
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
        http_sockets = tornado.netutil.bind_sockets(d.http_port, address=d.host)
        self.http_server = tornado.httpserver.HTTPServer(tornado.web.Application(self.http_routes()))
        self.http_server.add_sockets(http_sockets)
        http_port = http_sockets[0].getsockname()[1]
        if not self.name:
            self.name = self.pipeline.name = f"dispatcher-{router_ep.rsplit(':', 1)[1]}"
        self.endpoints = {"router": router_ep, "pub": pub_ep, "http": f"http://{d.host}:{http_port}"}
        self.router.start()
        self.xpub.start()
        self._tasks = [asyncio.create_task(self._announce_tails()),
                       asyncio.create_task(self._presence_ticks())]
        self.peers = PeerLinks(self.ctx, self.kv, me=self.name, curve=self.curve)
        await self.peers.start()
        if self.peers.discovered:
            self._set_ready()
        else:
            self.tasks.spawn(self._ready_after_discovery())
        await self.kv.register(NodeInfo(self.name, ROLE_DISPATCHER, self.cfg.node.dc,
                                        http=self.endpoints["http"], router=router_ep, pub=pub_ep))
        log.info("dispatcher %s serving: router %s, pub %s, http %s, epoch %d",
                 self.name, router_ep, pub_ep, self.endpoints["http"], self.seq.epoch)

    def _set_ready(self) -> None:
        self.pipeline.ready = True
        log.info("dispatcher %s ready: %d peer dispatchers known", self.name, len(self.peers.names))

    async def _ready_after_discovery(self) -> None:
        await self.peers.first_round()
        self._set_ready()

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
        handed to the pipeline together."""
        publishes: list[tuple[bytes, P.Control]] = []
        for frames in batch:
            peer = frames[0]
            try:
                msg = P.Control.from_frames(frames[1:])
            except RemoteProtocolError as exc:
                self.stats["malformed"] += 1
                wire_log.warning("dropped malformed control message from %r: %s", peer[:16], exc)
                continue
            if msg.msg_type == P.MSG_PUBLISH:
                publishes.append((peer, msg))
            elif msg.msg_type == P.MSG_PING:
                self._reply(peer, P.Control(P.MSG_PONG, msg.request_id, {"name": self.name}))
            elif msg.msg_type == P.MSG_HISTORY:
                self._apply(self.pipeline.history(peer, msg))
            elif msg.msg_type == P.MSG_REPLICATE:
                self._apply(self.pipeline.store_replica(peer, msg))
            elif msg.msg_type in (P.MSG_PRESENCE, P.MSG_PRESENCE_DC):
                self._handle_presence(peer, msg)
            elif msg.msg_type == P.MSG_PRESENCE_QUERY:
                self._handle_presence_query(peer, msg)
            else:
                self._reject(peer, msg, "unexpected_type", RemoteProtocolError(f"{msg.msg_type!r} is not a request"))
        if publishes:
            self._apply(self.pipeline.publish(publishes))

    def _reject(self, peer: bytes, msg: P.Control, code: str, exc: Exception) -> None:
        self._apply([rejection(self.stats, peer, msg, code, exc)])

    def _reply(self, peer: bytes, msg: P.Control) -> None:
        try:
            self.router.send_multipart([peer, *msg.to_frames()])
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the requester went away
            self.stats["unroutable"] += 1
            wire_log.info("reply to %r not routable: %s", peer[:16], exc)

    # --- the pipeline's effects --------------------------------------------------------------

    def _apply(self, effects: list) -> None:
        """Carry out the pipeline's effects, in order (``mesh.core.pipeline``)."""
        for effect in effects:
            kind = type(effect)
            if kind is Broadcast:  # the most frequent: one per video and burst
                self._send_fanout_frames(effect.frames, effect.kind, effect.video)
            elif kind is Reply:
                self._reply(effect.peer, effect.msg)
            elif kind is Replicate:
                self.tasks.spawn(self._replicate(effect))
            elif kind is Forward:
                self.tasks.spawn(self._forward(effect))
            else:
                self.tasks.spawn(self._fetch_chain(effect))

    async def _replicate(self, effect: Replicate) -> None:
        """One REPL to a backup; the burst commits whatever the outcome (a backup that misses
        REPLICATE_TIMEOUT is suspect for a while and skipped meanwhile, counted)."""
        ok = False
        try:
            if self.peers is None or self.peers.is_suspect(effect.backup):
                self.stats["replication_skipped"] += effect.count
                return
            await self.peers.request(effect.backup, P.MSG_REPLICATE, effect.body(), REPLICATE_TIMEOUT)
            ok = True
            self.stats["replicated"] += effect.count
            self.stats["replication_msgs"] += 1
        except (asyncio.TimeoutError, PeerGone) as exc:
            self.stats["replication_failures"] += effect.count
            log.warning("replicating %d events to %s failed (%s)", effect.count, effect.backup,
                        exc or type(exc).__name__)
        except Exception:  # noqa: BLE001 - a bug: count it like a replication failure, go on
            self.stats["replication_failures"] += effect.count
            log.exception("replicating to %s failed", effect.backup)
        finally:
            self._apply(self.pipeline.replicated(effect, ok))

    async def _forward(self, effect: Forward) -> None:
        reply, error = await self._request(effect.target, P.MSG_PUBLISH, effect.body, FORWARD_TIMEOUT)
        self._apply(self.pipeline.forwarded(effect, reply, error))

    async def _fetch_chain(self, effect: FetchChain) -> None:
        reply, error = await self._request(effect.source, P.MSG_HISTORY, effect.body, TAIL_TIMEOUT)
        self._apply(self.pipeline.chain_fetched(effect, reply, error))

    async def _request(self, target: str, msg_type: bytes, body: dict, timeout: float):
        """One request to a peer dispatcher: ``(reply, None)`` or ``(None, why not)``."""
        try:
            return await self.peers.request(target, msg_type, body, timeout), None
        except (asyncio.TimeoutError, PeerGone, RemoteProtocolError) as exc:
            return None, exc or type(exc).__name__

    def _send_fanout(self, msg: P.FanoutMessage) -> None:
        self._send_fanout_frames(msg.to_frames(), msg.kind, msg.video)

    def _send_fanout_frames(self, frames: list[bytes], kind: str, video: str) -> None:
        try:
            self.xpub.send_multipart(frames)
        except zmq.ZMQError as exc:  # XPUB drops at its high-water mark; this is a local failure
            presence = kind in (P.FANOUT_PRESENCE, P.FANOUT_DC_PRESENCE)
            self.stats["presence_dropped" if presence else "fanout_send_errors"] += 1
            wire_log.warning("%s of %s not sent: %s", "presence" if presence else "fan-out", video, exc)

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
            if not self.pipeline.ready:
                continue  # which videos are ours is not known yet
            live = self.live()
            for video, summary in self.presence.export(now, lambda v: owner(v, live) == self.name).items():
                self._export_presence(video, summary)

    async def _announce_tails(self) -> None:
        """Every TAIL_INTERVAL, the last published event of each video published here lately
        (``Pipeline.active_tails``): subscribers that lost a video's last event repair it now."""
        while True:
            await asyncio.sleep(TAIL_INTERVAL)
            for video, tail in self.pipeline.active_tails():
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


class HealthHandler(tornado.web.RequestHandler):
    def initialize(self, node: Dispatcher) -> None:
        self.node = node

    def get(self) -> None:
        node = self.node
        status = "leaving" if node.leaving else "ok" if node.pipeline.ready else "starting"
        self.write({"status": status, "role": ROLE_DISPATCHER,
                    "name": node.name, "epoch": node.seq.epoch, "videos": len(node.seq.videos),
                    "dispatchers": node.live(), "rss_kb": rss_kb(),
                    "stats": {**node.stats, **(node.peers.stats if node.peers else {})},
                    **node.endpoints})


async def run(cfg: Config) -> None:
    await serve(cfg, Dispatcher, ROLE_DISPATCHER)


def main(cfg: Config) -> None:
    asyncio.run(run(cfg))
