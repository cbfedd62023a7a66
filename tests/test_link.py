"""The frontend's mesh link, piece by piece and without sockets: the history fetch that asks
the owner and then the backup (``mesh.io.history`` over a fake link), the catch-up filter of a
reconnecting viewer across epochs (``frontend.stream.Given``), and the publish path's core
(``mesh.core.publishing``)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from types import SimpleNamespace

import pytest

from mesh.wire import protocol as P
from mesh.core.ownership import rank
from mesh.io.history import HistoryUnavailable, fetch_history
from mesh.io.peers import PeerGone
from frontend.fanout import Fanout
from frontend.stream import Given, ViewerStream
from mesh.core.subscriptions import SubscriptionTable


def _event(epoch: int, seq: int, prev=None, video: str = "v", eid: str | None = None) -> dict:
    return {"id": eid or f"e{epoch}-{seq}", "video": video, "kind": "like", "user": "u", "text": "",
            "ts": 0, "epoch": epoch, "seq": seq, "prev": list(prev) if prev else None}


# --- history from any replica -------------------------------------------------------------------


class FakeLinks:
    """``PeerLinks``' two members ``fetch_history`` uses; ``answers[name]`` is a coroutine
    function ``(body, timeout) -> Control`` (it may sleep or raise like a real link)."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.asked: list[tuple[str, float]] = []

    @property
    def names(self) -> list[str]:
        return sorted(self.answers)

    async def request(self, name: str, msg_type: bytes, body: dict, timeout: float) -> P.Control:
        assert msg_type == P.MSG_HISTORY
        self.asked.append((name, time.monotonic()))
        return await asyncio.wait_for(self.answers[name](body, timeout), timeout)


def _chain_reply(events):
    async def answer(body, timeout):
        return P.Control(P.MSG_ACK, b"1", {"events": events})
    return answer


def _silent():
    async def answer(body, timeout):
        await asyncio.sleep(3600)
    return answer


def _replicas(video: str) -> tuple[str, str]:
    owner, backup = rank(video, ["d1", "d2", "d3"])[:2]
    return owner, backup


async def test_history_comes_from_the_backup_once_the_owner_is_silent_past_the_deadline():
    owner, backup = _replicas("v")
    chain = [_event(7, 1)]
    rest = next(d for d in ("d1", "d2", "d3") if d not in (owner, backup))
    links = FakeLinks({owner: _silent(), backup: _chain_reply(chain), rest: _chain_reply([])})
    start = time.monotonic()
    got = await fetch_history(links, "v", (7, 0), timeout=5.0, hedge=0.2)
    took = time.monotonic() - start
    assert [e["id"] for e in got] == ["e7-1"]
    assert [n for n, _ in links.asked] == [owner, backup]  # the third dispatcher holds no replica
    assert links.asked[1][1] - start >= 0.2  # the backup is asked only after the hedge delay
    assert took < 2.0  # far below the 5 s deadline (2 s: margin for a loaded 2-core runner)


async def test_a_prompt_owner_is_the_only_replica_asked():
    owner, backup = _replicas("v")
    links = FakeLinks({owner: _chain_reply([_event(7, 2, (7, 1))]), backup: _chain_reply([])})
    got = await fetch_history(links, "v", (7, 1), timeout=5.0, hedge=0.5)
    assert [e["id"] for e in got] == ["e7-2"] and [n for n, _ in links.asked] == [owner]


async def test_an_owner_that_cannot_say_or_is_gone_sends_the_request_to_the_backup_at_once():
    owner, backup = _replicas("v")

    async def cannot_say(body, timeout):
        return P.Control(P.MSG_ACK, b"1", {"reset": True})

    async def gone(body, timeout):
        raise PeerGone("no link")

    for first in (cannot_say, gone):
        links = FakeLinks({owner: first, backup: _chain_reply([_event(7, 3)])})
        start = time.monotonic()
        got = await fetch_history(links, "v", (7, 2), timeout=5.0, hedge=2.0)
        assert [e["id"] for e in got] == ["e7-3"]
        assert links.asked[1][1] - start < 1.0  # not after the 2 s hedge delay


async def test_a_late_owner_answer_still_wins_when_the_backup_is_silent_too():
    owner, backup = _replicas("v")

    async def late(body, timeout):
        await asyncio.sleep(0.3)
        return P.Control(P.MSG_ACK, b"1", {"events": [_event(7, 4)]})

    links = FakeLinks({owner: late, backup: _silent()})
    got = await fetch_history(links, "v", (7, 3), timeout=5.0, hedge=0.1)
    assert [e["id"] for e in got] == ["e7-4"]


async def test_history_says_none_when_every_replica_cannot_say_and_raises_when_none_answers():
    owner, backup = _replicas("v")

    async def cannot_say(body, timeout):
        return P.Control(P.MSG_ACK, b"1", {"reset": True})

    assert await fetch_history(FakeLinks({owner: cannot_say, backup: cannot_say}), "v", (1, 1),
                               timeout=2.0, hedge=0.05) is None
    start = time.monotonic()
    with pytest.raises(HistoryUnavailable):
        await fetch_history(FakeLinks({owner: _silent(), backup: _silent()}), "v", (1, 1),
                            timeout=0.4, hedge=0.1)
    assert time.monotonic() - start < 1.5  # within its 0.4 s deadline (margin for a loaded runner)
    with pytest.raises(HistoryUnavailable):
        await fetch_history(FakeLinks({}), "v", None, timeout=0.2, hedge=0.1)


async def test_a_malformed_reply_counts_as_no_answer_and_the_backup_is_asked():
    owner, backup = _replicas("v")

    async def garbage(body, timeout):
        return P.Control(P.MSG_ACK, b"1", {"events": "not a list"})

    links = FakeLinks({owner: garbage, backup: _chain_reply([_event(7, 5)])})
    got = await fetch_history(links, "v", (7, 4), timeout=2.0, hedge=1.0)
    assert [e["id"] for e in got] == ["e7-5"]


# --- a reconnecting viewer's catch-up across epochs ---------------------------------------------


def test_given_compares_positions_only_within_an_epoch():
    # the owner's epoch 2000 is larger than its backup's 1000 (the backup started first); the
    # viewer's Last-Event-ID is 2000:3 and history gave 2000:4 and the backup's 1000:1
    chain = [_event(2000, 4, (2000, 3)), _event(1000, 1, (2000, 4))]
    given = Given((2000, 3), chain)
    assert not given.is_fresh(_event(2000, 4, (2000, 3)))  # history gave it
    assert not given.is_fresh(_event(2000, 2, (2000, 1)))  # before the Last-Event-ID
    assert given.is_fresh(_event(1000, 2, (1000, 1)))      # the backup's next: fresh
    assert given.is_fresh(_event(2000, 5, (2000, 4)))


def test_given_tells_an_unknown_epoch_by_its_predecessor():
    given = Given((50, 10), [_event(50, 11, (50, 10))])
    # a new owner after the fetch (its epoch 7 < 50), continuing from the viewer's last event
    assert given.is_fresh(_event(7, 1, (50, 11)))
    # a new chain (no predecessor) is past what the viewer has
    assert Given((50, 10), []).is_fresh(_event(3, 1, None))
    # an older epoch's event (this frontend lagging behind the viewer's), until the live path
    # brings an event of the viewer's epoch; after that an unknown epoch can only be newer
    lagging = Given((50, 10), [])
    assert not lagging.is_fresh(_event(90, 5, (90, 4)))
    assert not lagging.is_fresh(_event(50, 1, (90, 5)))
    assert lagging.is_fresh(_event(60, 2, (60, 1)))


def _stream() -> ViewerStream:
    node = SimpleNamespace(fanout=Fanout(SubscriptionTable()), stats=defaultdict(int))
    return ViewerStream(node, 1, "v", None, "127.0.0.1", catching_up=True, limit=1 << 20)


def _ids(data: bytes) -> list[str]:
    return [line.split(": ", 1)[1] for line in data.decode().split("\n") if line.startswith("id: ")]


async def test_a_viewer_caught_up_by_a_backup_with_a_smaller_epoch_gets_its_live_events():
    """The backup (epoch 1000) continues the chain of the dead owner (epoch 2000); live events
    in the backup's epoch are past the viewer's Last-Event-ID 2000:3 although 1000 < 2000."""
    v = _stream()

    def live(*events):
        v.send(v.node.fanout.encode(list(events)), list(events))

    live(_event(2000, 5, (2000, 4)))  # live while the history fetch ran: history has it too
    v.catch_up([_event(2000, 4, (2000, 3)), _event(2000, 5, (2000, 4))], (2000, 3))
    live(_event(2000, 3, (2000, 2)), _event(1000, 1, (2000, 5)))  # a late copy, then the backup's
    live(_event(1000, 2, (1000, 1)))
    assert _ids(bytes(v.buf)) == ["2000:4", "2000:5", "1000:1", "1000:2"]
