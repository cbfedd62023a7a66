"""Video ownership: rendezvous (highest-random-weight) hashing over the live dispatchers.

Every node that knows the same dispatcher set computes the same owner for a video, with no
coordination; when a dispatcher joins or leaves, only the videos it wins or held move
(1/N of them).  The weight is the first 8 bytes (big-endian) of BLAKE2b-64 over
``dispatcher-name + "\\x00" + video``: stable across processes and languages (docs/PROTOCOL.md).
"""

from __future__ import annotations

import hashlib
from typing import Iterable


def weight(dispatcher: str, video: str) -> int:
    digest = hashlib.blake2b(f"{dispatcher}\x00{video}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(video: str, dispatchers: Iterable[str]) -> list[str]:
    """Dispatchers in preference order for ``video``: the owner first, then the fallbacks."""
    return sorted(dispatchers, key=lambda d: (weight(d, video), d), reverse=True)


def owner(video: str, dispatchers: Iterable[str]) -> str | None:
    best, best_w = None, -1
    for d in dispatchers:
        w = weight(d, video)
        if w > best_w or (w == best_w and best is not None and d > best):
            best, best_w = d, w
    return best
