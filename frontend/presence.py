"""The frontend's presence link: local viewers' presence to each video's owner (``PRES``), and
a video's viewer list read back from it (``PRSQ``).

Theory of operation.  Presence is state, not a log: the owner keeps each frontend's latest
board per video (``mesh.core.presence``), and a frontend sends deltas often and full snapshots
now and then.  So a lost update needs no retry -- the next snapshot repairs it -- and a send
costs one request per owner per flush, whatever the number of videos.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from mesh.wire import protocol as P
from mesh.errors import ClientError
from mesh.io.peers import PeerGone, PeerLinks
from mesh.io.tasks import Tasks

log = logging.getLogger("mesh.app")


class PresenceLink:
    def __init__(self, links: PeerLinks, name: str, owner_of: Callable[[str], str | None],
                 stats: dict, tasks: Tasks):
        self.links = links
        self.name = name  # our frontend name: the owner keeps one board per frontend
        self.owner_of = owner_of
        self.stats = stats
        self.tasks = tasks

    def send_presence(self, updates: list[dict], timeout: float) -> None:
        """Each update to its video's owner, one request per owner, in the background."""
        by_owner: dict[str, list[dict]] = {}
        for upd in updates:
            own = self.owner_of(upd["video"])
            if own is not None:
                by_owner.setdefault(own, []).append(upd)
        for own, batch in by_owner.items():
            self.stats["presence_msgs"] += 1
            self.tasks.spawn(self._send(own, batch, timeout))

    async def _send(self, target: str, batch: list[dict], timeout: float) -> None:
        try:
            await self.links.request(target, P.MSG_PRESENCE, {"frontend": self.name, "updates": batch}, timeout)
        except (asyncio.TimeoutError, PeerGone) as exc:
            self.stats["presence_failures"] += 1
            log.info("presence update to %s failed (%s); the next snapshot repairs it",
                     target, exc or type(exc).__name__)

    async def presence_page(self, video: str, offset: int, limit: int, timeout: float) -> dict:
        """One page of the video's viewers, from its owner (ClientError 503 when it cannot)."""
        own = self.owner_of(video)
        if own is None:
            raise ClientError(503, "no_dispatcher", "no dispatcher known", retryable=True)
        try:
            reply = await self.links.request(own, P.MSG_PRESENCE_QUERY,
                                             {"video": video, "offset": offset, "limit": limit}, timeout)
        except (asyncio.TimeoutError, PeerGone):
            raise ClientError(503, "no_dispatcher", "the video's owner did not answer", retryable=True) from None
        if reply.msg_type != P.MSG_ACK:
            raise ClientError(503, "presence_unavailable", str(reply.body.get("message", "?")), retryable=True)
        return reply.body
