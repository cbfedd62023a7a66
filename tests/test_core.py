"""Unit tests of the sans-IO core: no sockets, no processes."""

from __future__ import annotations

import collections
import os

import msgpack
import pytest

from mesh.wire import protocol as P
from mesh.config import load_config
from mesh.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from mesh.core.ownership import owner, rank
from mesh.core.sequencing import Sequencer
from mesh.core.sse import SSEParser, encode_comment, encode_event, encode_retry
from mesh.core.subscriptions import CountSync, SubscriptionTable


# --- topics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", [("a", "ab"), ("video-1", "video-10"), ("x", "x.y"), ("1", "1_")])
def test_topics_are_prefix_free(a, b):
    ta, tb = P.topic_for(a), P.topic_for(b)
    assert not tb.startswith(ta) and not ta.startswith(tb)
    assert P.video_from_topic(ta) == a and P.video_from_topic(tb) == b


@pytest.mark.parametrize("bad", ["", "a b", "-x", ".x", "x/y", "é", "a" * 65, "a\x00"])
def test_invalid_video_ids_rejected(bad):
    assert not P.valid_video_id(bad)
    with pytest.raises(LocalProtocolError):
        P.topic_for(bad)


def test_valid_video_ids():
    for good in ["a", "A9", "video-10", "x.y_z-1", "a" * 64]:
        assert P.valid_video_id(good)


# --- envelopes ------------------------------------------------------------------------------

def test_control_round_trip():
    ev = P.make_event("v1", "comment", "ann", "hi\r\nthere 🎉")
    msg = P.Control(P.MSG_PUBLISH, b"\x00\x01", P.publish_body([P.event_row(ev)]))
    back = P.Control.from_frames(msg.to_frames())
    assert back.msg_type == P.MSG_PUBLISH and back.request_id == b"\x00\x01"
    assert list(map(P.row_event, P.publish_events(back))) == [ev]


def test_fanout_round_trip_and_sync():
    ev = P.make_event("v1", "like", None, None)
    msg = P.FanoutMessage.from_frames(P.FanoutMessage("v1", P.FANOUT_EVENTS, "d1", [P.event_row(ev)]).to_frames())
    assert (msg.video, msg.kind, msg.sender) == ("v1", "E", "d1")
    assert [P.row_event(e) for e in msg.events] == [ev]
    sync = P.FanoutMessage.from_frames(P.FanoutMessage("v1", P.FANOUT_SYNC, "d1").to_frames())
    assert sync.kind == P.FANOUT_SYNC and sync.events == []


GOOD_EVENT = P.make_event("v1", "like", "u", None)
GOOD_ROW = P.event_row(GOOD_EVENT)


@pytest.mark.parametrize("dc", [None, "dc2"])
def test_event_rows_round_trip_through_pub_repl_and_fanout_as_the_same_maps(dc):
    ev = {**P.make_event("v1", "comment", "ann", "hi 🎉"), "epoch": 3, "seq": 7, "prev": [3, 6]}
    if dc:
        ev["dc"] = dc
    nxt = {**ev, "seq": 8, "prev": [3, 7]}
    row = P.event_row(ev)
    assert type(row) is list and len(row) == P.EVENT_ROW_LEN + (1 if dc else 0)
    pub = P.Control.from_frames(P.Control(P.MSG_PUBLISH, b"r", P.publish_body([row])).to_frames())
    assert type(pub.body["events"][0]) is list and list(map(P.row_event, P.publish_events(pub))) == [ev]
    [(count, data)] = P.pack_events([P.event_row(ev), P.event_row(nxt)])
    repl = P.Control.from_frames(P.Control(P.MSG_REPLICATE, b"r", P.packed_events_body([(count, data)])).to_frames())
    assert list(map(P.row_event, P.publish_events(repl))) == [ev, nxt]
    fan = P.FanoutMessage.from_frames(P.packed_fanout_events("v1", "d1", count, data))
    assert list(map(P.row_event, fan.events)) == [ev, nxt]
    # a dispatcher keeps full rows (dc slot always there): a row from the wire is completed in place
    wire = P.event_row({k: v for k, v in ev.items() if k != "dc"})
    assert P.check_row(wire) is wire and wire[P.ROW_DC] is None and len(wire) == P.EVENT_ROW_LEN + 1
    assert P.row_event(wire) == {k: v for k, v in ev.items() if k != "dc"}


def test_an_event_map_on_the_wire_is_malformed():
    """Events travel as rows only: a map in an events list is rejected like any bad event."""
    with pytest.raises(RemoteProtocolError, match="not a row"):
        P.check_row(dict(GOOD_EVENT))
    events, rejected = P.publish_items(P.Control(P.MSG_PUBLISH, b"r", {"events": [list(GOOD_ROW), dict(GOOD_EVENT)]}))
    assert [i for i, _ in events] == [0] and [(i, r["code"]) for i, r in rejected] == [(1, "malformed")]
    with pytest.raises(RemoteProtocolError, match="not a row"):
        P.FanoutMessage.from_frames([P.topic_for("v1"), P.pack({"v": 1, "k": "E", "from": "d", "events": [GOOD_EVENT]})])
    with pytest.raises(RemoteProtocolError, match="not a row"):
        P.history_reply(P.Control(P.MSG_ACK, b"r", {"events": [GOOD_EVENT]}))


@pytest.mark.parametrize("row,needle", [
    (GOOD_ROW[:-1], "8 fields"),
    (GOOD_ROW + ["dc2", "x"], "11 fields"),
    ([], "0 fields"),
    (["", *GOOD_ROW[1:]], "malformed"),
    ([*GOOD_ROW[:1], ["v1"], *GOOD_ROW[2:]], "malformed"),  # unhashable video
    ([*GOOD_ROW[:2], {"k": 1}, *GOOD_ROW[3:]], "malformed"),  # unhashable kind
    ([*GOOD_ROW[:2], "dislike", *GOOD_ROW[3:]], "malformed"),
    ([*GOOD_ROW[:1], "a b", *GOOD_ROW[2:]], "malformed"),
    ([*GOOD_ROW[:6], "0", *GOOD_ROW[7:]], "malformed"),
    ([*GOOD_ROW[:8], [1]], "malformed"),
    (GOOD_ROW + [7], "malformed"),
    ("junk", "not a row"),
])
def test_malformed_event_rows_are_rejected_one_by_one(row, needle):
    with pytest.raises(RemoteProtocolError, match=needle):
        P.check_row(list(row) if type(row) is list else row)
    body = P.publish_body([list(GOOD_ROW)])
    body["events"].append(row)
    events, rejected = P.publish_items(P.Control(P.MSG_PUBLISH, b"r", body))
    assert [i for i, _ in events] == [0] and [i for i, _ in rejected] == [1]
    assert rejected[0][1]["code"] == "malformed" and needle in rejected[0][1]["message"]


@pytest.mark.parametrize("frames,needle", [
    ([b"LM\x01", b"PUB", b"r"], "3 frames"),
    ([b"LM\x02", b"PUB", b"r", P.pack({})], "version"),
    ([b"XX\x01", b"PUB", b"r", P.pack({})], "magic"),
    ([b"LM\x01", b"NOPE", b"r", P.pack({})], "unknown control type"),
    ([b"LM\x01", b"PUB", b"", P.pack({})], "request id"),
    ([b"LM\x01", b"PUB", b"r", b"\xc1\xff\x00garbage"], "undecodable"),
    ([b"LM\x01", b"PUB", b"r", P.pack([1, 2])], "not a map"),
])
def test_malformed_control_frames(frames, needle):
    with pytest.raises(RemoteProtocolError, match=needle):
        P.Control.from_frames(frames)


@pytest.mark.parametrize("body", [
    {}, {"events": []}, {"events": "x"}, {"events": [1]},
    {"events": [GOOD_EVENT]},
    {"events": [[*GOOD_ROW[:2], "dislike", *GOOD_ROW[3:]]]},
    {"events": [[*GOOD_ROW[:1], "a b", *GOOD_ROW[2:]]]},
    {"events": [[*GOOD_ROW[:7], "1", *GOOD_ROW[8:]]]},
    {"events": [list(GOOD_ROW), GOOD_ROW[:5]]},
])
def test_malformed_publish_bodies(body):
    with pytest.raises(RemoteProtocolError):
        P.publish_events(P.Control(P.MSG_PUBLISH, b"r", body))


@pytest.mark.parametrize("frames", [
    [b"v/a\x00"],
    [b"v/a", P.pack({"v": 1, "k": "S", "from": "d"})],
    [b"v/a\x00", b"\xff\xfe"],
    [b"v/a\x00", P.pack({"v": 2, "k": "S", "from": "d"})],
    [b"v/a\x00", P.pack({"v": 1, "k": "Q", "from": "d"})],
    [b"v/a\x00", P.pack({"v": 1, "k": "E", "from": "d", "events": [[*GOOD_ROW[:1], "b", *GOOD_ROW[2:]]]})],
    [b"v/a\x00", P.pack({"v": 1, "k": "E", "from": "d", "events": [{**GOOD_EVENT, "video": "a"}]})],
    [b"v/a\x00", msgpack.packb({"v": 1, "k": "E", "from": "d", "events": [[[[[]]]]]})],
])
def test_malformed_fanout_frames(frames):
    with pytest.raises(RemoteProtocolError):
        P.FanoutMessage.from_frames(frames)


def _msgpack_map(blob: bytes) -> dict | None:
    """The oracle: ``blob`` as msgpack decodes it, when that is a map; None otherwise."""
    try:
        decoded = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - any failure means "not a map" here
        return None
    return decoded if isinstance(decoded, dict) else None


def test_unpack_garbage_never_raises_other_errors():
    """Random bytes and damaged good bodies: each is refused with RemoteProtocolError exactly
    when msgpack cannot decode it to a map, and decoded to that map otherwise."""
    import random
    rnd = random.Random(7)
    good = P.pack({"events": [{"id": "a", "video": "v"}], "ack": "seqs"})
    outcomes = collections.Counter()
    for i in range(2000):
        if i % 2:
            blob = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 40)))
        else:  # a good body with one byte changed, or cut short
            blob = bytearray(good)
            blob[rnd.randrange(len(blob))] = rnd.randrange(256)
            blob = bytes(blob[:rnd.randrange(1, len(blob) + 1)] if rnd.random() < 0.3 else blob)
        expected = _msgpack_map(blob)
        try:
            msg = P.Control.from_frames([P.MAGIC_V1, P.MSG_PUBLISH, b"r", blob])
        except RemoteProtocolError:
            assert expected is None, blob
            outcomes["refused"] += 1
        else:
            assert (msg.msg_type, msg.request_id, msg.body) == (P.MSG_PUBLISH, b"r", expected), blob
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 0 and outcomes["decoded"] > 0, outcomes  # both paths ran


# --- ownership ------------------------------------------------------------------------------

def test_rendezvous_owner_is_stable_and_spread():
    ds = ["d1", "d2", "d3"]
    owners = collections.Counter(owner(f"video-{i}", ds) for i in range(3000))
    assert set(owners) == set(ds)
    assert min(owners.values()) > 800  # roughly a third each
    assert all(owner(f"video-{i}", ds) == owner(f"video-{i}", list(reversed(ds))) for i in range(100))


def test_rendezvous_moves_only_the_leaving_dispatchers_videos():
    ds = ["d1", "d2", "d3", "d4"]
    before = {f"v{i}": owner(f"v{i}", ds) for i in range(2000)}
    after = {v: owner(v, ["d1", "d2", "d3"]) for v in before}
    moved = [v for v in before if before[v] != after[v]]
    assert moved and all(before[v] == "d4" for v in moved)
    assert rank("v1", ds)[0] == owner("v1", ds)
    assert owner("v1", []) is None


# --- sequencing -----------------------------------------------------------------------------

def _ev(video="v"):
    return P.make_event(video, "like", None, None)


def _row(video="v") -> list:
    """A new like as a dispatcher keeps it: a full row (``check_row``)."""
    return P.check_row(P.event_row(_ev(video)))


def _maps(rows):
    """Rows as a frontend reads them (None stays None)."""
    return None if rows is None else [P.row_event(e) for e in rows]


class _Rows:
    """The sequencer with the events it gets (full rows), read back as maps."""

    def seq(self, **kwargs) -> Sequencer:
        return Sequencer(**kwargs)

    def ev(self, video: str = "v") -> list:
        return _row(video)

    def copy(self, event: list) -> list:
        return list(event)

    def m(self, event: list) -> dict:
        return P.row_event(event)

    def ms(self, events) -> list[dict] | None:
        return _maps(events)


@pytest.fixture
def form() -> _Rows:
    return _Rows()


def test_sequencer_chains_dedupes_and_remembers(form):
    seq = form.seq(epoch=7, history_size=3)
    evs = [form.ev() for _ in range(5)]
    prev = None
    for i, ev in enumerate(evs, 1):
        out, new = seq.accept(form.copy(ev))
        out = form.m(out)
        assert new and (out["epoch"], out["seq"], out["prev"]) == (7, i, prev)
        prev = [7, i]
    again, new = seq.accept(form.copy(evs[1]))
    assert not new and form.m(again)["seq"] == 2 and seq.duplicates == 1
    other, _ = seq.accept(form.ev("w"))
    assert (form.m(other)["seq"], form.m(other)["prev"]) == (1, None)  # per-video chains
    assert [e["seq"] for e in form.ms(seq.after("v", (7, 3)))] == [4, 5]
    assert seq.after("v", (7, 5)) == []
    assert seq.after("v", (7, 1)) is None   # history (3 events) no longer reaches seq 2
    assert seq.after("v", (6, 3)) is None   # a position this chain never had
    assert [e["seq"] for e in form.ms(seq.after("v", None))] == [3, 4, 5]
    assert seq.after("nothing", None) == [] and seq.after("nothing", (7, 1)) is None


def test_sequencer_history_age(form):
    seq = form.seq(epoch=1, history_size=10, history_age=5.0)
    seq.accept(form.ev(), now=0.0)
    seq.accept(form.ev(), now=10.0)
    assert [e["seq"] for e in form.ms(seq.after("v", (1, 1), now=11.0))] == [2]
    assert [e["seq"] for e in form.ms(seq.after("v", None, now=11.0))] == [2]


def test_chain_continues_across_owners_via_replica(form):
    owner1, backup = form.seq(epoch=10), form.seq(epoch=20)
    placed = [owner1.accept(form.ev())[0] for _ in range(3)]
    assert backup.store([form.copy(e) for e in placed]) == 3
    assert backup.store([form.copy(placed[0])]) == 0          # replicas are idempotent
    assert backup.is_replica(placed[0])
    nxt, new = backup.accept(form.ev())                      # owner1 died: the backup continues
    assert new and (form.m(nxt)["epoch"], form.m(nxt)["seq"], form.m(nxt)["prev"]) == (20, 1, [10, 3])
    retry, new = backup.accept(form.copy(placed[2]))          # a retry of a replicated event
    assert not new and (form.m(retry)["epoch"], form.m(retry)["seq"]) == (10, 3)
    assert [P.sse_id(e) for e in form.ms(backup.after("v", (10, 1)))] == ["10:2", "10:3", "20:1"]
    short = form.seq(epoch=4, history_size=2)
    for _ in range(3):
        short.accept(form.ev())
    # position 4:1 left history, but its successor is the oldest event kept: all of it follows
    assert [P.sse_id(e) for e in form.ms(short.after("v", (4, 1)))] == ["4:2", "4:3"]


def test_accept_many_appends_a_batch_in_order_and_splits_new_retried_and_replicated(form):
    owner1, backup = form.seq(epoch=10), form.seq(epoch=20)
    replicated = [owner1.accept(form.ev())[0] for _ in range(2)]
    backup.store([form.copy(e) for e in replicated])
    first = form.ev()
    batch = [first, form.copy(replicated[1]), form.ev(), form.copy(first), form.copy(replicated[1])]
    new, again, placed = backup.accept_many("v", batch, now=1.0)
    assert [(e["epoch"], e["seq"]) for e in form.ms(new)] == [(20, 1), (20, 2)]
    assert form.m(new[0])["prev"] == [10, 2] and form.m(new[1])["prev"] == [20, 1]   # one chain, in batch order
    assert again == [replicated[1]]          # a replica's retry: published again, once
    assert placed == [1, (10, 2), 2, 1, (10, 2)]   # a seq in the backup's epoch, else (epoch, seq)
    assert backup.duplicates == 3 and backup.tail("v") == (20, 2)
    assert [P.sse_id(e) for e in form.ms(backup.after("v", (10, 2)))] == ["20:1", "20:2"]


def test_dedupe_window_keeps_at_least_dedupe_size_ids_and_evicts_whole_batches(form):
    seq = form.seq(epoch=3, dedupe_size=4)
    first = seq.accept_many("v", [form.ev() for _ in range(3)])[0]
    second = seq.accept_many("w", [form.ev() for _ in range(3)])[0]
    third = seq.accept_many("v", [form.ev(), form.ev()])[0]     # 5 ids in the two newer batches: first leaves
    assert seq.accept_many("v", [form.copy(e) for e in second + third])[2] == [1, 2, 3, 4, 5]
    assert seq.accept(form.copy(first[0]))[1] and seq.duplicates == 5   # forgotten: sequenced anew
    none = form.seq(epoch=3, dedupe_size=0)
    ev = none.accept(form.ev())[0]
    assert none.accept(form.copy(ev))[1] and none.tail("v") == (3, 2)   # no window at all


def test_sequencer_stamps_its_dc(form):
    event = form.m(form.seq(epoch=5, dc="dc2").accept(form.ev())[0])
    assert event["dc"] == "dc2"
    assert "dc" not in form.m(form.seq(epoch=5).accept(form.ev())[0])


def test_ack_round_trip():
    placed = [7, 8, {"code": "malformed", "message": "bad"}, (2, 9)]
    ack = P.Control(P.MSG_ACK, b"r", P.ack_body(placed, 11))
    assert P.unpack(ack.to_frames()[3], "ack") == {"epoch": 11, "seqs": [7, 8, placed[2], [2, 9]]}
    assert P.ack_positions(P.Control.from_frames(ack.to_frames()), 4) == [(11, 7), (11, 8), placed[2], (2, 9)]
    assert P.publish_body([GOOD_ROW]) == {"events": [GOOD_ROW]}


@pytest.mark.parametrize("body,why", [
    ({"epoch": 1, "seqs": [1, 2]}, "3 'seqs'"),
    ({"epoch": -1, "seqs": [1, 2, 3]}, "'epoch'"),
    ({"epoch": 1, "seqs": [1, "2", 3]}, "malformed placement"),
    ({"epoch": 1, "seqs": [1, [1, 2, 3], 3]}, "malformed placement"),
    ({"epoch": 1, "seqs": [1, {"code": 5}, 3]}, "malformed placement"),
    ({"epoch": 1, "seqs": [1, True, 3]}, "malformed placement"),
    ({"results": [{"id": "a", "epoch": 1, "seq": 1}] * 3}, "'epoch' and 3 'seqs'"),
    ({"stored": 3}, "'epoch' and 3 'seqs'"),
])
def test_malformed_acks_are_remote_protocol_errors(body, why):
    with pytest.raises(RemoteProtocolError, match=why):
        P.ack_positions(P.Control(P.MSG_ACK, b"r", body), 3)


def test_publish_items_rejects_bad_events_one_by_one():
    good, bad = P.event_row(_ev()), P.event_row({**_ev(), "kind": "dislike"})
    msg = P.Control(P.MSG_PUBLISH, b"r", P.publish_body([good, bad, "junk"]))
    events, rejected = P.publish_items(msg)
    assert events == [(0, good)] and len(good) == P.EVENT_ROW_LEN + 1   # completed in place
    assert [(i, r["code"]) for i, r in rejected] == [(1, "malformed"), (2, "malformed")]
    with pytest.raises(RemoteProtocolError):
        P.publish_items(P.Control(P.MSG_PUBLISH, b"r", {"events": []}))


def test_chunked_keeps_every_message_far_below_the_size_limit():
    from mesh.io.sockets import MAX_MSG_SIZE
    likes = [_row() for _ in range(4500)]
    assert [len(c) for c in P.chunked(likes)] == [2000, 2000, 500]
    assert P.chunked(likes[:10]) == [likes[:10]]
    comments = [P.event_row(P.make_event("v", "comment", "u" * 64, "\U0001f389" * 2000)) for _ in range(300)]
    chunks = P.chunked(comments)
    assert [e for c in chunks for e in c] == comments and len(chunks) > 1
    assert all(len(P.pack(P.publish_body(c))) < MAX_MSG_SIZE // 2 for c in chunks)


@pytest.mark.parametrize("count", [1, 15, 16, 300, 4500])
def test_pre_packed_events_are_the_bytes_packing_would_give(count):
    """The dispatcher packs each batch once and reuses the bytes for fan-out and REPL: the
    messages must be exactly those of FanoutMessage.to_frames / Control.to_frames (wire unchanged)."""
    seq = Sequencer(epoch=5, dc="dc1")
    events = seq.accept_many("v", [_row() for _ in range(count)])[0]
    batches = P.pack_events(events)
    assert [n for n, _ in batches] == [len(c) for c in P.chunked(events)]
    assert [P.packed_fanout_events("v", "d-1", n, data) for n, data in batches] == \
        [P.FanoutMessage("v", P.FANOUT_EVENTS, "d-1", c).to_frames() for c in P.chunked(events)]
    groups, sent = P.packed_batches(batches + batches), []
    for group in groups:  # REPL requests: a header and the pre-packed batches joined
        frames = P.Control(P.MSG_REPLICATE, b"r", P.packed_events_body(group)).to_frames()
        part = P.publish_events(P.Control.from_frames(frames))
        assert frames[3] == P.pack({"events": part}) and len(part) <= P.MAX_BATCH_EVENTS
        sent += part
    assert sent == msgpack.unpackb(P.pack(events + events))


def test_chain_follower_delivers_in_order_and_repairs_gaps():
    from mesh.core.ordering import ChainFollower
    seq = Sequencer(epoch=1)
    evs = _maps(seq.accept(_row())[0] for _ in range(6))
    f = ChainFollower()
    out, fetch = f.offer(evs[:2])
    assert out == evs[:2] and fetch is None
    out, fetch = f.offer([evs[1]])                       # duplicate: dropped
    assert out == [] and fetch is None and f.duplicates == 1
    out, fetch = f.offer([evs[4]])                       # 3 and 4 missing: repair
    assert out == [] and fetch == (1, 2)
    out, fetch = f.offer([evs[5]])                       # held while repairing
    assert out == [] and fetch is None
    out, reset = f.repaired(_maps(seq.after("v", fetch)))
    assert [e["seq"] for e in out] == [3, 4, 5, 6] and not reset
    assert f.last == (1, 6)


def test_chain_follower_resets_when_history_cannot_fill():
    from mesh.core.ordering import ChainFollower
    seq = Sequencer(epoch=1)
    evs = _maps(seq.accept(_row())[0] for _ in range(4))
    f = ChainFollower()
    f.offer(evs[:1])
    _, fetch = f.offer(evs[3:])
    out, reset = f.repaired(None)
    assert reset and out == [evs[3]] and f.resets == 1
    nxt = P.row_event(seq.accept(_row())[0])
    assert f.offer([nxt]) == ([nxt], None)               # continues from there


def test_sse_id_parsing():
    assert P.parse_sse_id("12:34") == (12, 34)
    for bad in ["", "12", "a:b", "1:2:3", "-1:2", "9" * 50 + ":1"]:
        assert P.parse_sse_id(bad) is None


# --- subscriptions --------------------------------------------------------------------------

def test_subscription_table_transitions():
    t = SubscriptionTable()
    assert t.add(1, "v") is True
    assert t.add(2, "v") is False
    assert t.add(3, "w") is True
    assert t.count("v") == 2 and len(t) == 3
    assert t.remove(1) == ("v", False)
    assert t.remove(2) == ("v", True)
    assert t.remove(2) is None
    assert t.counts() == {"w": 1}
    with pytest.raises(ValueError):
        t.add(3, "v")


def test_count_sync_writes_transitions_at_once_and_coalesces_the_rest():
    cs = CountSync(interval=1.0)
    cs.set("v", 1)
    assert cs.due(0.0) == 0.0
    first = cs.take(0.0)
    assert first == {"v": 1}
    cs.done(first)
    for n in range(2, 50):      # many changes within the interval: one write later
        cs.set("v", n)
    assert cs.due(0.5) == pytest.approx(0.5)
    assert cs.take(1.0) == {"v": 49}
    cs.done({"v": 49})
    cs.set("v", 0)              # last viewer left: urgent
    assert cs.due(1.1) == 0.0
    change = cs.take(1.1)
    assert change == {"v": 0}
    cs.failed(change)           # write failed: still to do
    assert cs.due(1.2) == 0.0 and cs.take(1.2) == {"v": 0}


def test_count_sync_change_back_is_no_write_and_reset_rewrites():
    cs = CountSync(interval=1.0)
    cs.set("v", 2)
    cs.done(cs.take(0))
    cs.set("v", 3)
    cs.set("v", 2)
    assert cs.due(0.1) is None
    cs.reset()
    assert cs.due(0.1) == 0.0 and cs.take(0.1) == {"v": 2}


def test_count_sync_change_back_while_a_write_is_in_flight_is_written_after_it():
    """2 is being written when the count goes back to 1: 1 still gets written after it
    (comparing with the count written before the 2 left the KV at 2 until the next change)."""
    cs = CountSync(interval=1.0)
    cs.set("v", 1)
    cs.done(cs.take(0.0))
    cs.set("v", 2)
    flying = cs.take(1.0)
    assert flying == {"v": 2}
    cs.set("v", 1)              # while {"v": 2} is in flight
    cs.done(flying)
    assert cs.due(2.0) == 0.0 and cs.take(2.0) == {"v": 1}
    cs.set("v", 0)              # last viewer leaves while 1 is in flight ...
    cs.set("v", 1)              # ... and another arrives: 1 is what lands, no write needed
    cs.done({"v": 1})
    assert cs.due(3.0) is None
    cs.set("v", 2)
    flying = cs.take(4.0)
    cs.set("v", 0)              # all leave while 2 is in flight: urgent
    assert cs.due(4.0) == 0.0
    cs.failed(flying)           # the 2 never landed: 0 is what is still to write (1 was written)
    assert cs.take(4.1) == {"v": 0}


# --- SSE --------------------------------------------------------------------------------------

def test_sse_round_trip_keeps_text_byte_identical():
    text = "line one\nline two\r\nthird\rfourth 🎉 — ünïcödé \u2028 end"
    ev = P.make_event("v", "comment", "ann", text)
    ev["epoch"], ev["seq"] = 5, 9
    parser = SSEParser()
    wire = encode_retry(1500) + encode_comment("hb") + encode_event(ev)
    out = []
    for i in range(len(wire)):          # byte by byte: split anywhere, even inside UTF-8
        out += parser.feed(wire[i:i + 1])
    assert len(out) == 1
    assert out[0].id == "5:9" and out[0].event == "comment"
    assert out[0].json()["text"] == text
    assert parser.retry == 1500 and parser.comments == 1


def test_sse_parser_follows_the_spec():
    p = SSEParser()
    evs = p.feed(b"\xef\xbb\xbfdata: a\r\ndata:b\r\n\r\nid: 3\nevent: x\ndata\n\n: c\n\ndata: z\r")
    assert [(e.id, e.event, e.data) for e in evs] == [("", "message", "a\nb"), ("3", "x", "")]
    assert [e.data for e in p.feed(b"\r\n")] == ["z"] and p.last_id == "3"


# --- config -----------------------------------------------------------------------------------

def test_config_layers(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[frontend]\nport = 9000\nheartbeat_interval = 5\n[node]\ndc = "eu"\n')
    cfg = load_config(str(f), env={"LIVEMESH_FRONTEND_PORT": "9001"}, overrides={"node.name": "x"})
    assert (cfg.frontend.port, cfg.frontend.heartbeat_interval, cfg.node.dc, cfg.node.name) == (9001, 5.0, "eu", "x")


@pytest.mark.parametrize("env,needle", [
    ({"LIVEMESH_FRONTEND_PORT": "eighty"}, "frontend.port"),
    ({"LIVEMESH_FRONTEND_PORT": "70000"}, "frontend.port"),
    ({"LIVEMESH_KV_BACKEND": "redis"}, "kv.backend"),
    ({"LIVEMESH_FRONTEND_NOPE": "1"}, "frontend.nope"),
    ({"LIVEMESH_NODE_LOG_JSON": "maybe"}, "node.log_json"),
    ({"LIVEMESH_KV_SESSION_TTL": "5"}, "kv.session_ttl"),
])
def test_config_errors_name_the_key(env, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(env=env)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[frontend\nport=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(str(bad), env={})
    unknown = tmp_path / "u.toml"
    unknown.write_text("[fronted]\nport=1\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(str(unknown), env={})
    with pytest.raises(ConfigError, match="No such file"):
        load_config(str(tmp_path / "missing.toml"), env={})


def test_example_configs_load():
    """Every example file loads, and every key it sets is in effect with the file's value
    (a key the loader dropped or coerced wrongly fails here, not in a deployment)."""
    import glob
    import tomllib
    files = sorted(glob.glob("config/*.toml"))
    assert files
    for f in files:
        cfg = load_config(f, env={})
        with open(f, "rb") as fh:
            data = tomllib.load(fh)
        assert data, f"{f} sets nothing"
        for section, values in data.items():
            for key, value in values.items():
                loaded = getattr(cfg.sections()[section], key)
                want = tuple(value) if isinstance(value, list) else value
                assert loaded == want, (f, f"{section}.{key}", value, loaded)


def test_tail_announcement_reveals_a_lost_last_event():
    from mesh.core.ordering import ChainFollower
    seq = Sequencer(epoch=1)
    evs = _maps(seq.accept(_row())[0] for _ in range(3))
    f = ChainFollower()
    f.offer(evs[:2])                                     # the last event was lost on the wire
    assert f.check_tail((1, 2)) is None                  # a tail we have: nothing to do
    assert f.check_tail((1, 3)) == (1, 2)
    assert f.check_tail((1, 3)) is None                  # already repairing
    out, reset = f.repaired(_maps(seq.after("v", (1, 2))))
    assert out == [evs[2]] and not reset
    msg = P.FanoutMessage.from_frames(P.FanoutMessage("v", P.FANOUT_TAIL, "d1", tail=(1, 3)).to_frames())
    assert (msg.kind, msg.tail) == ("T", (1, 3))
    with pytest.raises(RemoteProtocolError):
        P.FanoutMessage.from_frames([P.topic_for("v"), P.pack({"v": 1, "k": "T", "from": "d", "tail": [1]})])


def test_config_reference_is_the_table_the_code_declares():
    """docs/CONFIG.md holds ``markdown_table()`` verbatim: every key, its environment variable,
    default and meaning as ``mesh/config.py`` declares them, so a new key, a changed default or
    a reworded meaning fails here until the document is regenerated."""
    from mesh.config import describe, markdown_table
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "CONFIG.md")
    with open(path, encoding="utf-8") as fh:
        doc = fh.read()
    missing = [f"{s}.{k}" for s, k, _, _ in describe() if f"| `{s}.{k}` |" not in doc]
    assert not missing, f"docs/CONFIG.md lacks {missing}"
    assert markdown_table() in doc, ("docs/CONFIG.md's table differs from mesh/config.py: "
                                     "replace it with the output of python -m mesh.config")
