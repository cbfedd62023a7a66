"""Cross-DC vs same-DC publish-to-viewer latency (a benchmark, not a test).

Three DCs on this machine (each: one dispatcher, one frontend, one bridge, its own embedded KV);
one viewer of a video in dc1 (same DC as the publisher) and one in dc3 (across two bridges:
dc1's export, dc3's import).  Likes are published to dc1's frontend at ``--rate`` per second;
latency is the viewer's receive time minus the event's ``ts`` (stamped by the accepting
frontend; one host, one clock).  The viewers and the publisher are small client processes
(this file with ``--client``), one per DC.  Run::

    python tests/bench/bench_multidc.py --rate 50 --seconds 10                 # loopback
    python tests/bench/bench_multidc.py --rate 50 --seconds 10 --netem-ms 20   # root only

Theory of operation of ``--netem-ms D [--jitter-ms J]`` (emulated WAN, needs root): every DC
runs in its own network namespace (``lmwan<pid>-dcK``: its nodes and its client are launched
with ``ip netns exec``), where intra-DC traffic stays on the namespace's own loopback.  The
only other interface of a DC is a TUN device ``wan0`` (10.213.0.K/24) whose far end is one
process (this file with ``--delayer``): it reads each IP packet a DC sends, holds it D ms
(+- a uniform J ms, never reordering a DC pair's packets) and writes it into the destination
DC's ``wan0``.  So only inter-DC packets (the bridges' links: each bridge binds its export
XPUB on its DC's 10.213.0.K) are delayed, D one way, like ``tc qdisc ... netem delay D J`` on
every DC's uplink.  The userspace delayer stands in for netem because kernels built without
``sch_netem`` (this machine's) cannot load the qdisc; it is fine at benchmark rates (a packet
costs a few microseconds of Python) but not at line rate.  Namespaces go away on exit, also on
Ctrl-C or failure; stale ones of a dead run (same prefix, pid not alive) are deleted at start.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import heapq
import json
import os
import random
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from helpers import Collector, like, viewer, wait_until  # noqa: E402
from mesh.tools.topology import Topology, free_port  # noqa: E402

DCS = ("dc1", "dc2", "dc3")
VIDEO = "bench"
#: network namespaces of a run are NS_PREFIX + the bench's pid + "-dcK"
NS_PREFIX = "lmwan"
#: DC k (1-based) is 10.213.0.k on its wan0
WAN_NET = "10.213.0"
WAN_DEV = "wan0"
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
CLONE_NEWNET = 0x40000000


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# --- the emulated WAN (namespaces + delayer) -----------------------------------------------

def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def delete_namespace(ns: str) -> None:
    """Kill what still runs in ``ns``, then delete it (its interfaces go with it)."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def delete_stale_namespaces() -> None:
    """Delete the namespaces of earlier runs whose bench process is gone (killed with -9)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in (line.split()[0] for line in listing.splitlines() if line.strip()):
        pid = ns[len(NS_PREFIX):].split("-")[0]
        if not ns.startswith(NS_PREFIX) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            print(f"deleting stale namespace {ns}", file=sys.stderr)
            delete_namespace(ns)


class EmulatedWan:
    """One network namespace per DC, joined through the delayer process; ``close()`` undoes it."""

    def __init__(self, dcs: tuple[str, ...], delay_ms: float, jitter_ms: float):
        self.dcs, self.delay_ms, self.jitter_ms = dcs, delay_ms, jitter_ms
        self.namespaces = {dc: f"{NS_PREFIX}{os.getpid()}-{dc}" for dc in dcs}
        self.hosts = {dc: f"{WAN_NET}.{k + 1}" for k, dc in enumerate(dcs)}
        self.delayer: subprocess.Popen | None = None

    def prefix(self, dc: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespaces[dc])

    def start(self) -> "EmulatedWan":
        if os.geteuid() != 0 or not shutil.which("ip"):
            raise SystemExit("--netem-ms needs root and iproute2's ip (network namespaces, TUN devices)")
        delete_stale_namespaces()
        for ns in self.namespaces.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.delayer = subprocess.Popen(
            [sys.executable, __file__, "--delayer", ",".join(self.namespaces[dc] for dc in self.dcs),
             "--netem-ms", str(self.delay_ms), "--jitter-ms", str(self.jitter_ms)],
            stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        sel = selectors.DefaultSelector()
        sel.register(self.delayer.stdout, selectors.EVENT_READ)
        ready = sel.select(10) and self.delayer.stdout.readline().strip() == b"ready"
        sel.close()
        if not ready:
            raise RuntimeError("the WAN delayer did not start (see its stderr)")
        for dc, ns in self.namespaces.items():
            sh("ip", "-n", ns, "addr", "add", f"{self.hosts[dc]}/24", "dev", WAN_DEV)
            sh("ip", "-n", ns, "link", "set", WAN_DEV, "up")
        return self

    def close(self) -> None:
        if self.delayer is not None:
            self.delayer.stdin.close()
            try:
                self.delayer.wait(5)
            except subprocess.TimeoutExpired:
                self.delayer.kill()
                self.delayer.wait(10)
        for ns in self.namespaces.values():
            delete_namespace(ns)


def open_tun_in(ns: str) -> int:
    """A TUN device ``wan0`` created in namespace ``ns``; it lives as long as the returned fd."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", WAN_DEV.encode(), IFF_TUN | IFF_NO_PI))
        if libc.setns(home, CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), "setns back")
        return fd
    finally:
        os.close(home)
        os.close(target)


def run_delayer(namespaces: list[str], delay_ms: float, jitter_ms: float) -> None:
    """Forward IPv4 packets between the DCs' ``wan0`` devices, each ``delay_ms`` +- ``jitter_ms``
    late; per (source, destination) pair in FIFO order.  Other packets are dropped.  Runs until
    its stdin (a pipe from the bench) closes."""
    tuns = [open_tun_in(ns) for ns in namespaces]
    by_addr = {socket.inet_aton(f"{WAN_NET}.{k + 1}"): fd for k, fd in enumerate(tuns)}
    sel = selectors.DefaultSelector()
    for fd in tuns:
        sel.register(fd, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)  # EOF: the bench is gone, so are we
    print("ready", flush=True)
    queue: list[tuple[float, int, int, bytes]] = []  # (due, seq, fd out, packet)
    last_due: dict[tuple[int, int], float] = {}
    seq = lost = 0
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, packet = heapq.heappop(queue)
            try:
                os.write(out, packet)
            except OSError:  # the destination's queue is full or down: the packet is lost
                lost += 1
        wait = queue[0][0] - now if queue else None
        if wait is not None and wait < 0.002:  # epoll's timeout is whole ms, rounded up: sleep
            time.sleep(wait)                  # sleep-ok: the delayer holds a packet until its due time
            continue
        for key, _ in sel.select(wait - 0.001 if wait is not None else None):
            if key.fileobj is sys.stdin:
                if lost:
                    print(f"WAN delayer: {lost} of {seq} packets lost (destination queue full)", file=sys.stderr)
                return
            while True:
                try:
                    packet = os.read(key.fd, 65536)
                except BlockingIOError:
                    break
                out = by_addr.get(packet[16:20]) if packet[:1] and packet[0] >> 4 == 4 else None
                if out is None:
                    continue
                due = time.monotonic() + max(0.0, delay_ms + random.uniform(-jitter_ms, jitter_ms)) / 1000
                due = last_due[key.fd, out] = max(due, last_due.get((key.fd, out), 0.0))
                seq += 1
                heapq.heappush(queue, (due, seq, out, packet))


# --- the clients (one process per DC, in that DC's namespace) ------------------------------

async def run_client() -> None:
    """Commands in on stdin, results out on stdout, one JSON object a line:
    ``{"view": URL}`` -> ``{"open": true}``, then ``{"id", "ts", "received"}`` per like;
    ``{"like": URL}`` publishes one like; ``{"likes": URL, "n", "rate"}`` publishes ``n`` at
    ``rate``/s -> ``{"published": [ids], "failed": k}``;
    ``{"rtt": HOST, "port", "n"}`` -> ``{"rtt": [ms of each TCP connect]}``."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    viewers: list[Collector] = []

    def out(msg: dict) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    async def flush_events() -> None:
        sent = 0
        while True:
            await asyncio.sleep(0.02)
            events = [e for c in viewers for e in c.of_kind("like")]
            for e in events[sent:]:
                out({"id": json.loads(e.data)["id"], "ts": json.loads(e.data)["ts"], "received": e.received})
            sent = len(events)

    async def publish(url: str, n: int, rate: float) -> None:
        t0 = time.monotonic()
        tasks = []
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            tasks.append(asyncio.ensure_future(like(url, VIDEO)))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        ids = [r["id"] for r in results if isinstance(r, dict)]
        out({"published": ids, "failed": n - len(ids)})

    async def rtt(host: str, port: int, n: int) -> None:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            _, writer = await asyncio.open_connection(host, port)
            times.append((time.perf_counter() - t) * 1000)
            writer.close()
        out({"rtt": times})

    flusher = asyncio.ensure_future(flush_events())
    pending = []
    while line := await stdin.readline():
        cmd = json.loads(line)
        if "view" in cmd:
            viewers.append(Collector(await viewer(cmd["view"], VIDEO)))
            out({"open": True})
        elif "like" in cmd:
            pending.append(asyncio.ensure_future(like(cmd["like"], VIDEO)))
        elif "likes" in cmd:
            pending.append(asyncio.ensure_future(publish(cmd["likes"], cmd["n"], cmd["rate"])))
        elif "rtt" in cmd:
            pending.append(asyncio.ensure_future(rtt(cmd["rtt"], cmd["port"], cmd["n"])))
    flusher.cancel()
    for task in pending:
        task.cancel()
    for c in viewers:
        await c.close()


class Client:
    """The bench's end of one client process: ``send`` a command, ``wait`` for a reply."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.lines: list[dict] = []
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, prefix: tuple[str, ...]) -> "Client":
        return cls(await asyncio.create_subprocess_exec(*prefix, sys.executable, __file__, "--client",
                                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE))

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            self.lines.append(json.loads(line))

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")

    async def wait(self, key: str, timeout: float) -> dict:
        return await wait_until(lambda: next((m for m in self.lines if key in m), None), timeout,
                                what=f"client reply {key!r}")

    def received(self) -> dict[str, float]:
        """Event id -> latency (ms) of every like this client's viewers received."""
        return {m["id"]: m["received"] - m["ts"] for m in self.lines if "received" in m}

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()


# --- the benchmark -------------------------------------------------------------------------

async def run(rate: float, seconds: float, wan: EmulatedWan | None) -> None:
    tmp = tempfile.mkdtemp(prefix="livemesh-bench-")
    ports = {dc: free_port() for dc in DCS}
    hosts = wan.hosts if wan else {dc: "127.0.0.1" for dc in DCS}
    topos = {dc: Topology(kv={"backend": "embedded", "path": f"{tmp}/kv-{dc}.db"}, log_dir=tmp,
                          extra={"node.dc": dc, "node.log_level": "warning"},
                          prefix=wan.prefix(dc) if wan else ()) for dc in DCS}
    clients: dict[str, Client] = {}
    try:
        for dc, topo in topos.items():
            topo.dispatcher(f"{dc}-d1")
            topo.bridge(f"bridge-{dc}", [f"{o}=tcp://{hosts[o]}:{p}" for o, p in ports.items() if o != dc],
                        export_port=ports[dc], **{"bridge.host": hosts[dc]})
            topo.frontend(f"{dc}-f1")
        front = {dc: topos[dc].nodes[-1].url for dc in DCS}
        for dc in ("dc1", "dc3"):
            clients[dc] = await Client.start(wan.prefix(dc) if wan else ())
            clients[dc].send(view=front[dc])
            await clients[dc].wait("open", 10)
        same, cross = clients["dc1"], clients["dc3"]
        cross.send(rtt=hosts["dc1"], port=ports["dc1"], n=5)
        rtt = statistics.median((await cross.wait("rtt", 10))["rtt"])

        async def cross_subscribed() -> bool:  # probes until dc3's subscription reached dc1
            same.send(like=front["dc1"])
            await asyncio.sleep(0.05)
            return bool(cross.received())
        await wait_until(cross_subscribed, 20, interval=0, what="the first like in dc3")
        n = int(rate * seconds)
        same.send(likes=front["dc1"], n=n, rate=rate)
        reply = await same.wait("published", seconds + 30)
        ids = reply["published"]
        await wait_until(lambda: all(i in c.received() for c in (same, cross) for i in ids), 10,
                         what="every published like at both viewers")
        print(f"{n} likes at {rate:g}/s published in dc1 ({reply['failed']} failed); "
              f"publish-to-viewer latency (ms)")
        if wan:
            print(f"emulated WAN: {wan.delay_ms:g} ms one way, jitter +-{wan.jitter_ms:g} ms; "
                  f"TCP connect dc3 -> dc1 (one round trip) median {rtt:.2f} ms")
        print(f"{'path':<24}{'events':>7}{'p50':>8}{'p90':>8}{'p99':>8}{'mean':>8}")
        for label, c in (("same DC (dc1 -> dc1)", same), ("cross DC (dc1 -> dc3)", cross)):
            got = c.received()
            lat = [got[i] for i in ids]
            print(f"{label:<24}{len(lat):>7}{pct(lat, 50):>8.2f}{pct(lat, 90):>8.2f}{pct(lat, 99):>8.2f}"
                  f"{statistics.mean(lat):>8.2f}")
    finally:
        for client in clients.values():
            await client.close()
        for topo in topos.values():
            topo.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=50.0, help="likes per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--netem-ms", type=float, default=None,
                    help="run each DC in its own network namespace with this one-way delay (ms) "
                         "between DCs (root only)")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="with --netem-ms: +- this much (uniform)")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--delayer", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return asyncio.run(run_client())
    if args.delayer:
        return run_delayer(args.delayer.split(","), args.netem_ms, args.jitter_ms)
    if not (0 < args.rate <= 1000 and 0 < args.seconds <= 120):
        ap.error("--rate must be in (0, 1000] and --seconds in (0, 120]")
    if args.netem_ms is not None and not (0 <= args.jitter_ms <= args.netem_ms <= 1000):
        ap.error("need 0 <= --jitter-ms <= --netem-ms <= 1000")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that finally blocks clean up
    wan = EmulatedWan(DCS, args.netem_ms, args.jitter_ms) if args.netem_ms is not None else None
    try:
        if wan:
            wan.start()
        asyncio.run(run(args.rate, args.seconds, wan))
    except KeyboardInterrupt:
        sys.exit("interrupted")
    finally:
        if wan:
            wan.close()


if __name__ == "__main__":
    main()
