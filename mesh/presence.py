"""Presence: who is watching a video, and how many: sans-IO.

Theory of operation.  Each frontend keeps ``LocalPresence``: per video, its anonymous
connections and, per identified user, how many connections (tabs) that user has here.  It
sends the video's owner dispatcher *deltas* -- users whose first connection here opened
(``joined``) or whose last one closed (``left``), plus the local anonymous count -- at most
every ``flush`` seconds, and a full snapshot of every video every ``refresh`` seconds.  The
owner's ``PresenceBoard`` merges them: a video's presence is the union of its users over all
frontends, and its count is that union's size plus every frontend's anonymous viewers (a user
with two tabs, on one frontend or two, counts once).

Join and leave are debounced at the owner, as the seed system does with a delayed trigger: a
user who disappears from every frontend becomes "leaving" and is announced ``leave`` only if
still absent ``grace`` seconds later; one who comes back meanwhile (a page reload, a network
blip) produces neither event.  Above ``broadcast_max`` viewers, per-user join/leave is not
broadcast at all (a 100 k-viewer video must not storm its viewers); counts still are, at most
once per ``count_interval`` and only when the number changed.  A frontend that stops sending
(it died) is dropped after ``expiry`` seconds without an update, so its viewers leave within
``expiry + grace``.  A new owner (failover, rebalancing) learns the state from the next
snapshots, within ``refresh``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Local:
    anon: int = 0
    users: dict[str, int] = field(default_factory=dict)  # user -> connections here
    joined: set[str] = field(default_factory=set)
    left: set[str] = field(default_factory=set)


class LocalPresence:
    """A frontend's presence bookkeeping; produces the updates it sends to owners."""

    def __init__(self) -> None:
        self.videos: dict[str, _Local] = {}
        self.dirty: set[str] = set()

    def add(self, video: str, user: str | None) -> None:
        local = self.videos.setdefault(video, _Local())
        if user is None:
            local.anon += 1
        else:
            n = local.users.get(user, 0)
            local.users[user] = n + 1
            if n == 0:
                if user in local.left:
                    local.left.discard(user)  # back before the update went out: no change
                else:
                    local.joined.add(user)
        self.dirty.add(video)

    def remove(self, video: str, user: str | None) -> None:
        local = self.videos.get(video)
        if local is None:
            return
        if user is None:
            local.anon = max(0, local.anon - 1)
        elif user in local.users:
            local.users[user] -= 1
            if local.users[user] == 0:
                del local.users[user]
                if user in local.joined:
                    local.joined.discard(user)
                else:
                    local.left.add(user)
        self.dirty.add(video)

    def take(self) -> dict[str, dict]:
        """Updates for the videos that changed since the last call: video -> update."""
        out = {}
        for video in self.dirty:
            local = self.videos.get(video)
            if local is None:
                continue
            out[video] = {"video": video, "anon": local.anon, "joined": sorted(local.joined),
                          "left": sorted(local.left)}
            local.joined.clear()
            local.left.clear()
            if not local.anon and not local.users:
                del self.videos[video]
        self.dirty.clear()
        return out

    def snapshot(self) -> dict[str, dict]:
        """Full state of every video: sent every ``refresh`` seconds."""
        return {video: {"video": video, "anon": local.anon, "users": sorted(local.users), "full": True}
                for video, local in self.videos.items()}


@dataclass
class _Contribution:
    anon: int = 0
    users: set[str] = field(default_factory=set)
    seen: float = 0.0


@dataclass
class _Board:
    frontends: dict[str, _Contribution] = field(default_factory=dict)
    holders: dict[str, set[str]] = field(default_factory=dict)  # user -> frontends having them
    leaving: dict[str, float] = field(default_factory=dict)     # user -> when to announce leave
    announced: set[str] = field(default_factory=set)           # users announced as present
    broadcast_count: int | None = None
    broadcast_at: float = float("-inf")


class PresenceBoard:
    """The owner dispatcher's merged presence of its videos."""

    def __init__(self, grace: float = 5.0, expiry: float = 6.0, count_interval: float = 1.0,
                 broadcast_max: int = 1000):
        self.grace = grace
        self.expiry = expiry
        self.count_interval = count_interval
        self.broadcast_max = broadcast_max
        self.videos: dict[str, _Board] = {}

    def count(self, video: str) -> int:
        board = self.videos.get(video)
        if board is None:
            return 0
        return len(board.holders) + sum(c.anon for c in board.frontends.values())

    def users(self, video: str) -> list[str]:
        board = self.videos.get(video)
        return sorted(board.holders) if board else []

    def update(self, frontend: str, upd: dict, now: float) -> list[dict]:
        """Merge one frontend's update; returns presence events to broadcast now (joins)."""
        video = upd["video"]
        board = self.videos.setdefault(video, _Board())
        contrib = board.frontends.setdefault(frontend, _Contribution())
        contrib.anon = upd.get("anon", 0)
        contrib.seen = now
        if upd.get("full"):
            wanted = set(upd.get("users", ()))
            joined, left = wanted - contrib.users, contrib.users - wanted
        else:
            joined, left = set(upd.get("joined", ())), set(upd.get("left", ()))
        out = []
        for user in sorted(joined):
            contrib.users.add(user)
            holders = board.holders.setdefault(user, set())
            holders.add(frontend)
            board.leaving.pop(user, None)  # back within the grace period: nothing to say
            if user not in board.announced and self.count(video) <= self.broadcast_max:
                board.announced.add(user)  # only users whose join was broadcast get a leave
                out.append({"kind": "join", "user": user})
        for user in sorted(left):
            contrib.users.discard(user)
            self._drop_holder(board, user, frontend, now)
        return out

    def _drop_holder(self, board: _Board, user: str, frontend: str, now: float) -> None:
        holders = board.holders.get(user)
        if holders is None:
            return
        holders.discard(frontend)
        if not holders:
            del board.holders[user]
            board.leaving[user] = now + self.grace

    def tick(self, now: float) -> dict[str, list[dict]]:
        """Expire silent frontends, announce leaves whose grace ran out, and counts that
        changed (at most once per ``count_interval``).  Returns video -> presence events."""
        out: dict[str, list[dict]] = {}
        for video, board in list(self.videos.items()):
            events = []
            for name, contrib in list(board.frontends.items()):
                if now - contrib.seen > self.expiry:
                    for user in list(contrib.users):
                        self._drop_holder(board, user, name, now - self.grace)  # no grace: it died
                    del board.frontends[name]
            for user, due in list(board.leaving.items()):
                if due <= now:
                    del board.leaving[user]
                    if user in board.announced:
                        board.announced.discard(user)
                        if self.count(video) <= self.broadcast_max:
                            events.append({"kind": "leave", "user": user})
            count = self.count(video)
            if count != board.broadcast_count and now - board.broadcast_at >= self.count_interval:
                board.broadcast_count, board.broadcast_at = count, now
                events.append({"kind": "count", "count": count})
            if events:
                out[video] = events
            if not board.frontends and not board.leaving and count == 0 and board.broadcast_count == 0:
                del self.videos[video]
        return out

    def page(self, video: str, offset: int, limit: int) -> dict:
        users = self.users(video)
        return {"video": video, "count": self.count(video), "users": users[offset:offset + limit],
                "total_users": len(users), "offset": offset}
