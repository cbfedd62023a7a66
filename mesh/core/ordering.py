"""A frontend's view of one video's event chain: in-order delivery, gap detection, repair.

Sans-IO.  Events arrive from the dispatchers over PUB/SUB, which may drop (high-water mark,
a reconnect, the slow joiner) and, across an owner change, may come from two dispatchers.  Each
event names its predecessor (``prev``, see ``mesh.core.sequencing``).  ``ChainFollower.offer`` passes
on every event whose ``prev`` is the last one delivered; on the first that does not fit it asks
its owner (``fetch_after``) for the missing events and holds everything that follows until
``repaired`` is called with the fetched events (or None: history cannot say, or the fetch timed
out).  Events already delivered (same id) are dropped, so a republished or replayed event is
never shown twice.  When continuity cannot be proven, ``repaired`` says ``reset``: the frontend
sends viewers an explicit ``reset`` event, never a silent gap.

Events imported from another datacenter (multi-DC bridges) belong to a remote owner's chain,
which no local dispatcher can repair: a frontend follows them with a separate follower per
(video, origin DC).  With a bridge that relays history (``dispatcher.bridge``) that follower
works as above, ``fetch_after`` going to the origin DC's owner through the bridges; without one,
:meth:`ChainFollower.offer_unrepairable` delivers at once and says ``reset`` when ``prev`` shows
a gap (events stay in order: a bridge path is one FIFO).
"""

from __future__ import annotations

from collections import OrderedDict

from mesh.core.sequencing import Position

RECENT_IDS = 4096


def position(event: dict) -> Position:
    """The ``(epoch, seq)`` of an event as a frontend holds it (``protocol.row_event``)."""
    return event["epoch"], event["seq"]


def _prev(event: dict) -> Position | None:
    """The position an event names as its predecessor (None at the start of a chain)."""
    prev = event.get("prev")
    return tuple(prev) if prev else None


class ChainFollower:
    def __init__(self) -> None:
        self.last: Position | None = None
        self.repairing = False
        self.held: list[dict] = []
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._positions: OrderedDict[Position, None] = OrderedDict()
        self.gaps = 0
        self.resets = 0
        self.duplicates = 0

    def seen(self, event_id: str) -> bool:
        return event_id in self._recent

    def _mark(self, event: dict) -> None:
        self.last = position(event)
        self._recent[event["id"]] = None
        self._positions[self.last] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
            self._positions.popitem(last=False)

    def check_tail(self, tail: Position) -> Position | None:
        """The owner announced its chain's tail (sent for recently active videos, so the loss
        of a video's last event is noticed without waiting for the next one).  Returns the
        position to fetch after when we are missing events, else None."""
        if self.repairing or self.last is None or tail in self._positions:
            return None
        self.gaps += 1
        self.repairing = True
        return self.last

    def offer(self, events: list[dict]) -> tuple[list[dict], Position | None]:
        """Events to deliver now, and the position to fetch after when a repair starts."""
        out: list[dict] = []
        fetch = None
        for event in events:
            if event["id"] in self._recent:
                self.duplicates += 1
                continue
            if self.repairing:
                self.held.append(event)
                continue
            prev = _prev(event)
            if self.last is None or prev == self.last:
                out.append(event)
                self._mark(event)
                continue
            self.gaps += 1
            self.repairing = True
            self.held.append(event)
            fetch = self.last
        return out, fetch

    def offer_unrepairable(self, events: list[dict]) -> tuple[list[dict], bool]:
        """For a chain nobody here can repair (another DC's): the events to deliver now, and
        whether a ``reset`` goes first (``prev`` is not the last delivered event)."""
        out: list[dict] = []
        reset = False
        for event in events:
            if event["id"] in self._recent:
                self.duplicates += 1
                continue
            prev = _prev(event)
            if self.last is not None and prev != self.last:
                reset = True  # one reset before the batch covers every gap in it
                self.gaps += 1
            out.append(event)
            self._mark(event)
        if reset:
            self.resets += 1
        return out, reset

    def repaired(self, chain: list[dict] | None) -> tuple[list[dict], bool]:
        """Finish a repair: ``chain`` is what the owner returned after ``last`` (None: it
        could not say).  Returns the events to deliver and whether a reset comes first."""
        self.repairing = False
        out: list[dict] = []
        reset = chain is None
        for event in chain or []:
            if event["id"] not in self._recent:
                out.append(event)
                self._mark(event)
        held, self.held = self.held, []
        for event in held:
            if event["id"] in self._recent:
                self.duplicates += 1
                continue
            prev = _prev(event)
            if prev != self.last:
                reset = True  # a fork or a loss that history could not fill
            out.append(event)
            self._mark(event)
        if reset:
            self.resets += 1
        return out, reset

    def catch_up(self, chain: list[dict]) -> None:
        """Adopt events a viewer was given from history as delivered."""
        for event in chain:
            self._recent[event["id"]] = None
