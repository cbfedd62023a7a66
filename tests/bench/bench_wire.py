"""Microbenchmark: an event's wire cost, per step a node takes with it.

    python tests/bench/bench_wire.py [--events 100] [--repeat 9] [--number 2000]

Per event, median of ``repeat`` timings of ``number`` runs over a batch of ``events`` likes:

* ``decode, kept``: decoding a PUB body and checking its rows (``publish_events``): what a
  dispatcher does with every like it receives, keeping the checked rows;
* ``decode to maps``: the same, then each row read as a map (``row_event``): what a frontend
  does with every fan-out event;
* ``encode from maps``: a frontend's event maps as rows in a packed PUB (``event_row``,
  ``publish_body``): what a frontend does with every like it publishes;
* ``pack``: packing a sequenced batch of full rows (``pack_events``): what a dispatcher does
  once per like for its fan-out and backup.

The steps alternate, so the machine's drift hits each alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import timeit

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")))

from mesh.wire import protocol as P  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100, help="likes per batch (1..2000)")
    ap.add_argument("--repeat", type=int, default=9, help="timings per step (1..99)")
    ap.add_argument("--number", type=int, default=2000, help="runs per timing (1..100000)")
    args = ap.parse_args()
    if not (1 <= args.events <= P.MAX_BATCH_EVENTS and 1 <= args.repeat <= 99 and 1 <= args.number <= 100000):
        ap.error("bounds: events 1..2000, repeat 1..99, number 1..100000")
    events = [P.make_event(f"video-{n % 10}", P.KIND_LIKE, f"user{n}", None) for n in range(args.events)]
    sequenced = [P.check_row(P.event_row({**e, "epoch": 3, "seq": n + 1, "prev": [3, n] if n else None, "dc": "dc1"}))
                 for n, e in enumerate(events)]
    frames = P.Control(P.MSG_PUBLISH, b"r", P.publish_body(list(map(P.event_row, events)))).to_frames()
    assert list(map(P.row_event, P.publish_events(P.Control.from_frames(frames)))) == events
    cases = {
        "decode, kept": lambda: P.publish_events(P.Control.from_frames(frames)),
        "decode to maps": lambda: list(map(P.row_event, P.publish_events(P.Control.from_frames(frames)))),
        "encode from maps": lambda: P.Control(P.MSG_PUBLISH, b"r", P.publish_body(list(map(P.event_row, events))))
        .to_frames(),
        "pack": lambda: P.pack_events(sequenced),
    }
    timings: dict = {key: [] for key in cases}
    for _ in range(args.repeat):
        for key, fn in cases.items():
            timings[key].append(timeit.timeit(fn, number=args.number))
    print(f"{args.events} likes per batch, median of {args.repeat} x {args.number} runs, us per event")
    for key, t in timings.items():
        print(f"{key:18}{statistics.median(t) / args.number / args.events * 1e6:8.2f}")


if __name__ == "__main__":
    main()
