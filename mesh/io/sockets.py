"""ZeroMQ socket helpers: every socket the mesh opens goes through ``make_socket`` so that
linger, high-water marks, message size limits and heartbeats are set deliberately, never left
at library defaults.  The context is always passed in (never ``Context.instance()``)."""

from __future__ import annotations

import zmq

#: largest message a peer may send us; bigger ones make ZeroMQ drop the connection
MAX_MSG_SIZE = 4 * 1024 * 1024


def make_socket(ctx: zmq.Context, kind: int, *, sndhwm: int = 100000, rcvhwm: int = 100000,
                identity: bytes | None = None, curve=None, curve_server: bool = False) -> zmq.Socket:
    """``curve``: this node's ``mesh.io.curve.CurveKeys`` (None: plaintext); ``curve_server``
    for the sockets a dispatcher binds (clients set the server key per connection)."""
    sock = ctx.socket(kind)
    if curve is not None:
        curve.configure(sock, server=curve_server)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_SIZE)
    # ZMTP heartbeats: a dead peer's pipe is torn down in seconds, not at TCP keepalive time
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock


def bind(sock: zmq.Socket, host: str, port: int) -> str:
    """Bind to ``tcp://host:port`` (port 0: any free port) and return the real endpoint."""
    if port:
        endpoint = f"tcp://{host}:{port}"
        sock.bind(endpoint)
        return endpoint
    sock.bind(f"tcp://{host}:*")
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()
