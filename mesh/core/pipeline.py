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
   (the ACK carries the epoch once and one integer per event).
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

One writer per chain.  A dispatcher appends to a video's chain only while it is the video's
owner in its own view of the dispatcher set and holds the chain's tail (``writing``); it
never sequences a video for someone else.  A publish it cannot place -- it is not ready yet
(``ready``: it does not know the dispatcher set, right after a start), the owner did not
take a forward, a forward reached it while another dispatcher owns the video, or the chain
could not be fetched -- gets a retryable error (``protocol.error_body(retryable=True)``):
the event was not placed, and the publisher sends it again.  Three rules keep the tail with
the writer whatever the order of deaths and restarts:

* Sync before writing.  ``writing`` is forgotten whenever the dispatcher set changes; the
  first publish of a video after that fetches the chain after our tail from the next
  SYNC_SOURCES dispatchers in rendezvous order (the acting owner while we were away, the
  backup, the stand-in that took the replicas the backup missed) and follows the ``prev``
  links across their copies to the chain's real tail before anything is sequenced.  A
  source that does not answer means no write: the tail may be there.
* Handoff.  A dispatcher that answers a peer's chain fetch (the peer is taking the video
  over) stops writing the video at once and, until its own view of the registry lists the
  peer (at most ``handoff_hold`` seconds), sends the video's publishes to that peer.  A
  leaving dispatcher's forwards say so (``leaving``): the receiver stops counting it as an
  owner at once, before the registry tells it.
* Two copies.  A backup that does not answer a ``REPL`` (or is suspect) is replaced by the
  next dispatcher in the video's rendezvous order, so an acknowledged event is held by two
  dispatchers while two are alive, and a new owner finds the tail where its sync looks.

Expiry: no stale 503.  A PUB carries ``expires`` (``protocol.publish_expiry``), the wall-clock
time after which its events must not be placed: the frontend's deadline for them less
``frontend.publisher.EXPIRY_MARGIN``.  The frontend answers 503 only at that deadline.  An
event is placed only if ``wall()`` reads before ``expires`` when it is sequenced -- checked
as a request is taken (the fast path sequences in the same call), and again when a slow-path
batch forwards or sequences, since a forward or a chain fetch can take long; a forward
carries the earliest ``expires`` of its events, so the owner checks too.  An expired event
gets the retryable result ``expired`` and is not placed.  So when the dispatcher's clock is at
most EXPIRY_MARGIN behind the frontend's (one host: one clock; one DC: NTP, milliseconds),
every placement happens before the 503 is sent: a request that waited in a dead owner's
socket queue until the owner restarted is dropped, not placed seconds later behind newer
acknowledged events.  What the rule cannot exclude is a placement just before the deadline
whose ACK arrives after it: that event is delivered once, and a retry with the same
Idempotency-Key is answered with its placement.  A clock ahead of the frontend's only expires
events early (they are sent again while the deadline allows).
"""

from __future__ import annotations

import logging
import time
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

#: seconds a dispatcher that handed a video's chain to a peer leaves the video to that peer,
#: even while its own view of the registry does not list the peer yet (registry propagation
#: takes a watch round: WATCH_POLL or one Consul blocking query)
HANDOFF_HOLD = 5.0
#: dispatchers a new writer asks for the chain after its tail: the next ones in rendezvous
#: order hold every acknowledged event between them (owner's backup, and its stand-in)
SYNC_SOURCES = 2
#: longest dispatcher name a handoff mark records (node names are short)
NAME_MAX = 128

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
    """Send one ``REPL`` of ``count`` packed events (``batches``, of ``videos``) to ``backup``;
    then call ``Pipeline.replicated(self, ok)``: ``ok`` False when it was not answered (timed
    out, no link, or skipped because the backup is suspect)."""

    __slots__ = ("backup", "batches", "videos", "tried", "count", "burst")

    def __init__(self, backup: str, batches: list[tuple[int, bytes]], videos: list[str],
                 tried: frozenset[str], burst: "Burst"):
        self.backup = backup
        self.batches = batches
        self.videos = videos  # per batch: its video (a fallback backup is per video)
        self.tried = tried    # dispatchers that do not get these events again (us included)
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
    """Send ``body`` (a peer ``HIST`` for the chain of ``video`` after ``after``, our tail, or
    the whole chain) to ``source``; then call ``Pipeline.chain_fetched(self, reply, error)``.
    ``from`` names us: the source leaves the video to us from then on (handoff)."""

    __slots__ = ("source", "video", "after", "body", "op")

    def __init__(self, source: str, video: str, after: tuple[int, int] | None, me: str,
                 op: "SlowBatch | HistoryWait"):
        self.source = source
        self.video = video
        self.after = after
        self.body = {**P.history_body(video, after), "peer": True, "from": me}
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

    __slots__ = ("out", "peer", "request_id", "results", "sent", "epoch", "expires")

    def __init__(self, out: list, peer: bytes, request_id: bytes, size: int, epoch: int):
        self.out = out  # the pipeline's effects: the ACK goes there
        self.peer = peer
        self.request_id = request_id
        self.results: list[int | tuple[int, int] | dict | None] = [None] * size
        self.sent = False
        self.epoch = epoch
        self.expires: float | None = None  # the request's ``expires``: wall-clock ms

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
            body = P.ack_body(self.results, self.epoch)
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
        self.replicas: dict[str, tuple[list[tuple[int, bytes]], list[str]]] = {}  # backup -> batches, their videos
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

    __slots__ = ("items", "fwd", "after", "stage", "fetching", "fetched", "fetch_error")

    def __init__(self, items: list[Item], fwd: bool, after: int):
        self.items = items
        self.fwd = fwd
        self.after = after
        self.stage = ""
        self.fetching = 0        # chain fetches not answered yet
        self.fetched: list = []  # their chains
        self.fetch_error = None  # why one failed


class HistoryWait:
    """A history request for a video we own but hold no chain of: answered once the chain
    is fetched."""

    __slots__ = ("peer", "request_id", "position", "after", "stage", "fetching", "fetched", "fetch_error")

    def __init__(self, peer: bytes, request_id: bytes, position: tuple[int, int] | None):
        self.peer = peer
        self.request_id = request_id
        self.position = position
        self.after = 0
        self.stage = ""
        self.fetching = 0
        self.fetched: list = []
        self.fetch_error = None


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
    leaving), ``clock()`` a monotonic clock in seconds; ``stats`` is the node's counters;
    ``ready``: whether ``live()`` is known (the shell sets it after its first discovery);
    ``wall()`` the wall clock in seconds, which a PUB's ``expires`` is read against."""

    def __init__(self, name: str, seq: Sequencer, stats: dict, live: Callable[[], list[str]],
                 clock: Callable[[], float], ready: bool = True,
                 handoff_hold: float = HANDOFF_HOLD, wall: Callable[[], float] = time.time):
        self.ready = ready
        self.wall = wall
        self.handoff_hold = handoff_hold
        #: videos we write now: owned in our view since the last change of the set, tail synced
        self.writing: set[str] = set()
        self._handed: dict[str, tuple[str, float]] = {}  # video -> (peer we handed it to, until)
        self._departed: dict[str, float] = {}  # peer that told us it is leaving -> until
        self.name = name
        self.seq = seq
        self.stats = stats
        self.live = live
        self.clock = clock
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

    def _owners(self) -> list[str]:
        """The set ownership is computed over: ``live()`` without the peers that told us they
        are leaving (their registry entry may outlive their word for a watch round)."""
        live = self.live()
        if not self._departed:
            return live
        now = self.clock()
        self._departed = {name: until for name, until in self._departed.items() if until > now}
        return [d for d in live if d not in self._departed]

    def _effects(self) -> list[Effect]:
        out = self.out[:]
        self.out.clear()  # PendingAcks hold this very list
        return out

    # --- requests in ------------------------------------------------------------------------

    def publish(self, requests: list[tuple[bytes, P.Control]]) -> list[Effect]:
        """One burst of PUB requests: grouped per (video, forwarded) and published together."""
        if not self.ready:
            return [self._not_ready(peer, msg) for peer, msg in requests]
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
        if not self.ready:
            return [self._not_ready(peer, msg)]
        try:
            video, after = P.history_request(msg)
        except RemoteProtocolError as exc:
            return [rejection(self.stats, peer, msg, "malformed", exc)]
        if msg.body.get("peer"):  # a chain fetch: the peer takes the video over
            self._hand_over(video, msg.body.get("from"))
        elif owner(video, self._owners()) == self.name and (video in self._slow or not self.seq.has_log(video)):
            self._enqueue(video, HistoryWait(peer, msg.request_id, after))
            return self._effects()
        self._answer_history(peer, msg.request_id, video, after)
        return self._effects()

    def _not_ready(self, peer: bytes, msg: P.Control) -> Reply:
        self.stats["not_ready"] += 1
        return Reply(peer, P.Control(P.MSG_ERROR, msg.request_id, P.error_body(
            P.ERR_NOT_READY, f"dispatcher {self.name} is starting: it does not know the dispatcher set yet",
            retryable=True)))

    def _depart(self, name: object) -> None:
        """Peer ``name`` leaves (it forwards what it owned): it owns nothing in our eyes now."""
        if type(name) is str and name != self.name and len(name) <= NAME_MAX:
            if name not in self._departed:
                self._departed[name] = self.clock() + self.handoff_hold
                self.stats["peers_departed"] += 1

    def _hand_over(self, video: str, taker: object) -> None:
        """``taker`` fetches the chain of ``video`` to write it: we stop writing it now."""
        self.writing.discard(video)
        if type(taker) is not str or taker == self.name or len(taker) > NAME_MAX or taker in self._owners():
            return  # a taker our view lists outranks us for the video: ownership says enough
        now = self.clock()
        if len(self._handed) > RANK_CACHE_MAX:
            self._handed = {v: mark for v, mark in self._handed.items() if mark[1] > now}
        self._handed[video] = (taker, now + self.handoff_hold)
        self.stats["chains_handed_over"] += 1

    def store_replica(self, peer: bytes, msg: P.Control) -> list[Effect]:
        """A ``REPL`` from the owner of some videos: its events join our logs."""
        try:
            events = P.publish_events(msg)
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

    def replicated(self, effect: Replicate, ok: bool = True) -> list[Effect]:
        """A ``REPL`` answered (``ok``), or not: then its events go to the next dispatcher in
        each video's rendezvous order, and the burst waits for that one instead."""
        burst = effect.burst
        if not ok:
            self._replicate_elsewhere(effect)
        burst.waiting -= 1
        if burst.waiting == 0:
            if burst.slow is not None:
                self._finish(burst)
                self._op_done(burst.slow)
            else:
                self._drain_commits()
        return self._effects()

    def forwarded(self, effect: Forward, reply: P.Control | None, error: object = None) -> list[Effect]:
        """The owner's answer to a forward (``reply``), or why there is none (``error``).  The
        owner's results, errors included, are the requester's; no answer is a retryable error
        (sequencing the video here would give its chain a second writer)."""
        op = effect.op
        placed = None
        if reply is not None:
            try:
                if reply.msg_type == P.MSG_ACK:
                    placed = P.ack_positions(reply, effect.count)
                else:
                    error = f"{reply.body.get('code')}: {reply.body.get('message')}"
            except RemoteProtocolError as exc:
                error = exc
        if placed is None:
            log.warning("forwarding %s to its owner %s failed (%s); answered retryable", effect.video,
                        effect.target, error)
            self._refuse(op, "owner_unavailable", f"the owner of {effect.video} ({effect.target}) "
                                                  f"did not take the events: {error}")
        else:
            self.stats["forwarded"] += len(op.items)
            for (ack, i, _), where in zip(op.items, placed):
                ack.fill(i, where)
        self._op_done(effect.video)
        return self._effects()

    def chain_fetched(self, effect: FetchChain, reply: P.Control | None, error: object = None) -> list[Effect]:
        """One source's answer to a chain fetch (``reply``), or why there is none (``error``).
        Once every source answered, the events that continue our chain are stored and the op
        resumes; if one did not answer, the video is not written (its tail may be there):
        retryable errors."""
        video, op = effect.video, effect.op
        chain = None
        if reply is not None:
            try:
                if reply.msg_type == P.MSG_ACK:
                    chain = P.history_reply(reply)
                else:
                    error = f"{reply.body.get('code')}: {reply.body.get('message')}"
            except RemoteProtocolError as exc:
                error = exc
        if error is None and chain is None and effect.after is not None:
            # the source does not hold our tail: its whole chain says whether it is ahead
            self.out.append(FetchChain(effect.source, video, None, self.name, op))
            return self._effects()
        op.fetching -= 1
        if error is not None:
            self.stats["chain_fetch_failures"] += 1
            log.warning("could not fetch the chain of %s from %s (%s); answered retryable", video,
                        effect.source, error)
            op.fetch_error = f"the chain of {video} could not be fetched from {effect.source}: {error}"
        elif chain:
            op.fetched.append(chain)
        if op.fetching:
            return self._effects()
        if op.fetch_error is not None:
            self._refuse(op, "chain_unavailable", op.fetch_error)
            self._op_done(video)
            return self._effects()
        more = self._continuation(video, op.fetched)
        if more:
            self.stats["chains_taken_over" if self.seq.tail(video) is None else "chains_synced"] += 1
            self.seq.store(more, self.clock())
        op.fetched = []
        self.seq.ensure_log(video)
        if self._resume(video, op):
            self._op_done(video)
        return self._effects()

    # --- the fast path ----------------------------------------------------------------------

    def _take_publish(self, peer: bytes, msg: P.Control, groups: dict, acks: list[PendingAck]) -> None:
        try:
            events, rejected = P.publish_items(msg)
            if not events:  # nothing usable: the whole request is rejected
                raise RemoteProtocolError(rejected[0][1]["message"])
            expires = P.publish_expiry(msg)
        except RemoteProtocolError as exc:
            self.out.append(rejection(self.stats, peer, msg, "malformed", exc))
            return
        ack = PendingAck(self.out, peer, msg.request_id, len(events) + len(rejected), self.seq.epoch)
        acks.append(ack)
        if rejected:  # one line per request, not per event
            self.stats["malformed"] += 1
            self.stats["events_rejected"] += len(rejected)
            wire_log.warning("rejected %d of %d events of a publish from %r: %s", len(rejected),
                             len(events) + len(rejected), peer[:16], rejected[0][1]["message"])
            for i, result in rejected:
                ack.fill(i, result)
        if expires is not None:
            ack.expires = expires
            if self.wall() * 1000.0 >= expires:
                self._expired([(ack, i, event) for i, event in events])
                return
        fwd = bool(msg.body.get("fwd"))
        if fwd and msg.body.get("leaving") is True:
            self._depart(msg.body.get("from"))
        by_video = groups[fwd]
        for i, event in events:
            group = by_video.get(event[P.ROW_VIDEO])
            if group is None:
                group = by_video[event[P.ROW_VIDEO]] = []
            group.append((ack, i, event))

    def _observe(self, live: list[str]) -> None:
        """A new dispatcher set forgets the rank cache and what we write (sync before writing)."""
        if live != self._ranks_for:
            self._ranks.clear()
            self._ranks_for = live
            self.writing.clear()
            if self._handed:  # a taker our view lists now needs no mark: ownership says enough
                names = set(live)
                self._handed = {v: mark for v, mark in self._handed.items() if mark[0] not in names}

    def _rank(self, video: str, live: list[str]) -> list[str]:
        """The video's rendezvous order over ``live`` (cached until the set changes: the
        caller ran ``_observe(live)``)."""
        if len(self._ranks) > RANK_CACHE_MAX:
            self._ranks.clear()
        order = self._ranks.get(video)
        if order is None:
            order = self._ranks[video] = rank(video, live)
        return order

    def _publish(self, groups: dict[bool, dict[str, list[Item]]], acks: list[PendingAck]) -> None:
        """Sequence a burst's events (fast path) and commit them; hand the rest to the slow
        path (see the module docstring)."""
        live = self._owners()
        self._observe(live)
        burst = Burst(acks)
        slow = []
        now = self.clock()
        for fwd, by_video in groups.items():
            for video, items in by_video.items():
                order = self._rank(video, live)
                if not order or order[0] != self.name or video not in self.writing or video in self._slow:
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
            batches.extend(P.pack_events(again))
            burst.again += len(again)
        if new:
            packed = P.pack_events(new)
            batches.extend(packed)
            backup = next((d for d in order if d != self.name), None)
            if backup is not None:
                batches, videos = burst.replicas.get(backup) or burst.replicas.setdefault(backup, ([], []))
                batches.extend(packed)
                videos.extend([video] * len(packed))
            burst.new += len(new)
        last = (new or again)[-1]
        burst.tails[video] = (last[P.ROW_EPOCH], last[P.ROW_SEQ])

    def _replicate(self, burst: Burst) -> None:
        """A burst's new events to their backups: one ``Replicate`` per backup and message."""
        tried = frozenset((self.name,))
        for backup, (batches, videos) in burst.replicas.items():
            self._send_replicas(burst, backup, batches, videos, tried)

    def _send_replicas(self, burst: Burst, backup: str, batches: list[tuple[int, bytes]],
                       videos: list[str], tried: frozenset[str]) -> None:
        tried = tried | {backup}
        at = 0
        for group in P.packed_batches(batches):  # in order: the videos follow by count
            burst.waiting += 1
            self.out.append(Replicate(backup, group, videos[at:at + len(group)], tried, burst))
            at += len(group)

    def _replicate_elsewhere(self, effect: Replicate) -> None:
        """The events of an unanswered ``REPL`` to the next dispatcher of each video's
        rendezvous order not tried yet; with none left they are held here only (counted)."""
        live = self.live()
        regrouped: dict[str, tuple[list[tuple[int, bytes]], list[str]]] = {}
        for batch, video in zip(effect.batches, effect.videos):
            backup = next((d for d in rank(video, live) if d not in effect.tried), None)
            if backup is None:
                self.stats["replication_lost"] += batch[0]
                continue
            batches, videos = regrouped.setdefault(backup, ([], []))
            batches.append(batch)
            videos.append(video)
        for backup, (batches, videos) in regrouped.items():
            self.stats["replication_fallbacks"] += sum(n for n, _ in batches)
            self._send_replicas(effect.burst, backup, batches, videos, effect.tried)

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

    def _writer(self, video: str) -> str | None:
        """Who writes ``video`` now: its owner in our view, unless we are that owner and
        handed the chain to a peer less than ``handoff_hold`` seconds ago (then that peer)."""
        live = self._owners()
        self._observe(live)
        own = owner(video, live)
        if own == self.name:
            mark = self._handed.get(video)
            if mark is not None:
                if mark[1] > self.clock():
                    return mark[0]
                del self._handed[video]
        return own

    def _start(self, video: str, op: SlowBatch | HistoryWait) -> bool:
        """Start ``op``; True when it is done already, False when it waits for a completion."""
        if type(op) is HistoryWait:
            if self.seq.has_log(video) or owner(video, self._owners()) != self.name:
                return self._resume(video, op)
            return self._fetch(video, op)
        if not self._drop_expired(op):
            return True
        writer = self._writer(video)
        if writer != self.name:
            if op.fwd or writer is None:  # never forwarded twice: views of the set differ
                self._refuse(op, "not_owner", f"dispatcher {self.name} does not write {video} "
                                              f"(its writer here: {writer})")
                return True
            op.stage = _FORWARD
            body = {**P.publish_body([e for _, _, e in op.items]),
                    "fwd": True, "from": self.name}
            if self.name not in self.live():  # we are leaving: the writer-to-be may not know yet
                body["leaving"] = True
            expiring = [ack.expires for ack, _, _ in op.items if ack.expires is not None]
            if expiring:
                body["expires"] = min(expiring)
            self.out.append(Forward(writer, video, body, len(op.items), op))
            return False
        if video in self.writing:
            return self._run(video, op)
        return self._fetch(video, op)

    def _fetch(self, video: str, op: SlowBatch | HistoryWait) -> bool:
        """Fetch the chain after our tail (the whole chain when we hold none) from the next
        SYNC_SOURCES dispatchers in rendezvous order -- the acting owner while we were away,
        the backup, the backup's stand-in -- then resume ``op``; alone, resume at once."""
        others = [d for d in rank(video, self.live()) if d != self.name][:SYNC_SOURCES]
        if not others:
            self.seq.ensure_log(video)
            return self._resume(video, op)
        op.stage = _FETCH
        op.fetching, op.fetched, op.fetch_error = len(others), [], None
        after = self.seq.tail(video)
        for source in others:
            self.out.append(FetchChain(source, video, after, self.name, op))
        return False

    def _continuation(self, video: str, chains: list[list]) -> list:
        """The events of ``chains`` (copies of one chain, each in chain order, each possibly
        with holes) that continue our chain, in chain order: followed from our tail along the
        ``prev`` links; with no chain here, the longest run ending at a copy's last event."""
        position = self.seq.position
        successor: dict = {}
        for chain in chains:
            for event in chain:
                prev = event[P.ROW_PREV]
                successor.setdefault(tuple(prev) if prev else None, event)

        def run(event) -> list:
            out, seen = [], set()
            while event is not None and id(event) not in seen:
                seen.add(id(event))
                out.append(event)
                event = successor.get(position(event))
            return out

        tail = self.seq.tail(video)
        if tail is not None:
            return run(successor.get(tail))
        known = {position(e) for chain in chains for e in chain}
        ends = {position(chain[-1]) for chain in chains if chain}
        runs = [run(e) for key, e in successor.items() if key is None or key not in known]
        runs = [r for r in runs if position(r[-1]) in ends] or runs
        return max(runs, key=len, default=[])

    def _resume(self, video: str, op: SlowBatch | HistoryWait) -> bool:
        """``op`` once the chain is here: a history answer, or the batch sequenced -- if we
        still write the video (the set may have changed, or a peer taken it, meanwhile)."""
        if type(op) is HistoryWait:
            self._answer_history(op.peer, op.request_id, video, op.position)
            return True
        if self._writer(video) != self.name:
            return self._start(video, op)
        self.writing.add(video)
        return self._run(video, op)

    def _run(self, video: str, op: SlowBatch) -> bool:
        if not self._drop_expired(op):
            return True
        burst = Burst([], deferred=[], slow=video)  # other slow publishes may settle these requests
        self._sequence(video, op.items, rank(video, self._owners()), burst, self.clock())
        self._replicate(burst)
        if burst.waiting:
            op.stage = _REPLICATE
            return False
        self._finish(burst)
        return True

    def _drop_expired(self, op: SlowBatch) -> bool:
        """Answer ``expired`` for the items of ``op`` past their request's ``expires`` and
        keep the rest; False when none is left."""
        now = self.wall() * 1000.0
        late = [item for item in op.items if item[0].expires is not None and now >= item[0].expires]
        if late:
            self._expired(late)
            op.items = [item for item in op.items if item[0].expires is None or now < item[0].expires]
        return bool(op.items)

    def _expired(self, items: list[Item]) -> None:
        self.stats["publish_expired"] += len(items)
        result = P.error_body(P.ERR_EXPIRED, "the publish expired before it could be placed", retryable=True)
        for ack, i, _ in items:
            ack.fill(i, result)

    def _refuse(self, op: SlowBatch | HistoryWait, code: str, message: str) -> None:
        """``op`` answered with a retryable error: nothing of it was placed."""
        if type(op) is HistoryWait:
            self.out.append(Reply(op.peer, P.Control(P.MSG_ERROR, op.request_id,
                                                     P.error_body(code, message, retryable=True))))
            return
        self.stats["publish_refused"] += len(op.items)
        result = P.error_body(code, message, retryable=True)
        for ack, i, _ in op.items:
            ack.fill(i, result)

    def _answer_history(self, peer: bytes, request_id: bytes, video: str, after) -> None:
        chain = self.seq.after(video, after, self.clock())
        self.stats["history_requests"] += 1
        body = {"reset": True, "tail": list(self.seq.tail(video) or ()) or None} if chain is None \
            else {"events": chain}
        self.out.append(Reply(peer, P.Control(P.MSG_ACK, request_id, body)))
