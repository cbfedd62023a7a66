"""The publish path's core, sans-IO: which dispatcher owns each event, the events queued for
each owner in one loop turn, and what an owner's reply says about each event.

Theory of operation.  A publish goes to its video's owner (``mesh.core.ownership``).  Hashing
every event is a cost per like, so ``OwnerCache`` keeps each video's owner for as long as the
dispatcher set stays the same: the caller hands it an opaque ``generation`` token that changes
with the set (``PeerLinks.changed``, replaced on every change), and the cache starts over when
it does, or when it holds ``OWNER_CACHE_MAX`` videos.  ``group_by_owner`` splits a batch by
owner in one pass; it is the one place the publish path groups.  ``Outbox`` is the one
batching level: whatever is published to one owner in a loop turn, from any number of calls,
becomes one request (a few when it exceeds one message, ``protocol.chunked``), and each caller's
``ticket`` gets its own events' results back (``ack_results``) in its order.
"""

from __future__ import annotations

from typing import Any, Iterable

from mesh.errors import ClientError
from mesh.wire import protocol as P
from mesh.core.ownership import owner

#: most videos whose owner the cache holds
OWNER_CACHE_MAX = 100000

#: the result of an event no dispatcher acknowledged within ``publish_timeout``
NO_DISPATCHER = {"code": "no_dispatcher", "message": "no dispatcher acknowledged the event in time"}


class OwnerCache:
    def __init__(self, max_size: int = OWNER_CACHE_MAX):
        self.max_size = max_size
        self._owners: dict[str, str | None] = {}
        self._generation: object = None

    def table(self, generation: object) -> dict[str, str | None]:
        """The cached owners for the dispatcher set ``generation`` stands for (emptied when
        the set changed or the cache is full); a caller fills in what it computes."""
        if generation is not self._generation or len(self._owners) >= self.max_size:
            self._owners = {}
            self._generation = generation
        return self._owners

    def owner_of(self, video: str, generation: object, dispatchers: Iterable[str]) -> str | None:
        """The owner of ``video`` among ``dispatchers``, the set ``generation`` stands for."""
        table = self.table(generation)
        try:
            return table[video]
        except KeyError:
            own = table[video] = owner(video, dispatchers)
            return own


def group_by_owner(events: list[dict], indices: Iterable[int], owners: OwnerCache, generation: object,
                   dispatchers: Iterable[str]) -> dict[str, list[int]]:
    """The ``indices`` of ``events`` per owner (``owners`` for the set ``generation`` stands
    for), each list in order; events of videos with no owner (no dispatcher known) are left
    out.  It runs for every published event: one cache check per batch, then dict lookups."""
    table = owners.table(generation)
    groups: dict[str, list[int]] = {}
    for i in indices:
        video = events[i]["video"]
        try:
            target = table[video]
        except KeyError:
            target = table[video] = owner(video, dispatchers)
        if target is not None:
            group = groups.get(target)
            if group is None:
                groups[target] = [i]
            else:
                group.append(i)
    return groups


class Outbox:
    """Events queued per owner until the loop turn's flush: ``add`` says when a target's queue
    is new (the caller schedules its flush then), ``take`` empties it."""

    def __init__(self) -> None:
        self._queues: dict[str, list[tuple[list[dict], Any]]] = {}

    def add(self, target: str, events: list[dict], ticket: Any) -> bool:
        queue = self._queues.get(target)
        if queue is None:
            self._queues[target] = [(events, ticket)]
            return True
        queue.append((events, ticket))
        return False

    def take(self, target: str) -> list[tuple[list[dict], Any]]:
        return self._queues.pop(target, [])

    def __len__(self) -> int:
        return len(self._queues)


def joined(batch: list[tuple[list[dict], Any]]) -> list[list[list]]:
    """A flushed queue's events as the requests' chunks of rows (``protocol.event_row``,
    ``protocol.chunked``)."""
    return P.chunked([P.event_row(e) for part, _ in batch for e in part])


def ack_results(rows: list[list], reply: P.Control, into: dict[str, dict]) -> None:
    """An owner's reply to the PUB request of ``rows``, per event id into ``into``: the ack
    ``{"id","epoch","seq"}`` or ``{"id","error"}`` (RemoteProtocolError: a malformed reply)."""
    ids = [r[P.ROW_ID] for r in rows]
    if reply.msg_type == P.MSG_ERROR:
        into.update((i, {"id": i, "error": reply.body}) for i in ids)
        return
    for i, where in zip(ids, P.ack_positions(reply, len(ids))):
        into[i] = {"id": i, "error": where} if type(where) is dict else {"id": i, "epoch": where[0], "seq": where[1]}


def not_acknowledged(event: dict) -> dict:
    return {"id": event["id"], "error": NO_DISPATCHER}


def acked(result: dict) -> dict:
    """A publish result as the ack ``{"id","epoch","seq"}``, or ClientError(503): no
    dispatcher acknowledged within ``publish_timeout``, or the owner rejected the event."""
    error = result.get("error")
    if error is None:
        return result
    if error.get("code") == "no_dispatcher":
        raise ClientError(503, "no_dispatcher", error["message"], retryable=True)
    raise ClientError(503, "publish_rejected", f"dispatcher rejected the event: "
                      f"{error.get('message', '?')}", retryable=True)
