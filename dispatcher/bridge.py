"""The bridge process: one per datacenter, it joins its DC's mesh to the peer DCs' bridges
with two ZeroMQ proxies (the rules of what crosses are in ``mesh.core.bridging``).

Endpoints (bind|connect TYPE for PURPOSE):

* connect XSUB  every local dispatcher's XPUB     this DC's events in (export proxy)
* bind    XPUB  ``tcp://host:export_port``        this DC's events out to peer bridges;
                                                  their subscriptions in
* connect XSUB  every peer DC's export XPUB       peer DCs' events in (import proxy)
                (``bridge.peers``)
* bind    XPUB  ``tcp://host:import_port``        peer DCs' events out to this DC's frontends;
                                                  their subscriptions in
* bind    ROUTER ``tcp://host:relay_port``        history requests in: from this DC's frontends
                                                  (gaps in another DC's chain) and from peer
                                                  bridges (gaps in this DC's chain)
* connect DEALER every peer DC's relay ROUTER     history requests out to the chain's origin DC
                (``bridge.relay_peers``)
* connect DEALER every local dispatcher's ROUTER  history requests and peer DCs' presence
                                                  summaries (``PRDC``) to a video's owner
* bind    HTTP  ``http://host:http_port``         ``/healthz`` (frames per video and direction),
                                                  ``/metrics``

It registers in its DC's KV as role ``bridge`` with ``pub`` = the import XPUB (frontends connect
their SUB there), ``export`` = the export XPUB and ``router`` = the relay ROUTER.  Local
dispatchers are found in the KV (``mesh.io.peers.PeerLinks``, whose links linger after a
dispatcher leaves, so a draining dispatcher's last events still cross); peer DCs are configured
(``bridge.peers``, ``bridge.relay_peers``), because each DC has its own KV -- or, on
WAN-federated Consul (``bridge.peers = "consul"`` or empty), found with their relay endpoints
in the other datacenters' catalogs and followed (``mesh.kv.federation``).

Restarts: ZeroMQ replays subscriptions when a pipe (re)connects -- a SUB/XSUB sends its whole
subscription set to a new publisher -- so a restarted bridge gets its frontends' and its peers'
subscriptions back as they reconnect, and passes them upstream; nothing else restarts.
"""

from __future__ import annotations

import asyncio
import logging

import tornado.httpserver
import tornado.netutil
import tornado.web
import zmq
import zmq.asyncio

from mesh.wire import protocol as P
from mesh.core.bridging import EXPORT, IMPORT, Gate, Relay, parse_peers
from mesh.config import Config
from mesh.io.curve import CurveError, connect as curve_connect, secure_links
from mesh.errors import RemoteProtocolError
from mesh.kv.federation import Links, discovers_peers, follow_peer_bridges
from mesh.kv import KV, NodeInfo, ROLE_BRIDGE
from mesh.io.metrics import MetricsHandler, bridge_registry
from mesh.io.node import release, serve
from mesh.core.ownership import owner
from mesh.io.history import HistoryUnavailable, fetch_history
from mesh.io.peers import PeerLinks, PeerGone
from mesh.io.sockets import bind, make_socket
from mesh.io.tasks import Tasks

log = logging.getLogger("mesh.app")
wire_log = logging.getLogger("mesh.wire")

#: seconds to hand a peer DC's presence summary to the video's owner here
PRESENCE_RELAY_TIMEOUT = 1.0


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
        self.relay_peers = parse_peers(cfg.bridge.relay_peers, self.dc, "bridge.relay_peers")
        self.peer_relays: PeerLinks | None = None  # DEALERs to the peer bridges' relays
        self._imported = 0  # event batches imported (fault injection counts them)
        self.tasks = Tasks(log)
        self.gate = Gate(self.dc)
        self.stats: dict[str, int] = {}
        self.endpoints: dict[str, str] = {}
        self.dispatchers: PeerLinks | None = None
        self.http_server = None
        self.zmq_sockets: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        b = self.cfg.bridge
        self.curve, self.zap = secure_links(self.ctx, self.cfg, self.stats)  # before any bind
        self.export_in = self._socket(zmq.XSUB, b.hwm)
        self.export_out = self._socket(zmq.XPUB, b.hwm, server=True)
        self.import_in = self._socket(zmq.XSUB, b.hwm)
        self.import_out = self._socket(zmq.XPUB, b.hwm, server=True)
        self.relay = self._socket(zmq.ROUTER, b.hwm, server=True)
        self.relay.setsockopt(zmq.ROUTER_MANDATORY, 1)
        export_ep = bind(self.export_out, b.host, b.export_port)
        import_ep = bind(self.import_out, b.host, b.import_port)
        relay_ep = bind(self.relay, b.host, b.relay_port)
        app = tornado.web.Application([(r"/healthz", HealthHandler, {"node": self}),
                                       (r"/metrics", MetricsHandler, {"registry": bridge_registry(self)})])
        http_sockets = tornado.netutil.bind_sockets(b.http_port, address=b.host)
        self.http_server = tornado.httpserver.HTTPServer(app, xheaders=False)
        self.http_server.add_sockets(http_sockets)
        http_port = http_sockets[0].getsockname()[1]
        self.endpoints = {"export": export_ep, "import": import_ep, "relay": relay_ep,
                          "http": f"http://{b.host}:{http_port}"}
        for dc, endpoint in self.peers.items():
            self._link_peer(dc, endpoint)
        self._tasks = [asyncio.create_task(self._data(self.export_in, self.export_out, EXPORT)),
                       asyncio.create_task(self._subscriptions(self.export_out, self.export_in, EXPORT)),
                       asyncio.create_task(self._data(self.import_in, self.import_out, IMPORT)),
                       asyncio.create_task(self._subscriptions(self.import_out, self.import_in, IMPORT)),
                       asyncio.create_task(self._serve_relay())]
        self.peer_relays = PeerLinks(self.ctx, self.kv, curve=self.curve)
        self._link_relays()
        await self.kv.open()
        self.dispatchers = PeerLinks(self.ctx, self.kv, curve=self.curve,
                                           on_connect=self._dispatcher_up,
                                           on_disconnect=self._dispatcher_gone)
        await self.dispatchers.start()
        await self.kv.register(NodeInfo(self.name, ROLE_BRIDGE, self.dc, http=self.endpoints["http"],
                                        pub=import_ep, export=export_ep, router=relay_ep))
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

    def _peers_changed(self, link: Links, unlink: Links) -> None:
        """Peer discovery saw a DC's bridge go or move (``unlink``), or appear (``link``)."""
        for dc, peer in unlink.items():
            self.peers.pop(dc, None)
            self.relay_peers.pop(dc, None)
            try:
                self.import_in.disconnect(peer.export)
            except zmq.ZMQError:
                pass  # never connected (its CURVE key was missing)
            log.info("no longer importing from %s at %s", dc, peer.export)
        for dc, peer in link.items():
            self._link_peer(dc, peer.export)
            if peer.relay:
                self.relay_peers[dc] = peer.relay
        self._link_relays()

    def _link_relays(self) -> None:
        self.peer_relays.set_dispatchers([NodeInfo(peer_bridge_name(dc), ROLE_BRIDGE, dc, router=ep)
                                          for dc, ep in self.relay_peers.items()])

    def _socket(self, kind: int, hwm: int, server: bool = False) -> zmq.asyncio.Socket:
        sock = make_socket(self.ctx, kind, sndhwm=hwm, rcvhwm=hwm, curve=self.curve, curve_server=server)
        self.zmq_sockets.append(sock)
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
        self.tasks.cancel()
        if self.dispatchers:
            await self.dispatchers.stop()
        if self.peer_relays:
            await self.peer_relays.stop()
        await release(self.kv, http_server=self.http_server, sockets=self.zmq_sockets,
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
            if isinstance(out, Relay):  # tasks start (and send, NOBLOCK) in arrival order: FIFO
                self.tasks.spawn(self._relay_presence(out))
                continue
            if direction == IMPORT and self._fault_drop():
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

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _fault_drop(self) -> bool:
        """Fault injection (``bridge.fault_drop_every``, off by default): lose every Nth
        imported event batch, as a high-water mark or a reconnect would."""
        every = self.cfg.bridge.fault_drop_every
        if not every:
            return False
        self._imported += 1
        if self._imported % every:
            return False
        self._count("fault_dropped")
        return True

    def _owner(self, video: str) -> str:
        """The video's owner in our DC, as its frontends compute it (PeerGone: none known)."""
        own = owner(video, self.dispatchers.names if self.dispatchers else [])
        if own is None:
            raise PeerGone("no dispatcher known")
        return own

    # --- presence of peer DCs -----------------------------------------------------------------

    async def _relay_presence(self, relay: Relay) -> None:
        """A peer DC's presence summary, to the video's owner in our DC (``PRDC``)."""
        own = None
        try:
            own = self._owner(relay.video)
            await self.dispatchers.request(own, P.MSG_PRESENCE_DC,
                                           {"video": relay.video, "summary": relay.summary},
                                           PRESENCE_RELAY_TIMEOUT)
            self._count("presence_relayed")
        except (asyncio.TimeoutError, PeerGone) as exc:
            self._count("presence_relay_failed")  # the next summary (at most dc_refresh) heals it
            log.info("presence summary of %s for %s not relayed: %s", relay.video, own, exc or "timeout")

    # --- history relay ------------------------------------------------------------------------

    async def _serve_relay(self) -> None:
        """``HIST`` requests for a chain of ``dc``: from our frontends (a gap in a peer DC's
        chain) and from peer bridges (a gap in ours)."""
        while True:
            frames = await self.relay.recv_multipart()
            peer = frames[0]
            try:
                msg = P.Control.from_frames(frames[1:])
            except RemoteProtocolError as exc:
                self._count("relay_malformed")
                wire_log.warning("relay: dropped a malformed request from %r: %s", peer[:16], exc)
                continue
            try:
                if msg.msg_type != P.MSG_HISTORY:
                    raise RemoteProtocolError(f"{msg.msg_type!r} is not a history request")
                video, after, dc = P.relay_history_request(msg)
            except RemoteProtocolError as exc:
                self._count("relay_malformed")
                wire_log.warning("relay: rejected a request from %r: %s", peer[:16], exc)
                self._relay_reply(peer, P.Control(P.MSG_ERROR, msg.request_id, P.error_body("malformed", str(exc))))
                continue
            self.tasks.spawn(self._relay_history(peer, msg.request_id, video, after, dc))

    async def _relay_history(self, peer: bytes, request_id: bytes, video: str, after, dc: str) -> None:
        timeout = self.cfg.frontend.gap_timeout  # the requesting frontend waits no longer
        try:
            if dc == self.dc:  # our chain: from its owner, or its backup when the owner is silent
                events = await fetch_history(self.dispatchers, video, after, timeout,
                                             self.cfg.frontend.history_deadline,
                                             lambda reply: P.chain_reply(reply, video, dc))
            elif dc in self.relay_peers:
                events = P.chain_reply(await self.peer_relays.request(
                    peer_bridge_name(dc), P.MSG_HISTORY, P.relay_history_body(video, after, dc), timeout), video, dc)
            else:
                raise PeerGone(f"no relay endpoint for {dc} (bridge.relay_peers)")
            answer = P.Control(P.MSG_ACK, request_id, {"reset": True} if events is None else {"events": events})
            self._count("relayed_history")
        except (asyncio.TimeoutError, PeerGone, HistoryUnavailable) as exc:
            self._count("relay_failed")
            log.info("history of %s@%s after %s not relayed: %s", video, dc, after, exc or "timeout")
            answer = P.Control(P.MSG_ERROR, request_id, P.error_body("unavailable", str(exc) or "timeout"))
        except RemoteProtocolError as exc:
            self._count("relay_malformed")
            wire_log.warning("relay: bad history reply for %s@%s: %s", video, dc, exc)
            answer = P.Control(P.MSG_ERROR, request_id, P.error_body("malformed", str(exc)))
        self._relay_reply(peer, answer)

    def _relay_reply(self, peer: bytes, msg: P.Control) -> None:
        try:
            self.relay.send_multipart([peer, *msg.to_frames()], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the requester went away
            self._count("relay_unroutable")
            wire_log.info("relay reply to %r not routable: %s", peer[:16], exc)

    def health(self) -> dict:
        return {"status": "ok" if self.dispatchers and self.dispatchers.peers else "degraded",
                "role": ROLE_BRIDGE, "name": self.name, "dc": self.dc,
                "dispatchers": sorted(self.dispatchers.peers) if self.dispatchers else [],
                "peers": self.peers, "relay_peers": self.relay_peers, **self.gate.snapshot(),
                "stats": dict(self.stats),
                **self.endpoints}


class HealthHandler(tornado.web.RequestHandler):
    def initialize(self, node: Bridge) -> None:
        self.node = node

    def get(self) -> None:
        self.write(self.node.health())


async def run(cfg: Config) -> None:
    await serve(cfg, Bridge, ROLE_BRIDGE)


def main() -> None:
    from mesh.io.launch import node_main
    node_main("bridge", run)


if __name__ == "__main__":
    main()
