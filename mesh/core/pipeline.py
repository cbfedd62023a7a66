"""The dispatcher's publish pipeline, sans-IO: ROUTER requests in, effects out.

Theory of operation.  ``Pipeline`` holds everything a dispatcher decides about publishes --
which requests it sequences, in which order its bursts commit, what it replicates to whom,
when a request is acknowledged, which video waits for a forward or a chain fetch -- and does
no I/O: each entry point (``publish``, ``history``, ``store_replica``, and the completions
``replicated``, ``forwarded``, ``chain_fetched``) returns a list of effects for the shell
(``dispatcher.node``) to carry out, in order: ``Reply`` (a ROUTER reply), ``Broadcast`` (an
XPUB message), ``Replicate``, ``Forward`` and ``FetchChain`` (requests to a peer dispatcher,
whose outcome the shell hands back to the matching completion).  The precedent is h11's
"bring-your-own-I/O" connection object; here the clock and the dispatcher set are callables
the shell passes in, so the unit tests (tests/test_pipeline.py) run the whole pipeline with a
fake clock and no socket.

1. A burst (``publish``: every PUB request one ROUTER drain gave) is decoded once; its events
   are validated one by one (a bad event gets its own error result, the others go on) and
   grouped per video over the whole burst.  Events stay the rows they arrive as
   (``protocol.check_row``), through the sequencer and history to the fan-out's packing.
2. Fast path -- a video this dispatcher owns (or that was forwarded to it), whose chain it
   already holds, with no slow-path work pending: its events are appended to the chain at
   once (``Sequencer.accept_many``: one chain append per video), packed once
   (``protocol.pack_events``: the same bytes go into the ``REPL`` and the XPUB message), and
   each event's placement -- its bare ``seq`` -- is written into its request's ``PendingAck``
   (the compact ACK carries the epoch once and one integer per event).
3. The burst then commits as a unit: its new events go to each backup (the next dispatcher
   in rendezvous order) in one ``Replicate`` per backup; once every one is answered (or
   skipped: the shell reports a timeout or a suspect backup the same way), each video's
   events leave in one ``Broadcast`` and every request gets one ACK.  Bursts commit in
   arrival order (a burst waits for the one before it), so a video's events reach the XPUB
   in chain order while the next burst is already being sequenced.  An acknowledged event is
   held by two dispatchers.
4. Slow path -- a publish for a video another live dispatcher owns (views of the dispatcher
   set differ for a moment after a change) is forwarded there, once (``Forward`` with
   ``fwd``); a video with no chain here yet first fetches its tail from the dispatcher that
   owned it before (``FetchChain``).  A video's slow work runs one piece at a time, in
   arrival order, each after the bursts received before it have committed; while it is
   pending, later events of that video take the slow path too, joining the video's slow
   publish that has not started yet (``SlowBatch``: one more round under sustained load, not
   one slow publish per burst for ever).  A history request for a video this dispatcher owns
   but holds no chain of waits in the same queue for the chain fetch.
5. A retried event already known from a replica (its owner died after replicating it) is
   published again; frontends drop what they already delivered by event id.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

from mesh.core.ownership import owner, rank
from mesh.core.sequencing import Sequencer
from mesh.errors import RemoteProtocolError
from mesh.wire import protocol as P

log = logging.getLogger("mesh.app")
wire_log = logging.getLogger("mesh.wire")

#: most videos whose rendezvous order is cached (the cache is dropped when the set changes)
RANK_CACHE_MAX = 100000
#: seconds a video is announced (``active_tails``) after its last publish
TAIL_ACTIVE = 30.0

#: what a slow op waits for after it started
_FORWARD, _FETCH, _REPLICATE = "forward", "fetch", "replicate"


# --- effects: what the shell carries out ------------------------------------------------------

class Reply:
    """Send ``msg`` to ROUTER peer ``peer``."""

    __slots__ = ("peer", "msg")

    def __init__(self, peer: bytes, msg: P.Control):
        self.peer = peer
        self.msg = msg


class Broadcast:
    """Send ``frames`` (a fan-out message of ``kind`` for ``video``) on the XPUB."""

    __slots__ = ("video", "kind", "frames")

    def __init__(self, video: str, kind: str, frames: list[bytes]):
        self.video = video
        self.kind = kind
        self.frames = frames


class Replicate:
    """Send one ``REPL`` of ``count`` packed events (``batches``) to ``backup``; then call
    ``Pipeline.replicated(self)``, whatever the outcome (answered, timed out, skipped)."""

    __slots__ = ("backup", "batches", "count", "burst")

    def __init__(self, backup: str, batches: list[tuple[int, bytes]], burst: "Burst"):
        self.backup = backup
        self.batches = batches
        self.count = sum(n for n, _ in batches)
        self.burst = burst

    def body(self) -> P.Packed:
        return P.packed_events_body(self.batches)


class Forward:
    """Send ``body`` (a ``fwd`` PUB of ``count`` events of ``video``) to ``target``; then call
    ``Pipeline.forwarded(self, reply, error)``."""

    __slots__ = ("target", "video", "body", "count", "op")

    def __init__(self, target: str, video: str, body: dict, count: int, op: "SlowBatch"):
        self.target = target
        self.video = video
        self.body = body
        self.count = count
        self.op = op


class FetchChain:
    """Send ``body`` (a peer ``HIST`` for the whole chain of ``video``) to ``source``; then call
    ``Pipeline.chain_fetched(self, reply, error)``."""

    __slots__ = ("source", "video", "body", "op")

    def __init__(self, source: str, video: str, op: "SlowBatch | HistoryWait"):
        self.source = source
        self.video = video
        self.body = {**P.history_body(video, None), "peer": True}
        self.op = op


Effect = Reply | Broadcast | Replicate | Forward | FetchChain


# --- pipeline state ---------------------------------------------------------------------------

class PendingAck:
    """The ACK of one PUB request: sent once every event has its result (fast-path events
    when their burst commits, slow-path ones when their forward or chain fetch is done).

    ``results`` holds per event its placement as ``protocol.ack_body`` takes it (a ``seq`` in
    our epoch, an ``(epoch, seq)``, or an error map), None until it has one.
    On the fast path ``Pipeline._sequence`` writes a placed event's result straight into
    ``results`` (no per-event bookkeeping); the burst calls ``settle`` once it committed.  That
    cannot send a result early: a request's events are all in one burst, and its slow-path
    events are sequenced only after that burst committed.  Slow-path bursts defer their
    results to their own commit (``fill``): two of them, for two videos of one request, may be
    in flight at once."""

    __slots__ = ("out", "peer", "request_id", "results", "sent", "legacy", "epoch")

    def __init__(self, out: list, peer: bytes, request_id: bytes, size: int, epoch: int,
                 legacy: list | None = None):
        self.out = out  # the pipeline's effects: the ACK goes there
        self.peer = peer
        self.request_id = request_id
        self.results: list[int | tuple[int, int] | dict | None] = [None] * size
        self.sent = False
        self.epoch = epoch
        self.legacy = legacy  # the request's events when it wants the per-event ACK form

    def fill(self, i: int, result: int | tuple[int, int] | dict) -> None:
        """Event ``i``'s result, unless it has one; the ACK leaves once all have one."""
        if self.results[i] is None:
            self.results[i] = result
            self.settle()

    def fail(self, i: int, result: dict) -> None:
        """Event ``i``'s error result, replacing a placement not yet acknowledged."""
        if not self.sent:
            self.results[i] = result
            self.settle()

    def settle(self) -> None:
        if not self.sent and None not in self.results:
            self.sent = True
            body = P.ack_body(self.results, self.epoch, self.legacy)
            self.out.append(Reply(self.peer, P.Control(P.MSG_ACK, self.request_id, body)))


#: (the request's ACK, the event's position in it, the event row)
Item = tuple[PendingAck, int, list]


class Burst:
    """What one burst of publishes commits: replicas per backup and fan-out per video (both as
    batches of pre-packed events, ``protocol.pack_events``), each video's last event, the
    requests whose placed events it acknowledges."""

    __slots__ = ("replicas", "fanout", "tails", "acks", "deferred", "placed", "new", "again",
                 "waiting", "serial", "slow")

    def __init__(self, acks: list[PendingAck], deferred: list | None = None,
                 slow: str | None = None) -> None:
        self.replicas: dict[str, list[tuple[int, bytes]]] = {}
        self.fanout: dict[str, list[tuple[int, bytes]]] = {}
        self.tails: dict[str, tuple[int, int]] = {}
        self.acks = acks  # settled on commit: their fast-path results are written in place
        self.deferred = deferred  # slow path: (ack, position, result), filled on commit
        self.placed = 0
        self.new = 0
        self.again = 0
        self.waiting = 0   # Replicate effects not yet reported back
        self.serial = 0    # place in the commit order (fast-path bursts)
        self.slow = slow   # the video of a slow-path burst: it commits on its own


class SlowBatch:
    """A video's slow-path publishes, joined until it starts: the items, whether they were
    forwarded to us, and the newest burst that must commit before it starts."""

    __slots__ = ("items", "fwd", "after", "stage")

    def __init__(self, items: list[Item], fwd: bool, after: int):
        self.items = items
        self.fwd = fwd
        self.after = after
        self.stage = ""


class HistoryWait:
    """A history request for a video we own but hold no chain of: answered once the chain
    is fetched."""

    __slots__ = ("peer", "request_id", "position", "after", "stage")

    def __init__(self, peer: bytes, request_id: bytes, position: tuple[int, int] | None):
        self.peer = peer
        self.request_id = request_id
        self.position = position
        self.after = 0
        self.stage = ""


class SlowVideo:
    """A video's slow-path work, one op at a time in arrival order."""

    __slots__ = ("queue", "busy", "open")

    def __init__(self) -> None:
        self.queue: deque[SlowBatch | HistoryWait] = deque()
        self.busy: SlowBatch | HistoryWait | None = None
        self.open: dict[bool, SlowBatch] = {}  # fwd -> the batch not started yet, to join


def rejection(stats: dict, peer: bytes, msg: P.Control, code: str, exc: Exception) -> Reply:
    """The error reply to a request we cannot accept (counted and logged once)."""
    stats["malformed"] += 1
    wire_log.warning("rejected %s from %r: %s", msg.msg_type.decode(errors="replace"), peer[:16], exc)
    return Reply(peer, P.Control(P.MSG_ERROR, msg.request_id, P.error_body(code, str(exc))))


class Pipeline:
    """One dispatcher's publish pipeline (see the module docstring).

    ``live()`` is the dispatcher set ownership is computed over (ours included unless we are
    leaving), ``clock()`` a monotonic clock in seconds; ``stats`` is the node's counters."""

    def __init__(self, name: str, seq: Sequencer, stats: dict, live: Callable[[], list[str]],
                 clock: Callable[[], float], event_rows: bool = True):
        self.name = name
        self.seq = seq
        self.stats = stats
        self.live = live
        self.clock = clock
        self.event_rows = event_rows
        self.out: list[Effect] = []
        self._slow: dict[str, SlowVideo] = {}
        self._waiting: set[str] = set()       # slow videos whose next op waits for a commit
        self._bursts: deque[Burst] = deque()  # fast-path bursts committing, in arrival order
        self._serial = 0      # the newest fast-path burst that entered the commit order
        self._committed = 0   # every burst up to this one has committed
        self._ranks: dict[str, list[str]] = {}  # video -> rendezvous order over _ranks_for
        self._ranks_for: list[str] = []
        # video -> (clock, position) of the last event broadcast here: tails announce what
        # subscribers can have seen, never events still awaiting replication
        self.active: dict[str, tuple[float, tuple[int, int]]] = {}

    def _effects(self) -> list[Effect]:
        out = self.out[:]
        self.out.clear()  # PendingAcks hold this very list
        return out

    # --- requests in ------------------------------------------------------------------------

    def publish(self, requests: list[tuple[bytes, P.Control]]) -> list[Effect]:
        """One burst of PUB requests: grouped per (video, forwarded) and published together."""
        groups: dict[bool, dict[str, list[Item]]] = {False: {}, True: {}}
        acks: list[PendingAck] = []
        for peer, msg in requests:
            self._take_publish(peer, msg, groups, acks)
        if acks:
            self._publish(groups, acks)
        return self._effects()

    def history(self, peer: bytes, msg: P.Control) -> list[Effect]:
        """A ``HIST`` request: the chain after a position, or ``reset`` when history cannot
        say.  The owner of a video it holds no chain of fetches the chain first."""
        try:
            video, after = P.history_request(msg)
        except RemoteProtocolError as exc:
            return [rejection(self.stats, peer, msg, "malformed", exc)]
        if not msg.body.get("peer") and owner(video, self.live()) == self.name \
                and (video in self._slow or not self.seq.has_log(video)):
            self._enqueue(video, HistoryWait(peer, msg.request_id, after))
        else:
            self._answer_history(peer, msg.request_id, video, after)
        return self._effects()

    def store_replica(self, peer: bytes, msg: P.Control) -> list[Effect]:
        """A ``REPL`` from the owner of some videos: its events join our logs."""
        try:
            events = P.publish_events(msg, P.check_row)
        except RemoteProtocolError as exc:
            return [rejection(self.stats, peer, msg, "malformed", exc)]
        stored = self.seq.store(events, self.clock())
        self.stats["replicas_stored"] += stored
        return [Reply(peer, P.Control(P.MSG_ACK, msg.request_id, {"stored": stored}))]

    def active_tails(self) -> list[tuple[str, tuple[int, int]]]:
        """The last broadcast event of each video broadcast here in the last TAIL_ACTIVE
        seconds (older ones are forgotten)."""
        cutoff = self.clock() - TAIL_ACTIVE
        out = []
        for video, (at, tail) in list(self.active.items()):
            if at < cutoff:
                del self.active[video]
            else:
                out.append((video, tail))
        return out

    # --- completions ------------------------------------------------------------------------

    def replicated(self, effect: Replicate) -> list[Effect]:
        burst = effect.burst
        burst.waiting -= 1
        if burst.waiting == 0:
            if burst.slow is not None:
                self._finish(burst)
                self._op_done(burst.slow)
            else:
                self._drain_commits()
        return self._effects()

    def forwarded(self, effect: Forward, reply: P.Control | None, error: object = None) -> list[Effect]:
        """The owner's answer to a forward (``reply``), or why there is none (``error``)."""
        op = effect.op
        placed = None
        if reply is not None:
            try:
                placed = P.ack_positions(reply, effect.count) if reply.msg_type == P.MSG_ACK else None
            except RemoteProtocolError as exc:
                error = exc
        if error is not None:
            log.warning("forwarding %s to its owner %s failed (%s); sequencing it here",
                        effect.video, effect.target, error)
        if placed is None or any(type(where) is dict for where in placed):  # an error result
            if self._chain_then_run(effect.video, op):
                self._op_done(effect.video)
            return self._effects()
        self.stats["forwarded"] += len(op.items)
        for (ack, i, _), where in zip(op.items, placed):
            ack.fill(i, where)
        self._op_done(effect.video)
        return self._effects()

    def chain_fetched(self, effect: FetchChain, reply: P.Control | None, error: object = None) -> list[Effect]:
        """The previous owner's answer to a chain fetch (``reply``), or why there is none."""
        chain: list[list] = []
        if reply is not None:
            try:
                chain = P.history_reply(reply, P.check_row) or []
                self.stats["chains_taken_over"] += bool(chain)
            except RemoteProtocolError as exc:
                error = exc
        if error is not None:
            self.stats["chain_fetch_failures"] += 1
            log.warning("could not fetch the chain of %s from %s (%s); starting a new one",
                        effect.video, effect.source, error)
        self.seq.store(chain, self.clock())
        self.seq.ensure_log(effect.video)
        if self._run(effect.video, effect.op):
            self._op_done(effect.video)
        return self._effects()

    # --- the fast path ----------------------------------------------------------------------

    def _take_publish(self, peer: bytes, msg: P.Control, groups: dict, acks: list[PendingAck]) -> None:
        try:
            events, rejected = P.publish_items(msg, P.check_row)
            if not events:  # nothing usable: the whole request is rejected
                raise RemoteProtocolError(rejected[0][1]["error"]["message"])
        except RemoteProtocolError as exc:
            self.out.append(rejection(self.stats, peer, msg, "malformed", exc))
            return
        # a requester that did not ask for the compact ACK gets the per-event maps (needs the ids)
        legacy = None if msg.body.get("ack") == P.ACK_SEQS else msg.body["events"]
        ack = PendingAck(self.out, peer, msg.request_id, len(events) + len(rejected), self.seq.epoch, legacy)
        acks.append(ack)
        if rejected:  # one line per request, not per event
            self.stats["malformed"] += 1
            self.stats["events_rejected"] += len(rejected)
            wire_log.warning("rejected %d of %d events of a publish from %r: %s", len(rejected),
                             len(events) + len(rejected), peer[:16], rejected[0][1]["error"]["message"])
            for i, result in rejected:
                ack.fill(i, result["error"])
        by_video = groups[bool(msg.body.get("fwd"))]
        for i, event in events:  # rows (P.check_row): what the sequencer keeps
            group = by_video.get(event[P.ROW_VIDEO])
            if group is None:
                group = by_video[event[P.ROW_VIDEO]] = []
            group.append((ack, i, event))

    def _rank(self, video: str, live: list[str]) -> list[str]:
        """The video's rendezvous order over ``live`` (cached until the set changes)."""
        if live != self._ranks_for or len(self._ranks) > RANK_CACHE_MAX:
            self._ranks.clear()
            self._ranks_for = live
        order = self._ranks.get(video)
        if order is None:
            order = self._ranks[video] = rank(video, live)
        return order

    def _publish(self, groups: dict[bool, dict[str, list[Item]]], acks: list[PendingAck]) -> None:
        """Sequence a burst's events (fast path) and commit them; hand the rest to the slow
        path (see the module docstring)."""
        live = self.live()
        burst = Burst(acks)
        slow = []
        now = self.clock()
        for fwd, by_video in groups.items():
            for video, items in by_video.items():
                order = self._rank(video, live)
                moved = bool(order) and order[0] != self.name and not fwd
                if moved or video in self._slow or not self.seq.has_log(video):
                    self._slow.setdefault(video, SlowVideo())
                    slow.append((video, items, fwd))
                else:
                    self._sequence(video, items, order, burst, now)
        if burst.placed:
            self._commit(burst)
        for video, items, fwd in slow:  # after this burst: a video's events may be in both
            sv = self._slow[video]
            batch = sv.open.get(fwd)
            if batch is not None and len(batch.items) + len(items) <= P.MAX_BATCH_EVENTS:
                # joins the video's pending slow publish that has not started yet: under
                # sustained load a video leaves the slow path after one more round, instead of
                # queueing one slow publish (with its own REPL) per burst for ever
                batch.items.extend(items)
                batch.after = self._serial
                continue
            batch = sv.open[fwd] = SlowBatch(items, fwd, self._serial)
            self._enqueue(video, batch)

    def _sequence(self, video: str, items: list[Item], order: list[str], burst: Burst, now: float) -> None:
        new, again, placed = self.seq.accept_many(video, [event for _, _, event in items], now)
        if burst.deferred is None:  # sent when the burst commits (_finish)
            for (ack, i, _), where in zip(items, placed):
                ack.results[i] = where
        else:
            burst.deferred.extend((ack, i, where) for (ack, i, _), where in zip(items, placed))
        burst.placed += len(placed)
        if not (again or new):
            return
        # each batch packed once: the same bytes go to the backup and to the fan-out
        batches = burst.fanout.setdefault(video, [])
        if again:
            batches.extend(P.pack_events(again, self.event_rows))
            burst.again += len(again)
        if new:
            packed = P.pack_events(new, self.event_rows)
            batches.extend(packed)
            backup = next((d for d in order if d != self.name), None)
            if backup is not None:
                burst.replicas.setdefault(backup, []).extend(packed)
            burst.new += len(new)
        last = (new or again)[-1]
        burst.tails[video] = (last[P.ROW_EPOCH], last[P.ROW_SEQ])

    def _replicate(self, burst: Burst) -> None:
        """A burst's new events to their backups: one ``Replicate`` per backup and message."""
        for backup, batches in burst.replicas.items():
            for group in P.packed_batches(batches):
                burst.waiting += 1
                self.out.append(Replicate(backup, group, burst))

    def _commit(self, burst: Burst) -> None:
        """A fast-path burst into the commit order: replicated, then -- once the bursts before
        it committed -- broadcast and acknowledged."""
        self._serial += 1
        burst.serial = self._serial
        self._bursts.append(burst)
        self._replicate(burst)
        if not burst.waiting:
            self._drain_commits()

    def _drain_commits(self) -> None:
        bursts = self._bursts
        if not bursts or bursts[0].waiting:
            return
        while bursts and not bursts[0].waiting:
            burst = bursts.popleft()
            self._finish(burst)
            self._committed = burst.serial
        for video in list(self._waiting):
            self._advance(video)

    def _finish(self, burst: Burst) -> None:
        at = self.clock()
        out, name, stats = self.out, self.name, self.stats
        for video, batches in burst.fanout.items():
            self.active[video] = (at, burst.tails[video])
            for count, data in batches:
                out.append(Broadcast(video, P.FANOUT_EVENTS, P.packed_fanout_events(video, name, count, data)))
            stats["fanout_msgs"] += len(batches)
        stats["events_in"] += burst.new
        stats["republished"] += burst.again
        stats["publish_bursts"] += 1
        for ack in burst.acks:
            ack.settle()
        for ack, i, result in burst.deferred or ():
            ack.fill(i, result)

    # --- the slow path ----------------------------------------------------------------------

    def _enqueue(self, video: str, op: SlowBatch | HistoryWait) -> None:
        self._slow.setdefault(video, SlowVideo()).queue.append(op)
        self._advance(video)

    def _advance(self, video: str) -> None:
        """Start the video's next slow op if none runs and the bursts before it committed;
        the video leaves the slow path once its queue is empty."""
        sv = self._slow.get(video)
        self._waiting.discard(video)
        while sv is not None and sv.busy is None and sv.queue:
            op = sv.queue[0]
            if op.after > self._committed:
                self._waiting.add(video)  # _drain_commits wakes it
                return
            sv.queue.popleft()
            if type(op) is SlowBatch and sv.open.get(op.fwd) is op:
                del sv.open[op.fwd]  # from here on, later publishes queue behind it
            sv.busy = op
            if self._start(video, op):
                sv.busy = None
        if sv is not None and sv.busy is None and not sv.queue:
            del self._slow[video]

    def _op_done(self, video: str) -> None:
        sv = self._slow.get(video)
        if sv is not None:
            sv.busy = None
            self._advance(video)

    def _start(self, video: str, op: SlowBatch | HistoryWait) -> bool:
        """Start ``op``; True when it is done already, False when it waits for a completion."""
        if type(op) is SlowBatch and not op.fwd:
            own = owner(video, self.live())
            if own is not None and own != self.name:
                op.stage = _FORWARD
                body = {**P.publish_body([e for _, _, e in op.items], compact_ack=True, rows=self.event_rows),
                        "fwd": True}
                self.out.append(Forward(own, video, body, len(op.items), op))
                return False
        return self._chain_then_run(video, op)

    def _chain_then_run(self, video: str, op: SlowBatch | HistoryWait) -> bool:
        """Run ``op`` once this dispatcher holds the video's chain: fetched first from the
        dispatcher that held it before us (so the chain and history continue across owners)."""
        if not self.seq.has_log(video):
            others = [d for d in rank(video, self.live()) if d != self.name]
            if others:
                op.stage = _FETCH
                self.out.append(FetchChain(others[0], video, op))
                return False
            self.seq.ensure_log(video)
        return self._run(video, op)

    def _run(self, video: str, op: SlowBatch | HistoryWait) -> bool:
        if type(op) is HistoryWait:
            self._answer_history(op.peer, op.request_id, video, op.position)
            return True
        burst = Burst([], deferred=[], slow=video)  # other slow publishes may settle these requests
        self._sequence(video, op.items, rank(video, self.live()), burst, self.clock())
        self._replicate(burst)
        if burst.waiting:
            op.stage = _REPLICATE
            return False
        self._finish(burst)
        return True

    def _answer_history(self, peer: bytes, request_id: bytes, video: str, after) -> None:
        chain = self.seq.after(video, after, self.clock())
        self.stats["history_requests"] += 1
        body = {"reset": True, "tail": list(self.seq.tail(video) or ()) or None} if chain is None \
            else {"events": P.wire_events(chain, self.event_rows)}
        self.out.append(Reply(peer, P.Control(P.MSG_ACK, request_id, body)))
