"""Hot-video like aggregation (``frontend.aggregate_likes_above``): the encoder alone, then real
processes: a burst above the threshold reaches a viewer as ``likes`` events whose counts sum
to the likes sent, in chain order around a comment; below the threshold and with aggregation
off likes stay individual; ``Last-Event-ID`` after an aggregated event resumes right after it."""

from __future__ import annotations

import asyncio

import pytest

from helpers import comment, like, viewer
from mesh.core.sse import SSEParser, encode_events

KINDS = {"like", "likes", "comment", "reset"}


def _event(seq: int, kind: str = "like", user: str | None = "ann", remote: bool = False) -> dict:
    ev = {"id": f"e{seq}", "video": "v", "kind": kind, "user": user, "ts": 1000.0 + seq, "seq": seq,
          "epoch": 3}
    if kind == "comment":
        ev["text"] = "hi"
    if remote:
        ev["remote"] = True
    return ev


def test_encoder_aggregates_runs_of_local_likes_past_the_threshold():
    events = ([_event(s, user=f"u{s % 7}") for s in range(1, 9)] + [_event(9, "comment")]
              + [_event(10, remote=True)] + [_event(s) for s in range(11, 14)])
    data = encode_events(events, 10)
    got = SSEParser().feed(data)
    # the remote like keeps its own event, without an id (the parser repeats the last one)
    assert [(e.event, e.id) for e in got] == [("likes", "3:8"), ("comment", "3:9"), ("like", "3:9"),
                                              ("likes", "3:13")]
    assert data.count(b"id: ") == 3
    assert got[0].json() == {"video": "v", "count": 8, "users": ["u1", "u2", "u3", "u4", "u5"],
                             "first_id": "3:1", "last_id": "3:8", "ts": 1001.0}
    assert got[3].json()["count"] == 3 and got[3].json()["users"] == ["ann"]
    # at or below the threshold, or off: byte for byte what single events give
    assert encode_events(events, 11) == encode_events(events, 0) == encode_events(events)
    # an owner change (new epoch) inside a run of likes: two runs, each a range of one epoch
    moved = [_event(s) for s in (7, 8)] + [dict(_event(s), epoch=4) for s in (1, 2)]
    runs = [e.json() for e in SSEParser().feed(encode_events(moved, 1))]
    assert [(r["first_id"], r["last_id"], r["count"]) for r in runs] == [("3:7", "3:8", 2), ("4:1", "4:2", 2)]
    assert [e.event for e in SSEParser().feed(encode_events(events, 0))].count("like") == 12


def like_seqs(events) -> list[int]:
    """The chain positions of the likes ``events`` carry, in order; each aggregated event's
    count must equal its id span (the tests publish nothing else between)."""
    out: list[int] = []
    for e in events:
        data = e.json()
        if e.event == "like":
            out.append(data["seq"])
        elif e.event == "likes":
            first, last = (int(x.split(":")[1]) for x in (data["first_id"], data["last_id"]))
            assert e.id == data["last_id"] and last - first + 1 == data["count"], data
            assert 1 <= len(data["users"]) <= 5
            out.extend(range(first, last + 1))
    return out


async def _collect(v, likes: int, comments: int, timeout: float = 15.0) -> list:
    """Events until ``likes`` likes (an aggregated event counting ``count``) and ``comments``
    comments arrived."""
    got: list = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(like_seqs(got)) < likes or sum(e.event == "comment" for e in got) < comments:
        got.append(await v.next_event(max(0.0, deadline - loop.time())))
    return got


async def _burst(url: str, video: str, n: int, tag: str) -> list[dict]:
    return list(await asyncio.gather(*(like(url, video, user=f"{tag}{i}") for i in range(n))))


@pytest.mark.topology
async def test_a_burst_above_the_threshold_arrives_aggregated_in_order_around_a_comment(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"frontend.fanout_tick": "1.0", "frontend.aggregate_likes_above": "5"})
    v = await viewer(f.url, "hot", only=KINDS)
    first = await like(f.url, "hot", user="first")  # a quiet video: written at once, alone
    before = await _burst(f.url, "hot", 20, "a")
    middle = await comment(f.url, "hot", "in the middle")
    after = await _burst(f.url, "hot", 20, "b")
    got = await _collect(v, 41, 1)
    assert got[0].event == "like" and got[0].json()["id"] == first["id"]
    assert any(e.event == "likes" for e in got)
    # every like exactly once, in chain order, and the comment in its place among them
    sent = sorted(s["seq"] for s in [first, *before, *after])
    assert like_seqs(got) == sent
    ids = [tuple(map(int, e.id.split(":"))) for e in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    at = next(i for i, e in enumerate(got) if e.event == "comment")
    assert got[at].json()["id"] == middle["id"]
    assert max(like_seqs(got[:at])) < middle["seq"] < min(like_seqs(got[at + 1:]))
    assert await v.no_event(0.5, kinds={"like", "likes"}) is None
    v.close()


@pytest.mark.topology
@pytest.mark.parametrize("above, burst", [(20, 10), (0, 30)], ids=["below-threshold", "off"])
async def test_single_like_events_below_the_threshold_or_with_aggregation_off(topology, above, burst):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"frontend.fanout_tick": "1.0", "frontend.aggregate_likes_above": str(above)})
    video = f"plain-{above}"
    v = await viewer(f.url, video, only=KINDS)
    sent = [await like(f.url, video, user="first")] + await _burst(f.url, video, burst, "u")
    got = await _collect(v, burst + 1, 0)
    assert [e.event for e in got] == ["like"] * (burst + 1)
    assert [e.json()["id"] for e in got] == [s["id"] for s in sorted(sent, key=lambda s: s["seq"])]
    v.close()


@pytest.mark.topology
async def test_last_event_id_of_an_aggregated_event_resumes_after_its_run(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"frontend.fanout_tick": "1.0", "frontend.aggregate_likes_above": "3"})
    v = await viewer(f.url, "resume", only=KINDS)
    sent = [await like(f.url, "resume", user="first")] + await _burst(f.url, "resume", 12, "a")
    got = await _collect(v, 13, 0)
    agg = next(e for e in got if e.event == "likes")
    v.close()
    later = await _burst(f.url, "resume", 8, "b")  # while the viewer is away
    last_seq = int(agg.id.split(":")[1])
    expected = sorted(s["seq"] for s in [*sent, *later] if s["seq"] > last_seq)
    back = await viewer(f.url, "resume", only=KINDS, last_event_id=agg.id)
    replay = await _collect(back, len(expected), 0)
    assert like_seqs(replay) == expected  # nothing before the run's end again, nothing missed
    # live again: a new burst after the catch-up arrives once, aggregated past the threshold
    live = await _burst(f.url, "resume", 6, "c")
    fresh = await _collect(back, 6, 0)
    assert like_seqs(fresh) == sorted(s["seq"] for s in live)
    back.close()
    # a reconnect while a burst is being published: live writes held during the catch-up
    # (aggregated for everyone) are re-encoded without what history gave -- once each
    resume_at = fresh[-1].id
    again, burst = await asyncio.gather(viewer(f.url, "resume", only=KINDS, last_event_id=resume_at),
                                        _burst(f.url, "resume", 15, "d"))
    got = await _collect(again, 15, 0)
    assert like_seqs(got) == sorted(s["seq"] for s in burst)
    assert await again.no_event(0.5, kinds={"like", "likes"}) is None
    again.close()
