"""CURVE on the node links: keys from ``meshctl keys``; nodes with allowed keys form the mesh,
a peer with no key or an unknown key gets nothing and cannot publish."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import zmq
import zmq.asyncio
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

from mesh.wire import protocol as P
from mesh.io.sockets import make_socket

from helpers import health, http, like, viewer, wait_until

pytestmark = pytest.mark.topology


def make_keys(key_dir: str, *names: str) -> None:
    for name in names:
        out = subprocess.run([sys.executable, "-m", "mesh.tools.meshctl", "keys", name, "--dir", key_dir],
                             capture_output=True, text=True, check=True).stdout
        assert f"public {os.path.join(key_dir, name)}.key" in out


def curve_settings(key_dir: str, name: str) -> dict:
    return {"security.curve": "true", "security.curve_secret_key": os.path.join(key_dir, f"{name}.key_secret"),
            "security.curve_public_keys": key_dir}


@pytest.fixture
def curve_mesh(topology, tmp_path):
    key_dir = str(tmp_path / "keys")
    make_keys(key_dir, "d1", "d2", "f1")
    assert oct(os.stat(os.path.join(key_dir, "f1.key_secret")).st_mode & 0o777) == "0o600"
    ds = [topology.dispatcher(n, **curve_settings(key_dir, n)) for n in ("d1", "d2")]
    f = topology.frontend("f1", **curve_settings(key_dir, "f1"))
    return key_dir, ds, f


async def test_curve_mesh_delivers_and_refuses_strangers(curve_mesh, tmp_path, aclose):
    key_dir, (d1, d2), f = curve_mesh
    assert sorted((await health(f.url))["dispatchers"]) == ["d1", "d2"]
    # the rogue peers, subscribed to every video on both dispatchers
    ctx = zmq.asyncio.Context()
    rogue_pair = zmq.curve_keypair()
    socks = []
    for d in (d1, d2):
        plain = make_socket(ctx, zmq.SUB)                       # no CURVE at all
        unknown = make_socket(ctx, zmq.SUB)                     # a key nobody allowed
        unknown.curve_publickey, unknown.curve_secretkey = rogue_pair
        unknown.curve_serverkey = zmq.auth.load_certificate(os.path.join(key_dir, f"{d.name}.key"))[0]
        for s in (plain, unknown):
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(d.info["pub"])
            socks.append(s)

    async def cleanup():
        for s in socks:
            s.close(linger=0)
        ctx.term()
    aclose.append(cleanup)

    # the mesh itself works over CURVE: viewers on f1 get likes published through f1
    v = await viewer(f.url, "secret-talk")
    sent = [(await like(f.url, "secret-talk"))["id"] for _ in range(5)]
    assert [json.loads(e.data)["id"] for e in await v.events(5)] == sent
    # ... and two dispatchers replicate to each other over CURVE DEALERs
    await wait_until(lambda: _replicated(d1, d2), what="replication between dispatchers")

    # the strangers received nothing (not even the sync markers of the subscribe)
    for s in socks:
        assert not await s.poll(300), "a peer without an allowed key received a message"

    # a stranger cannot publish: no reply, and no viewer sees its event
    for keys in (None, rogue_pair):
        dealer = make_socket(ctx, zmq.DEALER)
        socks.append(dealer)
        if keys is not None:
            dealer.curve_publickey, dealer.curve_secretkey = keys
            dealer.curve_serverkey = zmq.auth.load_certificate(os.path.join(key_dir, "d1.key"))[0]
        dealer.connect(d1.info["router"])
        event = P.make_event("secret-talk", P.KIND_LIKE, "mallory", None)
        await dealer.send_multipart(P.Control(P.MSG_PUBLISH, b"r1", P.publish_body([P.event_row(event)])).to_frames())
        assert not await dealer.poll(1000), "a peer without an allowed key got a reply"
    assert await v.no_event(0.5, kinds={"like"}) is None
    stats = (await health(d1.info["http"]))["stats"]
    assert stats.get("curve_refused", 0) >= 1  # the unknown key was seen and refused
    assert stats.get("malformed", 0) == 0      # nothing of theirs was even read
    log_text = open(os.path.join(str(tmp_path), "d1.log")).read()
    assert "CURVE: refused a peer with unknown public key" in log_text
    assert "PLAINTEXT" not in log_text
    v.close()


async def _replicated(d1, d2) -> bool:
    h1, h2 = await health(d1.info["http"]), await health(d2.info["http"])
    return h1["stats"].get("replicated", 0) + h2["stats"].get("replicated", 0) >= 5


async def test_frontend_without_an_allowed_key_gets_nothing(topology, tmp_path):
    key_dir = str(tmp_path / "keys")
    make_keys(key_dir, "d1", "f1")
    other_dir = str(tmp_path / "other")
    make_keys(other_dir, "f2", "d1")          # a different "d1" key: f2 is not in key_dir
    topology.dispatcher("d1", **curve_settings(key_dir, "d1"))
    good = topology.frontend("f1", **curve_settings(key_dir, "f1"))
    bad = topology.frontend("f2", **{**curve_settings(other_dir, "f2"),
                                     "frontend.publish_timeout": "1.0", "frontend.sync_timeout": "0.5"})
    v = await viewer(bad.url, "leak")
    status, body = await http("POST", f"{bad.url}/v1/videos/leak/likes")
    assert status == 503 and body["error"]["code"] == "no_dispatcher"
    await like(good.url, "leak")
    assert await v.no_event(1.0, kinds={"like"}) is None
    v.close()


async def test_plaintext_is_said_loudly(topology, tmp_path):
    topology.dispatcher("d1")
    f = topology.frontend("f1")
    for name in ("d1", "f1"):
        text = open(os.path.join(str(tmp_path), f"{name}.log")).read()
        assert "node links are PLAINTEXT" in text
    assert "publishing is UNAUTHENTICATED" in open(os.path.join(str(tmp_path), "f1.log")).read()
    # said loudly, and still working: the plaintext mesh delivers
    v = await viewer(f.url, "in-the-clear")
    sent = await like(f.url, "in-the-clear")
    assert json.loads((await v.events(1))[0].data)["id"] == sent["id"]
    v.close()


def test_meshctl_keys_refuses_to_overwrite(tmp_path):
    key_dir = str(tmp_path)
    make_keys(key_dir, "n1")
    again = subprocess.run([sys.executable, "-m", "mesh.tools.meshctl", "keys", "n1", "--dir", key_dir],
                           capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr
    public, secret = zmq.auth.load_certificate(os.path.join(key_dir, "n1.key_secret"))
    assert len(public) == 40 and len(secret) == 40


async def test_curve_between_datacenters_through_bridges(tmp_path):
    """Two DCs, every link CURVE: a like in dc1 reaches a viewer in dc2 through the bridges;
    a stranger without an allowed key subscribed at dc1's export gets nothing of it."""
    from mesh.tools.topology import Topology, free_port
    key_dir = str(tmp_path / "keys")
    names = {dc: (f"{dc}-d1", f"{dc}-f1", f"bridge-{dc}") for dc in ("dc1", "dc2")}
    make_keys(key_dir, *[n for group in names.values() for n in group])
    ports = {dc: free_port() for dc in names}
    topos = {dc: Topology(kv={"backend": "embedded", "path": str(tmp_path / f"kv-{dc}.db"), "liveness_ttl": "2"},
                          log_dir=str(tmp_path), extra={"node.dc": dc, "dispatcher.drain_seconds": "0.3"})
             for dc in names}
    ctx = zmq.asyncio.Context()
    try:
        fronts = {}
        for dc, (d, f, b) in names.items():
            topos[dc].dispatcher(d, **curve_settings(key_dir, d))
            peers = [f"{o}=tcp://127.0.0.1:{p}" for o, p in ports.items() if o != dc]
            topos[dc].bridge(b, peers, export_port=ports[dc], **curve_settings(key_dir, b))
            fronts[dc] = topos[dc].frontend(f, **curve_settings(key_dir, f))
        stranger = make_socket(ctx, zmq.SUB)
        stranger.setsockopt(zmq.SUBSCRIBE, b"")
        stranger.connect(f"tcp://127.0.0.1:{ports['dc1']}")
        remote = await viewer(fronts["dc2"].url, "wan")
        got = None
        for _ in range(50):  # until dc2's subscription has crossed to dc1 (bounded)
            sent = await like(fronts["dc1"].url, "wan")
            ev = await remote.no_event(0.2)
            if ev is not None:
                got = (sent, ev)
                break
        assert got is not None, "no like crossed the CURVE bridges"
        sent = await like(fronts["dc1"].url, "wan")
        assert json.loads((await remote.events(1))[0].data)["id"] == sent["id"]
        assert not await stranger.poll(300), "a peer without an allowed key received traffic"
    finally:
        ctx.destroy(linger=0)
        for topo in topos.values():
            topo.close()



class CurveServer:
    """A real CURVE ROUTER guarded by the dispatchers' authenticator, and handshakes against it:
    each ``handshake`` is a fresh DEALER whose socket monitor reports the ZAP verdict."""

    def __init__(self, key_dir: str):
        from mesh.io.curve import CurveKeys, start_authenticator
        self.key_dir = key_dir
        self.stats: dict = {}
        self.ctx = zmq.asyncio.Context()
        keys = CurveKeys(os.path.join(key_dir, "srv.key_secret"), key_dir)
        self.auth = start_authenticator(self.ctx, keys, self.stats)
        self.router = make_socket(self.ctx, zmq.ROUTER)
        keys.configure(self.router, server=True)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.server_key = keys.public

    async def handshake(self, secret_file: str, timeout: float = 2.0) -> bool:
        """True when the server admits the client keypair in ``secret_file``, False when it
        refuses it; fails the test when neither happens within ``timeout``."""
        public, secret = zmq.auth.load_certificate(secret_file)
        dealer = make_socket(self.ctx, zmq.DEALER)
        dealer.curve_publickey, dealer.curve_secretkey, dealer.curve_serverkey = public, secret, self.server_key
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        try:
            dealer.connect(self.endpoint)
            try:
                frames = await asyncio.wait_for(monitor.recv_multipart(), timeout)
            except asyncio.TimeoutError:
                raise AssertionError(f"no handshake verdict for {secret_file} in {timeout} s "
                                     "(is the authenticator alive?)") from None
            return parse_monitor_message(frames)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        finally:
            dealer.disable_monitor()
            monitor.close(linger=0)
            dealer.close(linger=0)

    def close(self) -> None:
        self.router.close(linger=0)
        self.auth.stop()
        self.ctx.destroy(linger=0)


@pytest.fixture
def curve_keys(tmp_path):
    key_dir = str(tmp_path / "keys")
    make_keys(key_dir, "srv", "c1", "c2")
    make_keys(str(tmp_path / "elsewhere"), "c3")    # a keypair the server does not allow
    return key_dir, str(tmp_path / "elsewhere" / "c3.key_secret")


def curve_server(key_dir: str, aclose: list) -> CurveServer:
    """A CurveServer (made inside the test's loop, which the authenticator runs on), closed after."""
    server = CurveServer(key_dir)

    async def cleanup():
        server.close()
    aclose.append(cleanup)
    return server


async def _until_verdict(server: CurveServer, secret_file: str, verdict: bool, start: float, within: float) -> None:
    """Fresh handshakes until ``secret_file`` gets ``verdict``; fails past ``start + within``."""
    while await server.handshake(secret_file) != verdict:
        assert time.monotonic() - start < within, \
            f"{secret_file} not {'admitted' if verdict else 'refused'} within {within} s"


async def test_a_key_rotated_with_force_is_picked_up_within_two_seconds(curve_keys, tmp_path, aclose):
    key_dir, stranger = curve_keys
    server = curve_server(key_dir, aclose)
    c1, c2 = (os.path.join(key_dir, f"{n}.key_secret") for n in ("c1", "c2"))
    assert await server.handshake(c1) and await server.handshake(c2)
    assert not await server.handshake(stranger)
    old_c1 = str(tmp_path / "old-c1.key_secret")
    shutil.copy(c1, old_c1)
    # rotation in place: same file names, same sizes, the directory's own mtime unchanged
    subprocess.run([sys.executable, "-m", "mesh.tools.meshctl", "keys", "c1", "--dir", key_dir, "--force"],
                   capture_output=True, text=True, check=True)
    rotated = time.monotonic()
    assert zmq.auth.load_certificate(c1)[0] != zmq.auth.load_certificate(old_c1)[0]
    await _until_verdict(server, old_c1, False, rotated, within=2.0)
    await _until_verdict(server, c1, True, rotated, within=2.0)
    assert await server.handshake(c2)


async def test_bad_key_files_are_skipped_and_the_authenticator_survives(curve_keys, tmp_path, aclose):
    key_dir, stranger = curve_keys
    server = curve_server(key_dir, aclose)
    c2 = os.path.join(key_dir, "c2.key_secret")
    open(os.path.join(key_dir, "empty.key"), "wb").close()
    with open(os.path.join(key_dir, "junk.key"), "wb") as f:
        f.write(b"\xff\xfe garbage\npublic-key = \"short\"\n\x00\x01")
    # the directory is read again on a handshake at most once a second: handshake until it was
    async def c2_admitted_after_reading_both():
        return await server.handshake(c2) and server.stats.get("curve_bad_key_files", 0) >= 2
    await wait_until(c2_admitted_after_reading_both, timeout=5.0, what="both bad files read, c2 admitted")
    assert not await server.handshake(stranger)
    # fix the empty file: it now holds c3's public key, which is admitted from then on
    shutil.copy(str(tmp_path / "elsewhere" / "c3.key"), os.path.join(key_dir, "empty.key"))
    await _until_verdict(server, stranger, True, time.monotonic(), within=3.0)
    assert await server.handshake(c2)
