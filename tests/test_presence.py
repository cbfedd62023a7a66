"""Presence: unit tests of the sans-IO core, then multi-process tests on a live mesh."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from mesh.core.presence import LocalPresence, PresenceBoard

from helpers import Collector, health, http, wait_until, within


# --- sans-IO ----------------------------------------------------------------------------------

def test_local_presence_deltas_tabs_and_snapshots():
    lp = LocalPresence()
    lp.add("v", "ann")
    lp.add("v", "ann")          # a second tab: no second join
    lp.add("v", None)
    assert lp.take() == {"v": {"video": "v", "anon": 1, "joined": ["ann"], "left": []}}
    lp.remove("v", "ann")
    assert lp.take()["v"]["left"] == []          # one tab still open
    lp.remove("v", "ann")
    lp.add("v", "ann")          # closed and reopened before the update went out: nothing
    assert lp.take()["v"] == {"video": "v", "anon": 1, "joined": [], "left": []}
    assert lp.snapshot() == {"v": {"video": "v", "anon": 1, "users": ["ann"], "full": True}}
    lp.remove("v", "ann")
    lp.remove("v", None)
    assert lp.take()["v"]["left"] == ["ann"] and lp.snapshot() == {}


def upd(video="v", anon=0, joined=(), left=()):
    return {"video": video, "anon": anon, "joined": list(joined), "left": list(left)}


def test_board_counts_union_and_debounces_leave():
    b = PresenceBoard(grace=5.0, expiry=100.0, count_interval=1.0, broadcast_max=100)
    assert b.update("f1", upd(anon=2, joined=["ann"]), now=0.0) == [{"kind": "join", "user": "ann"}]
    assert b.update("f2", upd(joined=["ann", "bob"]), now=0.0) == [{"kind": "join", "user": "bob"}]
    assert b.count("v") == 4                     # ann once + bob + 2 anonymous
    assert b.tick(0.1) == {"v": [{"kind": "count", "count": 4}]}
    assert b.tick(0.2) == {}                     # unchanged: no count
    b.update("f1", upd(anon=2, left=["ann"]), now=0.3)
    b.update("f2", upd(left=["ann"]), now=0.3)   # ann gone everywhere: leaving
    b.update("f2", upd(joined=["ann"]), now=2.0)  # reload within grace: no join, no leave
    assert b.tick(9.0) == {}                     # count back at 4 (was 3 only between ticks)
    b.update("f2", upd(left=["ann"]), now=9.1)
    assert b.tick(9.2) == {"v": [{"kind": "count", "count": 3}]}
    assert b.tick(14.0) == {}
    assert b.tick(14.2) == {"v": [{"kind": "leave", "user": "ann"}]}  # exactly one, after grace


def test_board_sends_the_count_to_a_frontend_that_starts_watching():
    b = PresenceBoard(grace=5.0, expiry=100.0, count_interval=1.0, broadcast_max=100)
    b.update("f1", upd(anon=1, joined=["amy"]), now=0.0)
    assert b.tick(0.0) == {"v": [{"kind": "count", "count": 2}]}
    assert b.tick(1.5) == {}
    b.update("f2", upd(joined=["amy"]), now=2.0)           # amy's second tab on f2: still 2
    assert b.tick(2.0) == {"v": [{"kind": "count", "count": 2}]}
    b.update("f2", upd(), now=2.5)                          # f2 changes nothing more: no count
    assert b.tick(3.5) == {}
    b.update("f2", upd(left=["amy"]), now=4.0)
    b.update("f2", upd(joined=["amy"]), now=4.1)           # f2 empty, then watching again
    assert b.tick(4.1) == {"v": [{"kind": "count", "count": 2}]}


def test_board_expires_dead_frontends_and_limits_counts():
    b = PresenceBoard(grace=5.0, expiry=3.0, count_interval=1.0, broadcast_max=100)
    b.update("f1", upd(anon=1, joined=["ann"]), now=0.0)
    b.update("f2", {"video": "v", "anon": 0, "users": ["bob"], "full": True}, now=0.0)
    assert b.tick(0.0) == {"v": [{"kind": "count", "count": 3}]}
    b.update("f2", {"video": "v", "anon": 0, "users": ["bob"], "full": True}, now=2.5)
    out = b.tick(3.5)                            # f1 silent past expiry: it died
    assert out == {"v": [{"kind": "leave", "user": "ann"}, {"kind": "count", "count": 1}]}
    b.update("f2", {"video": "v", "anon": 5, "users": ["bob", "cy"], "full": True}, now=3.6)
    assert b.tick(3.7) == {}                     # count interval not yet over
    assert b.tick(4.6) == {"v": [{"kind": "count", "count": 7}]}
    assert b.page("v", 1, 10) == {"video": "v", "count": 7, "users": ["cy"], "total_users": 2, "offset": 1}


def test_board_above_threshold_counts_but_no_joins():
    b = PresenceBoard(grace=0.0, expiry=10.0, count_interval=0.0, broadcast_max=3)
    b.update("f1", upd(anon=3), now=0.0)
    assert b.update("f1", upd(anon=3, joined=["ann"]), now=0.1) == []  # 4 viewers > 3
    b.update("f1", upd(anon=3, left=["ann"]), now=0.2)
    assert b.tick(0.3) == {"v": [{"kind": "count", "count": 3}]}  # no leave either, only the count


# --- live mesh --------------------------------------------------------------------------------

FAST = {"presence.flush": "0.05", "presence.refresh": "0.5", "presence.expiry": "1.5",
        "presence.grace": "1.0", "presence.count_interval": "0.2"}


def _counts(c: Collector) -> list[int]:
    return [json.loads(e.data)["count"] for e in c.of_kind("count")]


def _users(c: Collector, kind: str) -> list[str]:
    return [json.loads(e.data)["user"] for e in c.of_kind(kind)]


@pytest.fixture
def presence_mesh(topology):
    topology.extra.update(FAST)
    topology.dispatcher("d1")
    topology.dispatcher("d2")
    return topology.frontend("f1"), topology.frontend("f2")


async def _open(url, path):
    from mesh.tools.sse_client import SSEClient
    return await SSEClient(f"{url}/v1/videos/{path}").connect()


@pytest.mark.topology
async def test_counts_add_up_across_frontends_and_tabs_count_once(presence_mesh):
    fa, fb = presence_mesh
    watcher = Collector(await _open(fa.url, "pv/events"))
    others = [Collector(await _open(fa.url, "pv/events?user=ann")),
              Collector(await _open(fb.url, "pv/events?user=ann")),   # ann's second tab, elsewhere
              Collector(await _open(fb.url, "pv/events?user=bob")),
              Collector(await _open(fb.url, "pv/events"))]
    # watcher + anon + ann (once) + bob = 4
    await wait_until(lambda: _counts(watcher)[-1:] == [4], what="count 4 at a viewer of f1")
    await wait_until(lambda: _counts(others[2])[-1:] == [4], what="count 4 at a viewer of f2")
    assert sorted(set(_users(watcher, "join"))) == ["ann", "bob"] and _users(watcher, "join").count("ann") == 1
    status, page = await http("GET", f"{fb.url}/v1/videos/pv/presence?limit=1")
    assert status == 200 and page["count"] == 4 and page["users"] == ["ann"] and page["total_users"] == 2
    status, page2 = await http("GET", f"{fa.url}/v1/videos/pv/presence?offset=1&limit=1")
    assert page2["users"] == ["bob"]
    await others[3].close()
    await wait_until(lambda: _counts(watcher)[-1:] == [3], what="count drops to 3")
    for c in [watcher, *others[:3]]:
        await c.close()


@pytest.mark.topology
async def test_a_stream_whose_arrival_changes_no_count_still_gets_the_count(presence_mesh):
    fa, fb = presence_mesh
    others = [Collector(await _open(fa.url, "nc/events")) for _ in range(2)]
    amy_a = Collector(await _open(fa.url, "nc/events?user=amy"))
    await wait_until(lambda: _counts(amy_a)[-1:] == [3], what="count 3 at amy's stream on f1")
    # amy opens on the other frontend (a second tab, or a reload within grace): the count stays 3
    amy_b = Collector(await _open(fb.url, "nc/events?user=amy"))
    await wait_until(lambda: _counts(amy_b), timeout=3.0, what="a count at amy's stream on f2")
    assert _counts(amy_b)[-1] == _counts(amy_a)[-1] == 3
    # and a second tab on the same frontend gets it from that frontend at once
    tab = Collector(await _open(fa.url, "nc/events?user=amy"))
    await wait_until(lambda: _counts(tab), timeout=1.0, what="a count at amy's second tab on f1")
    assert _counts(tab) == [3]
    for c in [*others, amy_a, amy_b, tab]:
        await c.close()


@pytest.mark.topology
async def test_reload_within_grace_is_silent_and_a_real_leave_is_announced_once(presence_mesh):
    fa, fb = presence_mesh
    watcher = Collector(await _open(fa.url, "rl/events"))
    ann = Collector(await _open(fb.url, "rl/events?user=ann"))
    bob = Collector(await _open(fb.url, "rl/events?user=bob"))
    await wait_until(lambda: _users(watcher, "join") == ["ann", "bob"], what="ann and bob joined")
    await ann.close()
    ann = Collector(await _open(fa.url, "rl/events?user=ann"))   # reload, onto the other frontend
    # the marker: bob leaves for real after ann's reload, so his leave falls due after any leave
    # of ann's would have (the owner announces leaves in the order they fell due)
    await bob.close()
    await wait_until(lambda: _users(watcher, "leave") == ["bob"], what="bob's leave after grace")
    assert _users(watcher, "leave") == ["bob"] and _users(watcher, "join") == ["ann", "bob"]
    await wait_until(lambda: _counts(watcher)[-1:] == [2], what="count 2: the watcher and ann")
    await ann.close()
    await wait_until(lambda: _users(watcher, "leave") == ["bob", "ann"], what="ann's one leave after grace")
    await wait_until(lambda: _counts(watcher)[-1:] == [1], what="count 1")
    assert _users(watcher, "leave") == ["bob", "ann"]
    await watcher.close()


@pytest.mark.topology
async def test_killed_frontend_viewers_leave_within_the_bound(presence_mesh):
    fa, fb = presence_mesh
    watcher = Collector(await _open(fa.url, "kf/events"))
    doomed = [Collector(await _open(fb.url, f"kf/events?user=u{i}")) for i in range(3)]
    await wait_until(lambda: _counts(watcher)[-1:] == [4], what="count 4")
    fb.kill()
    t0 = time.monotonic()
    await wait_until(lambda: _counts(watcher)[-1:] == [1], timeout=10, what="count back to 1")
    # docs/API.md: counts are right within presence.expiry + presence.count_interval of a crash
    within(time.monotonic() - t0, float(FAST["presence.expiry"]) + float(FAST["presence.count_interval"]),
           "the count after a frontend's SIGKILL")
    assert sorted(_users(watcher, "leave")) == ["u0", "u1", "u2"]
    for c in [watcher, *doomed]:
        await c.close()


@pytest.mark.topology
async def test_above_threshold_joins_are_not_broadcast_but_counts_are(topology):
    topology.extra.update({**FAST, "presence.broadcast_max": "3"})
    topology.dispatcher("d1")
    f = topology.frontend("f1")
    watcher = Collector(await _open(f.url, "big/events"))
    crowd = [Collector(await _open(f.url, "big/events")) for _ in range(3)]
    await wait_until(lambda: _counts(watcher)[-1:] == [4], what="count 4")
    late = Collector(await _open(f.url, "big/events?user=zed"))
    await wait_until(lambda: _counts(watcher)[-1:] == [5], what="count 5")
    status, page = await http("GET", f"{f.url}/v1/videos/big/presence")
    assert page["users"] == ["zed"]              # still in presence, just not broadcast
    assert _users(watcher, "join") == []
    for c in [watcher, late, *crowd]:
        await c.close()


@pytest.mark.topology
async def test_presence_bad_input(presence_mesh):
    fa, _ = presence_mesh
    for path, code in [("/v1/videos/a%20b/presence", "invalid_video"),
                       ("/v1/videos/ok/presence?limit=0", "invalid_paging"),
                       ("/v1/videos/ok/presence?offset=x", "invalid_paging"),
                       ("/v1/videos/ok/events?user=" + "x" * 65, "invalid_user")]:
        status, body = await http("GET", fa.url + path)
        assert status == 400 and body["error"]["code"] == code, path
    assert (await health(fa.url))["status"] == "ok"


@pytest.mark.topology
async def test_meshctl_presence(presence_mesh, kv_path):
    import subprocess
    import sys
    fa, fb = presence_mesh
    vs = [Collector(await _open(fa.url, "mp/events?user=ann")), Collector(await _open(fb.url, "mp/events?user=bob")),
          Collector(await _open(fb.url, "mp/events"))]
    await wait_until(lambda: _counts(vs[0])[-1:] == [3], what="count 3")
    cli = [sys.executable, "-m", "mesh.tools.meshctl", "--kv-path", kv_path, "presence", "mp"]
    out = json.loads(subprocess.run(cli + ["--json", "--limit", "1"], capture_output=True, text=True,
                                    check=True).stdout)
    assert out == {"video": "mp", "count": 3, "users": ["ann", "bob"]}   # two pages of one
    text = subprocess.run(cli + ["--frontend", fb.url], capture_output=True, text=True, check=True).stdout
    assert "mp: 3 watching, 2 identified" in text and "  bob" in text
    for c in vs:
        await c.close()


@pytest.mark.topology
async def test_counts_are_paced_by_the_frontends_count_budget_and_the_latest_arrives(topology):
    """``presence.count_writes_max = 2`` on a frontend with 3-4 viewers: a video's count may go
    out every 1.5-2 s.  While viewers come and go every 0.3 s the owner sends a new count every
    0.2-0.3 s; the viewers get them at most that often, and the last one is never lost."""
    topology.extra.update(FAST)
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"presence.count_writes_max": "2"})
    watcher = Collector(await _open(f.url, "paced/events"))
    crowd = [Collector(await _open(f.url, "paced/events")) for _ in range(3)]
    await wait_until(lambda: _counts(watcher)[-1:] == [4], timeout=10, what="count 4")
    before = len(watcher.of_kind("count"))
    for _ in range(4):  # churn: 3, 4, 3, 4, ... viewers
        await crowd.pop(0).close()
        await asyncio.sleep(0.3)  # sleep-ok: pacing the churn, not waiting for readiness
        crowd.append(Collector(await _open(f.url, "paced/events")))
        await asyncio.sleep(0.3)  # sleep-ok: pacing the churn
    await crowd.pop(0).close()     # ends at 3
    await wait_until(lambda: _counts(watcher)[-1:] == [3], timeout=10, what="the latest count, 3")
    churn = watcher.of_kind("count")[before:]
    gaps = [b.received - a.received for a, b in zip(churn, churn[1:])]
    assert all(g >= 1500 * 0.9 for g in gaps), gaps   # >= 3 viewers / 2 writes per s (10 % clock margin)
    assert len(churn) <= 4, [json.loads(e.data)["count"] for e in churn]   # ~2.6 s of churn, ~16 changes
    assert (await health(f.url))["stats"]["counts_replaced"] >= 1
    for c in [watcher, *crowd]:
        await c.close()
