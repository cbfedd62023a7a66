"""The frontend process: wires the HTTP handlers, the mesh link, the local fan-out and the
KV count sync together."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import defaultdict

import zmq.asyncio
from tornado.iostream import IOStream

from mesh.config import Config
from mesh.io.curve import from_config as curve_from_config
from mesh.errors import ClientError, KVError
from mesh.kv import KV, NodeInfo, ROLE_FRONTEND
from mesh.io.metrics import frontend_registry
from mesh.io.node import release, rss_kb, serve
from mesh.core.sse import encode_comment
from mesh.core.presence import LocalPresence
from mesh.core.subscriptions import CountSync, SubscriptionTable

from .admission import CountingHTTPServer
from .fanout import Fanout
from .gcpause import CHECK_INTERVAL, GCWatch, freeze_allowance
from .http import Api, NotFoundHandler, routes
from .ingest import PublishPath
from .link import MeshLink
from .security import Application, FrontendSecurity
from .stream import StreamHooks, ViewerStream

log = logging.getLogger("mesh.app")

#: the largest request Tornado reads at all; bodies over ``max_body_bytes`` but under this get
#: a JSON 413, bigger ones are refused by Tornado's HTTP layer (400, connection closed)
MAX_REQUEST_BYTES = 1024 * 1024


class Frontend:
    def __init__(self, cfg: Config, kv: KV, ctx: zmq.asyncio.Context):
        self.cfg = cfg
        self.kv = kv
        self.ctx = ctx
        self.name = cfg.node.name
        self.table = SubscriptionTable()
        self.fanout = Fanout(self.table, cfg.frontend.fanout_slice, cfg.frontend.fanout_tick,
                             cfg.frontend.aggregate_likes_above, cfg.presence.count_writes_max)
        self.counts = CountSync(cfg.frontend.count_flush_interval)
        self.presence = LocalPresence()
        self.stats = defaultdict(int)
        self.link: MeshLink | None = None
        self.url = ""
        self.server: CountingHTTPServer | None = None
        self.ingest: PublishPath | None = None
        self.security: FrontendSecurity | None = None
        self.stream_hooks: StreamHooks | None = None
        self._kv_wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.gc = GCWatch()
        #: set on SIGTERM: /healthz answers 503 so load balancers stop sending here
        self.draining = False

    async def start(self) -> None:
        f = self.cfg.frontend
        # auth, limits, CORS, access log, accept loop
        security = self.security = FrontendSecurity(self.cfg, self.stats, lambda: len(self.table))
        checks = security.publish_checks()
        self.stream_hooks = StreamHooks(self.stats, self.fanout.encode, security.stream_attached,
                                        security.stream_detached, self.remove_viewer)
        api = Api(settings=f, auth_off=self.cfg.security.auth == "off", cors_headers=security.cors_headers,
                  preflight=security.preflight, admit_watcher=security.admit_watcher,
                  new_viewer=self.new_viewer, add_viewer=self.add_viewer,
                  wait_synced=self._wait_synced, history=self._history, presence_page=self._presence_page,
                  publish_event=checks.event, publish_many=self.publish_many, health=self.health)
        app = Application(routes(api, frontend_registry(self)), default_handler_class=NotFoundHandler,
                          default_handler_args={"api": api}, compress_response=False,
                          log_function=security.log_request)
        self.server = CountingHTTPServer(
            app, max_body_size=MAX_REQUEST_BYTES, max_buffer_size=MAX_REQUEST_BYTES,
            idle_connection_timeout=30.0, body_timeout=10.0, max_header_size=16384)
        if f.publish_fast_path:  # likes and comments off Tornado's HTTP stack
            self.ingest = PublishPath(
                handoff=self.to_tornado, publish_event=checks.event, publish_many=self.publish_many,
                cors_headers=security.cors_headers, log_access=security.log_access,
                attached=security.stream_attached, detached=security.stream_detached, stats=self.stats,
                header_timeout=self.cfg.security.header_timeout, max_body=f.max_body_bytes)
        sockets = self.security.listen(self.server, f.port, f.host,
                                       self.ingest.adopt if self.ingest else self.to_tornado)
        port = sockets[0].getsockname()[1]
        self.url = f"http://{f.host}:{port}"
        if not self.name:
            self.name = f"frontend-{port}"
        self.link = MeshLink(self.ctx, self.kv, self.name, f, on_events=self.fanout.deliver,
                             on_reset=self.fanout.reset, on_presence=self.fanout.presence,
                             curve=curve_from_config(self.cfg), dc=self.cfg.node.dc)
        await self.kv.open()
        await self.kv.register(NodeInfo(self.name, ROLE_FRONTEND, self.cfg.node.dc, http=self.url))
        await self.link.start()
        self._tasks = [asyncio.create_task(self._sync_counts()),
                       asyncio.create_task(self._heartbeats()),
                       asyncio.create_task(self._sync_presence()),
                       asyncio.create_task(self._freeze_viewers())]
        self.gc.install()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, self.gc.collect_now)
        log.info("frontend %s serving on %s", self.name, self.url)

    def to_tornado(self, sock, address) -> None:
        """Tornado serves the connection from here on, bytes still unread included."""
        self.server.handle_stream(IOStream(sock, max_buffer_size=MAX_REQUEST_BYTES), address)

    @property
    def endpoints(self) -> dict[str, str]:
        return {"http": self.url}

    async def shutdown(self, timeout: float = 2.0) -> None:
        """Graceful shutdown, first step.  For ``drain_seconds`` the frontend serves everything
        as before while ``/healthz`` answers 503 ``draining``: a load balancer's health check
        takes it out of rotation while it still answers, so no publish or new stream that
        reached it meanwhile fails.  Then it stops accepting, leaves the registry (so no new
        viewer or count points here) and ends every SSE response, so browsers reconnect after
        ``retry`` through the load balancer to a frontend still in rotation."""
        self.draining = True
        drain = self.cfg.frontend.drain_seconds
        log.info("frontend %s draining for %.1fs (/healthz answers 503)", self.name, drain)
        await asyncio.sleep(drain)
        if self.security:
            self.security.stop_listening()
        if self.ingest:
            self.ingest.stop()
        try:
            await self.kv.deregister()
        except Exception as exc:  # noqa: BLE001 - shutting down: report, keep closing
            log.warning("deregister failed: %s", exc)
        viewers = [v for conns in self.table.by_video.values() for v in conns.values()]
        for viewer in viewers:
            viewer.end()
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.table) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        log.info("closed %d streams", len(viewers))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.gc.uninstall()
        if self.ingest:
            self.ingest.stop()
        if self.link:
            await self.link.stop()
        if self.security:
            self.security.stop_listening()
        await release(self.kv, http_server=self.server)

    # --- viewers ------------------------------------------------------------------------

    def new_viewer(self, conn_id: int, video: str, user: str | None, ip: str,
                   catching_up: bool) -> ViewerStream:
        return ViewerStream(self.stream_hooks, conn_id, video, user, ip, catching_up,
                            self.cfg.frontend.max_buffer_bytes)

    # the link is made in start(), after the routes: these reach it when a request comes
    async def _wait_synced(self, video: str, timeout: float) -> bool:
        return await self.link.wait_synced(video, timeout)

    async def _history(self, video: str, after, timeout: float):
        return await self.link.history(video, after, timeout)

    async def _presence_page(self, video: str, offset: int, limit: int, timeout: float) -> dict:
        return await self.link.presence_page(video, offset, limit, timeout)

    def add_viewer(self, viewer) -> None:
        if self.table.add(viewer.conn_id, viewer.video, viewer):
            self.link.subscribe(viewer.video)
        self.security.track_viewer(viewer)
        self.stats["viewers_opened"] += 1
        self.presence.add(viewer.video, viewer.user)
        self.fanout.welcome(viewer.video, viewer)
        self._count_changed(viewer.video)

    def remove_viewer(self, viewer) -> None:
        removed = self.table.remove(viewer.conn_id)
        if removed is None:
            return
        video, last = removed
        self.security.release_viewer(viewer)
        self.presence.remove(video, viewer.user)
        if last:
            self.link.unsubscribe(video)
        self.stats["viewers_closed"] += 1
        self._count_changed(video)

    def _count_changed(self, video: str) -> None:
        self.counts.set(video, self.table.count(video))
        self._kv_wake.set()

    async def publish_many(self, events: list[dict], on_result=None) -> list[dict]:
        """``events`` to their owners; one ``Publisher.publish_many`` result per event (each
        owner's share also to ``on_result(indices, results)`` as soon as it answers)."""
        if self.link is None:
            raise ClientError(503, "no_dispatcher", "the frontend is starting", retryable=True)
        self.stats["publishes"] += len(events)
        return await self.link.publish_many(events, on_result)

    def health(self) -> dict:
        status = "draining" if self.draining else "ok" if self.link.peers else "degraded"
        return {"status": status, "role": ROLE_FRONTEND,
                "name": self.name, "url": self.url, "dispatchers": sorted(self.link.peers),
                "connections": len(self.table), "videos": len(self.table.by_video), "rss_kb": rss_kb(),
                "cpu_s": round(time.process_time(), 3), "gc": self.gc.stats(),
                "stats": {**self.stats, **self.link.stats, "deliveries": self.fanout.deliveries,
                          "fanout_rounds": self.fanout.rounds, "counts_replaced": self.fanout.counts_replaced,
                          "kv_requests": getattr(self.kv, "kv_writes", 0)}}

    # --- background work ------------------------------------------------------------------

    async def _sync_counts(self) -> None:
        """Write count changes to the KV: transitions at once, the rest coalesced."""
        backoff = 0.2
        generation = self.kv.generation
        while True:
            if self.kv.generation != generation:
                generation = self.kv.generation
                log.info("KV registration was renewed; writing all %d counts again",
                         len(self.counts.desired))
                self.counts.reset()
            delay = self.counts.due(time.monotonic())
            if delay is None or delay > 0:
                self._kv_wake.clear()
                try:  # wake at least every second to notice a renewed registration
                    await asyncio.wait_for(self._kv_wake.wait(), min(delay or 1.0, 1.0))
                except asyncio.TimeoutError:
                    pass
                continue
            changes = self.counts.take(time.monotonic())
            try:
                await self.kv.write_counts(self.name, changes)
                self.counts.done(changes)
                self.stats["kv_writes"] += 1
                backoff = 0.2
            except KVError as exc:
                self.counts.failed(changes)
                log.warning("KV write of %d counts failed (%s); retrying in %.1fs",
                            len(changes), exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _sync_presence(self) -> None:
        """Presence deltas to each video's owner every ``presence.flush`` seconds, full
        snapshots every ``presence.refresh`` (they rebuild a new owner's state and heal any
        lost delta).  Sending fails quietly: the next snapshot repairs it."""
        pr = self.cfg.presence
        loop = asyncio.get_running_loop()
        next_full = loop.time() + pr.refresh
        while True:
            await asyncio.sleep(pr.flush)
            updates = self.presence.take()
            if loop.time() >= next_full:
                updates.update(self.presence.snapshot())
                next_full = loop.time() + pr.refresh
            if updates:
                self.link.send_presence(list(updates.values()), timeout=pr.refresh)

    async def _freeze_viewers(self) -> None:
        """``gc.freeze()`` once ``gc_freeze_after`` viewers opened since the last freeze
        (``frontend.gcpause``): a settled audience leaves the collector's full passes."""
        after = self.cfg.frontend.gc_freeze_after
        frozen_at = self.stats["viewers_opened"]
        while after:
            await asyncio.sleep(CHECK_INTERVAL)
            in_tornado = self.server.open_connections  # requests, viewers before their head
            if self.stats["viewers_opened"] - frozen_at >= after and \
                    in_tornado <= freeze_allowance(len(self.table)):
                frozen_at = self.stats["viewers_opened"]
                self.gc.freeze()

    async def _heartbeats(self) -> None:
        data = encode_comment("hb")
        while True:
            await asyncio.sleep(self.cfg.frontend.heartbeat_interval)
            await self.fanout.broadcast(data)


async def run(cfg: Config) -> None:
    await serve(cfg, Frontend, ROLE_FRONTEND)


def main(cfg: Config) -> None:
    asyncio.run(run(cfg))
