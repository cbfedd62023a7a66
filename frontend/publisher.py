"""The frontend's publish path: events to their owners' ROUTERs, acknowledged, retried.

Theory of operation.  ``publish_many`` groups a batch by owner once (``mesh.core.publishing``,
the owner cached per video until the dispatcher set changes) and queues each group in the
``Outbox``: everything published to one owner in a loop turn, from any number of calls,
travels in one PUB request (several when it exceeds one message).  Each group's results go to
``on_result`` as soon as its owner answers, so a slow owner delays only its own videos.  An
event whose ack does not come within ``attempt_timeout`` is sent again -- always to the current
owner, which changes once discovery says the owner left (a slow owner retried elsewhere would
sequence the event twice) -- until ``publish_timeout``; the event id makes the retry
idempotent.  An error the owner marks ``retryable`` (it has just started, a forward found no
owner, the chain's tail could not be fetched) means the event was not placed: it is sent again
after ``RETRYABLE_PAUSE``, so a dispatcher restart costs a publisher some milliseconds, not an
error; only at ``publish_timeout`` does the last such error become the result.  One future per
owner request and one per group attempt, never one per event.

Expiry.  Every PUB carries ``expires`` (``protocol.publish_body``): the wall-clock time, in ms,
after which a dispatcher must not place its events -- the earliest deadline of the events in
it, less ``EXPIRY_MARGIN``.  No attempt is sent after that, and the 503 goes out only at the
deadline itself, so a publish answered 503 is never placed afterwards, even from a request
that sat in a dead owner's queue until it restarted (``mesh.core.pipeline``: the rule, and
the clocks it assumes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable

from mesh.wire import protocol as P
from mesh.errors import RemoteProtocolError
from mesh.core.publishing import OwnerCache, Outbox, ack_results, group_by_owner, joined, not_acknowledged
from mesh.io.peers import PeerGone, PeerLinks
from mesh.io.tasks import Tasks

log = logging.getLogger("mesh.app")

#: ``on_result(indices, results)``: the results of ``events[i]`` for each ``i`` in ``indices``
OnResult = Callable[[list[int], list[dict]], None]
#: seconds a publish whose link broke waits for discovery before its retry
LINK_BROKE_PAUSE = 0.05
#: seconds before an event refused with a retryable error is sent again
RETRYABLE_PAUSE = 0.05
#: seconds a PUB expires before its events' deadline: the largest clock difference between a
#: frontend and a dispatcher the stale-503 rule tolerates (NTP keeps one DC's hosts within a
#: few ms, one host's processes share a clock; 100 ms is more than ten times that)
EXPIRY_MARGIN = 0.1


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _retryable(result: dict | None) -> bool:
    error = None if result is None else result.get("error")
    return error is not None and error.get("retryable") is True


def _fill_all(done: Iterable[asyncio.Future], sent: dict[asyncio.Future, list[int]], results: list,
              refused: dict[int, dict]) -> bool:
    """The answered groups' results into ``results``, and the events refused with a retryable
    error into ``refused`` (they stay pending); True when a group's link broke."""
    failed = False
    for fut in done:
        if fut.exception() is not None:
            failed = True
            continue
        for i, res in zip(sent[fut], fut.result()):
            if _retryable(res):
                refused[i] = res
            else:
                results[i] = res
    return failed


def _abandon(late) -> None:
    """Requests given up on: their late reply or failure is read when it comes."""
    for fut in late:
        fut.add_done_callback(_consume)


class Publisher:
    def __init__(self, links: PeerLinks, owners: OwnerCache, stats: dict,
                 tasks: Tasks, attempt_timeout: float, publish_timeout: float):
        self.links = links
        self.owners = owners  # shared with the subscriber and presence (MeshLink.owner_of)
        self.stats = stats
        self.tasks = tasks
        self.attempt_timeout = attempt_timeout
        self.publish_timeout = publish_timeout
        self.outbox = Outbox()
        self._expires: dict[str, float] = {}  # target -> the ``expires`` of its queued request

    async def publish_many(self, events: list[dict], on_result: OnResult | None = None) -> list[dict]:
        """Send ``events`` to their owners; one result per event, in order: the ack
        ``{"id","epoch","seq"}``, or ``{"id","error": {"code","message"}}`` (the owner's
        rejection, or ``no_dispatcher`` when no ack came within ``publish_timeout``).
        ``on_result`` gets each owner's share as soon as it is known."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        expires = (time.time() + self.publish_timeout - EXPIRY_MARGIN) * 1000.0
        results: list[dict | None] = [None] * len(events)
        refused: dict[int, dict] = {}  # index -> its latest retryable error
        pending: list[int] = list(range(len(events)))
        while pending:
            left = deadline - loop.time()
            if left <= EXPIRY_MARGIN:  # a request sent now would expire: the answer waits for the deadline
                await asyncio.sleep(max(0.0, left))
                break
            links = self.links
            groups = group_by_owner(events, pending, self.owners, links.changed, links.peers)
            if not groups:  # no dispatcher known yet: wait for discovery, within the deadline
                try:
                    await asyncio.wait_for(self.links.changed.wait(), left)
                except asyncio.TimeoutError:
                    break
                continue
            sent = {self._enqueue(target, [events[i] for i in idx], expires): idx for target, idx in groups.items()}
            refused_before = len(refused)
            refused.clear()
            if on_result is None:  # one wait for all: the cheapest for a caller that awaits the lot
                done, late = await asyncio.wait(sent, timeout=min(self.attempt_timeout, left))
                failed = _fill_all(done, sent, results, refused)
                _abandon(late)
            else:
                failed = await self._collect_each(sent, results, min(self.attempt_timeout, left), on_result,
                                                  refused)
            pending = [i for i in pending if results[i] is None]
            if pending:
                self.stats["publish_retries"] += len(pending)
                if failed or refused:  # the link broke, or the owner cannot place them yet
                    pause = LINK_BROKE_PAUSE if failed else RETRYABLE_PAUSE
                    if refused and not refused_before:
                        log.info("%d events refused for now (%s); retrying", len(refused),
                                 next(iter(refused.values()))["error"].get("code"))
                    await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
                else:
                    log.warning("no ack for %d events within %.2fs; retrying", len(pending), self.attempt_timeout)
        if pending:
            self.stats["publish_failures"] += len(pending)
            for i in pending:
                results[i] = refused.get(i) or not_acknowledged(events[i])
            if on_result is not None:
                on_result(pending, [results[i] for i in pending])
        return results

    async def _collect_each(self, sent: dict[asyncio.Future, list[int]], results: list, timeout: float,
                            on_result: OnResult, refused: dict[int, dict]) -> bool:
        """Fill ``results`` (and ``refused``, as ``_fill_all``) from the attempt's groups as
        they answer, each group's share to ``on_result`` then, until ``timeout``; True when a
        link broke."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        late, failed = set(sent), False
        while late:
            done, late = await asyncio.wait(late, timeout=max(0.0, until - loop.time()),
                                            return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            for fut in done:
                failed |= _fill_all((fut,), sent, results, refused)
                answered = [i for i in sent[fut] if results[i] is not None]  # pending until now
                if answered:
                    on_result(answered, [results[i] for i in answered])
        _abandon(late)
        return failed

    def _enqueue(self, target: str, events: list[dict], expires: float) -> asyncio.Future:
        """Queue ``events`` (to be placed before ``expires``, wall-clock ms) for ``target``'s
        next request; the future gets one result per event (None for an event the ack did
        not cover).  The request expires with its earliest event: one that expires earlier
        than its own deadline is refused ``expired`` (retryable) and sent again."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self.outbox.add(target, events, fut):
            self._expires[target] = expires
            loop.call_soon(self._flush, target)
        elif expires < self._expires[target]:
            self._expires[target] = expires
        return fut

    def _flush(self, target: str) -> None:
        batch = self.outbox.take(target)
        expires = self._expires.pop(target, None)
        if batch:
            self.stats["publish_requests"] += 1
            self.tasks.spawn(self._send(target, batch, expires))

    async def _send(self, target: str, batch: list[tuple[list[dict], asyncio.Future]], expires: float | None) -> None:
        chunks = joined(batch)
        results: dict[str, dict] = {}
        try:
            replies = await asyncio.gather(*(self.links.request(
                target, P.MSG_PUBLISH, P.publish_body(c, expires=expires),
                self.publish_timeout) for c in chunks))
            for rows, reply in zip(chunks, replies):
                ack_results(rows, reply, results)
        except asyncio.TimeoutError:
            return  # the publishers' own attempt deadlines have fired and retried
        except (PeerGone, RemoteProtocolError) as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(ConnectionError(str(exc)))
            return
        for part, fut in batch:
            if not fut.done():
                fut.set_result([results.get(e["id"]) for e in part])
