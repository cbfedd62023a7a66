"""Presence across datacenters and history through bridges: unit tests of the sans-IO core
(``mesh.core.presence`` export/update_dc, ``mesh.core.bridging`` Gate and relay checks, the protocol's
new shapes).  Two boards are paired by a fake bridge, as h11's ``ConnectionPair`` pairs two
connections.  No sockets."""

from __future__ import annotations

import pytest

from mesh.wire import protocol as P
from mesh.core.bridging import EXPORT, IMPORT, Gate, Relay, relayed_history
from mesh.errors import RemoteProtocolError
from mesh.core.presence import PresenceBoard


def upd(video="v", anon=0, joined=(), left=()):
    return {"video": video, "anon": anon, "joined": list(joined), "left": list(left)}


class DCPair:
    """Two DCs' owner boards of the same videos, joined by a fake bridge that carries each
    summary through the real wire format and the gates (and can lose them)."""

    def __init__(self, **kw):
        kw = {"grace": 2.0, "expiry": 100.0, "count_interval": 0.0, "broadcast_max": 100,
              "dc_flush": 0.25, "dc_refresh": 5.0, "dc_expiry": 15.0, **kw}
        self.boards = {"dc1": PresenceBoard(dc="dc1", **kw), "dc2": PresenceBoard(dc="dc2", **kw)}
        self.gates = {dc: Gate(dc) for dc in self.boards}
        self.lose = 0
        self.carried = 0

    def step(self, now: float) -> dict[str, dict[str, list[dict]]]:
        """Export from both sides, carry, merge, tick: presence events per DC and video."""
        out: dict[str, dict[str, list[dict]]] = {dc: {} for dc in self.boards}
        for src, dst in (("dc1", "dc2"), ("dc2", "dc1")):
            for video, summary in self.boards[src].export(now).items():
                frames = P.FanoutMessage(video, P.FANOUT_DC_PRESENCE, f"{src}-d1",
                                  summary={**summary, "from": f"{src}-d1"}).to_frames()
                frames = self.gates[src].passes(EXPORT, frames)
                relay = self.gates[dst].passes(IMPORT, frames)
                assert isinstance(relay, Relay)
                if self.lose:
                    self.lose -= 1
                    continue
                self.carried += 1
                events = self.boards[dst].update_dc(relay.video, relay.summary, now)
                if events:
                    out[dst].setdefault(video, []).extend(events)
        for dc, board in self.boards.items():
            for video, events in board.tick(now).items():
                out[dc].setdefault(video, []).extend(events)
        return out


def test_global_count_users_union_and_join_leave_across_dcs():
    pair = DCPair()
    b1, b2 = pair.boards["dc1"], pair.boards["dc2"]
    b1.update("f1", upd(anon=2, joined=["ann"]), now=0.0)
    b2.update("g1", upd(anon=1, joined=["bob", "ann"]), now=0.0)   # ann in both DCs at once
    out = pair.step(0.0)
    assert {"kind": "join", "user": "bob"} in out["dc1"]["v"]       # dc2's user joins at dc1
    assert {"kind": "join", "user": "ann"} not in out["dc1"]["v"]   # already announced locally
    # ann counts once, like two tabs: ann + bob + 3 anonymous
    assert b1.count("v") == b2.count("v") == 5
    assert b1.users("v") == b2.users("v") == ["ann", "bob"]
    assert b1.dcs("v") == {"dc1": 3, "dc2": 3}
    # bob leaves dc2: one leave at dc1, after dc1's grace, and the count follows
    b2.update("g1", upd(anon=1, left=["bob"]), now=1.0)
    assert pair.step(1.0)["dc1"]["v"] == [{"kind": "count", "count": 4}]
    assert "v" not in pair.step(2.5)["dc1"]
    assert pair.step(3.1)["dc1"]["v"] == [{"kind": "leave", "user": "bob"}]
    assert pair.step(3.5)["dc1"] == {}


def test_reload_in_another_dc_within_grace_is_silent():
    pair = DCPair()
    b1, b2 = pair.boards["dc1"], pair.boards["dc2"]
    b1.update("f1", upd(anon=1), now=0.0)
    b2.update("g1", upd(joined=["cy"]), now=0.0)
    assert {"kind": "join", "user": "cy"} in pair.step(0.0)["dc1"]["v"]
    b2.update("g1", upd(left=["cy"]), now=1.0)
    pair.step(1.0)
    b1.update("f1", upd(anon=1, joined=["cy"]), now=1.5)           # back, in dc1 this time
    for t in (1.5, 2.0, 3.5, 4.0):
        assert not [e for e in pair.step(t)["dc1"].get("v", []) if e["kind"] != "count"]
    assert b1.count("v") == 2


def test_lost_delta_waits_for_the_next_full_summary_but_the_count_is_current():
    pair = DCPair()
    b1, b2 = pair.boards["dc1"], pair.boards["dc2"]
    b1.update("f1", upd(anon=1), now=0.0)
    b2.update("g1", upd(joined=["ann"]), now=0.0)
    pair.step(0.0)
    b2.update("g1", upd(joined=["bob"]), now=0.5)
    pair.lose = 1                                   # dc2's delta +bob is lost
    pair.step(0.5)
    b2.update("g1", upd(anon=3), now=1.0)
    pair.step(1.0)                                  # next delta does not follow: not applied...
    assert b1.stale_deltas == 1
    assert b1.count("v") == 1 + 5 and b1.users("v") == ["ann"]   # ...but its count is
    pair.step(5.0)                                  # the periodic full summary heals the users
    assert b1.users("v") == ["ann", "bob"] and b1.count("v") == 6


def test_export_is_quiet_when_nothing_changes_and_a_vanished_dc_expires():
    pair = DCPair(dc_refresh=2.0, dc_expiry=3.0)
    b1, b2 = pair.boards["dc1"], pair.boards["dc2"]
    b1.update("f1", upd(anon=1), now=0.0)
    b2.update("g1", upd(anon=4), now=0.0)
    pair.step(0.0)
    carried = pair.carried
    for t in (0.3, 0.6, 1.0, 1.9):
        pair.step(t)
    assert pair.carried == carried                  # no change, no refresh due: nothing sent
    pair.step(2.0)
    assert pair.carried == carried + 2              # one full refresh each way
    assert b2.export(2.1) == {}
    # dc2's bridge dies: dc1 keeps its summary until dc_expiry, then drops it
    assert b1.count("v") == 5
    b1.update("f1", upd(anon=1), now=4.0)
    assert b1.tick(4.9) == {} and b1.count("v") == 5
    assert b1.tick(5.1) == {"v": [{"kind": "count", "count": 1}]}


def test_export_full_on_new_subscriber_caps_users_and_says_zero_once():
    b = PresenceBoard(dc="dc1", dc_flush=0.25, dc_refresh=5.0)
    assert b.export(0.0) == {}
    b.update("f1", upd(joined=["ann"]), now=0.0)
    first = b.export(0.0)["v"]
    assert first == {"dc": "dc1", "n": 0, "count": 1, "full": True, "users": ["ann"]}
    b.update("f1", upd(joined=["bob"]), now=0.1)
    assert b.export(0.2) == {}                      # within dc_flush
    assert b.export(0.3)["v"] == {"dc": "dc1", "n": 1, "count": 2, "full": False,
                                  "joined": ["bob"], "left": []}
    b.want_full_export("v")                         # a peer DC's bridge subscribed
    assert b.export(0.4)["v"]["full"] is True
    b.update("f1", upd(left=["ann", "bob"]), now=1.0)
    assert b.export(1.0)["v"]["count"] == 0         # the last change goes out...
    assert b.export(6.0) == {}                      # ...but no periodic "0"
    many = [f"u{i}" for i in range(P.MAX_SUMMARY_USERS + 5)]
    b.update("f2", {"video": "w", "anon": 0, "users": many, "full": True}, now=7.0)
    big = b.export(7.0)["w"]
    assert big["count"] == len(many) and len(big["users"]) == P.MAX_SUMMARY_USERS
    assert P.check_dc_summary({**big, "from": "d"})
    b.update("f2", {"video": "w", "anon": 0, "users": many[1:], "full": True}, now=7.5)
    assert b.export(7.5)["w"]["full"] is True       # over the cap: always full, never deltas


def test_only_the_owner_exports_and_a_new_owner_starts_with_a_full_summary():
    b = PresenceBoard(dc="dc1", dc_flush=0.25, dc_refresh=5.0)
    b.update("f1", upd(joined=["ann"]), now=0.0)
    assert b.export(0.0)["v"]["n"] == 0
    b.update("f1", upd(joined=["bob"]), now=0.5)
    assert b.export(0.5, owns=lambda v: False) == {}   # no longer the owner: silent
    b.update("f1", upd(joined=["cy"]), now=1.0)
    back = b.export(1.0)["v"]                          # owner again: a full one, numbered anew
    assert back["full"] is True and back["n"] == 0 and back["users"] == ["ann", "bob", "cy"]


def test_a_board_ignores_its_own_dc_and_remote_users_are_not_exported_again():
    b = PresenceBoard(dc="dc1")
    assert b.update_dc("v", {"dc": "dc1", "from": "x", "n": 0, "count": 9, "full": True, "users": ["z"]},
                       0.0) == []
    assert b.count("v") == 0
    b.update_dc("v", {"dc": "dc2", "from": "x", "n": 0, "count": 3, "full": True, "users": ["z"]}, 0.0)
    assert b.count("v") == 3
    assert b.export(0.0) == {}                      # nothing of our own: nothing to export


@pytest.mark.parametrize("bad", [
    None, [], {"dc": "dc2"},
    {"dc": "", "from": "d", "n": 0, "count": 1, "full": True, "users": []},
    {"dc": "dc2", "from": "d", "n": -1, "count": 1, "full": True, "users": []},
    {"dc": "dc2", "from": "d", "n": 0, "count": True, "full": True, "users": []},
    {"dc": "dc2", "from": "d", "n": 0, "count": 1, "full": True, "users": [1]},
    {"dc": "dc2", "from": "d", "n": 0, "count": 1, "full": True, "users": ["x" * 65]},
    {"dc": "dc2", "from": "d", "n": 0, "count": 1, "full": False, "joined": []},
    {"dc": "dc2", "from": "d", "n": 0, "count": 1, "full": "yes", "users": []},
])
def test_malformed_dc_summaries_are_remote_protocol_errors(bad):
    with pytest.raises(RemoteProtocolError):
        P.check_dc_summary(bad)
    with pytest.raises(RemoteProtocolError):
        P.FanoutMessage.from_frames([P.topic_for("v"), P.pack({"v": 1, "k": "D", "from": "d", "summary": bad})])
    with pytest.raises(RemoteProtocolError):
        P.presence_dc_update(P.Control(P.MSG_PRESENCE_DC, b"1", {"video": "v", "summary": bad}))


def test_gate_passes_summaries_of_its_own_dc_out_and_relays_the_others_in():
    gate = Gate("dc1")
    ours = P.FanoutMessage("v", P.FANOUT_DC_PRESENCE, "d1",
                    summary={"dc": "dc1", "from": "d1", "n": 0, "count": 1, "full": True, "users": []}).to_frames()
    theirs = P.FanoutMessage("v", P.FANOUT_DC_PRESENCE, "e1",
                      summary={"dc": "dc2", "from": "e1", "n": 0, "count": 2, "full": True, "users": []}).to_frames()
    assert gate.passes(EXPORT, ours) == ours
    assert gate.passes(IMPORT, ours) is None        # our own, back: never merged twice
    assert gate.passes(EXPORT, theirs) is None      # never re-exported
    relay = gate.passes(IMPORT, theirs)
    assert relay == Relay("v", P.FanoutMessage.from_frames(theirs).summary)
    assert gate.presence == {EXPORT: 1, IMPORT: 1} and not gate.frames[EXPORT]


def _event(video="v", dc="dc2", seq=1) -> list:
    """A sequenced like of DC ``dc``, as a row."""
    e = P.make_event(video, "like", None, None)
    e.update(epoch=1, seq=seq, prev=[1, seq - 1] if seq > 1 else None, dc=dc)
    return P.event_row(e)


def test_relayed_history_is_checked_and_relay_requests_need_an_origin():
    ok = P.Control(P.MSG_ACK, b"1", {"events": [_event(), _event(seq=2)]})
    assert len(relayed_history(ok, "v", "dc2")["events"]) == 2
    assert relayed_history(P.Control(P.MSG_ACK, b"1", {"reset": True}), "v", "dc2") == {"reset": True}
    for bad in (P.Control(P.MSG_ACK, b"1", {"events": [_event(video="w")]}),
                P.Control(P.MSG_ACK, b"1", {"events": [_event(dc="dc3")]}),
                P.Control(P.MSG_ACK, b"1", {"events": [{"id": "x"}]}),
                P.Control(P.MSG_ERROR, b"1", P.error_body("unavailable", "x"))):
        with pytest.raises(RemoteProtocolError):
            relayed_history(bad, "v", "dc2")
    req = P.Control(P.MSG_HISTORY, b"1", P.relay_history_body("v", (1, 2), "dc2"))
    assert P.relay_history_request(req) == ("v", (1, 2), "dc2")
    with pytest.raises(RemoteProtocolError):
        P.relay_history_request(P.Control(P.MSG_HISTORY, b"1", P.history_body("v", None)))


# --- fuzzing the new decoders: only RemoteProtocolError, and what passes merges cleanly ------

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**64 - 1), st.floats(), st.text(max_size=70),
                 st.binary(max_size=8), st.lists(st.integers(-2**63, 2**64 - 1), max_size=2))
users = st.one_of(st.lists(st.text(max_size=70), max_size=4), junk)
summaries = st.one_of(junk, st.fixed_dictionaries({}, optional={
    "dc": st.one_of(st.sampled_from(["dc1", "dc2", "", "x" * 65]), junk), "from": st.one_of(st.text(max_size=4), junk),
    "n": st.one_of(st.integers(-2, 3), junk), "count": st.one_of(st.integers(-2, 9), junk),
    "full": st.one_of(st.booleans(), junk), "users": users, "joined": users, "left": users}))


#: summaries a peer DC's owner could send: full ones and deltas of two owners, so in-sequence,
#: out-of-sequence and other-owner deltas all occur
names = st.sampled_from(["amy", "bob", "cy"])
valid_summaries = st.builds(
    lambda dc, origin, n, count, full, a, b: {"dc": dc, "from": origin, "n": n, "count": count, "full": full,
                                              **({"users": a} if full else {"joined": a, "left": b})},
    st.sampled_from(["dc1", "dc2", "dc3"]), st.sampled_from(["d1", "d2"]), st.integers(0, 3),
    st.integers(0, 5), st.booleans(), st.lists(names, max_size=3), st.lists(names, max_size=2))


def _expected_presence(summaries: list[dict], our_dc: str) -> tuple[list[str], int]:
    """The users and count a board holds after ``summaries`` (each valid), by the rules of
    docs/MULTIDC.md "Presence across datacenters": a full summary sets a DC's users, a delta applies only when it is the
    next of the same owner, the count is always the latest; users are a union over DCs and
    the count adds each DC's viewers that are not identified users."""
    dcs: dict[str, dict] = {}
    for s in summaries:
        if s["dc"] == our_dc:
            continue
        m = dcs.setdefault(s["dc"], {"from": "", "n": -1, "users": set()})
        if s["full"]:
            m.update({"from": s["from"], "n": s["n"], "users": set(s["users"])})
        elif s["from"] == m["from"] and s["n"] == m["n"] + 1:
            m.update({"n": s["n"], "users": (m["users"] | set(s["joined"])) - set(s["left"])})
        else:
            m["n"] = -1
        m["count"] = s["count"]
    users = set().union(*(m["users"] for m in dcs.values()))
    return sorted(users), len(users) + sum(max(0, m["count"] - len(m["users"])) for m in dcs.values())


@FUZZ
@given(st.lists(st.tuples(valid_summaries, summaries), min_size=1, max_size=8))
def test_fuzz_dc_summaries_only_remote_errors_and_boards_stay_consistent(pairs):
    board = PresenceBoard(dc="dc1", grace=0.0, count_interval=0.0)
    accepted = []
    for now, item in enumerate(item for pair in pairs for item in pair):  # a valid one, then junk
        frames = [P.topic_for("v"), P.pack({"v": 1, "k": "D", "from": "d", "summary": item})]
        try:
            msg = P.FanoutMessage.from_frames(frames)
        except RemoteProtocolError:
            continue
        accepted.append(msg.summary)
        board.update_dc("v", msg.summary, float(now))
        board.tick(float(now))
        assert (board.users("v"), board.count("v")) == _expected_presence(accepted, "dc1"), accepted


relay_bodies = st.dictionaries(st.sampled_from(["video", "after", "dc", "events", "reset", "summary"]),
                               st.one_of(junk, st.lists(junk, max_size=2), summaries, valid_summaries),
                               max_size=6)


@FUZZ
@given(relay_bodies)
@example({"video": "v", "after": [1, 2], "dc": "dc2"})
@example({"video": "v", "after": None, "dc": "dc2", "events": []})
@example({"reset": True})
@example({"video": "v", "summary": {"dc": "dc2", "from": "d1", "n": 0, "count": 1, "full": True, "users": ["amy"]}})
def test_fuzz_relay_requests_and_replies_only_remote_errors(body):
    """Each decoder refuses with RemoteProtocolError only, and what it accepts is what was
    sent, well-formed (the examples make every decoder accept at least once)."""
    try:
        video, after, dc = P.relay_history_request(P.Control(P.MSG_HISTORY, b"1", body))
    except RemoteProtocolError:
        pass
    else:
        assert (video, after, dc) == (body["video"], tuple(body["after"]) if body["after"] else None, body["dc"])
        assert P.valid_video_id(video) and P.valid_dc(dc) and P.valid_position(after, allow_none=True)
    try:
        relayed = relayed_history(P.Control(P.MSG_ACK, b"1", body), "v", "dc2")
    except RemoteProtocolError:
        pass
    else:
        if body.get("reset"):
            assert relayed == {"reset": True}
        else:
            assert relayed == {"events": body["events"]}
            assert all(e["video"] == "v" and P.origin_dc(e, "dc2") == "dc2" for e in relayed["events"])
    try:
        video, summary = P.presence_dc_update(P.Control(P.MSG_PRESENCE_DC, b"1", body))
    except RemoteProtocolError:
        pass
    else:
        assert (video, summary) == (body["video"], body["summary"]) and P.valid_video_id(video)
        assert P.check_dc_summary(summary) is summary
