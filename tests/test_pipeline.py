"""The dispatcher's publish pipeline (mesh.core.pipeline) without sockets: several pipelines
paired by a fake link (``Mesh``, in the spirit of h11's ``ConnectionPair``) that carries their
peer requests when a test says so, so each test decides what is answered, when, and what
times out."""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest

from mesh.core.ownership import rank
from mesh.core.pipeline import Broadcast, FetchChain, Forward, Pipeline, Replicate, Reply
from mesh.core.sequencing import IDEMPOTENCY_KEY_MAX, Sequencer, event_id_for_key, parse_idempotency_key
from mesh.wire import protocol as P


def _wire(msg: P.Control) -> P.Control:
    """``msg`` as the receiver decodes it."""
    return P.Control.from_frames(msg.to_frames())


class Node:
    def __init__(self, mesh: "Mesh", name: str, epoch: int):
        self.name = name
        self.live = list(mesh.names)  # this node's view of the dispatcher set
        self.seq = Sequencer(epoch=epoch, history_size=100)
        self.stats: dict = defaultdict(int)
        self.pipeline = Pipeline(name, self.seq, self.stats, lambda: self.live, mesh.clock,
                                 wall=lambda: mesh.wall)
        self.replies: dict[bytes, P.Control] = {}   # client request id -> reply
        self.broadcast: list[P.FanoutMessage] = []  # XPUB messages, in order
        self.pending: list = []                     # peer requests not carried out yet

    def events(self, video: str) -> list[dict]:
        """The events of ``video`` broadcast here, in order, as a frontend reads them."""
        return [P.row_event(e) for m in self.broadcast if m.video == video for e in m.events]

    def held(self, kind: type) -> list:
        return [e for e in self.pending if type(e) is kind]


class Mesh:
    """Pipelines ``names`` with epochs 1, 2, ...; peer requests wait in ``Node.pending``
    until ``deliver`` (answered by the target pipeline) or ``fail`` (a timeout)."""

    def __init__(self, *names: str):
        self.names = names
        self.now = 100.0
        self.wall = 1.7e9  # the wall clock (seconds), which a PUB's expires is read against
        self.nodes = {n: Node(self, n, epoch) for epoch, n in enumerate(names, 1)}
        self._ids = itertools.count(1)
        self._waiting: dict[bytes, tuple[str, object]] = {}

    def clock(self) -> float:
        return self.now

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def publish(self, name: str, events: list[dict], request_id: bytes, expires: float | None = None) -> None:
        msg = _wire(P.Control(P.MSG_PUBLISH, request_id,
                              P.publish_body(list(map(P.event_row, events)), expires=expires)))
        self.apply(name, self.nodes[name].pipeline.publish([(b"client", msg)]))

    def history(self, name: str, video: str, after, request_id: bytes) -> None:
        msg = _wire(P.Control(P.MSG_HISTORY, request_id, P.history_body(video, after)))
        self.apply(name, self.nodes[name].pipeline.history(b"client", msg))

    def apply(self, name: str, effects: list) -> None:
        node = self.nodes[name]
        for effect in effects:
            if type(effect) is Reply:
                waiting = self._waiting.pop(effect.msg.request_id, None)
                if waiting is None:
                    node.replies[effect.msg.request_id] = _wire(effect.msg)
                else:
                    self._complete(*waiting, _wire(effect.msg), None)
            elif type(effect) is Broadcast:
                node.broadcast.append(P.FanoutMessage.from_frames(effect.frames))
            else:
                node.pending.append(effect)

    def deliver(self, name: str, effect) -> None:
        """Carry peer request ``effect`` of ``name`` to its target, which answers in its turn."""
        self.nodes[name].pending.remove(effect)
        rid = next(self._ids).to_bytes(8, "big")
        self._waiting[rid] = (name, effect)
        peer = b"peer-" + name.encode()
        if type(effect) is Replicate:
            target = effect.backup
            effects = self.nodes[target].pipeline.store_replica(peer, _wire(P.Control(P.MSG_REPLICATE, rid, effect.body())))
        elif type(effect) is Forward:
            target = effect.target
            effects = self.nodes[target].pipeline.publish([(peer, _wire(P.Control(P.MSG_PUBLISH, rid, effect.body)))])
        else:
            target = effect.source
            effects = self.nodes[target].pipeline.history(peer, _wire(P.Control(P.MSG_HISTORY, rid, effect.body)))
        self.apply(target, effects)

    def fail(self, name: str, effect, why: str = "TimeoutError") -> None:
        self.nodes[name].pending.remove(effect)
        self._complete(name, effect, None, why)

    def _complete(self, name: str, effect, reply, error) -> None:
        pipeline = self.nodes[name].pipeline
        if type(effect) is Replicate:
            self.apply(name, pipeline.replicated(effect, ok=error is None))
        elif type(effect) is Forward:
            self.apply(name, pipeline.forwarded(effect, reply, error))
        elif type(effect) is FetchChain:
            self.apply(name, pipeline.chain_fetched(effect, reply, error))

    def settle(self, limit: int = 1000) -> None:
        """Deliver every peer request, in the order they were made, until none is left."""
        for _ in range(limit):
            for name, node in self.nodes.items():
                if node.pending:
                    self.deliver(name, node.pending[0])
                    break
            else:
                return
        raise AssertionError("peer requests never stop")


def likes(video: str, n: int, start: int = 0) -> list[dict]:
    return [P.make_event(video, P.KIND_LIKE, f"u{i}", None, event_id=f"{video}-{i}", ts=1.0)
            for i in range(start, start + n)]


def placements(reply: P.Control, n: int) -> list:
    assert reply.msg_type == P.MSG_ACK, reply
    return P.ack_positions(reply, n)


def video_owned_by(first: str, second: str, names: tuple[str, ...], prefix: str = "v") -> str:
    """A video whose rendezvous order over ``names`` starts ``first, second``."""
    return next(v for v in (f"{prefix}{i}" for i in range(10000)) if rank(v, names)[:2] == [first, second])


@pytest.fixture
def mesh() -> Mesh:
    return Mesh("d1", "d2", "d3")


def _make_writer(mesh: Mesh, name: str, video: str) -> list:
    """``name`` writes ``video``: one publish through the real path (the chain fetch first,
    answered); returns the placement of that first event."""
    mesh.publish(name, likes(video, 1, start=900), b"warm-" + name.encode())
    mesh.settle()
    return placements(mesh[name].replies.pop(b"warm-" + name.encode()), 1)


def _ids(events: list[dict]) -> list[str]:
    return [e["id"] for e in events]


def _written_by_d3_while_d2_is_away(mesh: Mesh) -> str:
    """A video d2 owns, written by d3 (its backup), whose view does not list d2."""
    video = video_owned_by("d2", "d3", mesh.names)
    mesh["d3"].live = ["d1", "d3"]
    _make_writer(mesh, "d3", video)
    return video


def test_the_first_publish_of_a_video_fetches_its_chain_first(mesh):
    video = video_owned_by("d1", "d2", mesh.names)
    mesh.publish("d1", likes(video, 1), b"r1")
    fetches = mesh["d1"].held(FetchChain)
    assert [f.source for f in fetches] == ["d2", "d3"] and all(f.after is None for f in fetches)
    assert all(f.body["from"] == "d1" for f in fetches)
    assert not mesh["d1"].replies
    mesh.settle()
    assert placements(mesh["d1"].replies[b"r1"], 1) == [(1, 1)]


def test_replication_comes_before_the_ack_and_the_fanout(mesh):
    video = video_owned_by("d1", "d2", mesh.names)
    assert _make_writer(mesh, "d1", video) == [(1, 1)]
    mesh["d1"].broadcast.clear()
    mesh.publish("d1", likes(video, 3), b"r1")
    d1 = mesh["d1"]
    [repl] = d1.held(Replicate)
    assert repl.backup == "d2" and repl.count == 3
    assert not d1.replies and not d1.broadcast, "nothing leaves before the backup holds it"
    mesh.deliver("d1", repl)
    assert [row[P.ROW_ID] for row in mesh["d2"].seq.after(video, (1, 1), mesh.now)] == _ids(likes(video, 3))
    assert placements(d1.replies[b"r1"], 3) == [(1, 2), (1, 3), (1, 4)]
    assert [e["seq"] for e in d1.events(video)] == [2, 3, 4]


def test_an_unanswered_replica_goes_to_the_next_dispatcher_before_the_ack(mesh):
    """The backup times out: the events go to the third in rendezvous order, and the
    request is acknowledged once that one holds them."""
    video = video_owned_by("d1", "d2", mesh.names)
    _make_writer(mesh, "d1", video)
    mesh.publish("d1", likes(video, 2), b"r1")
    mesh.fail("d1", mesh["d1"].held(Replicate)[0])
    assert not mesh["d1"].replies
    [again] = mesh["d1"].held(Replicate)
    assert again.backup == "d3" and again.count == 2
    mesh.deliver("d1", again)
    assert placements(mesh["d1"].replies[b"r1"], 2) == [(1, 2), (1, 3)]
    assert _ids(map(P.row_event, mesh["d3"].seq.after(video, None, mesh.now))) == _ids(likes(video, 2))
    assert mesh["d1"].stats["replication_fallbacks"] == 2


def test_with_no_backup_left_the_ack_still_comes(mesh):
    video = video_owned_by("d1", "d2", mesh.names)
    _make_writer(mesh, "d1", video)
    mesh.publish("d1", likes(video, 2), b"r1")
    mesh.fail("d1", mesh["d1"].held(Replicate)[0])
    mesh.fail("d1", mesh["d1"].held(Replicate)[0])
    assert placements(mesh["d1"].replies[b"r1"], 2) == [(1, 2), (1, 3)]
    assert mesh["d1"].stats["replication_lost"] == 2 and mesh["d1"].stats["events_in"] == 3


def test_bursts_commit_in_arrival_order_within_a_video(mesh):
    """The second burst's backup answers first: its events still leave after the first's."""
    video = video_owned_by("d1", "d2", mesh.names)
    _make_writer(mesh, "d1", video)
    mesh["d1"].broadcast.clear()
    mesh.publish("d1", likes(video, 2), b"r1")
    mesh.publish("d1", likes(video, 2, start=2), b"r2")
    first, second = mesh["d1"].held(Replicate)
    mesh.deliver("d1", second)
    assert not mesh["d1"].replies and not mesh["d1"].broadcast, "the second burst waits for the first"
    mesh.deliver("d1", first)
    assert list(mesh["d1"].replies) == [b"r1", b"r2"]
    events = mesh["d1"].events(video)
    assert [e["seq"] for e in events] == [2, 3, 4, 5]
    assert [e["prev"] for e in events] == [[1, 1], [1, 2], [1, 3], [1, 4]]


def test_a_burst_without_replicas_waits_for_the_burst_before_it():
    solo = Mesh("d1", "d2")
    _make_writer(solo, "d1", "a")
    solo.publish("d1", likes("a", 1), b"r1")  # replicated to d2
    solo["d1"].live = ["d1"]                   # d2 left: nothing to replicate to...
    solo["d1"].pipeline.writing.add("a")       # ...and d1 still writes "a" (no sync needed alone)
    solo.publish("d1", likes("a", 1, start=1), b"r2")
    assert not solo["d1"].replies
    solo.deliver("d1", solo["d1"].held(Replicate)[0])
    assert list(solo["d1"].replies) == [b"r1", b"r2"]


def test_a_retry_is_placed_once(mesh):
    video = video_owned_by("d1", "d2", mesh.names)
    _make_writer(mesh, "d1", video)
    events = likes(video, 2)
    mesh.publish("d1", events, b"r1")
    mesh.settle()
    mesh.publish("d1", events + likes(video, 1, start=2), b"r2")
    mesh.settle()
    assert placements(mesh["d1"].replies[b"r2"], 3) == [(1, 2), (1, 3), (1, 4)]
    assert _ids(mesh["d1"].events(video))[1:] == _ids(likes(video, 3))
    assert mesh["d1"].seq.duplicates == 2


def test_the_backup_takes_over_after_syncing_and_republishes_a_replicated_retry(mesh):
    """The owner died after replicating: the backup, now the owner, first asks the next
    dispatcher for anything after its tail, then answers the retry with the original
    placement and publishes the event again (frontends drop what they had)."""
    video = video_owned_by("d1", "d2", mesh.names)
    _make_writer(mesh, "d1", video)
    events = likes(video, 2)
    mesh.publish("d1", events, b"r1")
    mesh.settle()
    mesh["d2"].live = ["d2", "d3"]   # d1 is gone
    mesh.publish("d2", [events[1]] + likes(video, 1, start=2), b"r2")
    [sync] = mesh["d2"].held(FetchChain)  # d3: the only other dispatcher left
    assert sync.source == "d3" and sync.after == (1, 3)
    mesh.settle()
    assert placements(mesh["d2"].replies[b"r2"], 2) == [(1, 3), (2, 1)]
    got = mesh["d2"].events(video)
    assert [(e["id"], e["epoch"], e["seq"]) for e in got] == [(f"{video}-1", 1, 3), (f"{video}-2", 2, 1)]
    assert got[1]["prev"] == [1, 3], "the backup continues the chain"


def test_a_sync_takes_the_events_the_next_dispatcher_holds_beyond_our_tail(mesh):
    """The backup missed replicas that went to the third dispatcher: taking over, it gets
    them first and continues after the last one."""
    video = video_owned_by("d1", "d2", mesh.names)
    _make_writer(mesh, "d1", video)
    mesh.publish("d1", likes(video, 2), b"r1")
    mesh.fail("d1", mesh["d1"].held(Replicate)[0])  # d2 missed them; d3 holds them
    mesh.settle()
    mesh["d2"].live = ["d2", "d3"]
    mesh.publish("d2", likes(video, 1, start=2), b"r2")
    mesh.settle()
    assert mesh["d2"].events(video)[0]["prev"] == [1, 3]
    assert mesh["d2"].stats["chains_synced"] == 1


def test_a_publish_for_another_owner_is_forwarded(mesh):
    video = video_owned_by("d2", "d3", mesh.names)
    _make_writer(mesh, "d2", video)
    mesh.publish("d1", likes(video, 2), b"r1")
    [fwd] = mesh["d1"].held(Forward)
    assert fwd.target == "d2" and fwd.body["fwd"] is True
    mesh.settle()
    assert placements(mesh["d1"].replies[b"r1"], 2) == [(2, 2), (2, 3)]
    assert not mesh["d1"].broadcast and [e["seq"] for e in mesh["d2"].events(video)] == [1, 2, 3]
    assert mesh["d1"].stats["forwarded"] == 2 and not mesh["d1"].seq.has_log(video)


def test_a_failed_forward_is_answered_retryable_and_not_sequenced(mesh):
    video = video_owned_by("d2", "d3", mesh.names)
    mesh.publish("d1", likes(video, 2), b"r1")
    mesh.fail("d1", mesh["d1"].held(Forward)[0])
    results = placements(mesh["d1"].replies[b"r1"], 2)
    assert [r["code"] for r in results] == ["owner_unavailable"] * 2 and all(r["retryable"] for r in results)
    assert not mesh["d1"].seq.has_log(video) and not mesh["d1"].broadcast and not mesh["d1"].pending


def test_a_forward_to_a_dispatcher_that_does_not_own_the_video_is_refused(mesh):
    """Views of the set differ: d1 thinks d2 owns the video, d2 thinks d3 does.  d2 neither
    sequences it nor forwards it again."""
    video = video_owned_by("d2", "d3", mesh.names)
    mesh["d2"].live = ["d1", "d3"]  # d2 is leaving: it is not in its own set
    mesh.publish("d1", likes(video, 1), b"r1")
    mesh.settle()
    [result] = placements(mesh["d1"].replies[b"r1"], 1)
    assert result["code"] == "not_owner" and result["retryable"]
    assert not mesh["d2"].seq.has_log(video) and not mesh["d2"].pending


def test_a_failed_chain_fetch_starts_no_chain(mesh):
    video = video_owned_by("d1", "d2", mesh.names)
    mesh.publish("d1", likes(video, 1), b"r1")
    first, second = mesh["d1"].held(FetchChain)
    mesh.fail("d1", first)
    assert not mesh["d1"].replies, "the answer waits for every source"
    mesh.deliver("d1", second)
    [result] = placements(mesh["d1"].replies[b"r1"], 1)
    assert result["code"] == "chain_unavailable" and result["retryable"]
    assert not mesh["d1"].seq.has_log(video)
    mesh.publish("d1", likes(video, 1), b"r2")  # the retry fetches again
    assert mesh["d1"].held(FetchChain)
    mesh.settle()
    assert placements(mesh["d1"].replies[b"r2"], 1) == [(1, 1)]


def test_a_dispatcher_that_is_not_ready_answers_retryable(mesh):
    video = video_owned_by("d1", "d2", mesh.names)
    mesh["d1"].pipeline.ready = False
    mesh.publish("d1", likes(video, 1), b"r1")
    mesh.history("d1", video, None, b"h1")
    for rid in (b"r1", b"h1"):
        reply = mesh["d1"].replies[rid]
        assert reply.msg_type == P.MSG_ERROR and reply.body["code"] == P.ERR_NOT_READY and reply.body["retryable"]
    assert not mesh["d1"].pending and not mesh["d1"].seq.has_log(video)


def test_a_not_ready_owner_makes_a_forward_retryable(mesh):
    video = video_owned_by("d2", "d3", mesh.names)
    mesh["d2"].pipeline.ready = False
    mesh.publish("d1", likes(video, 1), b"r1")
    mesh.settle()
    [result] = placements(mesh["d1"].replies[b"r1"], 1)
    assert result["code"] == "owner_unavailable" and P.ERR_NOT_READY in result["message"]


def test_after_a_handoff_the_old_writer_forwards_even_before_it_sees_the_new_one(mesh):
    """d3 writes the video while d2 is away; d2 comes back and fetches the chain; d3, whose
    view does not list d2 yet, sends its next publish to d2: one writer, one chain."""
    video = _written_by_d3_while_d2_is_away(mesh)
    mesh.publish("d2", likes(video, 1), b"r1")   # d2 takes over: fetches from d3
    mesh.settle()
    assert placements(mesh["d2"].replies[b"r1"], 1) == [(2, 1)]
    mesh.publish("d3", likes(video, 1, start=1), b"r2")
    [fwd] = mesh["d3"].held(Forward)
    assert fwd.target == "d2"
    mesh.settle()
    assert placements(mesh["d3"].replies[b"r2"], 1) == [(2, 2)]
    chain = mesh["d2"].events(video)
    assert [e["prev"] for e in chain] == [[3, 1], [2, 1]]
    assert len(mesh["d3"].events(video)) == 1, "d3 sequenced nothing after the handoff"


def test_a_handoff_expires_when_the_new_writer_never_appears(mesh):
    video = _written_by_d3_while_d2_is_away(mesh)
    mesh.publish("d2", likes(video, 1), b"r1")
    mesh.settle()
    mesh.now += mesh["d3"].pipeline.handoff_hold + 0.1   # d2 died before d3 ever saw it
    mesh.publish("d3", likes(video, 1, start=1), b"r2")
    syncs = mesh["d3"].held(FetchChain)                # d3 syncs first: d2 replicated to it
    assert [f.after for f in syncs] == [(2, 1)]        # d2 is not in d3's view: d1 only
    mesh.settle()
    assert placements(mesh["d3"].replies[b"r2"], 1) == [(3, 2)]
    assert mesh["d3"].events(video)[-1]["prev"] == [2, 1]


def test_later_events_join_a_pending_slow_publish_in_order(mesh):
    video = video_owned_by("d2", "d3", mesh.names)
    mesh.publish("d2", likes(video, 1), b"r1")
    mesh.publish("d2", likes(video, 1, start=1), b"r2")
    mesh.publish("d2", likes(video, 1, start=2), b"r3")
    assert len(mesh["d2"].held(FetchChain)) == 2, "one chain fetch for the video (from 2 sources)"
    mesh.settle()
    assert [placements(mesh["d2"].replies[r], 1)[0] for r in (b"r1", b"r2", b"r3")] == [(2, 1), (2, 2), (2, 3)]


def test_a_slow_publish_waits_for_the_bursts_before_it(mesh):
    """Video w's burst is still replicating when a publish for v (no chain here) arrives: v's
    chain fetch starts only after w's burst committed, so requests answer in arrival order."""
    w = video_owned_by("d1", "d2", mesh.names, "w")
    v = video_owned_by("d1", "d3", mesh.names)
    _make_writer(mesh, "d1", w)
    mesh.publish("d1", likes(w, 1), b"r1")
    mesh.publish("d1", likes(v, 1), b"r2")
    assert not mesh["d1"].held(FetchChain)
    mesh.deliver("d1", mesh["d1"].held(Replicate)[0])
    assert list(mesh["d1"].replies) == [b"r1"]
    assert mesh["d1"].held(FetchChain)
    mesh.settle()
    assert list(mesh["d1"].replies) == [b"r1", b"r2"]


def test_history_of_an_owned_video_fetches_the_chain_first(mesh):
    video = _written_by_d3_while_d2_is_away(mesh)
    mesh.publish("d3", likes(video, 2), b"r0")
    mesh.settle()
    mesh.history("d2", video, (3, 1), b"h1")
    assert b"h1" not in mesh["d2"].replies
    mesh.settle()
    assert [e[P.ROW_SEQ] for e in P.history_reply(mesh["d2"].replies[b"h1"])] == [2, 3]


def test_one_bad_event_is_rejected_alone(mesh):
    video = video_owned_by("d1", "d2", mesh.names)
    _make_writer(mesh, "d1", video)
    body = P.publish_body(list(map(P.event_row, likes(video, 2))))
    body["events"][1] = ["bad"]
    mesh.apply("d1", mesh["d1"].pipeline.publish([(b"client", _wire(P.Control(P.MSG_PUBLISH, b"r1", body)))]))
    mesh.settle()
    first, second = placements(mesh["d1"].replies[b"r1"], 2)
    assert first == (1, 2) and second["code"] == "malformed"


def test_a_restarted_owner_joins_the_copies_of_its_chain_that_have_holes(mesh):
    """The owner's backup missed a run of replicas (they went to the third dispatcher), then
    got the next ones: the owner, restarted with nothing, follows the prev links across both
    copies and continues after the true tail."""
    video = video_owned_by("d1", "d2", mesh.names)
    _make_writer(mesh, "d1", video)
    mesh.publish("d1", likes(video, 2), b"r1")
    mesh.fail("d1", mesh["d1"].held(Replicate)[0])   # to d3 instead
    mesh.settle()
    mesh.publish("d1", likes(video, 2, start=2), b"r2")
    mesh.settle()                                     # to d2 again
    assert [row[P.ROW_SEQ] for row in mesh["d2"].seq.after(video, None, mesh.now)] == [1, 4, 5]
    mesh.nodes["d1"] = Node(mesh, "d1", 7)            # restarted: new epoch, no chain
    mesh.publish("d1", likes(video, 1, start=4), b"r3")
    mesh.settle()
    assert placements(mesh["d1"].replies[b"r3"], 1) == [(7, 1)]
    assert mesh["d1"].events(video)[0]["prev"] == [1, 5]


def test_a_leaving_owner_hands_its_publishes_to_a_peer_that_does_not_know_yet(mesh):
    """d2 leaves (SIGTERM): it forwards to d3, whose view still lists d2; d3 takes the word
    of the leaving owner, syncs (d2 still answers) and writes."""
    video = video_owned_by("d2", "d3", mesh.names)
    _make_writer(mesh, "d2", video)
    mesh["d2"].live = ["d1", "d3"]
    mesh.publish("d2", likes(video, 1), b"r1")
    [fwd] = mesh["d2"].held(Forward)
    assert fwd.target == "d3" and fwd.body["leaving"] is True
    mesh.settle()
    assert placements(mesh["d2"].replies[b"r1"], 1) == [(3, 1)]
    assert mesh["d3"].events(video)[0]["prev"] == [2, 1]
    mesh.publish("d3", likes(video, 1, start=1), b"r2")  # a frontend that knows: straight to d3
    mesh.settle()
    assert placements(mesh["d3"].replies[b"r2"], 1) == [(3, 2)]


# --- idempotency: an id placed on a chain is answered with its placement, wherever it is retried

def test_a_retry_at_a_restarted_owner_gets_the_original_placement(mesh):
    """The owner placed the event, then restarted with nothing: it syncs the chain from its
    backup, so the retry gets the first placement (published again, for a frontend that
    missed it) instead of a second place on the chain."""
    video = video_owned_by("d1", "d2", mesh.names)
    _make_writer(mesh, "d1", video)
    events = likes(video, 2)
    mesh.publish("d1", events, b"r1")
    mesh.settle()
    mesh.nodes["d1"] = Node(mesh, "d1", 7)
    mesh.publish("d1", [events[1]] + likes(video, 1, start=2), b"r2")
    mesh.settle()
    assert placements(mesh["d1"].replies[b"r2"], 2) == [(1, 3), (7, 1)]
    assert _ids(mesh["d1"].events(video)) == [events[1]["id"], f"{video}-2"]
    assert mesh["d1"].events(video)[1]["prev"] == [1, 3]


def test_a_retry_racing_its_forward_is_placed_once(mesh):
    """A non-owner's forward is still on its way when the retry reaches the owner directly:
    both get the one placement."""
    video = video_owned_by("d2", "d3", mesh.names)
    _make_writer(mesh, "d2", video)
    event = likes(video, 1)
    mesh.publish("d1", event, b"r1")
    [fwd] = mesh["d1"].held(Forward)
    mesh.publish("d2", event, b"r2")
    mesh.settle()
    assert placements(mesh["d2"].replies[b"r2"], 1) == placements(mesh["d1"].replies[b"r1"], 1) == [(2, 2)]
    assert _ids(mesh["d2"].events(video)).count(event[0]["id"]) == 1


def test_an_id_placed_on_another_video_is_refused(mesh):
    a = video_owned_by("d1", "d2", mesh.names, "a")
    b = video_owned_by("d1", "d3", mesh.names, "b")
    _make_writer(mesh, "d1", a)
    _make_writer(mesh, "d1", b)
    first = likes(a, 1)
    mesh.publish("d1", first, b"r1")
    mesh.settle()
    reused = {**first[0], "video": b}
    mesh.publish("d1", [reused], b"r2")
    mesh.settle()
    [result] = placements(mesh["d1"].replies[b"r2"], 1)
    assert result["code"] == "id_conflict" and not result.get("retryable")
    assert first[0]["id"] not in _ids(mesh["d1"].events(b))


def test_an_idempotency_key_gives_one_event_id_per_video_user_and_key():
    one = event_id_for_key("v1", "amy", "order-17")
    assert one == event_id_for_key("v1", "amy", "order-17")
    assert len({one, event_id_for_key("v2", "amy", "order-17"), event_id_for_key("v1", "bob", "order-17"),
                event_id_for_key("v1", None, "order-17"), event_id_for_key("v1", "amy", "order-18")}) == 5
    assert P.check_row(P.event_row(P.make_event("v1", P.KIND_LIKE, "amy", None, event_id=one, ts=1.0)))
    assert one.startswith("k") and all(c in "0123456789abcdef" for c in P.new_event_id()), \
        "a keyed id never equals a generated one"
    for bad in ("", "x" * 256, "caf\u00e9", "tab\there"):
        with pytest.raises(ValueError):
            event_id_for_key("v1", "amy", bad)


def test_an_idempotency_key_field_is_a_bare_key_or_an_rfc8941_string():
    for value, key in [("order-17", "order-17"), ('"order-17"', "order-17"), ('"a b"', "a b"),
                       ('"say \\"hi\\""', 'say "hi"'), ('"back\\\\slash"', "back\\slash"),
                       ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
                       ("x" * IDEMPOTENCY_KEY_MAX, "x" * IDEMPOTENCY_KEY_MAX),
                       ('"' + "\\\"" * IDEMPOTENCY_KEY_MAX + '"', '"' * IDEMPOTENCY_KEY_MAX)]:
        assert parse_idempotency_key(value) == key, value
    for bad in ("", '""', '"unclosed', '"a"b', '"a";p=1', '"a", "b"', "a,b", "a;p=1", "a b", 'a"b',
                '"bad \\x escape"', '"tab\there"', '"caf\u00e9"', "caf\u00e9", "x" * (IDEMPOTENCY_KEY_MAX + 1),
                '"' + "x" * (IDEMPOTENCY_KEY_MAX + 1) + '"', "x" * 100000):
        with pytest.raises(ValueError):
            parse_idempotency_key(bad)


def test_an_expired_publish_is_never_placed_on_the_fast_or_the_slow_path(mesh):
    """A PUB whose ``expires`` has passed when it is taken, or when its slow-path batch (a
    chain fetch, a forward) resumes, is answered ``expired`` (retryable) and never placed: the
    next event of the video takes the place it would have had."""
    video = video_owned_by("d1", "d2", mesh.names)
    in_ms = lambda seconds: (mesh.wall + seconds) * 1000.0  # noqa: E731

    def result(name: str, rid: bytes):
        [where] = placements(mesh[name].replies[rid], 1)
        return where

    # the owner's first publish of the video fetches the chain; the wall clock passes expires meanwhile
    mesh.publish("d1", likes(video, 1), b"slow", expires=in_ms(1.0))
    assert mesh["d1"].held(FetchChain)
    mesh.wall += 1.0
    mesh.settle()
    assert result("d1", b"slow")["code"] == P.ERR_EXPIRED and result("d1", b"slow")["retryable"] is True
    mesh.publish("d1", likes(video, 1, start=1), b"live", expires=in_ms(1.0))
    mesh.settle()
    assert result("d1", b"live") == (1, 1)
    # the fast path: taken after it expired
    mesh.publish("d1", likes(video, 1, start=2), b"stale", expires=in_ms(-0.001))
    mesh.settle()
    assert result("d1", b"stale")["code"] == P.ERR_EXPIRED
    # a forward carries the expiry, and the owner reads it when the forward arrives
    mesh.publish("d2", likes(video, 1, start=3), b"fwd", expires=in_ms(0.5))
    [forward] = mesh["d2"].held(Forward)
    assert forward.body["expires"] == in_ms(0.5)
    mesh.wall += 0.5
    mesh.settle()
    assert result("d2", b"fwd")["code"] == P.ERR_EXPIRED
    mesh.publish("d2", likes(video, 1, start=4), b"marker")
    mesh.settle()
    assert result("d2", b"marker") == (1, 2)
    assert _ids(mesh["d1"].events(video)) == [f"{video}-1", f"{video}-4"]
    assert mesh["d1"].stats["publish_expired"] == 3
    for bad in ("soon", float("nan"), [1]):
        msg = _wire(P.Control(P.MSG_PUBLISH, b"bad", {**P.publish_body(list(map(P.event_row, likes(video, 1, start=5)))),
                                                      "expires": bad}))
        [reply] = mesh["d1"].pipeline.publish([(b"client", msg)])
        assert reply.msg.msg_type == P.MSG_ERROR and "expires" in reply.msg.body["message"]
