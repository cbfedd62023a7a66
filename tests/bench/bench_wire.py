"""Microbenchmark: an event's wire cost as a msgpack map and as an event row.

    python tests/bench/bench_wire.py [--events 100] [--repeat 9] [--number 2000]

Per event, median of ``repeat`` timings of ``number`` runs over a batch of ``events`` likes:
decoding a PUB body and checking its events, kept in the form they came in (``publish_events``
with ``check_row`` for rows: what a dispatcher does with every like it receives), or turned
into maps (``check_event``: what a frontend does with every fan-out event), and packing a sequenced
batch (``pack_events``: what a dispatcher does once per like for its fan-out and backup; it
keeps its likes as rows, so rows are packed as they are, maps as maps).
Both forms run side by side in one process, alternating; the ratio is rows / maps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import timeit

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")))

from mesh import protocol as P  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100, help="likes per batch (1..2000)")
    ap.add_argument("--repeat", type=int, default=9, help="timings per variant (1..99)")
    ap.add_argument("--number", type=int, default=2000, help="runs per timing (1..100000)")
    args = ap.parse_args()
    if not (1 <= args.events <= P.MAX_BATCH_EVENTS and 1 <= args.repeat <= 99 and 1 <= args.number <= 100000):
        ap.error("bounds: events 1..2000, repeat 1..99, number 1..100000")
    events = [P.make_event(f"video-{n % 10}", P.KIND_LIKE, f"user{n}", None) for n in range(args.events)]
    sequenced = [{**e, "epoch": 3, "seq": n + 1, "prev": [3, n] if n else None, "dc": "dc1"}
                 for n, e in enumerate(events)]
    cases = {}
    for form, rows in (("maps", False), ("rows", True)):
        frames = P.Control(P.MSG_PUBLISH, b"r", P.publish_body(events, compact_ack=True, rows=rows)).to_frames()
        assert P.publish_events(P.Control.from_frames(frames)) == events
        kept = P.check_row if rows else P.check_event  # what a dispatcher keeps of each form: the checked row or map
        cases[("decode, kept", form)] = lambda f=frames, c=kept: P.publish_events(P.Control.from_frames(f), c)
        cases[("decode to maps", form)] = lambda f=frames: P.publish_events(P.Control.from_frames(f))
        batch = [P.event_row(e, full=True) for e in sequenced] if rows else sequenced
        cases[("pack", form)] = lambda b=batch, r=rows: P.pack_events(b, r)
    timings: dict = {key: [] for key in cases}
    for _ in range(args.repeat):  # the cases alternate: the machine's drift hits each alike
        for key, fn in cases.items():
            timings[key].append(timeit.timeit(fn, number=args.number))
    per_event = {key: statistics.median(t) / args.number / args.events * 1e6 for key, t in timings.items()}
    print(f"{args.events} likes per batch, median of {args.repeat} x {args.number} runs, us per event")
    print(f"{'':16}{'maps':>8}{'rows':>8}{'rows/maps':>11}")
    for step in ("decode, kept", "decode to maps", "pack"):
        maps, rows = per_event[(step, "maps")], per_event[(step, "rows")]
        print(f"{step:16}{maps:8.2f}{rows:8.2f}{rows / maps:10.2f}x")


if __name__ == "__main__":
    main()
