"""Frontends behind a real HAProxy configured from ``config/haproxy.cfg.template``: a dead or
draining frontend leaves the rotation within 2 s (HAProxy's own view, read from its runtime
API), and publishes through the load balancer keep being accepted meanwhile.  Every wait is a
condition with a deadline; every process stops at teardown, even on failure."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from helpers import Collector, http, like, viewer, wait_until

pytestmark = [pytest.mark.lb, pytest.mark.topology]

#: what the template promises: a dead or draining frontend is out of rotation within this.
#: Its own worst case is inter + fastinter = 0.6 s (the template's comment); the rest is
#: margin for scheduling on a loaded machine.
OUT_WITHIN = 2.0

#: no aggregation: each like is its own event, so ids compare one to one
PLAIN = {"frontend.aggregate_likes_above": "0"}


async def down_after(lb, name: str, t0: float) -> float:
    """Seconds from ``t0`` until HAProxy holds ``name`` DOWN."""
    await wait_until(lambda: lb.server_states().get(name) == "DOWN", timeout=10, interval=0.02,
                     what=f"{name} DOWN in HAProxy")
    return time.monotonic() - t0


class Publisher:
    """Likes through the load balancer, one after another, in the background, until told to
    stop; every answer's status is kept, the ids of the accepted ones in order.  Bounded:
    at most ``limit`` publishes and ``seconds``."""

    def __init__(self, url: str, video: str, limit: int = 5000, seconds: float = 20.0):
        self.url, self.video, self.limit = url, video, limit
        self.deadline = time.monotonic() + seconds
        self.statuses: list[int] = []
        self.acked: list[str] = []
        self.stopping = False
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self.stopping and len(self.statuses) < self.limit and time.monotonic() < self.deadline:
            status, body = await http("POST", f"{self.url}/v1/videos/{self.video}/likes", {"user": "lb"})
            self.statuses.append(status)
            if status == 202:
                self.acked.append(body["id"])

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.wait_for(self.task, 15)


async def test_a_killed_frontend_is_out_within_2s_and_publishes_go_elsewhere(topology, balancer):
    topology.dispatcher("d1")
    f1, f2 = topology.frontend("f1", **PLAIN), topology.frontend("f2", **PLAIN)
    lb = await balancer([f1, f2])
    video = "lb-kill"
    col = Collector(await viewer(f2.url, video))
    # none in flight when it dies: a publish a frontend took and never answered is not
    # acknowledged, so it may or may not be delivered; this test counts only acknowledged ones
    before = [(await like(lb.url, video))["id"] for _ in range(5)]
    t0 = time.monotonic()
    f1.kill()
    pub = Publisher(lb.url, video)  # at once: f1 is still UP for HAProxy for a while
    try:
        took = await down_after(lb, "f1", t0)
        assert took <= OUT_WITHIN, f"f1 DOWN {took:.2f}s after SIGKILL"
        assert lb.server_states()["f2"] == "UP"
        after = len(pub.statuses)
        await wait_until(lambda: len(pub.statuses) >= after + 5, what="publishes after f1 is out")
        await pub.stop()
        # connections to the dead frontend are refused and redispatched: not one publish fails
        assert set(pub.statuses) == {202}, pub.statuses
        await wait_until(lambda: col.ids() == before + pub.acked, what="every accepted like, once, in order")
    finally:
        pub.stopping = True
        await col.close()
    print(f"\nf1 DOWN {took:.2f}s after SIGKILL; {len(pub.statuses)} publishes after it, all 202")


async def test_a_draining_frontend_is_out_within_2s_while_it_serves(topology, balancer):
    topology.dispatcher("d1")
    f1 = topology.frontend("f1", **PLAIN, **{"frontend.drain_seconds": "1.5"})
    f2 = topology.frontend("f2", **PLAIN)
    lb = await balancer([f1, f2])
    video = "lb-drain"
    col = Collector(await viewer(f2.url, video))
    watcher = Collector(await viewer(f1.url, video))  # a stream held by the draining frontend
    pub = Publisher(lb.url, video)
    try:
        await wait_until(lambda: len(pub.acked) >= 5, what="publishes through the LB")
        t0 = time.monotonic()
        f1.proc.send_signal(signal.SIGTERM)
        took = await down_after(lb, "f1", t0)
        assert took <= OUT_WITHIN, f"f1 DOWN {took:.2f}s after SIGTERM"
        # out of rotation before its drain ends: it still answers, and says why it is out
        status, body = await http("GET", f"{f1.url}/healthz")
        assert (status, body["status"]) == (503, "draining"), (status, body)
        assert not watcher.closed
        marker = len(pub.acked)
        await wait_until(lambda: len(pub.acked) >= marker + 3, what="publishes after f1 is out")
        # its streams still get live events until the drain is over
        await wait_until(lambda: set(pub.acked[marker:marker + 3]) <= set(watcher.ids()),
                         what="live events on the draining frontend's stream")
        await wait_until(lambda: not f1.alive(), timeout=10, what="f1 exits after its drain")
        assert f1.proc.returncode == 0
        assert watcher.closed  # ended by the frontend, so its browser reconnects
        after = len(pub.statuses)
        await wait_until(lambda: len(pub.statuses) >= after + 5, what="publishes after f1 exited")
        await pub.stop()
        assert set(pub.statuses) == {202}, pub.statuses
        await wait_until(lambda: col.ids() == pub.acked, what="every accepted like, once, in order")
        assert lb.server_states() == {"f1": "DOWN", "f2": "UP"}
    finally:
        pub.stopping = True
        await col.close()
        await watcher.close()
    print(f"\nf1 DOWN {took:.2f}s after SIGTERM (drain 1.5 s); {len(pub.statuses)} publishes, all 202")


async def test_a_hung_frontend_is_out_within_2s(topology, balancer):
    """SIGSTOP: the kernel still accepts its connections, only the check's read timeout
    notices (the template's worst case 1.4 s)."""
    topology.dispatcher("d1")
    f1, f2 = topology.frontend("f1"), topology.frontend("f2")
    lb = await balancer([f1, f2])
    t0 = time.monotonic()
    f1.proc.send_signal(signal.SIGSTOP)
    try:
        took = await down_after(lb, "f1", t0)
    finally:
        f1.proc.send_signal(signal.SIGCONT)
    assert took <= OUT_WITHIN, f"f1 DOWN {took:.2f}s after SIGSTOP"
    assert lb.server_states()["f2"] == "UP"
    # back in rotation once it answers again (rise 2)
    await wait_until(lambda: lb.server_states()["f1"] == "UP", timeout=10, what="f1 UP again")
    print(f"\nf1 DOWN {took:.2f}s after SIGSTOP")


def test_the_stats_socket_is_in_the_configuration_and_refused_when_too_long(tmp_path):
    from mesh.tools.haproxy import HAProxy, LoadBalancerFailed
    lb = HAProxy.write_config(str(tmp_path / "h.cfg"), "127.0.0.1", 20999, [("f1", "127.0.0.1:1")])
    assert lb.stats_socket == str(tmp_path / "h.sock")
    assert f"stats socket {lb.stats_socket} mode 600 level user" in (tmp_path / "h.cfg").read_text()
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with pytest.raises(LoadBalancerFailed, match="longer than 107 bytes"):
        HAProxy.write_config(str(deep / "h.cfg"), "127.0.0.1", 20999, [("f1", "127.0.0.1:1")])
