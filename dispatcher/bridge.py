"""The bridge process: one per datacenter, it joins its DC's mesh to the peer DCs' bridges
with two ZeroMQ proxies (the rules of what crosses are in ``mesh.bridging``).

Endpoints (bind|connect TYPE for PURPOSE):

* connect XSUB  every local dispatcher's XPUB     this DC's events in (export proxy)
* bind    XPUB  ``tcp://host:export_port``        this DC's events out to peer bridges;
                                                  their subscriptions in
* connect XSUB  every peer DC's export XPUB       peer DCs' events in (import proxy)
                (``bridge.peers``)
* bind    XPUB  ``tcp://host:import_port``        peer DCs' events out to this DC's frontends;
                                                  their subscriptions in
* bind    HTTP  ``http://host:http_port``         ``/healthz`` (frames per video and direction),
                                                  ``/metrics``

It registers in its DC's KV as role ``bridge`` with ``pub`` = the import XPUB (frontends connect
their SUB there) and ``export`` = the export XPUB.  Local dispatchers are found in the KV
(``mesh.peers.DispatcherPeers``, whose links linger after a dispatcher leaves, so a draining
dispatcher's last events still cross); peer DCs are configured (``bridge.peers``), because each
DC has its own KV -- or, on WAN-federated Consul (``bridge.peers = "consul"`` or empty), found
in the other datacenters' catalogs and followed (``mesh.federation``).

Restarts: ZeroMQ replays subscriptions when a pipe (re)connects -- a SUB/XSUB sends its whole
subscription set to a new publisher -- so a restarted bridge gets its frontends' and its peers'
subscriptions back as they reconnect, and passes them upstream; nothing else restarts.
"""

from __future__ import annotations

import asyncio
import logging

import tornado.web
import zmq
import zmq.asyncio

from mesh.bridging import EXPORT, IMPORT, Gate, parse_peers
from mesh.config import Config
from mesh.curve import CurveError, connect as curve_connect, secure_links
from mesh.errors import RemoteProtocolError
from mesh.federation import discovers_peers, follow_peer_bridges
from mesh.kv import KV, NodeInfo, ROLE_BRIDGE
from mesh.metrics import MetricsHandler, bridge_registry
from mesh.node import release, serve
from mesh.peers import DispatcherPeers
from mesh.sockets import bind, make_socket

log = logging.getLogger("mesh.app")
wire_log = logging.getLogger("mesh.wire")


def peer_bridge_name(dc: str) -> str:
    """The node name (and CURVE key file ``<name>.key``) of DC ``dc``'s bridge."""
    return f"bridge-{dc}"


class Bridge:
    def __init__(self, cfg: Config, kv: KV, ctx: zmq.asyncio.Context):
        self.cfg = cfg
        self.kv = kv
        self.ctx = ctx
        self.dc = cfg.node.dc
        self.name = cfg.node.name or peer_bridge_name(self.dc)
        self.discovery = discovers_peers(cfg.bridge.peers, cfg.kv.backend)
        self.peers = {} if self.discovery else parse_peers(cfg.bridge.peers, self.dc)  # dc -> export endpoint
        self.gate = Gate(self.dc)
        self.stats: dict[str, int] = {}
        self.endpoints: dict[str, str] = {}
        self.dispatchers: DispatcherPeers | None = None
        self.http_server = None
        self._sockets: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        b = self.cfg.bridge
        self.curve, self.zap = secure_links(self.ctx, self.cfg, self.stats)  # before any bind
        self.export_in = self._socket(zmq.XSUB, b.hwm)
        self.export_out = self._socket(zmq.XPUB, b.hwm, server=True)
        self.import_in = self._socket(zmq.XSUB, b.hwm)
        self.import_out = self._socket(zmq.XPUB, b.hwm, server=True)
        export_ep = bind(self.export_out, b.host, b.export_port)
        import_ep = bind(self.import_out, b.host, b.import_port)
        app = tornado.web.Application([(r"/healthz", HealthHandler, {"node": self}),
                                       (r"/metrics", MetricsHandler, {"registry": bridge_registry(self)})])
        self.http_server = app.listen(b.http_port, address=b.host, xheaders=False)
        http_port = next(iter(self.http_server._sockets.values())).getsockname()[1]
        self.endpoints = {"export": export_ep, "import": import_ep, "http": f"http://{b.host}:{http_port}"}
        for dc, endpoint in self.peers.items():
            self._link_peer(dc, endpoint)
        self._tasks = [asyncio.create_task(self._data(self.export_in, self.export_out, EXPORT)),
                       asyncio.create_task(self._subscriptions(self.export_out, self.export_in, EXPORT)),
                       asyncio.create_task(self._data(self.import_in, self.import_out, IMPORT)),
                       asyncio.create_task(self._subscriptions(self.import_out, self.import_in, IMPORT))]
        await self.kv.open()
        self.dispatchers = DispatcherPeers(self.ctx, self.kv, curve=self.curve,
                                           on_connect=self._dispatcher_up,
                                           on_disconnect=self._dispatcher_gone)
        await self.dispatchers.start()
        await self.kv.register(NodeInfo(self.name, ROLE_BRIDGE, self.dc, http=self.endpoints["http"],
                                        pub=import_ep, export=export_ep))
        if self.discovery:
            self._tasks.append(asyncio.create_task(follow_peer_bridges(self.kv, self._peers_changed)))
        log.info("bridge %s of %s serving: export %s, import %s, http %s; peers %s", self.name, self.dc,
                 export_ep, import_ep, self.endpoints["http"],
                 ", ".join(f"{dc}={ep}" for dc, ep in self.peers.items())
                 or ("from the federated Consul catalog" if self.discovery else "none"))

    def _link_peer(self, dc: str, endpoint: str) -> None:
        try:
            curve_connect(self.import_in, endpoint, peer_bridge_name(dc), self.curve)
        except CurveError as exc:
            log.error("not linking to the bridge of %s: %s", dc, exc)
            return
        self.peers[dc] = endpoint
        log.info("importing from %s at %s", dc, endpoint)

    def _peers_changed(self, link: dict[str, str], unlink: dict[str, str]) -> None:
        """Peer discovery saw a DC's bridge go or move (``unlink``), or appear (``link``)."""
        for dc, endpoint in unlink.items():
            self.peers.pop(dc, None)
            try:
                self.import_in.disconnect(endpoint)
            except zmq.ZMQError:
                pass  # never connected (its CURVE key was missing)
            log.info("no longer importing from %s at %s", dc, endpoint)
        for dc, endpoint in link.items():
            self._link_peer(dc, endpoint)

    def _socket(self, kind: int, hwm: int, server: bool = False) -> zmq.asyncio.Socket:
        sock = make_socket(self.ctx, kind, sndhwm=hwm, rcvhwm=hwm, curve=self.curve, curve_server=server)
        self._sockets.append(sock)
        return sock

    def _dispatcher_up(self, info: NodeInfo) -> None:
        curve_connect(self.export_in, info.pub, info.name, self.curve)

    def _dispatcher_gone(self, info: NodeInfo) -> None:
        try:
            self.export_in.disconnect(info.pub)
        except zmq.ZMQError:
            pass

    async def shutdown(self) -> None:
        try:
            await self.kv.deregister()
        except Exception as exc:  # noqa: BLE001 - shutting down: report, keep going
            log.warning("deregister failed: %s", exc)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.dispatchers:
            await self.dispatchers.stop()
        await release(self.kv, http_server=self.http_server, sockets=self._sockets,
                      zap=getattr(self, "zap", None))

    # --- the proxies ------------------------------------------------------------------------

    async def _data(self, src: zmq.asyncio.Socket, dst: zmq.asyncio.Socket, direction: str) -> None:
        while True:
            frames = await src.recv_multipart()
            try:
                out = self.gate.passes(direction, frames)
            except RemoteProtocolError as exc:
                wire_log.warning("%s: dropped a malformed fan-out message: %s", direction, exc)
                continue
            if out is None:
                continue
            try:  # an XPUB never blocks: at its high-water mark it drops (counted as a gap later)
                await dst.send_multipart(out, flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self.stats[f"{direction}_send_failed"] = self.stats.get(f"{direction}_send_failed", 0) + 1
                wire_log.warning("%s: send failed: %s", direction, exc)

    async def _subscriptions(self, xpub: zmq.asyncio.Socket, xsub: zmq.asyncio.Socket, direction: str) -> None:
        while True:
            msg = await xpub.recv()
            if self.gate.subscription(direction, msg):
                await xsub.send(msg)

    def health(self) -> dict:
        return {"status": "ok" if self.dispatchers and self.dispatchers.peers else "degraded",
                "role": ROLE_BRIDGE, "name": self.name, "dc": self.dc,
                "dispatchers": sorted(self.dispatchers.peers) if self.dispatchers else [],
                "peers": self.peers, **self.gate.snapshot(), "stats": dict(self.stats),
                **self.endpoints}


class HealthHandler(tornado.web.RequestHandler):
    def initialize(self, node: Bridge) -> None:
        self.node = node

    def get(self) -> None:
        self.write(self.node.health())


async def run(cfg: Config) -> None:
    await serve(cfg, Bridge, ROLE_BRIDGE)


def main() -> None:
    from mesh.launch import node_main
    node_main("bridge", run)


if __name__ == "__main__":
    main()
