"""Delivery under compound faults (issue 19's outside run, scaled down to this suite):
3 dispatchers and 2 frontends, about 100 publishes/s with Idempotency-Keys (a 503, or a
frontend gone, is retried with the same key), dispatchers SIGKILLed and restarted on their
ports (some within the liveness TTL, some past it, so the backup takes over), one frontend
SIGKILLed and restarted, and viewers that drop and reconnect to the other frontend with
Last-Event-ID every few seconds and right after an owner dies.

Per viewer it asserts: every acknowledged event once, in chain order (each publisher's
events in the order they were acknowledged, and the same order at every viewer of the
video), no ``reset``, no event published under a key delivered twice, and no event that was
never published.  The totals are printed (``-s``) so that runs can be compared.  The Consul
variant restarts a persistent agent mid-run and checks the KV viewer counts right afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
from tornado.httpclient import HTTPClientError

from mesh.core.ownership import rank
from mesh.core.sequencing import event_id_for_key
from mesh.kv.consul import ConsulKV
from mesh.tools.sse_client import SSEClient, SSEError
from mesh.tools.topology import Topology, free_port

from helpers import CHAIN_KINDS, http, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.topology]

DISPATCHERS = ("d1", "d2", "d3")
FRONTENDS = ("f1", "f2")
VIDEOS = [f"chaos-{i}" for i in range(5)]
#: two publishers per video, each pausing PUBLISH_PAUSE between publishes: ~100 publishes/s
PUBLISHERS = 2 * len(VIDEOS)
PUBLISH_PAUSE = 0.09
#: most publishes per publisher (a bound on the load loop besides the run's end)
PUBLISHES_MAX = 1000
#: seconds a publisher retries one key before giving it up (counted, never asserted on)
KEY_RETRY_FOR = 15.0
#: seconds a viewer stays on one connection: a random drop in this range
DROP_EVERY = (3.0, 6.0)
FRONT = {"frontend.aggregate_likes_above": "0", "frontend.publish_timeout": "4",
         "frontend.attempt_timeout": "0.5"}


class Run:
    """What the publishers acknowledged and what the viewers got."""

    def __init__(self, fronts):
        self.fronts = fronts  # the frontend NodeProcesses, replaced in place when restarted
        self.stop = asyncio.Event()
        self.acked: dict[str, list[str]] = {v: [] for v in VIDEOS}
        self.by_publisher: dict[int, list[str]] = {w: [] for w in range(PUBLISHERS)}
        self.answers: dict[str, dict] = {}    # event id -> the 202 body
        self.given_up: set[str] = set()       # ids of keys never acknowledged
        self.markers: set[str] = set()        # ids of the markers published after the run
        self.retries = 0
        self.viewers: list[Roamer] = []

    def url(self, i: int) -> str:
        return self.fronts[i % len(self.fronts)].url


async def publisher(run: Run, w: int) -> None:
    video, user = VIDEOS[w % len(VIDEOS)], f"w{w}"
    for n in range(PUBLISHES_MAX):
        if run.stop.is_set():
            return
        key = f"{user}-{n}"
        expected = event_id_for_key(video, user, key)
        give_up = time.monotonic() + KEY_RETRY_FOR
        front = w + n
        while True:
            try:
                status, body = await http("POST", f"{run.url(front)}/v1/videos/{video}/likes", {"user": user},
                                          headers={"Idempotency-Key": f'"{key}"'}, timeout=8)
            except (OSError, HTTPClientError):
                status, body = 0, None  # the frontend is down: the other one, same key
            if status == 202:
                assert body["id"] == expected, (key, body)
                assert run.answers.setdefault(body["id"], body) == body, "a retry got another placement"
                run.acked[video].append(body["id"])
                run.by_publisher[w].append(body["id"])
                break
            assert status in (0, 503) and (body is None or body["error"]["retryable"]), (status, body)
            run.retries += 1
            front += 1
            if time.monotonic() > give_up:
                run.given_up.add(expected)
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(PUBLISH_PAUSE)


class Roamer:
    """A viewer of ``video`` that reads on one frontend until a random drop, an owner outage
    (``hop``) or the frontend's death, then reconnects to the other with Last-Event-ID."""

    def __init__(self, run: Run, video: str, start: int):
        self.run = run
        self.video = video
        self.at = start
        self.events: list[tuple[str, str | None, str | None]] = []  # (kind, sse id, event id)
        self.last_id: str | None = None
        self.hops = asyncio.Event()
        self.roaming = True
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.task = asyncio.ensure_future(self._run())

    def hop(self) -> None:
        self.hops.set()

    async def _read(self, client: SSEClient) -> None:
        while True:
            ev = await client.next_event(timeout=3600)
            data = json.loads(ev.data) if ev.data else {}
            self.events.append((ev.event, ev.id or None, data.get("id")))
            if ev.id:
                self.last_id = ev.id

    async def _run(self) -> None:
        while True:
            client = SSEClient(f"{self.run.url(self.at)}/v1/videos/{self.video}/events",
                               last_event_id=self.last_id, only=CHAIN_KINDS)
            try:
                await client.connect(timeout=5)
            except (OSError, EOFError, SSEError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                client.close()
                self.at += 1
                await asyncio.sleep(0.1)
                continue
            self.connected.set()
            self.hops.clear()
            self.events.append(("open", self.last_id, self.frontend()))
            reader = asyncio.ensure_future(self._read(client))
            hopped = asyncio.ensure_future(self.hops.wait())
            await asyncio.wait([reader, hopped], timeout=random.uniform(*DROP_EVERY) if self.roaming else None,
                               return_when=asyncio.FIRST_COMPLETED)
            while not self.roaming and not reader.done():  # the run is over: stay until cancelled
                await asyncio.wait([reader], timeout=3600)
            for task in (reader, hopped):
                task.cancel()
            await asyncio.gather(reader, hopped, return_exceptions=True)
            client.close()
            self.connected.clear()
            self.at += 1
            self.reconnects += 1

    def frontend(self) -> str:
        return FRONTENDS[self.at % len(FRONTENDS)]

    def ids(self) -> list[str]:
        return [i for kind, _, i in self.events if kind == "like"]

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def restart(topo: Topology, name: str, down: float) -> None:
    node = next(n for n in topo.nodes if n.name == name)
    node.kill()
    await asyncio.sleep(down)
    fresh = topo.respawn(node)  # the same ports
    await asyncio.to_thread(fresh.wait_ready)


async def kill_dispatchers(run: Run, topo: Topology, schedule: list[tuple[str, float]]) -> None:
    """SIGKILL each (dispatcher, seconds down) in turn; the viewers of the videos it owns
    reconnect right after it dies, while it is still registered."""
    for victim, down in schedule:
        await asyncio.sleep(1.5)
        hop = [r for r in run.viewers if rank(r.video, DISPATCHERS)[0] == victim]
        node = next(n for n in topo.nodes if n.name == victim)
        node.kill()
        for r in hop:
            r.hop()
        await asyncio.sleep(down)
        fresh = topo.respawn(node)
        await asyncio.to_thread(fresh.wait_ready)


async def kill_frontend(run: Run, topo: Topology, name: str, after: float) -> None:
    await asyncio.sleep(after)
    i = FRONTENDS.index(name)
    node = run.fronts[i]
    node.kill()
    await asyncio.sleep(1.0)
    fresh = topo.respawn(node)
    await asyncio.to_thread(fresh.wait_ready)
    run.fronts[i] = fresh


def _around(r: Roamer, sse_id: str) -> list:
    """The viewer's events near where ``sse_id``'s epoch starts (a loss report)."""
    epoch = sse_id.split(":")[0]
    at = next((k for k, (_, sid, _) in enumerate(r.events) if sid and sid.startswith(epoch + ":")), len(r.events))
    return [(kind, sid) if kind != "open" else (kind, sid, i) for kind, sid, i in r.events[max(0, at - 5):at + 4]]


def check(run: Run) -> tuple[dict, list[str]]:
    """Totals over every viewer, and what breaks the promise."""
    totals = dict(acknowledged=sum(len(a) for a in run.acked.values()), delivered=0, lost=0, duplicated=0,
                  resets=0, unknown=0, not_acknowledged=len(run.given_up), retries=run.retries,
                  reconnects=sum(r.reconnects for r in run.viewers))
    problems = []
    orders: dict[str, list[str]] = {}
    for r in run.viewers:
        got = r.ids()
        want = set(run.acked[r.video])
        totals["delivered"] += len(got)
        totals["duplicated"] += len(got) - len(set(got))
        lost = want - set(got)
        totals["lost"] += len(lost)
        if lost:
            problems.append(f"a viewer of {r.video} lost " + ", ".join(
                f"{run.answers[i]['sse_id']}" for i in sorted(lost, key=run.acked[r.video].index)[:5])
                + f"; got {_around(r, run.answers[next(iter(lost))]['sse_id'])}")
        resets = [k for k, (kind, _, _) in enumerate(r.events) if kind == "reset"]
        totals["resets"] += len(resets)
        if resets:
            k = resets[0]
            problems.append(f"a viewer of {r.video} got reset: {r.events[max(0, k - 4):k + 4]}")
        unknown = [i for i in set(got) - want if i not in run.given_up and i not in run.markers]
        totals["unknown"] += len(unknown)
        delivered = [i for i in got if i in want]
        order = orders.setdefault(r.video, delivered)
        if delivered != order:
            problems.append(f"viewers of {r.video} got the acknowledged events in different orders")
        for w, ids in run.by_publisher.items():
            if VIDEOS[w % len(VIDEOS)] != r.video:
                continue
            own = set(ids)
            mine = [i for i in delivered if i in own]
            if mine != ids:
                at = next((k for k, (a, b) in enumerate(zip(mine, ids)) if a != b), min(len(mine), len(ids)))
                problems.append(f"a viewer of {r.video} got publisher w{w}'s events out of order from "
                                f"{[run.answers[i]['sse_id'] for i in mine[at:at + 3]]}, acknowledged "
                                f"{[run.answers[i]['sse_id'] for i in ids[at:at + 3]]}")
    for name in ("lost", "duplicated", "resets", "unknown"):
        if totals[name]:
            problems.append(f"{totals[name]} {name}")
    return totals, problems


async def chaos_run(topo: Topology, faults, settle: float = 20.0) -> tuple[Run, dict]:
    """Start the mesh, publish and view under ``faults(run)`` (a coroutine), then wait until
    every viewer has every acknowledged event and a marker published after them."""
    # ports outside the ephemeral range: no socket bound to port 0 takes one while its node is down
    for name in DISPATCHERS:
        topo.dispatcher(name, **{f"dispatcher.{p}_port": free_port() for p in ("router", "pub", "http")})
    run = Run([topo.frontend(name, port=free_port(), **FRONT) for name in FRONTENDS])
    run.viewers = [Roamer(run, v, i) for v in VIDEOS for i in range(len(FRONTENDS))]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.connected.wait() for r in run.viewers)), 20)
        publishing = [asyncio.ensure_future(publisher(run, w)) for w in range(PUBLISHERS)]
        try:
            await faults(run)
        finally:
            run.stop.set()
            await asyncio.gather(*publishing)
        for r in run.viewers:
            r.roaming = False
        markers = {}
        for v in VIDEOS:
            status, body = await http("POST", f"{run.url(0)}/v1/videos/{v}/likes", {"user": "marker"},
                                      headers={"Idempotency-Key": "marker"}, timeout=10)
            assert status == 202, (status, body)
            markers[v] = body["id"]
            run.markers.add(body["id"])
        for r in run.viewers:
            await wait_until(lambda r=r: markers[r.video] in r.ids(), timeout=settle,
                             what=f"the marker at a viewer of {r.video}")
        totals, problems = check(run)
        print("chaos totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
        for problem in problems:
            print("chaos problem: " + problem)
        return run, {"totals": totals, "problems": problems}
    finally:
        for r in run.viewers:
            await r.close()


async def test_chaos_kills_of_dispatchers_and_a_frontend_with_roaming_viewers(topology):
    async def faults(run: Run) -> None:
        # (victim, seconds down): within the 2 s liveness TTL, or past it (the backup takes over)
        schedule = [("d1", 0.3), ("d2", 2.5), ("d3", 0.3), ("d1", 2.5), ("d2", 0.3), ("d3", 2.5)]
        await asyncio.gather(kill_dispatchers(run, topology, schedule), kill_frontend(run, topology, "f2", 8.0))

    run, result = await chaos_run(topology, faults)
    assert result["totals"]["acknowledged"] > 500, result
    assert not result["problems"], result


@pytest.mark.consul
async def test_chaos_on_consul_with_the_agent_restarted_mid_run(consul_agent_factory, tmp_path, aclose):
    """A persistent agent (KV, sessions and services survive its restart, as on a server
    agent with a data dir) restarted while publishing goes on."""
    consul_agent = consul_agent_factory(persistent=True)
    topo = Topology(kv={"backend": "consul", "consul_addr": consul_agent.http_addr},
                    log_dir=str(tmp_path), extra={"dispatcher.drain_seconds": "0.3"})
    kv = ConsulKV(consul_agent.host, consul_agent.port)
    aclose.append(kv.close)

    async def counts_right(run: Run) -> bool:
        expected: dict[str, dict[str, int]] = {}
        for r in run.viewers:
            if not r.connected.is_set():
                return False
            per = expected.setdefault(r.video, {})
            per[r.frontend()] = per.get(r.frontend(), 0) + 1
        try:
            return await kv.read_counts() == expected
        except Exception:  # noqa: BLE001 - the agent may be restarting: keep polling
            return False

    async def faults(run: Run) -> None:
        # within Consul's session TTL only: past it a dispatcher stays registered for ~20 s
        await kill_dispatchers(run, topo, [("d1", 0.3), ("d2", 0.3), ("d3", 0.3)])
        await asyncio.sleep(1.0)
        await asyncio.to_thread(consul_agent.restart)
        await asyncio.sleep(2.0)  # publishing goes on while every node registers again
        for r in run.viewers:
            r.roaming = False
        await wait_until(lambda: counts_right(run), timeout=30, interval=0.2,
                         what="viewer counts rewritten after the agent restart")

    try:
        run, result = await chaos_run(topo, faults)
    finally:
        topo.close()
    assert result["totals"]["acknowledged"] > 300, result
    assert not result["problems"], result
