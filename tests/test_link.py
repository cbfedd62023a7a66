"""The frontend's mesh link, piece by piece and without sockets: the history fetch that asks
the owner and then the backup (``mesh.io.history`` over a fake link), the catch-up filter of a
reconnecting viewer across epochs (``frontend.stream.Given``), and the publish path's core
(``mesh.core.publishing``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

import pytest

from mesh.wire import protocol as P
from mesh.errors import ClientError, RemoteProtocolError
from mesh.core.ownership import owner, rank
from mesh.core.publishing import (OwnerCache, Outbox, ack_results, acked, group_by_owner,
                                  not_acknowledged)
from mesh.io.history import HistoryUnavailable, fetch_history
from mesh.io.peers import PeerGone
from mesh.io.tasks import Tasks
from frontend.fanout import Fanout
from frontend.publisher import EXPIRY_MARGIN, Publisher
from frontend.stream import Given, StreamHooks, ViewerStream
from mesh.core.subscriptions import SubscriptionTable


def _event(epoch: int, seq: int, prev=None, video: str = "v", eid: str | None = None) -> dict:
    return {"id": eid or f"e{epoch}-{seq}", "video": video, "kind": "like", "user": "u", "text": "",
            "ts": 0, "epoch": epoch, "seq": seq, "prev": list(prev) if prev else None}


# --- history from any replica -------------------------------------------------------------------


class FakeLinks:
    """``PeerLinks``' two members ``fetch_history`` uses; ``answers[name]`` is a coroutine
    function ``(body, timeout) -> Control`` (it may sleep or raise like a real link)."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.asked: list[tuple[str, float]] = []

    @property
    def names(self) -> list[str]:
        return sorted(self.answers)

    async def request(self, name: str, msg_type: bytes, body: dict, timeout: float) -> P.Control:
        assert msg_type == P.MSG_HISTORY
        self.asked.append((name, time.monotonic()))
        return await asyncio.wait_for(self.answers[name](body, timeout), timeout)


def _chain_reply(events):
    async def answer(body, timeout):
        return P.Control(P.MSG_ACK, b"1", {"events": [P.event_row(e) for e in events]})
    return answer


def _silent():
    async def answer(body, timeout):
        await asyncio.sleep(3600)
    return answer


def _replicas(video: str) -> tuple[str, str]:
    owner, backup = rank(video, ["d1", "d2", "d3"])[:2]
    return owner, backup


async def test_history_comes_from_the_backup_once_the_owner_is_silent_past_the_deadline():
    owner, backup = _replicas("v")
    chain = [_event(7, 1)]
    rest = next(d for d in ("d1", "d2", "d3") if d not in (owner, backup))
    links = FakeLinks({owner: _silent(), backup: _chain_reply(chain), rest: _chain_reply([])})
    start = time.monotonic()
    got = await fetch_history(links, "v", (7, 0), timeout=5.0, hedge=0.2)
    took = time.monotonic() - start
    assert [e[P.ROW_ID] for e in got] == ["e7-1"]
    assert [n for n, _ in links.asked] == [owner, backup]  # the third dispatcher holds no replica
    assert links.asked[1][1] - start >= 0.2  # the backup is asked only after the hedge delay
    assert took < 2.0  # far below the 5 s deadline (2 s: margin for a loaded 2-core runner)


async def test_a_prompt_owner_is_the_only_replica_asked():
    owner, backup = _replicas("v")
    links = FakeLinks({owner: _chain_reply([_event(7, 2, (7, 1))]), backup: _chain_reply([])})
    got = await fetch_history(links, "v", (7, 1), timeout=5.0, hedge=0.5)
    assert [e[P.ROW_ID] for e in got] == ["e7-2"] and [n for n, _ in links.asked] == [owner]


async def test_an_owner_that_cannot_say_or_is_gone_sends_the_request_to_the_backup_at_once():
    owner, backup = _replicas("v")

    async def cannot_say(body, timeout):
        return P.Control(P.MSG_ACK, b"1", {"reset": True})

    async def gone(body, timeout):
        raise PeerGone("no link")

    for first in (cannot_say, gone):
        links = FakeLinks({owner: first, backup: _chain_reply([_event(7, 3)])})
        start = time.monotonic()
        got = await fetch_history(links, "v", (7, 2), timeout=5.0, hedge=2.0)
        assert [e[P.ROW_ID] for e in got] == ["e7-3"]
        assert links.asked[1][1] - start < 1.0  # not after the 2 s hedge delay


async def test_a_late_owner_answer_still_wins_when_the_backup_is_silent_too():
    owner, backup = _replicas("v")

    async def late(body, timeout):
        await asyncio.sleep(0.3)
        return P.Control(P.MSG_ACK, b"1", {"events": [P.event_row(_event(7, 4))]})

    links = FakeLinks({owner: late, backup: _silent()})
    got = await fetch_history(links, "v", (7, 3), timeout=5.0, hedge=0.1)
    assert [e[P.ROW_ID] for e in got] == ["e7-4"]


async def test_history_says_none_when_every_replica_cannot_say_and_raises_when_none_answers():
    owner, backup = _replicas("v")

    async def cannot_say(body, timeout):
        return P.Control(P.MSG_ACK, b"1", {"reset": True})

    assert await fetch_history(FakeLinks({owner: cannot_say, backup: cannot_say}), "v", (1, 1),
                               timeout=2.0, hedge=0.05) is None
    start = time.monotonic()
    with pytest.raises(HistoryUnavailable):
        await fetch_history(FakeLinks({owner: _silent(), backup: _silent()}), "v", (1, 1),
                            timeout=0.4, hedge=0.1)
    assert time.monotonic() - start < 1.5  # within its 0.4 s deadline (margin for a loaded runner)
    with pytest.raises(HistoryUnavailable):
        await fetch_history(FakeLinks({}), "v", None, timeout=0.2, hedge=0.1)


async def test_a_malformed_reply_counts_as_no_answer_and_the_backup_is_asked():
    owner, backup = _replicas("v")

    async def garbage(body, timeout):
        return P.Control(P.MSG_ACK, b"1", {"events": "not a list"})

    links = FakeLinks({owner: garbage, backup: _chain_reply([_event(7, 5)])})
    got = await fetch_history(links, "v", (7, 4), timeout=2.0, hedge=1.0)
    assert [e[P.ROW_ID] for e in got] == ["e7-5"]


# --- a reconnecting viewer's catch-up across epochs ---------------------------------------------


def test_given_compares_positions_only_within_an_epoch():
    # the owner's epoch 2000 is larger than its backup's 1000 (the backup started first); the
    # viewer's Last-Event-ID is 2000:3 and history gave 2000:4 and the backup's 1000:1
    chain = [_event(2000, 4, (2000, 3)), _event(1000, 1, (2000, 4))]
    given = Given((2000, 3), chain)
    assert not given.is_fresh(_event(2000, 4, (2000, 3)))  # history gave it
    assert not given.is_fresh(_event(2000, 2, (2000, 1)))  # before the Last-Event-ID
    assert given.is_fresh(_event(1000, 2, (1000, 1)))      # the backup's next: fresh
    assert given.is_fresh(_event(2000, 5, (2000, 4)))


def test_given_tells_an_unknown_epoch_by_its_predecessor():
    given = Given((50, 10), [_event(50, 11, (50, 10))])
    # a new owner after the fetch (its epoch 7 < 50), continuing from the viewer's last event
    assert given.is_fresh(_event(7, 1, (50, 11)))
    # a new chain (no predecessor) is past what the viewer has
    assert Given((50, 10), []).is_fresh(_event(3, 1, None))
    # an older epoch's event (this frontend lagging behind the viewer's), until the live path
    # brings an event of the viewer's epoch; after that an unknown epoch can only be newer
    lagging = Given((50, 10), [])
    assert not lagging.is_fresh(_event(90, 5, (90, 4)))
    assert not lagging.is_fresh(_event(50, 1, (90, 5)))
    assert lagging.is_fresh(_event(60, 2, (60, 1)))
    assert Given(None, []).is_fresh(_event(90, 5, (90, 4)))  # a viewer holding nothing lacks all


def _stream() -> ViewerStream:
    fanout = Fanout(SubscriptionTable())
    hooks = StreamHooks(stats=defaultdict(int), encode=fanout.encode, attached=lambda ip: None,
                        detached=lambda ip: None, closed=lambda viewer: None)
    return ViewerStream(hooks, 1, "v", None, "127.0.0.1", catching_up=True, limit=1 << 20)


def _ids(data: bytes) -> list[str]:
    return [line.split(": ", 1)[1] for line in data.decode().split("\n") if line.startswith("id: ")]


async def test_a_viewer_caught_up_by_a_backup_with_a_smaller_epoch_gets_its_live_events():
    """The backup (epoch 1000) continues the chain of the dead owner (epoch 2000); live events
    in the backup's epoch are past the viewer's Last-Event-ID 2000:3 although 1000 < 2000."""
    v = _stream()

    def live(*events):
        v.send(v.hooks.encode(list(events)), list(events))

    live(_event(2000, 5, (2000, 4)))  # live while the history fetch ran: history has it too
    v.catch_up([_event(2000, 4, (2000, 3)), _event(2000, 5, (2000, 4))], (2000, 3))
    live(_event(2000, 3, (2000, 2)), _event(1000, 1, (2000, 5)))  # a late copy, then the backup's
    live(_event(1000, 2, (1000, 1)))
    assert _ids(bytes(v.buf)) == ["2000:4", "2000:5", "1000:1", "1000:2"]


def test_a_new_owners_first_events_in_one_write_after_a_catch_up_all_reach_the_viewer():
    """A viewer reconnected while the owner was down and history ended at 2000:7; the owner,
    restarted with epoch 3000, publishes 3000:1 and 3000:2, which reach the viewer in one
    write: both are past history's end (the second follows the first, whose epoch the
    viewer did not hold before the write)."""
    v = _stream()
    v.catch_up([], (2000, 7))
    events = [_event(3000, 1, (2000, 7)), _event(3000, 2, (3000, 1)), _event(3000, 3, (3000, 2))]
    v.send(v.hooks.encode(events), events)
    v.send(v.hooks.encode([_event(3000, 4, (3000, 3))]), [_event(3000, 4, (3000, 3))])
    assert _ids(bytes(v.buf)) == ["3000:1", "3000:2", "3000:3", "3000:4"]


# --- the publish path's core --------------------------------------------------------------------


def test_owner_cache_hashes_once_per_video_and_dispatcher_set():
    calls = []

    class Names(list):
        def __iter__(self):
            calls.append(1)
            return super().__iter__()

    cache, gen = OwnerCache(), object()
    names = Names(["d1", "d2", "d3"])
    first = [cache.owner_of(v, gen, names) for v in ("a", "b", "a", "a", "b")]
    assert first == [owner(v, ["d1", "d2", "d3"]) for v in ("a", "b", "a", "a", "b")]
    assert len(calls) == 2  # one hash pass per video
    gone = first[0]
    rest = Names([d for d in ("d1", "d2", "d3") if d != gone])
    assert cache.owner_of("a", object(), rest) == owner("a", rest) != gone  # a new set: recomputed
    small = OwnerCache(max_size=2)
    for v in ("a", "b", "c"):
        small.owner_of(v, gen, ["d1"])
    assert len(small.table(gen)) <= 2  # bounded


def test_group_by_owner_keeps_order_and_leaves_out_events_without_owner():
    events = [{"video": v} for v in ("a", "b", "a", "b", "a")]
    cache, gen, names = OwnerCache(), object(), ["d1", "d2", "d3"]
    want: dict[str, list[int]] = {}
    for i, e in enumerate(events):
        want.setdefault(owner(e["video"], names), []).append(i)
    assert group_by_owner(events, range(5), cache, gen, names) == want
    assert group_by_owner(events, [3, 4], cache, gen, names) == \
        {owner("b", names): [3]} | {owner("a", names): [4]}
    assert group_by_owner(events, range(5), OwnerCache(), gen, []) == {}  # no dispatcher known


def test_outbox_queues_per_target_until_taken():
    box = Outbox()
    assert box.add("d1", [{"id": "1"}], "t1") is True  # new queue: schedule a flush
    assert box.add("d1", [{"id": "2"}], "t2") is False
    assert box.add("d2", [{"id": "3"}], "t3") is True
    assert box.take("d1") == [([{"id": "1"}], "t1"), ([{"id": "2"}], "t2")]
    assert box.take("d1") == [] and len(box) == 1


def test_ack_results_reads_the_ack_per_event_and_errors():
    events = [P.event_row(_event(1, 0, eid=i)) for i in "abc"]
    reply = P.Control(P.MSG_ACK, b"1", {"epoch": 9, "seqs": [4, [8, 2], {"code": "bad", "message": "no"}]})
    out: dict = {}
    ack_results(events, reply, out)
    assert out == {"a": {"id": "a", "epoch": 9, "seq": 4}, "b": {"id": "b", "epoch": 8, "seq": 2},
                   "c": {"id": "c", "error": {"code": "bad", "message": "no"}}}
    ack_results(events[:1], P.Control(P.MSG_ERROR, b"2", {"code": "malformed", "message": "x"}), out)
    assert out["a"] == {"id": "a", "error": {"code": "malformed", "message": "x"}}
    with pytest.raises(RemoteProtocolError):
        ack_results(events, P.Control(P.MSG_ACK, b"3", {"epoch": 9, "seqs": [1]}), {})
    assert acked(out["b"]) == out["b"]
    with pytest.raises(ClientError) as err:
        acked(not_acknowledged({"id": "z"}))
    assert (err.value.status, err.value.code) == (503, "no_dispatcher")


class FakeDispatchers:
    """``PeerLinks``' members the publisher uses; each dispatcher acks its PUB requests with
    consecutive seqs after ``delay[name]`` seconds (a name missing from ``alive``: PeerGone)."""

    def __init__(self, names, delay=None):
        self.peers = {n: None for n in names}
        self.alive = set(names)
        self.delay = delay or {}
        self.changed = asyncio.Event()
        self.requests: list[tuple[str, int]] = []
        self.seq = defaultdict(int)
        self.refuse: list[dict] = []  # error bodies the next requests are answered with (ERR)
        self.sent: list[tuple[float, float | None]] = []  # per request: wall-clock ms, its expires

    def set(self, names):
        self.peers = {n: None for n in names}
        self.changed.set()
        self.changed = asyncio.Event()

    async def request(self, name, msg_type, body, timeout):
        assert msg_type == P.MSG_PUBLISH
        if name not in self.alive:
            raise PeerGone(name)
        wire = P.Control.from_frames(P.Control(msg_type, b"1", body).to_frames())  # as a dispatcher reads it
        events = P.publish_events(wire)
        self.requests.append((name, len(events)))
        self.sent.append((time.time() * 1000.0, P.publish_expiry(wire)))
        await asyncio.wait_for(asyncio.sleep(self.delay.get(name, 0)), timeout)
        if self.refuse:
            return P.Control(P.MSG_ERROR, b"1", self.refuse.pop(0))
        seqs = []
        for _ in events:
            self.seq[name] += 1
            seqs.append(self.seq[name])
        return P.Control(P.MSG_ACK, b"1", {"epoch": 1, "seqs": seqs})


def _publisher(links, attempt=0.2, deadline=1.0) -> Publisher:
    return Publisher(links, OwnerCache(), defaultdict(int), Tasks(logging.getLogger("test")), attempt, deadline)


def _like(video: str, i: int) -> dict:
    return P.make_event(video, "like", "u", None, event_id=f"{video}-{i}")


async def test_one_request_per_owner_per_loop_turn_from_many_calls():
    links = FakeDispatchers(["d1", "d2", "d3"])
    pub = _publisher(links)
    videos = [f"v{i}" for i in range(12)]
    calls = [pub.publish_many([_like(v, n) for v in videos]) for n in range(3)]
    results = await asyncio.gather(*calls)
    owners = {owner(v, ["d1", "d2", "d3"]) for v in videos}
    assert sorted(n for n, _ in links.requests) == sorted(owners)  # three calls, one request per owner
    assert sum(k for _, k in links.requests) == 36
    for n, res in enumerate(results):
        assert [r["id"] for r in res] == [f"{v}-{n}" for v in videos] and all("seq" in r for r in res)


async def test_on_result_gets_each_owners_share_when_it_answers():
    links = FakeDispatchers(["d1", "d2"])
    slow = owner("a", ["d1", "d2"])
    fast_video = next(v for v in (f"b{i}" for i in range(50)) if owner(v, ["d1", "d2"]) != slow)
    links.delay[slow] = 0.5
    pub = _publisher(links, attempt=2.0, deadline=3.0)
    seen: list[tuple[float, list[int]]] = []
    start = time.monotonic()
    events = [_like("a", 0), _like(fast_video, 1), _like("a", 2)]
    results = await pub.publish_many(events, lambda idx, res: seen.append((time.monotonic() - start, idx)))
    assert [idx for _, idx in seen] == [[1], [0, 2]]
    assert seen[0][0] < 0.4  # the fast owner's share did not wait for the slow one (0.5 s)
    assert [r["id"] for r in results] == [e["id"] for e in events]


async def test_a_publish_is_retried_to_the_new_owner_and_fails_cleanly_without_one():
    links = FakeDispatchers(["d1", "d2"])
    first = owner("r", ["d1", "d2"])
    other = "d2" if first == "d1" else "d1"
    links.alive.discard(first)  # its link broke: the publisher waits for discovery
    pub = _publisher(links, attempt=0.2, deadline=3.0)
    task = asyncio.ensure_future(pub.publish_many([_like("r", 0)]))
    await asyncio.sleep(0.1)
    links.set([other])  # discovery: the owner left
    (res,) = await task
    assert "seq" in res and links.requests[-1][0] == other
    assert pub.stats["publish_retries"] >= 1
    none = _publisher(FakeDispatchers([]), deadline=0.2)
    got = []
    assert await none.publish_many([_like("r", 1)], lambda idx, res: got.append(idx)) == \
        [not_acknowledged(_like("r", 1))]
    assert got == [[0]] and none.stats["publish_failures"] == 1


async def test_an_event_refused_as_retryable_is_sent_again_until_placed_and_a_final_refusal_passes():
    """A dispatcher that cannot place an event yet (just started, no owner for a forward, a
    chain it could not fetch) answers a retryable error: the event was not placed, so the
    publisher sends it again after RETRYABLE_PAUSE instead of answering the client 503; a
    refusal that is not retryable is the result at once."""
    links = FakeDispatchers(["d1"])
    links.refuse = [P.error_body(P.ERR_NOT_READY, "starting", retryable=True)] * 2
    pub = _publisher(links, attempt=0.5, deadline=3.0)
    (res,) = await pub.publish_many([_like("v", 0)])
    assert "seq" in res and len(links.requests) == 3
    links.refuse = [P.error_body("not_owner", "moved", retryable=True), P.error_body("bad", "no")]
    got = []
    (res,) = await pub.publish_many([_like("v", 1)], lambda idx, r: got.append((idx, r)))
    assert res["error"]["code"] == "bad" and got == [([0], [res])] and len(links.requests) == 5
    # still refused at publish_timeout: the last refusal is the answer, on both ways of waiting
    for on_result in (None, lambda idx, r: None):
        links.refuse = [P.error_body(P.ERR_NOT_READY, "starting", retryable=True)] * 1000
        short = _publisher(links, attempt=0.5, deadline=0.3)
        (res,) = await short.publish_many([_like("v", 2)], on_result)
        assert res["error"]["code"] == P.ERR_NOT_READY and res["error"]["retryable"] is True
        assert short.stats["publish_failures"] == 1


async def test_every_attempt_expires_a_margin_before_the_deadline_and_the_503_waits_for_the_deadline():
    """A publish no dispatcher answers: each attempt's PUB carries ``expires``, the deadline
    less EXPIRY_MARGIN, and is sent before it; the 503 comes at the deadline, not when the
    last attempt expires, so no dispatcher clock within the margin places it after the 503."""
    deadline = 0.6
    links = FakeDispatchers(["d1"], delay={"d1": 30.0})
    pub = _publisher(links, attempt=0.1, deadline=deadline)
    start = time.time() * 1000.0
    (res,) = await pub.publish_many([_like("v", 0)])
    answered = time.time() * 1000.0
    assert res["error"]["code"] == "no_dispatcher"
    assert len(links.sent) >= 2, links.sent  # attempt_timeout 0.1 s within 0.5 s
    for at, expires in links.sent:
        assert at < expires <= start + (deadline - EXPIRY_MARGIN) * 1000.0 + 5.0, (at, expires, start)
    assert answered >= start + deadline * 1000.0 - 5.0, (answered - start)  # 5 ms: the two clock reads
