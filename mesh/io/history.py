"""A video's history from any of its replicas: the owner, then its backup.

Theory of operation.  The owner replicates every event to the video's backup (the next
dispatcher in rendezvous order, ``mesh.core.ownership.rank``) before it acknowledges it, so
the backup's log holds the whole acknowledged chain.  A SIGKILLed owner stays in the
registry until its liveness TTL runs out, and a catch-up that asks only the owner waits its
whole deadline for nothing, then tells the viewer ``reset``.  ``fetch_history`` is a hedged
request, as in Dean and Barroso's "The Tail at Scale": it asks the owner and, when no useful
answer has come within ``hedge`` seconds (or the owner failed or said it cannot say), the
backup too; the first chain either of them returns wins, and a late owner still counts.
When every replica asked failed, it tries again with the dispatcher set discovery gives then,
until ``timeout``.  A frontend (a viewer's Last-Event-ID catch-up, gap repair) and a bridge
(history of its DC's chain for a peer DC) use this one function.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from mesh.wire import protocol as P
from mesh.core.ownership import rank
from mesh.errors import RemoteProtocolError
from mesh.io.peers import PeerGone, PeerLinks

log = logging.getLogger("mesh.app")

#: the replicas of a video's chain asked in turn: its owner and its backup
REPLICAS = 2
#: seconds between rounds when every replica asked failed (discovery may change the set)
RETRY_PAUSE = 0.05

_FAILURES = (asyncio.TimeoutError, PeerGone, RemoteProtocolError)


class HistoryUnavailable(Exception):
    """No replica of the chain answered within the deadline."""


async def fetch_history(links: PeerLinks, video: str, after: tuple[int, int] | None,
                        timeout: float, hedge: float,
                        parse: Callable[[P.Control], Any] = P.history_reply) -> Any:
    """The chain of ``video`` after ``after`` as ``parse`` reads a replica's ``HIST`` reply
    (``protocol.history_reply``: the events, or None when the replica cannot say).  Returns
    the first answer that is not None; None when every replica that answered said it cannot
    say; raises ``HistoryUnavailable`` when none answered within ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body = P.history_body(video, after)
    failures: list[str] = []
    while True:
        replicas = rank(video, links.names)[:REPLICAS]
        if not replicas or loop.time() >= deadline:
            break
        answered, result = await _ask(links, replicas, body, parse, deadline, hedge, failures)
        if answered:
            return result
        await asyncio.sleep(min(RETRY_PAUSE, max(0.0, deadline - loop.time())))
    raise HistoryUnavailable("; ".join(failures[-REPLICAS:]) or "no dispatcher known")


async def _ask(links: PeerLinks, replicas: list[str], body: dict, parse, deadline: float,
               hedge: float, failures: list[str]) -> tuple[bool, Any]:
    """One round: ``replicas`` in order, each started ``hedge`` seconds after the one before
    (at once when it failed).  Returns (whether any answered, the chain or None)."""
    loop = asyncio.get_running_loop()
    running: dict[asyncio.Future, str] = {}
    said_none = False

    async def one(name: str) -> Any:
        return parse(await links.request(name, P.MSG_HISTORY, body, max(0.0, deadline - loop.time())))

    try:
        for i, name in enumerate(replicas):
            running[asyncio.ensure_future(one(name))] = name
            last = i == len(replicas) - 1
            stage_end = deadline if last else min(deadline, loop.time() + hedge)
            while running and loop.time() < stage_end:
                done, _ = await asyncio.wait(running, timeout=stage_end - loop.time(),
                                             return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    who = running.pop(fut)
                    exc = fut.exception()
                    if exc is None:
                        if fut.result() is not None:
                            return True, fut.result()
                        said_none = True
                    elif isinstance(exc, _FAILURES):
                        failures.append(f"{who}: {exc or type(exc).__name__}")
                        log.warning("history of %s from %s failed: %s", body["video"], who,
                                    exc or type(exc).__name__)
                    else:
                        raise exc
                if not running:
                    break  # every replica asked so far has answered or failed: ask the next now
        failures.extend(f"{who}: no answer in time" for who in running.values())
        return said_none, None
    finally:
        for fut in running:
            fut.cancel()
