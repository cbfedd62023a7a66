"""The lean SSE stream path (``frontend/stream.py``) and tick coalescing (``frontend/fanout.py``)
against real processes: what goes on the wire, viewers leaving, a busy video's events
coalesced per tick, in order."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from helpers import health, like, viewer, wait_until

pytestmark = pytest.mark.topology


async def _raw_stream(url: str, video: str) -> tuple[socket.socket, bytes]:
    """A raw client: the response head and what followed it."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, f"GET /v1/videos/{video}/events HTTP/1.1\r\nHost: {host}\r\n"
                                  f"Origin: https://app.example\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
        assert chunk, "closed before the response head"
        data += chunk
    return sock, data


async def test_stream_head_is_unchunked_with_cors_and_the_body_ends_at_close(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"security.cors_origins": "https://app.example"})
    sock, data = await _raw_stream(f.url, "raw")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    assert lines[0] == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["connection"] == "close" and "transfer-encoding" not in headers
    assert "content-length" not in headers and headers["cache-control"] == "no-cache"
    assert headers["access-control-allow-origin"] == "https://app.example"
    sent = await like(f.url, "raw", user="ann")
    loop = asyncio.get_running_loop()
    while b"event: like" not in body:
        body += await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
    assert body.startswith(b"retry: ") and sent["id"].encode() in body
    assert b"\r\n" not in body  # raw SSE bytes: no chunk-size lines
    assert (await health(f.url))["connections"] == 1
    sock.close()  # the viewer leaves: seen at once (EOF on the socket), not at the next write
    await wait_until(lambda: _connections_are(f.url, 0), timeout=5, what="viewer removed")
    assert (await health(f.url))["stats"]["viewers_closed"] == 1


async def _connections_are(url: str, n: int) -> bool:
    return (await health(url))["connections"] == n


async def test_a_busy_videos_likes_are_coalesced_per_tick_in_order(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"frontend.fanout_tick": "1.0"})
    v = await viewer(f.url, "busy")
    first = await like(f.url, "busy", user="first")  # a quiet video: written at once
    assert json.loads((await v.events(1, timeout=5))[0].data)["id"] == first["id"]
    rounds = (await health(f.url))["stats"]["fanout_rounds"]
    sent = await asyncio.gather(*(like(f.url, "busy", user=f"u{i}") for i in range(10)))
    got = await v.events(10, timeout=10)
    # published together, acknowledged in chain order: the viewer sees them in that order
    assert [json.loads(e.data)["id"] for e in got] == [s["id"] for s in sorted(sent, key=lambda s: s["seq"])]
    # within a second of the last write: they waited for the next tick and went out together
    # (one round, or a few if publishing took longer than a tick on a loaded machine)
    assert (await health(f.url))["stats"]["fanout_rounds"] - rounds <= 3
    # nothing else of the video follows them: the next like the viewer gets is a marker
    # published after
    marker = await like(f.url, "busy", user="marker")
    assert json.loads((await v.events(1, timeout=5))[0].data)["id"] == marker["id"]
    v.close()


async def test_a_reconnect_drops_live_writes_it_already_has_while_they_wait_for_a_tick(topology):
    """The viewer had event X from f1 and reconnects to f2, whose write of X still waits for
    the video's next tick: history after X is empty, and the pending write must not give X
    again; the next like arrives once."""
    topology.dispatcher("d1")
    f1 = topology.frontend("f1")
    f2 = topology.frontend("f2", **{"frontend.fanout_tick": "1.0"})
    watcher = await viewer(f2.url, "again")  # f2 subscribed; its writes of the video ticked
    on_f1 = await viewer(f1.url, "again")
    await like(f2.url, "again", user="warm")  # f2's write at once: the next waits ~1 s
    await on_f1.events(1, timeout=5)
    await watcher.events(1, timeout=5)
    x = await like(f1.url, "again", user="x")
    got = await on_f1.events(1, timeout=5)
    assert json.loads(got[0].data)["id"] == x["id"]
    back = await viewer(f2.url, "again", last_event_id=got[0].id)
    y = await like(f1.url, "again", user="y")
    after = await back.events(1, timeout=5)
    assert json.loads(after[0].data)["id"] == y["id"]  # not X again
    assert await back.no_event(1.2, kinds={"like"}) is None
    for v in (watcher, on_f1, back):
        v.close()
