"""What one read of an SSE stream costs the load generator, by the size asked of ``recv``.

    python tests/bench/bench_reader.py [--streams 2000] [--rounds-per-s 20] [--seconds 4]
                                       [--repeats 3] [--sizes 262144,65536]

A writer process writes a 140-byte block (an aggregated ``likes`` event) to each of
``--streams`` loopback TCP streams, ``--rounds-per-s`` times a second for ``--seconds``; a
reader process (fresh for each run, as a bench client process is) waits on one epoll set and
reads every ready stream with ``recv(size)``.  Reported: the reader's CPU per read, median of
``--repeats`` runs per size, the sizes alternated (the machine drifts).  CPython allocates
``size`` bytes for each ``recv`` before shrinking the result; past glibc's mmap threshold
(128 KiB at the start of a process) that can be an mmap, a page fault and an munmap per read.
Bounded: streams x rounds x seconds writes, loopback only, every process waited for.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import time

BLOCK = b'id: 7:129\nevent: likes\ndata: {"video":"bench-0","count":30,"first_id":"7:100",' \
        b'"last_id":"7:129","ts":1795699923851.7256}\n\n'


def child(streams: int, rate: float, seconds: float, size: int) -> None:
    """One run in this fresh process: the writer is a forked child, the reader this process."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(streams)
    ours, theirs = [], []
    for _ in range(streams):
        c = socket.create_connection(listener.getsockname())
        s, _ = listener.accept()
        c.setblocking(False)
        ours.append(c)
        theirs.append(s)
    listener.close()
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            for c in ours:
                c.close()
            t0 = time.monotonic()
            for r in range(int(rate * seconds)):
                for s in theirs:
                    s.send(BLOCK)
                delay = t0 + (r + 1) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # sleep-ok: pacing the writer's rounds
        finally:
            os._exit(0)
    for s in theirs:
        s.close()
    epoll = select.epoll()
    by_fd = {c.fileno(): c for c in ours}
    for fd in by_fd:
        epoll.register(fd, select.EPOLLIN)
    reads, open_streams = 0, streams
    cpu0 = time.process_time()
    deadline = time.monotonic() + seconds + 30
    while open_streams and time.monotonic() < deadline:
        for fd, _ in epoll.poll(1.0, 4096):
            if by_fd[fd].recv(size):
                reads += 1
            else:
                epoll.unregister(fd)
                open_streams -= 1
    cpu = time.process_time() - cpu0
    os.waitpid(pid, 0)
    print(json.dumps({"reads": reads, "us_per_read": cpu / max(1, reads) * 1e6}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--rounds-per-s", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="262144,65536")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 1 <= args.streams <= 10000 or not 0 < args.seconds <= 60 or not 0 < args.rounds_per_s <= 100:
        raise SystemExit("bounds: 1..10000 streams, 0..60 s, 0..100 rounds/s")
    if args.child:
        child(args.streams, args.rounds_per_s, args.seconds, args.child)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(args.repeats):
        for size in sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(size), "--streams", str(args.streams),
                                  "--rounds-per-s", str(args.rounds_per_s), "--seconds", str(args.seconds)],
                                 capture_output=True, text=True, timeout=args.seconds + 90, check=True)
            runs[size].append(json.loads(out.stdout)["us_per_read"])
    print(f"{args.streams:,} streams, {args.rounds_per_s:g} writes/s each, {args.seconds:g} s; "
          f"reader CPU per read, median of {args.repeats} alternated runs")
    base = statistics.median(runs[sizes[0]])
    for size in sizes:
        med = statistics.median(runs[size])
        print(f"recv({size:>7,}): {med:6.1f} us  ({', '.join(f'{v:.1f}' for v in runs[size])})  "
              f"{med / base:.2f}x recv({sizes[0]:,})")


if __name__ == "__main__":
    main()
