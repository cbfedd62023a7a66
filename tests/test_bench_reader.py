"""The ``meshctl bench`` stream reader's accounting: deliveries, duplicates and reordering are
found from raw SSE bytes, whichever way the reads split the stream."""

from __future__ import annotations

import asyncio
import json

import pytest

from mesh.tools.bench import ClientResult, Plan, _publish, _Reader, merge_samples, sample


def like(epoch: int, seq: int) -> bytes:
    data = json.dumps({"video": "v", "kind": "like", "user": "u", "ts": 1.0, "epoch": epoch, "seq": seq},
                      separators=(",", ":"))
    return f"id: {epoch}:{seq}\nevent: like\ndata: {data}\n\n".encode()


def read(chunks: list[bytes]) -> tuple[_Reader, ClientResult]:
    res = ClientResult()
    reader = _Reader(None, res, "v")
    for chunk in chunks:
        reader.feed(chunk)
    return reader, res


def split(stream: bytes, size: int) -> list[bytes]:
    return [stream[i:i + size] for i in range(0, len(stream), size)]


@pytest.mark.parametrize("size", [7, 100, 1000, 100000])
def test_a_contiguous_run_is_counted_whatever_the_read_sizes(size):
    stream = b": hb\n\n" + b"".join(like(5, s) for s in range(1, 201))
    reader, res = read(split(stream, size))
    assert reader.count == 200 and reader.last == (5, 200)
    assert (res.duplicates, res.reordered) == (0, 0)


@pytest.mark.parametrize("size", [50, 100000])
def test_repeats_and_reordering_are_found(size):
    seqs = [1, 2, 3, 3, 4, 2, 5, 6, 6, 7]          # 3 and 6 twice, 2 out of order
    reader, res = read(split(b"".join(like(5, s) for s in seqs), size))
    assert reader.count == len(seqs)
    assert res.duplicates == 2 and res.reordered == 1
    assert reader.last == (5, 7)


def test_a_gap_or_a_new_epoch_is_neither_a_duplicate_nor_a_reorder():
    stream = b"".join(like(5, s) for s in (1, 2, 4, 5)) + b"".join(like(6, s) for s in (1, 2))
    reader, res = read([stream])
    assert reader.count == 6 and (res.duplicates, res.reordered) == (0, 0)
    assert reader.last == (6, 2)


def test_latency_is_sampled_once_per_event_and_at_most_three_times_per_read():
    _, res = read([like(5, s) for s in range(1, 11)])  # ten reads of one like each
    assert len(res.latencies) == 10
    _, res = read([b"".join(like(5, s) for s in range(1, 101))])  # one read: oldest, middle, newest
    assert len(res.latencies) == 3


def test_a_block_that_repeats_the_previous_reads_last_id_is_a_duplicate():
    reader, res = read([like(5, 1) + like(5, 2), like(5, 2) + like(5, 3)])
    assert reader.count == 4 and res.duplicates == 1 and res.reordered == 0


def likes(epoch: int, first: int, last: int, count: int | None = None) -> bytes:
    """An aggregated run as ``mesh.core.sse.encode_likes`` writes it (``count`` may lie)."""
    data = json.dumps({"video": "v", "count": last - first + 1 if count is None else count, "users": ["u"],
                       "first_id": f"{epoch}:{first}", "last_id": f"{epoch}:{last}", "ts": 1.0},
                      separators=(",", ":"))
    return f"id: {epoch}:{last}\nevent: likes\ndata: {data}\n\n".encode()


@pytest.mark.parametrize("size", [13, 100000])
def test_runs_and_single_likes_mixed_count_as_the_likes_they_stand_for(size):
    stream = (like(5, 1) + like(5, 2) + likes(5, 3, 30) + like(5, 31) + likes(5, 32, 40)
              + likes(5, 41, 50) + like(5, 51))
    reader, res = read(split(stream, size))
    assert reader.count == 51 and reader.last == (5, 51)
    assert (res.aggregated, res.aggregated_likes) == (3, 47)
    assert (res.duplicates, res.reordered, res.aggregate_mismatch) == (0, 0, 0)


def test_a_run_overlapping_what_came_before_counts_the_overlap_as_duplicates():
    reader, res = read([like(5, 1) + like(5, 2) + like(5, 3) + likes(5, 2, 6) + like(5, 6)])
    assert reader.count == 3 + 5 + 1
    assert res.duplicates == 2 + 1 and res.aggregate_mismatch == 0   # 2..3 again, then 6 again
    assert reader.last == (5, 6)


def test_a_run_whose_count_is_not_its_id_span_is_a_mismatch():
    _, res = read([likes(5, 1, 10, count=12) + like(5, 11)])
    assert res.aggregate_mismatch == 1 and res.duplicates == 0


async def publish_to(serve, rate: float, duration: float) -> tuple[dict, int, int]:
    """``_publish`` against a loopback server running ``serve``: (acked, errors, connections)."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    plan = Plan([f"http://127.0.0.1:{port}"], connections=1, videos=1, rate=rate, duration=duration)
    try:
        return await _publish(plan, print)
    finally:
        server.close()
        await server.wait_closed()


def test_the_publisher_counts_an_answer_that_closes_the_connection_and_reopens_it():
    """A ``202`` with ``Connection: close`` is an answer (not an error); the closed connection
    is replaced, so the next likes still go out."""
    opened = 0

    async def serve(reader, writer):
        nonlocal opened
        opened += 1
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(16)  # the bench's body
        writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    acked, errors, connections = asyncio.run(publish_to(serve, rate=50, duration=0.2))
    # 10 likes on a pool of 4 connections, each closed after one answer
    assert acked == {"bench-0": 10} and errors == 0
    assert opened >= 10 and connections >= 10


def test_the_latency_sample_covers_the_whole_run_not_its_first_values():
    """Past the cap, a reservoir: late values are as likely to be kept as early ones."""
    kept, seen = [], 0
    for value in range(100_000):
        seen = sample(kept, seen, value, cap=1000)
    assert seen == 100_000 and len(kept) == 1000
    assert sum(v >= 50_000 for v in kept) > 400  # ~500 of 1000; the first 1,000 only: none
    assert sum(v < 50_000 for v in kept) > 400


def test_merged_samples_weigh_each_client_by_what_it_observed():
    """A client that observed 10x more values keeps as many samples (its cap): merged, it
    must count 10x more."""
    busy, quiet = [], []
    seen_busy = seen_quiet = 0
    for _ in range(20_000):
        seen_busy = sample(busy, seen_busy, 1.0, cap=1000)
    for _ in range(2_000):
        seen_quiet = sample(quiet, seen_quiet, 2.0, cap=1000)
    merged = merge_samples([(busy, seen_busy), (quiet, seen_quiet)])
    assert merged.count(1.0) == 1000 and merged.count(2.0) == 100
    assert merge_samples([([3.0], 1), ([], 0)]) == [3.0]


def test_a_reader_samples_latencies_past_the_cap(monkeypatch):
    monkeypatch.setattr("mesh.tools.bench.MAX_LATENCY_SAMPLES", 5)
    _, res = read([like(5, s) for s in range(1, 51)])
    assert res.latency_seen == 50 and len(res.latencies) == 5


def test_the_publisher_opens_connections_while_answers_are_slow():
    """Likes are offered at the planned rate however slowly the server answers: when likes
    wait for a free connection, the publisher opens another (the viewers' browsers do not
    queue behind each other)."""
    in_flight = peak = 0

    async def serve(reader, writer):
        nonlocal in_flight, peak
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0.3)  # sleep-ok: a server slow to answer, on purpose
                in_flight -= 1
                writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    acked, errors, connections = asyncio.run(publish_to(serve, rate=100, duration=1))
    # 0.3 s per answer at 100 likes/s needs ~30 in flight; the first pool has 10
    assert sum(acked.values()) == 100 and errors == 0
    assert connections > 10 and peak > 10


@pytest.mark.parametrize("runs", [
    [(5, 1, 10), (5, 11, 20), (5, 21, 30)],                 # contiguous
    [(5, 1, 10), (5, 8, 15), (5, 16, 20)],                  # overlap: 8..10 again
    [(5, 1, 10), (5, 11, 20, 12), (5, 21, 30)],             # a count that is not its span
    [(5, 11, 20), (5, 1, 10), (6, 1, 5)],                   # a step back, then a new epoch
])
def test_a_read_of_one_likes_event_is_accounted_as_the_general_parser_does(runs):
    """Under load most reads hold one ``likes`` event and take a one-match path
    (``ONE_RUN_RE``): its counts must be those of the same events read together."""
    events = [likes(*run) for run in runs]
    one_by_one, res1 = read(events)
    together, res2 = read([b"".join(events)])
    fields = ("aggregated", "aggregated_likes", "duplicates", "reordered", "aggregate_mismatch")
    assert one_by_one.count == together.count and one_by_one.last == together.last
    assert [getattr(res1, f) for f in fields] == [getattr(res2, f) for f in fields]
    assert res1.latency_seen == len(runs)  # one latency sample per event read alone
