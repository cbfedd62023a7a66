"""What a multi-DC bridge lets through, and its counters: the bridge's sans-IO core.

Theory of operation.  A bridge (``dispatcher.bridge``) runs two ZeroMQ proxies per DC:

* **export**: XSUB connected to every local dispatcher's XPUB -> XPUB bound at ``export_port``,
  which the peer DCs' bridges connect to;
* **import**: XSUB connected to every peer DC's export XPUB -> XPUB bound at ``import_port``,
  which this DC's frontends connect to (like to a dispatcher).

Subscriptions flow the other way (XPUB -> XSUB), deduplicated by the XPUB sockets (first
subscribe / last unsubscribe of a topic only), so a dispatcher sends a video's events towards a
DC only while some frontend there has a viewer of it: a DC without viewers of a video receives
none of its frames (the zguide's "Espresso"/proxy pattern, with PUB-side filtering all the way).

The data path of each proxy goes through :class:`Gate`: only event batches (``k == "E"``)
and DC presence summaries (``k == "D"``) cross, and only those whose origin DC (``dc``, stamped
by the owner dispatcher) is this DC on export and another DC on import.  Sync markers, tails
and the viewers' presence events (``k == "P"``) are local to a DC (they name a local owner).
The import path never feeds the export path, so nothing imported is re-exported: a full mesh
of DCs has no loops by construction, and each message crosses each link once.  Frontends also
drop duplicate events by id.  An imported summary does not go on to the frontends: the gate
returns a :class:`Relay` and the bridge sends it to the video's owner in its DC (``PRDC``),
whose board merges it (``mesh.core.presence``).  It travels on the video's topic, so it reaches only
the DCs whose frontends watch the video.

History relay: a frontend that finds a gap in another DC's chain asks its
DC's bridge (``HIST`` with ``dc`` = the chain's origin); the bridge passes the request to the
origin DC's bridge (``bridge.relay_peers``), which asks the video's owner there and the answer
travels back the same way, each hop checking what it passes on.

Limits: events whose origin DC is missing (a dispatcher older than the ``dc`` field) are not
exported; tail announcements do not cross, so the loss of a remote chain's *last* event is
noticed only with the next event.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

from mesh.wire import protocol as P
from mesh.errors import ConfigError, RemoteProtocolError

EXPORT = "export"
IMPORT = "import"
#: per-video counters are kept for at most this many videos per direction (then "_other")
MAX_VIDEOS_COUNTED = 10000


def parse_peers(entries: tuple[str, ...] | list[str], our_dc: str, key: str = "bridge.peers") -> dict[str, str]:
    """``["dc2=tcp://h:p", ...]`` -> ``{"dc2": "tcp://h:p"}``; our own DC is skipped (so every
    bridge of a mesh can be given the same list).  ``key``: the config key, for errors."""
    peers: dict[str, str] = {}
    for entry in entries:
        dc, sep, endpoint = entry.partition("=")
        dc, endpoint = dc.strip(), endpoint.strip()
        if not sep or not dc or not endpoint.startswith("tcp://"):
            raise ConfigError(f"{key}: {entry!r} is not dc=tcp://host:port")
        if dc in peers:
            raise ConfigError(f"{key}: datacenter {dc!r} listed twice")
        if dc != our_dc:
            peers[dc] = endpoint
    return peers


class Relay(NamedTuple):
    """An imported DC presence summary, for the video's owner in our DC (not for frontends)."""

    video: str
    summary: dict


class Gate:
    """Decides which fan-out frames a bridge passes and counts them per direction and video."""

    def __init__(self, dc: str):
        self.dc = dc
        self.frames: dict[str, dict[str, int]] = {EXPORT: defaultdict(int), IMPORT: defaultdict(int)}
        self.events: dict[str, int] = defaultdict(int)
        self.dropped: dict[str, int] = defaultdict(int)
        self.subscriptions: dict[str, int] = defaultdict(int)
        self.presence: dict[str, int] = defaultdict(int)  # DC presence summaries, per direction

    def passes(self, direction: str, frames: list[bytes]) -> list[bytes] | Relay | None:
        """The frames to forward (the same ones, or a re-encoded batch of the events that may
        cross), a :class:`Relay` (an imported presence summary), or None to drop them."""
        try:
            msg = P.FanoutMessage.from_frames(frames)
        except RemoteProtocolError:
            self.dropped["malformed"] += 1
            raise
        if msg.kind == P.FANOUT_DC_PRESENCE:
            return self._summary(direction, msg, frames)
        if msg.kind != P.FANOUT_EVENTS:
            self.dropped[f"{direction}_{'control' if msg.kind != P.FANOUT_PRESENCE else 'presence'}"] += 1
            return None
        dc, at = self.dc, P.ROW_DC  # rows: a row without a dc is its receiver's DC's
        if direction == EXPORT:
            keep = [e for e in msg.events if e[at] == dc]
        else:
            keep = [e for e in msg.events if e[at] is not None and e[at] != dc]
        if len(keep) != len(msg.events):
            self.dropped[f"{direction}_not_crossing"] += len(msg.events) - len(keep)
        if not keep:
            return None
        self._count(direction, msg.video, len(keep))
        if len(keep) == len(msg.events):
            return frames
        return P.FanoutMessage(msg.video, msg.kind, msg.sender, keep).to_frames()

    def _summary(self, direction: str, msg: P.FanoutMessage, frames: list[bytes]) -> list[bytes] | Relay | None:
        ours = msg.summary["dc"] == self.dc
        if ours != (direction == EXPORT):
            self.dropped[f"{direction}_presence_not_crossing"] += 1
            return None
        self.presence[direction] += 1
        return frames if ours else Relay(msg.video, msg.summary)

    def subscription(self, direction: str, msg: bytes) -> bool:
        """A (un)subscribe message from an XPUB, to pass upstream: only video topics."""
        if not msg or msg[0] not in (0, 1):
            self.dropped["bad_subscription"] += 1
            return False
        try:
            P.video_from_topic(bytes(msg[1:]))
        except RemoteProtocolError:
            self.dropped["bad_subscription"] += 1
            return False
        self.subscriptions[f"{direction}_{'subscribe' if msg[0] == 1 else 'unsubscribe'}"] += 1
        return True

    def _count(self, direction: str, video: str, n: int) -> None:
        per_video = self.frames[direction]
        if video not in per_video and len(per_video) >= MAX_VIDEOS_COUNTED:
            video = "_other"
        per_video[video] += 1
        self.events[direction] += n

    def snapshot(self) -> dict:
        return {"frames": {d: dict(v) for d, v in self.frames.items()},
                "events": dict(self.events), "dropped": dict(self.dropped), "presence": dict(self.presence),
                "subscriptions": dict(self.subscriptions)}



def relayed_history(reply: P.Control, video: str, dc: str) -> dict:
    """The body a bridge passes back for a relayed ``HIST``: the reply of the origin DC's
    owner (or of the next bridge), checked (``protocol.chain_reply``), or RemoteProtocolError."""
    events = P.chain_reply(reply, video, dc)
    return {"reset": True} if events is None else {"events": events}
