"""Unit tests of the multi-DC sans-IO pieces: what a bridge passes, remote chains, the ``dc``
field.  No sockets."""

from __future__ import annotations

import pytest

from mesh.wire import protocol as P
from mesh.core.bridging import EXPORT, IMPORT, Gate, parse_peers
from mesh.errors import ConfigError, RemoteProtocolError
from mesh.core.ordering import ChainFollower
from mesh.core.sequencing import Sequencer
from mesh.core.sse import encode_event


def _event(video="v", dc="dc1", epoch=1, seq=1, prev=None):
    e = P.make_event(video, "like", "ann", None)
    e.update(epoch=epoch, seq=seq, prev=list(prev) if prev else None)
    if dc:
        e["dc"] = dc
    return e


def _row(video="v") -> list:
    return P.check_row(P.event_row(P.make_event(video, "like", None, None)))


def test_sequencer_stamps_the_origin_dc_and_check_row_accepts_it():
    seq = Sequencer(epoch=5, dc="dc2")
    event, _ = seq.accept(_row())
    assert event[P.ROW_DC] == "dc2" and P.check_row(event) is event and P.row_event(event)["dc"] == "dc2"
    assert "dc" not in P.row_event(Sequencer(epoch=5).accept(_row())[0])
    with pytest.raises(RemoteProtocolError):
        P.check_row([*event[:P.ROW_DC], 7])
    assert P.origin_dc({"id": "x"}, "here") == "here"


def test_gate_exports_only_own_dc_events_and_imports_only_others():
    gate = Gate("dc1")
    own = P.FanoutMessage("v", P.FANOUT_EVENTS, "d1", [P.event_row(_event(dc="dc1"))]).to_frames()
    assert gate.passes(EXPORT, own) == own
    assert gate.passes(IMPORT, own) is None  # our own events never come back in
    foreign = P.FanoutMessage("v", P.FANOUT_EVENTS, "x", [P.event_row(_event(dc="dc2"))]).to_frames()
    assert gate.passes(EXPORT, foreign) is None  # never re-exported
    assert gate.passes(IMPORT, foreign) == foreign
    mixed = P.FanoutMessage("v", P.FANOUT_EVENTS, "d1", [P.event_row(_event(dc="dc1")),
                                                         P.event_row(_event(dc="dc2", seq=2))]).to_frames()
    out = P.FanoutMessage.from_frames(gate.passes(EXPORT, mixed))
    assert [e[P.ROW_DC] for e in out.events] == ["dc1"]
    unstamped = P.FanoutMessage("v", P.FANOUT_EVENTS, "d1", [P.event_row(_event(dc=None))]).to_frames()
    assert gate.passes(EXPORT, unstamped) is None and gate.passes(IMPORT, unstamped) is None  # ours
    for kind, extra in ((P.FANOUT_SYNC, {}), (P.FANOUT_TAIL, {"tail": (1, 1)}),
                        (P.FANOUT_PRESENCE, {"presence": [{"kind": "count", "count": 1}]})):
        assert gate.passes(EXPORT, P.FanoutMessage("v", kind, "d1", **extra).to_frames()) is None
    assert gate.frames[EXPORT]["v"] == 2 and gate.frames[IMPORT]["v"] == 1
    with pytest.raises(RemoteProtocolError):
        gate.passes(IMPORT, [b"v/v\x00", b"\xc1garbage"])


def test_gate_passes_only_video_subscriptions():
    gate = Gate("dc1")
    assert gate.subscription(IMPORT, b"\x01" + P.topic_for("a"))
    assert gate.subscription(IMPORT, b"\x00" + P.topic_for("a"))
    assert not gate.subscription(IMPORT, b"\x01")  # subscribe-to-everything is refused
    assert not gate.subscription(IMPORT, b"\x01v/a")  # not self-delimiting
    assert not gate.subscription(IMPORT, b"")
    assert gate.subscriptions == {"import_subscribe": 1, "import_unsubscribe": 1}


def test_parse_peers():
    assert parse_peers(["dc1=tcp://a:1", "dc2=tcp://b:2", " dc3 = tcp://c:3 "], "dc1") == {
        "dc2": "tcp://b:2", "dc3": "tcp://c:3"}
    for bad in (["dc2"], ["dc2=http://x"], ["=tcp://x:1"], ["dc2=tcp://a:1", "dc2=tcp://b:1"]):
        with pytest.raises(ConfigError):
            parse_peers(bad, "dc1")


def test_remote_chain_delivers_in_order_once_and_resets_on_a_gap():
    f = ChainFollower()
    e1, e2 = _event(seq=1), _event(seq=2, prev=(1, 1))
    e4 = _event(seq=4, prev=(1, 3))
    assert f.offer_unrepairable([e1, e2]) == ([e1, e2], False)
    assert f.offer_unrepairable([e2]) == ([], False) and f.duplicates == 1
    assert f.offer_unrepairable([e4]) == ([e4], True) and f.resets == 1


def test_remote_events_have_no_sse_id():
    e = _event(dc="dc2")
    assert encode_event(e).startswith(b"id: 1:1\n")
    e["remote"] = True
    assert encode_event(e).startswith(b"event: like\n")
