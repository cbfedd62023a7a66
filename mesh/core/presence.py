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
once per ``count_interval`` and only when the number changed or a frontend started watching the
video (its first viewers there get the count even when their arrival does not change it: a
second tab, a reload within ``grace`` on another frontend).  A frontend that stops sending
(it died) is dropped after ``expiry`` seconds without an update, so its viewers leave within
``expiry + grace``.  A new owner (failover, rebalancing) learns the state from the next
snapshots, within ``refresh``.

Several datacenters.  Each DC's owner of a video also *exports* its DC's own presence of it
(``export``): a summary -- the DC's count and its identified users, as deltas at most every
``dc_flush`` seconds while they change and in full every ``dc_refresh`` seconds (and at once
when someone new subscribes to the video, e.g. a peer DC's bridge) -- published on the video's
topic, so it reaches only the DCs whose frontends subscribed to the video (``mesh.core.bridging``
relays it to their owner).  A summary only ever holds the exporting DC's *own* frontends'
presence, so nothing is re-exported.  The receiving owner merges each peer DC as one more
contributor (``update_dc``): its users join the union, and its count minus its listed users is
added like anonymous viewers.  So a user present in two DCs at once counts once, like a user with
two tabs; anonymous viewers (and users beyond ``MAX_SUMMARY_USERS`` a DC lists) are summed.  A
peer DC's users go through the same ``grace`` before ``leave``; a DC that stopped sending (its
bridge or owner vanished) is dropped after ``dc_expiry``.  A delta that does not follow the last
summary received from that owner (a lost message, an owner change) is not applied -- only its
count is -- until the next full summary, within ``dc_refresh``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mesh.wire.protocol import MAX_SUMMARY_USERS

#: prefix of a peer DC's contributor name on a board (no frontend name holds a NUL)
DC_CONTRIBUTOR = "\x00dc:"


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
    remote: bool = False   # a peer DC's summary, not one of our frontends
    origin: str = ""       # remote: the owner dispatcher whose summaries we follow
    n: int = -1            # remote: number of the last summary applied (-1: wait for a full one)


@dataclass
class _Board:
    frontends: dict[str, _Contribution] = field(default_factory=dict)
    holders: dict[str, set[str]] = field(default_factory=dict)  # user -> frontends having them
    leaving: dict[str, float] = field(default_factory=dict)     # user -> when to announce leave
    announced: set[str] = field(default_factory=set)           # users announced as present
    broadcast_count: int | None = None
    broadcast_at: float = float("-inf")
    count_wanted: bool = False  # a frontend started watching: it needs the count, changed or not
    # export of our own DC's presence to peer DCs
    local_dirty: bool = True
    exported: set[str] | None = None   # our DC's users as of the last summary (None: none sent)
    exported_count: int = 0
    export_at: float = float("-inf")
    export_full_at: float = float("-inf")
    export_full_now: bool = False
    export_n: int = -1


class PresenceBoard:
    """The owner dispatcher's merged presence of its videos."""

    def __init__(self, grace: float = 5.0, expiry: float = 6.0, count_interval: float = 1.0,
                 broadcast_max: int = 1000, dc: str = "dc1", dc_flush: float = 0.25,
                 dc_refresh: float = 5.0, dc_expiry: float = 15.0):
        self.grace = grace
        self.expiry = expiry
        self.count_interval = count_interval
        self.broadcast_max = broadcast_max
        self.dc = dc
        self.dc_flush = dc_flush
        self.dc_refresh = dc_refresh
        self.dc_expiry = dc_expiry
        self.videos: dict[str, _Board] = {}
        self.stale_deltas = 0

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
        contrib = board.frontends.get(frontend)
        if contrib is None or (not contrib.anon and not contrib.users):
            # its first viewers of the video: the count may not change, but they must see it
            board.count_wanted = True
            contrib = board.frontends.setdefault(frontend, _Contribution())
        contrib.anon = upd.get("anon", 0)
        contrib.seen = now
        board.local_dirty = True
        if upd.get("full"):
            wanted = set(upd.get("users", ()))
            joined, left = wanted - contrib.users, contrib.users - wanted
        else:
            joined, left = set(upd.get("joined", ())), set(upd.get("left", ()))
        return self._merge(video, board, frontend, contrib, joined, left, now)

    def update_dc(self, video: str, summary: dict, now: float) -> list[dict]:
        """Merge a peer DC's summary of its own presence (``export`` there, checked by
        ``protocol.check_dc_summary``); returns presence events to broadcast now (joins)."""
        if summary["dc"] == self.dc:
            return []  # our own summary back (misconfigured peers): never count it twice
        board = self.videos.setdefault(video, _Board())
        name = DC_CONTRIBUTOR + summary["dc"]
        contrib = board.frontends.setdefault(name, _Contribution(remote=True))
        contrib.seen = now
        if summary["full"]:
            contrib.origin, contrib.n = summary["from"], summary["n"]
            target = set(summary["users"])
        elif summary["from"] == contrib.origin and summary["n"] == contrib.n + 1:
            contrib.n = summary["n"]
            target = (contrib.users | set(summary["joined"])) - set(summary["left"])
        else:
            self.stale_deltas += 1  # a summary was lost (or a new owner): wait for a full one
            contrib.n = -1
            target = contrib.users
        contrib.anon = max(0, summary["count"] - len(target))  # the count is always current
        return self._merge(video, board, name, contrib, target - contrib.users, contrib.users - target, now)

    def _merge(self, video: str, board: _Board, name: str, contrib: _Contribution,
               joined: set[str], left: set[str], now: float) -> list[dict]:
        out = []
        for user in sorted(joined):
            contrib.users.add(user)
            holders = board.holders.setdefault(user, set())
            holders.add(name)
            board.leaving.pop(user, None)  # back within the grace period: nothing to say
            if user not in board.announced and self.count(video) <= self.broadcast_max:
                board.announced.add(user)  # only users whose join was broadcast get a leave
                out.append({"kind": "join", "user": user})
        for user in sorted(left):
            contrib.users.discard(user)
            self._drop_holder(board, user, name, now)
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
                if now - contrib.seen > (self.dc_expiry if contrib.remote else self.expiry):
                    for user in list(contrib.users):
                        self._drop_holder(board, user, name, now - self.grace)  # no grace: it died
                    del board.frontends[name]
                    board.local_dirty |= not contrib.remote
            for user, due in list(board.leaving.items()):
                if due <= now:
                    del board.leaving[user]
                    if user in board.announced:
                        board.announced.discard(user)
                        if self.count(video) <= self.broadcast_max:
                            events.append({"kind": "leave", "user": user})
            count = self.count(video)
            if ((count != board.broadcast_count or board.count_wanted)
                    and now - board.broadcast_at >= self.count_interval):
                board.broadcast_count, board.broadcast_at, board.count_wanted = count, now, False
                events.append({"kind": "count", "count": count})
            if events:
                out[video] = events
            if (not board.frontends and not board.leaving and count == 0 and board.broadcast_count == 0
                    and not board.exported_count):
                del self.videos[video]
        return out

    # --- several datacenters: our own DC's presence, for the others --------------------------

    def want_full_export(self, video: str) -> None:
        """Someone (a peer DC's bridge, among others) subscribed to the video: send it our
        full summary at the next ``export`` instead of making it wait for ``dc_refresh``."""
        board = self.videos.get(video)
        if board is not None:
            board.export_full_now = True

    def export(self, now: float, owns: Callable[[str], bool] = lambda video: True) -> dict[str, dict]:
        """Our DC's own presence summaries due now: video -> summary (``check_dc_summary``
        without ``from``, which the dispatcher adds).  A delta when our DC's users or count
        changed (at most every ``dc_flush``), a full summary every ``dc_refresh`` while the
        DC has viewers (the last change to none goes out once).  Only videos we ``owns``: a
        former owner's board goes stale (its frontends moved on) and must not speak for the DC."""
        out = {}
        for video, board in self.videos.items():
            full = board.export_full_now or now - board.export_full_at >= self.dc_refresh
            if not full and not (board.local_dirty and now - board.export_at >= self.dc_flush):
                continue
            if not owns(video):
                board.exported, board.exported_count, board.export_n = None, 0, -1  # back: full first
                board.export_full_at, board.export_full_now = now, False
                continue
            users, count = self._local(board)
            board.local_dirty = False
            if full:
                board.export_full_at, board.export_full_now = now, False
            if not count and not board.exported_count:
                continue  # nobody here, and the peers were told so (or never heard of us)
            if not full and users == board.exported and count == board.exported_count:
                continue  # a frontend's snapshot that changed nothing
            # a first summary, and any past the user cap (deltas of a truncated list would lie)
            full = full or board.exported is None or len(users) > MAX_SUMMARY_USERS
            board.export_n += 1
            summary = {"dc": self.dc, "n": board.export_n, "count": count, "full": full}
            if full:
                summary["users"] = sorted(users)[:MAX_SUMMARY_USERS]
                board.export_full_at = now
            else:
                summary["joined"] = sorted(users - board.exported)
                summary["left"] = sorted(board.exported - users)
            board.exported, board.exported_count, board.export_at = users, count, now
            out[video] = summary
        return out

    @staticmethod
    def _local(board: _Board) -> tuple[set[str], int]:
        """Our own DC's users and count of a video (without peer DCs' summaries)."""
        users: set[str] = set()
        anon = 0
        for contrib in board.frontends.values():
            if not contrib.remote:
                users |= contrib.users
                anon += contrib.anon
        return users, len(users) + anon

    def dcs(self, video: str) -> dict[str, int]:
        """Viewers per DC, each DC's own count (ours, and the peers' whose summary we hold)."""
        board = self.videos.get(video)
        if board is None:
            return {}
        return {self.dc: self._local(board)[1],
                **{name[len(DC_CONTRIBUTOR):]: c.anon + len(c.users)
                   for name, c in board.frontends.items() if c.remote}}

    def page(self, video: str, offset: int, limit: int) -> dict:
        users = self.users(video)
        return {"video": video, "count": self.count(video), "users": users[offset:offset + limit],
                "total_users": len(users), "offset": offset}
