"""The dispatcher process: thin I/O around ``mesh.sequencing.Sequencer``."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import tornado.web
import zmq
import zmq.asyncio

from mesh import protocol as P
from mesh.config import Config
from mesh.errors import RemoteProtocolError
from mesh.kv import KV, NodeInfo, ROLE_DISPATCHER
from mesh.node import announce_ready, make_kv, settle_gc, stop_on_signals
from mesh.sequencing import Sequencer
from mesh.sockets import bind, make_socket

log = logging.getLogger("mesh.app")
wire_log = logging.getLogger("mesh.wire")

#: most messages handled per batch before fan-out and acks go out
DRAIN_MAX = 1000


class Dispatcher:
    def __init__(self, cfg: Config, kv: KV, ctx: zmq.asyncio.Context):
        self.cfg = cfg
        self.kv = kv
        self.ctx = ctx
        d = cfg.dispatcher
        self.seq = Sequencer(history_size=d.history_size, history_age=d.history_age,
                             dedupe_size=d.dedupe_size)
        self.name = cfg.node.name
        self.stats = defaultdict(int)
        self.router: zmq.asyncio.Socket | None = None
        self.xpub: zmq.asyncio.Socket | None = None
        self.http_server = None
        self.endpoints: dict[str, str] = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        d = self.cfg.dispatcher
        self.router = make_socket(self.ctx, zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.xpub = make_socket(self.ctx, zmq.XPUB, sndhwm=d.pub_hwm)
        # every subscribe reaches us (not only a topic's first), so each new subscriber gets
        # its own sync marker
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        router_ep = bind(self.router, d.host, d.router_port)
        pub_ep = bind(self.xpub, d.host, d.pub_port)
        app = tornado.web.Application([(r"/healthz", HealthHandler, {"node": self})])
        self.http_server = app.listen(d.http_port, address=d.host, xheaders=False)
        http_port = next(iter(self.http_server._sockets.values())).getsockname()[1]
        if not self.name:
            self.name = f"dispatcher-{router_ep.rsplit(':', 1)[1]}"
        self.endpoints = {"router": router_ep, "pub": pub_ep, "http": f"http://{d.host}:{http_port}"}
        self._tasks = [asyncio.create_task(self._serve_router()),
                       asyncio.create_task(self._serve_subscriptions())]
        await self.kv.open()
        await self.kv.register(NodeInfo(self.name, ROLE_DISPATCHER, self.cfg.node.dc,
                                        http=self.endpoints["http"], router=router_ep, pub=pub_ep))
        log.info("dispatcher %s serving: router %s, pub %s, http %s, epoch %d",
                 self.name, router_ep, pub_ep, self.endpoints["http"], self.seq.epoch)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        try:
            await self.kv.deregister()
        except Exception as exc:  # noqa: BLE001 - shutting down: report, keep closing
            log.warning("deregister failed: %s", exc)
        await self.kv.close()
        if self.http_server:
            self.http_server.stop()
        for sock in (self.router, self.xpub):
            if sock is not None:
                sock.close(linger=0)

    # --- publish path ---------------------------------------------------------------------

    async def _serve_router(self) -> None:
        router = self.router
        while True:
            batch = [await router.recv_multipart(copy=True)]
            while len(batch) < DRAIN_MAX and router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                batch.append(await router.recv_multipart(copy=True))
            try:
                await self._handle_batch(batch)
            except Exception:  # noqa: BLE001 - a bug must not kill the serving loop
                log.exception("publish batch failed")

    async def _handle_batch(self, batch: list[list[bytes]]) -> None:
        fanout: dict[str, list[dict]] = {}
        replies: list[list[bytes]] = []
        for frames in batch:
            peer = frames[0]
            try:
                msg = P.Control.from_frames(frames[1:])
            except RemoteProtocolError as exc:
                self.stats["malformed"] += 1
                wire_log.warning("dropped malformed control message from %r: %s", peer[:16], exc)
                continue
            if msg.msg_type == P.MSG_PING:
                replies.append([peer, *P.Control(P.MSG_PONG, msg.request_id, {"name": self.name}).to_frames()])
                continue
            if msg.msg_type != P.MSG_PUBLISH:
                self.stats["malformed"] += 1
                wire_log.warning("unexpected %r from %r", msg.msg_type, peer[:16])
                replies.append([peer, *P.Control(P.MSG_ERROR, msg.request_id,
                                                 P.error_body("unexpected_type", "not a request")).to_frames()])
                continue
            try:
                events = P.publish_events(msg)
            except RemoteProtocolError as exc:
                self.stats["malformed"] += 1
                wire_log.warning("rejected publish from %r: %s", peer[:16], exc)
                replies.append([peer, *P.Control(P.MSG_ERROR, msg.request_id,
                                                 P.error_body("malformed", str(exc))).to_frames()])
                continue
            results = []
            for event in events:
                event, is_new = self.seq.accept(event)
                if is_new:
                    fanout.setdefault(event["video"], []).append(event)
                    self.stats["events_in"] += 1
                results.append({"id": event["id"], "epoch": event["epoch"], "seq": event["seq"]})
            replies.append([peer, *P.Control(P.MSG_ACK, msg.request_id, P.ack_body(results)).to_frames()])
        for video, events in fanout.items():
            await self.xpub.send_multipart(P.Fanout(video, P.FANOUT_EVENTS, self.name, events).to_frames())
            self.stats["fanout_msgs"] += 1
        for reply in replies:
            try:
                await self.router.send_multipart(reply)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: the requester went away
                self.stats["unroutable"] += 1
                wire_log.info("reply to %r not routable: %s", reply[0][:16], exc)

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
            await self.xpub.send_multipart(P.Fanout(video, P.FANOUT_SYNC, self.name).to_frames())


class HealthHandler(tornado.web.RequestHandler):
    def initialize(self, node: Dispatcher) -> None:
        self.node = node

    def get(self) -> None:
        self.write({"status": "ok", "role": ROLE_DISPATCHER, "name": self.node.name,
                    "epoch": self.node.seq.epoch, "videos": len(self.node.seq.videos),
                    "stats": dict(self.node.stats), **self.node.endpoints})


async def run(cfg: Config) -> None:
    ctx = zmq.asyncio.Context()
    node = Dispatcher(cfg, make_kv(cfg), ctx)
    stop = asyncio.Event()
    stop_on_signals(stop)
    try:
        await node.start()
        settle_gc()
        announce_ready(role=ROLE_DISPATCHER, name=node.name, **node.endpoints)
        await stop.wait()
        log.info("dispatcher %s stopping", node.name)
    finally:
        await node.stop()
        ctx.term()


def main(cfg: Config) -> None:
    asyncio.run(run(cfg))
