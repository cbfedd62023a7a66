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
from mesh.core.sequencing import Sequencer
from mesh.wire import protocol as P


def _wire(msg: P.Control) -> P.Control:
    """``msg`` as the receiver decodes it."""
    return P.Control.from_frames(msg.to_frames())


class Node:
    def __init__(self, mesh: "Mesh", name: str, epoch: int):
        self.name = name
        self.live = list(mesh.names)  # this node's view of the dispatcher set
        self.seq = Sequencer(epoch=epoch, rows=True, history_size=100)
        self.stats: dict = defaultdict(int)
        self.pipeline = Pipeline(name, self.seq, self.stats, lambda: self.live, mesh.clock)
        self.replies: dict[bytes, P.Control] = {}   # client request id -> reply
        self.broadcast: list[P.FanoutMessage] = []  # XPUB messages, in order
        self.pending: list = []                     # peer requests not carried out yet

    def events(self, video: str) -> list[dict]:
        return [e for m in self.broadcast if m.video == video for e in m.events]

    def held(self, kind: type) -> list:
        return [e for e in self.pending if type(e) is kind]


class Mesh:
    """Pipelines ``names`` with epochs 1, 2, ...; peer requests wait in ``Node.pending``
    until ``deliver`` (answered by the target pipeline) or ``fail`` (a timeout)."""

    def __init__(self, *names: str):
        self.names = names
        self.now = 100.0
        self.nodes = {n: Node(self, n, epoch) for epoch, n in enumerate(names, 1)}
        self._ids = itertools.count(1)
        self._waiting: dict[bytes, tuple[str, object]] = {}

    def clock(self) -> float:
        return self.now

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def publish(self, name: str, events: list[dict], request_id: bytes) -> None:
        msg = _wire(P.Control(P.MSG_PUBLISH, request_id, P.publish_body(events, compact_ack=True, rows=True)))
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
            self.apply(name, pipeline.replicated(effect))
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


def _with_chain(mesh: Mesh, name: str, video: str) -> None:
    """``name`` holds an (empty) chain of ``video``: its publishes take the fast path."""
    mesh[name].seq.ensure_log(video)


def test_replication_comes_before_the_ack_and_the_fanout(mesh):
    video = video_owned_by("d1", "d2", mesh.names)
    _with_chain(mesh, "d1", video)
    mesh.publish("d1", likes(video, 3), b"r1")
    d1 = mesh["d1"]
    [repl] = d1.held(Replicate)
    assert repl.backup == "d2" and repl.count == 3
    assert not d1.replies and not d1.broadcast, "nothing leaves before the backup holds it"
    mesh.deliver("d1", repl)
    assert [row[P.ROW_ID] for row in mesh["d2"].seq.after(video, None, mesh.now)] == [f"{video}-{i}" for i in range(3)]
    assert placements(d1.replies[b"r1"], 3) == [(1, 1), (1, 2), (1, 3)]
    assert [e["seq"] for e in d1.events(video)] == [1, 2, 3]


def test_a_backup_timeout_still_acknowledges_and_counts(mesh):
    video = video_owned_by("d1", "d2", mesh.names)
    _with_chain(mesh, "d1", video)
    mesh.publish("d1", likes(video, 2), b"r1")
    mesh.fail("d1", mesh["d1"].held(Replicate)[0])
    assert placements(mesh["d1"].replies[b"r1"], 2) == [(1, 1), (1, 2)]
    assert not mesh["d2"].seq.has_log(video)
    assert mesh["d1"].stats["events_in"] == 2


def test_bursts_commit_in_arrival_order_within_a_video(mesh):
    """The second burst's backup answers first: its events still leave after the first's."""
    video = video_owned_by("d1", "d2", mesh.names)
    _with_chain(mesh, "d1", video)
    mesh.publish("d1", likes(video, 2), b"r1")
    mesh.publish("d1", likes(video, 2, start=2), b"r2")
    first, second = mesh["d1"].held(Replicate)
    mesh.deliver("d1", second)
    assert not mesh["d1"].replies and not mesh["d1"].broadcast, "the second burst waits for the first"
    mesh.deliver("d1", first)
    assert list(mesh["d1"].replies) == [b"r1", b"r2"]
    events = mesh["d1"].events(video)
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e["prev"] for e in events] == [None, [1, 1], [1, 2], [1, 3]]


def test_a_video_without_replicas_waits_for_the_burst_before_it(mesh):
    """A burst with nothing to replicate (no backup) still commits after the one before it."""
    solo = Mesh("d1")
    _with_chain(solo, "d1", "a")
    solo["d1"].live = ["d1", "d2"]  # a backup exists for the first burst only
    solo.nodes["d2"] = Node(solo, "d2", 2)
    solo.publish("d1", likes("a", 1), b"r1")
    solo["d1"].live = ["d1"]
    solo.publish("d1", likes("a", 1, start=1), b"r2")
    assert not solo["d1"].replies
    solo.deliver("d1", solo["d1"].held(Replicate)[0])
    assert list(solo["d1"].replies) == [b"r1", b"r2"]


def test_a_retry_is_placed_once(mesh):
    video = video_owned_by("d1", "d2", mesh.names)
    _with_chain(mesh, "d1", video)
    events = likes(video, 2)
    mesh.publish("d1", events, b"r1")
    mesh.settle()
    mesh.publish("d1", events + likes(video, 1, start=2), b"r2")
    mesh.settle()
    assert placements(mesh["d1"].replies[b"r2"], 3) == [(1, 1), (1, 2), (1, 3)]
    assert [e["id"] for e in mesh["d1"].events(video)] == [f"{video}-{i}" for i in range(3)]
    assert mesh["d1"].seq.duplicates == 2


def test_a_retry_of_a_replicated_event_is_published_again_with_its_placement(mesh):
    """The owner died after replicating: the backup, now the owner, answers the retry with
    the original placement and publishes the event (frontends drop what they had)."""
    video = video_owned_by("d1", "d2", mesh.names)
    _with_chain(mesh, "d1", video)
    events = likes(video, 2)
    mesh.publish("d1", events, b"r1")
    mesh.settle()
    mesh["d2"].live = ["d2", "d3"]   # d1 is gone
    mesh.publish("d2", [events[1]] + likes(video, 1, start=2), b"r2")
    mesh.settle()
    assert placements(mesh["d2"].replies[b"r2"], 2) == [(1, 2), (2, 1)]
    got = mesh["d2"].events(video)
    assert [(e["id"], e["epoch"], e["seq"]) for e in got] == [(f"{video}-1", 1, 2), (f"{video}-2", 2, 1)]
    assert got[1]["prev"] == [1, 2], "the backup continues the chain"


def test_a_publish_for_another_owner_is_forwarded(mesh):
    video = video_owned_by("d2", "d3", mesh.names)
    _with_chain(mesh, "d2", video)
    mesh.publish("d1", likes(video, 2), b"r1")
    [fwd] = mesh["d1"].held(Forward)
    assert fwd.target == "d2" and fwd.body["fwd"] is True
    mesh.settle()
    assert placements(mesh["d1"].replies[b"r1"], 2) == [(2, 1), (2, 2)]
    assert not mesh["d1"].broadcast and [e["seq"] for e in mesh["d2"].events(video)] == [1, 2]
    assert mesh["d1"].stats["forwarded"] == 2 and not mesh["d1"].seq.has_log(video)


def test_a_new_owner_fetches_the_chain_before_sequencing(mesh):
    video = video_owned_by("d2", "d3", mesh.names)
    _with_chain(mesh, "d3", video)
    mesh["d3"].live = ["d1", "d3"]  # d3 owned the video while d2 was away
    mesh.publish("d3", likes(video, 2), b"r0")
    mesh.settle()
    mesh.publish("d2", likes(video, 1, start=2), b"r1")
    [fetch] = mesh["d2"].held(FetchChain)
    assert fetch.source == "d3"
    mesh.settle()
    assert placements(mesh["d2"].replies[b"r1"], 1) == [(2, 1)]
    assert mesh["d2"].events(video)[0]["prev"] == [3, 2], "the chain continues"


def test_later_events_join_a_pending_slow_publish_in_order(mesh):
    video = video_owned_by("d2", "d3", mesh.names)
    _with_chain(mesh, "d3", video)
    mesh.publish("d2", likes(video, 1), b"r1")
    mesh.publish("d2", likes(video, 1, start=1), b"r2")
    mesh.publish("d2", likes(video, 1, start=2), b"r3")
    assert len(mesh["d2"].held(FetchChain)) == 1, "one chain fetch for the video"
    mesh.settle()
    assert [placements(mesh["d2"].replies[r], 1)[0] for r in (b"r1", b"r2", b"r3")] == [(2, 1), (2, 2), (2, 3)]


def test_a_slow_publish_waits_for_the_bursts_before_it(mesh):
    """Video w's burst is still replicating when a publish for v (no chain here) arrives: v's
    chain fetch starts only after w's burst committed, so requests answer in arrival order."""
    w = video_owned_by("d1", "d2", mesh.names, "w")
    v = video_owned_by("d1", "d3", mesh.names)
    _with_chain(mesh, "d1", w)
    mesh.publish("d1", likes(w, 1), b"r1")
    mesh.publish("d1", likes(v, 1), b"r2")
    assert not mesh["d1"].held(FetchChain)
    mesh.deliver("d1", mesh["d1"].held(Replicate)[0])
    assert list(mesh["d1"].replies) == [b"r1"]
    assert mesh["d1"].held(FetchChain)
    mesh.settle()
    assert list(mesh["d1"].replies) == [b"r1", b"r2"]


def test_history_of_an_owned_video_fetches_the_chain_first(mesh):
    video = video_owned_by("d2", "d3", mesh.names)
    _with_chain(mesh, "d3", video)
    mesh["d3"].live = ["d1", "d3"]
    mesh.publish("d3", likes(video, 3), b"r0")
    mesh.settle()
    mesh.history("d2", video, (3, 1), b"h1")
    assert b"h1" not in mesh["d2"].replies
    mesh.settle()
    assert [e[P.ROW_SEQ] for e in P.history_reply(mesh["d2"].replies[b"h1"], P.check_row)] == [2, 3]


def test_one_bad_event_is_rejected_alone(mesh):
    video = video_owned_by("d1", "d2", mesh.names)
    _with_chain(mesh, "d1", video)
    good = P.publish_body(likes(video, 2), compact_ack=True, rows=True)
    good["events"][1] = ["bad"]
    mesh.apply("d1", mesh["d1"].pipeline.publish([(b"client", _wire(P.Control(P.MSG_PUBLISH, b"r1", good)))]))
    mesh.settle()
    first, second = placements(mesh["d1"].replies[b"r1"], 2)
    assert first == (1, 1) and second["code"] == "malformed"
