"""Multi-process topology tests: real dispatchers and frontends on loopback, real SSE streams."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import zmq
import zmq.asyncio

from mesh.wire import protocol as P
from mesh.kv import NodeInfo, ROLE_DISPATCHER
from mesh.kv.embedded import EmbeddedKV
from mesh.core.ownership import owner

from helpers import comment, health, http, like, read_lines_until, viewer, wait_until

pytestmark = pytest.mark.topology


@pytest.fixture
def mesh2(topology):
    """2 dispatchers + 2 frontends (the default topology)."""
    ds = [topology.dispatcher("d1"), topology.dispatcher("d2")]
    fs = [topology.frontend("f1"), topology.frontend("f2")]
    return ds, fs


async def test_like_reaches_viewers_on_both_frontends_once_in_order(mesh2):
    _, (fa, fb) = mesh2
    va1, va2, vb = [await viewer(u, "live-1") for u in (fa.url, fa.url, fb.url)]
    sent = [await like(fa.url if i % 2 else fb.url, "live-1", user=f"user{i}") for i in range(20)]
    for v in (va1, va2, vb):
        got = await v.events(20, timeout=10)
        assert [json.loads(e.data)["id"] for e in got] == [s["id"] for s in sent]
        assert [e.event for e in got] == ["like"] * 20
        ids = [tuple(map(int, e.id.split(":"))) for e in got]
        assert ids == sorted(ids) and len(set(ids)) == 20
        assert [json.loads(e.data)["user"] for e in got] == [f"user{i}" for i in range(20)]
        assert await v.no_event(0.3, kinds={"like"}) is None  # nothing twice
        v.close()


async def test_comment_text_arrives_byte_identical(mesh2):
    _, (fa, fb) = mesh2
    v = await viewer(fb.url, "talk")
    texts = ["multi\nline\ncomment", "crlf\r\nline\rcr", "emoji 🎉🔥 — ünïcödé 中文", "  spaces  ",
             "data: not a field\n\nid: 99", "\u2028\u2029 separators"]
    for t in texts:
        await comment(fa.url, "talk", t, user="ann")
    got = await v.events(len(texts), timeout=10)
    assert [json.loads(e.data)["text"] for e in got] == texts
    assert all(e.event == "comment" and json.loads(e.data)["user"] == "ann" for e in got)
    data = json.loads(got[0].data)
    assert set(data) >= {"id", "video", "kind", "user", "text", "ts"} and data["video"] == "talk"


async def test_stream_headers_retry_and_heartbeat(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"frontend.heartbeat_interval": "0.2", "frontend.retry_ms": "1234"})
    v = await viewer(f.url, "hb")
    assert v.status == 200 and v.headers["content-type"].startswith("text/event-stream")
    assert v.headers["cache-control"] == "no-cache"
    await wait_until(lambda: v.parser.retry == 1234 and v.parser.comments >= 2 or
                     v.no_event(0.1), what="retry and 2 heartbeats")
    assert v.parser.retry == 1234 and v.parser.comments >= 2


@pytest.mark.parametrize("a,b", [("a", "ab"), ("video-1", "video-10")])
async def test_prefix_videos_are_isolated(mesh2, a, b):
    _, (fa, fb) = mesh2
    va, vb = await viewer(fa.url, a), await viewer(fb.url, b)
    for _ in range(3):
        await like(fb.url, b)
        await like(fa.url, a)
    got_a, got_b = await va.events(3), await vb.events(3)
    assert {json.loads(e.data)["video"] for e in got_a} == {a}
    assert {json.loads(e.data)["video"] for e in got_b} == {b}
    assert await va.no_event(0.3) is None and await vb.no_event(0.3) is None


async def test_two_dispatchers_share_videos_and_deliver_exactly_once(mesh2):
    (d1, d2), (fa, fb) = mesh2
    videos = [f"vid-{i}" for i in range(12)]
    owners = {v: owner(v, ["d1", "d2"]) for v in videos}
    assert set(owners.values()) == {"d1", "d2"}  # the hash spreads these 12 over both
    viewers = {v: await viewer(fb.url, v) for v in videos}
    sent = {v: [(await like(fa.url, v))["id"] for _ in range(3)] for v in videos}
    epochs = {"d1": (await health(d1.url))["epoch"], "d2": (await health(d2.url))["epoch"]}
    for v in videos:
        got = await viewers[v].events(3)
        assert [json.loads(e.data)["id"] for e in got] == sent[v]
        assert {int(e.id.split(":")[0]) for e in got} == {epochs[owners[v]]}, "sequenced by its owner"
        assert await viewers[v].no_event(0.1) is None
    s1, s2 = (await health(d1.url))["stats"], (await health(d2.url))["stats"]
    assert s1["events_in"] + s2["events_in"] == 36
    assert s1["events_in"] == 3 * list(owners.values()).count("d1")


async def test_viewer_that_opened_gets_the_very_next_event(mesh2):
    """The ZeroMQ slow joiner must not cost a fresh viewer its first events."""
    _, (fa, fb) = mesh2
    for i in range(15):
        video = f"fresh-{i}"
        v = await viewer(fb.url, video)      # first viewer of the video on fb
        sent = await like(fa.url, video)     # published right after the stream opened
        got = await v.events(1, timeout=5)
        assert json.loads(got[0].data)["id"] == sent["id"]
        v.close()


async def test_disconnect_unsubscribes_and_clears_the_kv(mesh2, kv_path):
    _, (fa, _) = mesh2
    kv = EmbeddedKV(kv_path)
    try:
        v1, v2 = await viewer(fa.url, "leave"), await viewer(fa.url, "leave")
        await wait_until(lambda: _count(kv, "leave", "f1", 2), what="KV count 2")
        assert (await health(fa.url))["connections"] == 2
        v1.close()
        # removed promptly on close, not at the next write: nothing is published meanwhile
        await wait_until(lambda: _connections(fa.url, 1), timeout=3, what="1 connection")
        await wait_until(lambda: _count(kv, "leave", "f1", 1), what="KV count 1")
        v2.close()
        await wait_until(lambda: _connections(fa.url, 0), timeout=3, what="0 connections")
        await wait_until(lambda: _no_video(kv, "leave"), timeout=3, what="KV entry deleted")
        h = await health(fa.url)
        assert h["videos"] == 0
        # unsubscribed: a like for the video no longer reaches this frontend's SUB socket
        before = h["stats"].get("events_in", 0)
        await like(fa.url, "leave")
        v3 = await viewer(fa.url, "other")
        await like(fa.url, "other")
        await v3.events(1)
        assert (await health(fa.url))["stats"]["events_in"] == before + 1
    finally:
        await kv.close()


async def _count(kv, video, frontend, n):
    return (await kv.read_counts(video)).get(video, {}).get(frontend) == n


async def _no_video(kv, video):
    return video not in await kv.read_counts()


async def _connections(url, n):
    return (await health(url))["connections"] == n


BAD_INPUTS = [
    ("GET", "/v1/videos/a%20b/events", None, 400, "invalid_video"),
    ("GET", "/v1/videos/" + "x" * 65 + "/events", None, 400, "invalid_video"),
    ("POST", "/v1/videos/-bad/likes", None, 400, "invalid_video"),
    ("GET", "/v1/nothing/here", None, 404, "not_found"),
    ("DELETE", "/v1/videos/ok/likes", None, 405, "method_not_allowed"),
    ("GET", "/v1/videos/ok/likes", None, 405, "method_not_allowed"),
    ("POST", "/v1/videos/ok/events", None, 405, "method_not_allowed"),
    ("POST", "/v1/videos/ok/likes", b"{not json", 400, "invalid_json"),
    ("POST", "/v1/videos/ok/likes", b"[1,2]", 400, "invalid_body"),
    ("POST", "/v1/videos/ok/likes", b"[" * 100000 + b"]" * 100000, 413, "body_too_large"),
    ("POST", "/v1/videos/ok/likes", b'{"a":' * 2000 + b"1" + b"}" * 2000, 400, "invalid_json"),
    ("POST", "/v1/videos/ok/likes", b'{"user": "\xff\xfe"}', 400, "invalid_encoding"),
    ("POST", "/v1/videos/ok/likes", b'{"user": 5}', 400, "invalid_user"),
    ("POST", "/v1/videos/ok/likes", b'{"user": "a\\u0000b"}', 400, "invalid_user"),
    ("POST", "/v1/videos/ok/comments", b"", 400, "missing_body"),
    ("POST", "/v1/videos/ok/comments", b'{"user": "u"}', 400, "missing_text"),
    ("POST", "/v1/videos/ok/comments", b'{"text": "   \\n "}', 400, "empty_comment"),
    ("POST", "/v1/videos/ok/comments", json.dumps({"text": "x" * 2001}).encode(), 400, "comment_too_long"),
]


async def test_bad_input_gets_json_errors_and_the_node_keeps_serving(mesh2):
    _, (fa, fb) = mesh2
    v = await viewer(fb.url, "ok")
    for method, path, raw, status, code in BAD_INPUTS:
        got_status, body = await http(method, fa.url + path, raw=raw)
        assert (got_status, body["error"]["code"]) == (status, code), (method, path)
        assert body["error"]["message"] and body["error"]["retryable"] is False
    sent = await like(fa.url, "ok")
    assert json.loads((await v.events(1))[0].data)["id"] == sent["id"]
    # a body larger than Tornado reads at all: refused, the node still serves
    try:
        status, _ = await http("POST", fa.url + "/v1/videos/ok/likes", raw=b"x" * (2 * 1024 * 1024))
    except OSError:  # the server may close before the client finished sending: fine
        status = "closed"
    assert status in (400, 413, "closed")
    assert (await health(fa.url))["status"] == "ok"


async def test_publish_without_dispatcher_is_503(topology):
    f = topology.frontend("lonely", **{"frontend.publish_timeout": "0.5"})
    status, body = await http("POST", f.url + "/v1/videos/v/likes")
    assert status == 503 and body["error"]["code"] == "no_dispatcher" and body["error"]["retryable"]
    assert (await health(f.url))["status"] == "degraded"


async def test_malformed_zmq_frames_are_counted_and_dropped(mesh2, kv_path):
    (d1, _), (fa, fb) = mesh2
    ctx = zmq.asyncio.Context()
    kv = EmbeddedKV(kv_path, ttl=5)
    try:
        # garbage to a dispatcher's ROUTER: dropped, counted; it keeps acknowledging
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(d1.info["router"])
        for frames in ([b"garbage"], [b"LM\x09", b"PUB", b"r", b"x"], [P.MAGIC_V1, b"PUB", b"r", b"\xc1"]):
            await dealer.send_multipart(frames)
        await dealer.send_multipart(P.Control(P.MSG_PUBLISH, b"r1", {"events": [{"id": 1}]}).to_frames())
        reply = P.Control.from_frames(await asyncio.wait_for(dealer.recv_multipart(), 5))
        assert reply.msg_type == P.MSG_ERROR and reply.request_id == b"r1"
        await wait_until(lambda: _stat(d1.url, "malformed", 4), what="4 malformed counted")
        log = open(d1.log_path).read()
        assert "dropped malformed control message" in log and "expected 4" in log
        assert "unsupported protocol version" in log and "undecodable msgpack" in log
        assert "rejected PUB" in log
        # a rogue "dispatcher" whose XPUB sends garbage to subscribers: the frontend drops it
        rogue = ctx.socket(zmq.XPUB)
        rogue.setsockopt(zmq.LINGER, 0)
        port = rogue.bind_to_random_port("tcp://127.0.0.1")
        rogue_router = ctx.socket(zmq.ROUTER)
        rogue_router.setsockopt(zmq.LINGER, 0)
        rport = rogue_router.bind_to_random_port("tcp://127.0.0.1")
        await kv.register(NodeInfo("zz-rogue", ROLE_DISPATCHER, router=f"tcp://127.0.0.1:{rport}",
                                   pub=f"tcp://127.0.0.1:{port}"))
        await wait_until(lambda: _has_dispatcher(fb.url, "zz-rogue"), what="frontend sees rogue")
        v = await viewer(fb.url, "victim") if owner("victim", ["d1", "d2", "zz-rogue"]) != "zz-rogue" else None
        sub = await asyncio.wait_for(rogue.recv(), 5)
        assert sub[0] == 1
        for frames in ([sub[1:], b"\xc1junk"], [sub[1:]], [b"v/victim\x00", P.pack({"v": 1, "k": "E", "from": "x",
                                                                                  "events": [{"bad": 1}]})]):
            await rogue.send_multipart(frames)
        await wait_until(lambda: _stat(fb.url, "malformed", 3), what="frontend counted 3 malformed")
        assert open(fb.log_path).read().count("dropped malformed fan-out message") >= 3
        await kv.deregister()
        await wait_until(lambda: _has_dispatcher(fb.url, "zz-rogue", present=False), what="rogue gone")
        if v is not None:
            sent = await like(fa.url, "victim")
            assert json.loads((await v.events(1))[0].data)["id"] == sent["id"]
    finally:
        await kv.close()
        ctx.destroy(linger=0)  # closes every socket of the test, even after a failure


async def _stat(url, key, n):
    return (await health(url))["stats"].get(key, 0) >= n


async def _has_dispatcher(url, name, present=True):
    return (name in (await health(url))["dispatchers"]) == present


async def test_meshctl_subs_and_nodes(mesh2, kv_path):
    _, (fa, fb) = mesh2
    vs = [await viewer(fa.url, "show"), await viewer(fa.url, "show"), await viewer(fb.url, "show"),
          await viewer(fb.url, "other")]
    kv = EmbeddedKV(kv_path)

    async def settled():
        c = await kv.read_counts()
        return c.get("show") == {"f1": 2, "f2": 1} and c.get("other") == {"f2": 1}
    try:
        await wait_until(settled, what="counts written")
    finally:
        await kv.close()
    cli = [sys.executable, "-m", "mesh.tools.meshctl", "--kv-path", kv_path]
    out = subprocess.run(cli + ["subs", "--json"], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert data["videos"]["show"] == {"frontends": {"f1": 2, "f2": 1}, "total": 3}
    assert data["total"] == 4
    one = json.loads(subprocess.run(cli + ["subs", "show", "--json"], capture_output=True, text=True,
                                    check=True).stdout)
    assert list(one["videos"]) == ["show"]
    table = subprocess.run(cli + ["subs"], capture_output=True, text=True, check=True).stdout
    assert "show" in table and "(total)" in table and "total viewers: 4" in table
    nodes = json.loads(subprocess.run(cli + ["nodes", "--json"], capture_output=True, text=True,
                                      check=True).stdout)
    assert {(n["role"], n["name"]) for n in nodes} == {("dispatcher", "d1"), ("dispatcher", "d2"),
                                                        ("frontend", "f1"), ("frontend", "f2")}
    for v in vs:
        v.close()


def test_mesh_up_prints_nodes_then_ready_and_stops_everything(tmp_path):
    import os
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "bin/mesh-up", "--dispatchers", "2", "--frontends", "3",
                             "--base-port", "0", "--kv-path", str(tmp_path / "kv.db"),
                             "--log-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        lines = read_lines_until(proc, "ready")
        roles = [ln.split()[0] for ln in lines[:-1]]
        assert roles.count("dispatcher") == 2 and roles.count("frontend") == 3
        front = [ln.split()[2] for ln in lines if ln.startswith("frontend ")]
        assert all(u.startswith("http://127.0.0.1:") for u in front)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        for pid in children:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_dispatcher_joining_and_dying_rebalances_videos(topology):
    d1 = topology.dispatcher("d1")
    fast = {"frontend.publish_timeout": "8", "frontend.attempt_timeout": "0.5"}
    fa, fb = topology.frontend("f1", **fast), topology.frontend("f2", **fast)
    videos = [f"rb-{i}" for i in range(10)]
    assert {owner(v, ["d1", "d2"]) for v in videos} == {"d1", "d2"}
    viewers = {v: await viewer(fb.url, v) for v in videos}
    d2 = topology.dispatcher("d2")
    for f in (fa, fb):
        await wait_until(lambda: _dispatchers_are(f.url, ["d1", "d2"]), what="d2 discovered")
    epochs = {"d1": (await health(d1.url))["epoch"], "d2": (await health(d2.url))["epoch"]}
    for v in videos:
        sent = await like(fa.url, v)
        got = (await viewers[v].events(1))[0]
        assert json.loads(got.data)["id"] == sent["id"]
        assert int(got.id.split(":")[0]) == epochs[owner(v, ["d1", "d2"])]
    d2.kill()  # SIGKILL: its videos move to d1 once its registration expires
    for v in videos:
        sent = await like(fa.url, v)
        got = (await viewers[v].events(1, timeout=15))[0]
        assert json.loads(got.data)["id"] == sent["id"]
        assert int(got.id.split(":")[0]) == epochs["d1"]
    assert (await health(fa.url))["dispatchers"] == ["d1"]


async def _dispatchers_are(url, names):
    return (await health(url))["dispatchers"] == names


async def test_killed_frontend_counts_vanish_within_the_liveness_bound(topology, kv_path):
    topology.dispatcher("d1")
    fa, fb = topology.frontend("f1"), topology.frontend("f2")
    vs = [await viewer(fa.url, "k"), await viewer(fa.url, "k"), await viewer(fb.url, "k")]
    kv = EmbeddedKV(kv_path)
    try:
        await wait_until(lambda: _count(kv, "k", "f1", 2), what="f1 counted")
        await wait_until(lambda: _count(kv, "k", "f2", 1), what="f2 counted")
        fa.kill()
        t0 = asyncio.get_running_loop().time()
        await wait_until(lambda: _gone(kv, "k", "f1"), timeout=2.0 + 1.0, what="f1's count gone")
        assert asyncio.get_running_loop().time() - t0 <= 3.0
        assert (await kv.read_counts("k")) == {"k": {"f2": 1}}
        assert "f1" not in [n.name for n in await kv.nodes()]
    finally:
        await kv.close()
        for v in vs:
            v.close()


async def _gone(kv, video, frontend):
    return frontend not in (await kv.read_counts(video)).get(video, {})


async def test_publish_batch_of_several_videos_with_a_bad_event(mesh2):
    """One PUB request with events of several videos, one of them malformed: the bad one gets
    its own error result, the others are acknowledged in order and delivered.  The burst
    travels as one REPL to the backup and one fan-out message per video; the event of a video
    the other dispatcher owns is forwarded there."""
    (d1, d2), (fa, _) = mesh2
    names = ["d1", "d2"]
    mine = [v for v in (f"batch-{i}" for i in range(200)) if owner(v, names) == "d1"][:2]
    theirs = next(v for v in (f"batch-{i}" for i in range(200)) if owner(v, names) == "d2")
    a, b = mine
    viewers = {v: await viewer(fa.url, v) for v in (a, b, theirs)}
    for v in (a, b, theirs):  # every chain exists now: the batch takes the fast path
        await like(fa.url, v)
        await viewers[v].events(1)
    before = (await health(d1.url))["stats"]
    events = [P.make_event(a, "like", "u1", None), P.make_event(a, "like", "u2", None),
              P.make_event(b, "comment", "u3", "hi"), {**P.make_event(a, "like", None, None), "video": "bad video!"},
              P.make_event(theirs, "like", "u4", None), P.make_event(a, "like", "u5", None)]
    ctx = zmq.asyncio.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(d1.info["router"])
        body = P.publish_body(list(map(P.event_row, events)))
        await dealer.send_multipart(P.Control(P.MSG_PUBLISH, b"mixed", body).to_frames())
        reply = P.Control.from_frames(await asyncio.wait_for(dealer.recv_multipart(), 5))
        # the same events again: each one a retry now, answered with its first placement
        body = P.publish_body(list(map(P.event_row, events)))
        await dealer.send_multipart(P.Control(P.MSG_PUBLISH, b"again", body).to_frames())
        again = P.Control.from_frames(await asyncio.wait_for(dealer.recv_multipart(), 5))
    finally:
        ctx.destroy(linger=0)
    assert reply.msg_type == P.MSG_ACK and reply.request_id == b"mixed"
    results = P.ack_positions(reply, len(events))
    d1_epoch = (await health(d1.url))["epoch"]
    assert reply.body["epoch"] == again.body["epoch"] == d1_epoch and type(again.body["seqs"][0]) is int
    assert results[4][0] != d1_epoch  # theirs: placed by d2, in its epoch
    assert P.ack_positions(again, len(events)) == results
    assert results[3]["code"] == "malformed"
    assert all(type(r) is tuple for i, r in enumerate(results) if i != 3)
    seqs = [results[i][1] for i in (0, 1, 5)]
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]  # the batch's order is the chain's order
    for v, idx in ((a, (0, 1, 5)), (b, (2,)), (theirs, (4,))):
        got = [json.loads(e.data) for e in await viewers[v].events(len(idx))]
        assert [g["id"] for g in got] == [events[i]["id"] for i in idx]
        assert [g["seq"] for g in got] == [results[i][1] for i in idx]
    after = (await health(d1.url))["stats"]
    assert after["replication_msgs"] - before["replication_msgs"] == 1  # a and b: one REPL to d2
    assert after["replicated"] - before["replicated"] == 4
    assert after["fanout_msgs"] - before["fanout_msgs"] == 2  # one message for a, one for b; retries none
    assert after["forwarded"] - before.get("forwarded", 0) == 2  # theirs, once per request
    assert after["events_rejected"] - before.get("events_rejected", 0) == 2
    assert "rejected 1 of 6 events" in open(d1.log_path).read()
    for v in viewers.values():
        v.close()

