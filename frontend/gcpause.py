"""The garbage collector on a frontend: how long its full passes stop the loop, and keeping
long-lived viewer objects out of them.

Theory of operation.  CPython's cyclic collector walks every tracked container of the
generation it collects; a full (generation 2) pass over a process holding 20 k Tornado
connections took ~1 s, during which no viewer gets anything.  Three things keep that away:

* per viewer, few objects and no reference cycles (``frontend.stream.ViewerStream``): closed
  viewers are freed by reference counting, never by the collector;
* ``gc.freeze()`` once ``freeze_after`` viewers opened since the last freeze (checked every
  ``CHECK_INTERVAL``): the streams of a live event's audience, once settled, move to the
  permanent generation, which no pass walks.  What is frozen stays out of every pass: a frozen
  object that later becomes part of unreachable cycle garbage is never collected.  Viewer
  streams hold no cycles, but Tornado's request objects do, so the freeze waits while many
  connections are still Tornado's (``freeze_allowance``: an open storm, many publishers):
  what it can pin is a few KB per request open at the moment of a freeze, and freezes happen
  once per ``freeze_after`` new viewers (measured before this wait existed: 100 k viewers
  opened at 400/s over six frontends left 0-15 k frozen objects behind per frontend, a few
  MB);
* ``GCWatch`` times every full pass (``gc.callbacks``) so ``/healthz`` shows the longest
  one, and ``SIGUSR2`` asks for a full pass on purpose (benchmarks, an operator checking
  the pause) and logs how long it took.

Precedent: Instagram's Django fleet (``gc.freeze()`` after fork, Python 3.7's addition for
them) and the same advice in the ``gc.freeze`` documentation.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("mesh.app")

#: seconds between checks whether enough viewers arrived to freeze them
CHECK_INTERVAL = 5.0


def freeze_allowance(viewers: int) -> int:
    """Most connections still held by Tornado (requests in flight, viewers before their
    head) at which freezing is worth what it may pin: 1 % of the viewers, at least 100."""
    return max(100, viewers // 100)


class GCWatch:
    """Durations of the collector's full passes, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.full_passes = 0
        self.last_full_ms = 0.0
        self.max_full_ms = 0.0
        self.freezes = 0
        self._started = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started) * 1000.0
        self.full_passes += 1
        self.last_full_ms = ms
        self.max_full_ms = max(self.max_full_ms, ms)

    def collect_now(self) -> float:
        """A full pass on request (SIGUSR2); returns and logs its duration in ms."""
        unreachable = gc.collect()
        log.info("full garbage collection on request: %.1f ms, %d unreachable objects found "
                 "(%d tracked, %d frozen)", self.last_full_ms, unreachable, len(gc.get_objects()),
                 gc.get_freeze_count())
        return self.last_full_ms

    def freeze(self) -> None:
        gc.freeze()
        self.freezes += 1

    def stats(self) -> dict:
        return {"full_passes": self.full_passes, "last_full_ms": round(self.last_full_ms, 2),
                "max_full_ms": round(self.max_full_ms, 2), "freezes": self.freezes,
                "frozen": gc.get_freeze_count()}
