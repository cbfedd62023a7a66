"""The mesh on a real Consul agent: discovery, liveness, coalesced writes, outages, meshctl."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from mesh.kv.consul import ConsulKV
from mesh.core.ownership import owner
from mesh.tools.topology import Topology

from helpers import SCHEDULING_MARGIN, health, like, read_lines_until, viewer, wait_until

pytestmark = [pytest.mark.consul, pytest.mark.topology]


@pytest.fixture
def consul_topo(consul_agent, tmp_path):
    topo = Topology(kv={"backend": "consul", "consul_addr": consul_agent.http_addr},
                    log_dir=str(tmp_path))
    topo.agent = consul_agent
    try:
        yield topo
    finally:
        topo.close()


@pytest.fixture
def reader(consul_agent, aclose):
    kv = ConsulKV(consul_agent.host, consul_agent.port)
    aclose.append(kv.close)
    return kv


def meshctl(agent, *args) -> str:
    cmd = [sys.executable, "-m", "mesh.tools.meshctl", "--kv", "consul", "--consul-addr", agent.http_addr, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout


async def test_delivery_with_discovery_from_consul(consul_topo, reader):
    d1, d2 = consul_topo.dispatcher("d1"), consul_topo.dispatcher("d2")
    fa, fb = consul_topo.frontend("f1"), consul_topo.frontend("f2")
    for f in (fa, fb):
        await wait_until(lambda: _dispatchers_are(f.url, ["d1", "d2"]), what="both dispatchers")
    videos = [f"c-{i}" for i in range(8)]
    assert {owner(v, ["d1", "d2"]) for v in videos} == {"d1", "d2"}
    viewers = {v: await viewer(fb.url, v) for v in videos}
    for v in videos:
        sent = await like(fa.url, v)
        assert json.loads((await viewers[v].events(1))[0].data)["id"] == sent["id"]
    nodes = {n.name: n for n in await reader.nodes()}
    assert {"d1", "d2", "f1", "f2"} <= set(nodes)
    assert nodes["d1"].router == d1.info["router"] and nodes["f1"].http == fa.url
    await wait_until(lambda: _kv_counts(reader, {v: {"f2": 1} for v in videos}), what="counts in Consul")


async def test_sigkilled_frontend_keys_vanish_and_meshctl_agrees(consul_topo, reader):
    consul_topo.dispatcher("d1")
    fa, fb = consul_topo.frontend("f1"), consul_topo.frontend("f2")
    keep = [await viewer(fb.url, "show"), await viewer(fb.url, "show")]
    doomed = [await viewer(fa.url, "show"), await viewer(fa.url, "other")]
    await wait_until(lambda: _kv_counts(reader, {"show": {"f1": 1, "f2": 2}, "other": {"f1": 1}}),
                     what="counts of both frontends")
    fa.kill()
    bound = 2 * 10.0  # session TTL 10 s: Consul invalidates within 2 x TTL (lock-delay 0)
    t0 = time.monotonic()
    # the deadline is the check: the bound plus the margin for a loaded runner
    await wait_until(lambda: _kv_counts(reader, {"show": {"f2": 2}}), timeout=bound + SCHEDULING_MARGIN,
                     interval=0.2, what=f"f1's keys removed by its session within 2 x TTL ({bound}s)")
    print(f"\nf1's keys removed {time.monotonic() - t0:.1f}s after its SIGKILL (bound {bound}s)")
    data = json.loads(meshctl(consul_topo.agent, "subs", "--json"))
    assert data == {"videos": {"show": {"frontends": {"f2": 2}, "total": 2}}, "total": 2}
    table = meshctl(consul_topo.agent, "subs", "show")
    assert "f2" in table and "f1" not in table
    nodes = json.loads(meshctl(consul_topo.agent, "nodes", "--json"))
    by_name = {n["name"]: n for n in nodes}
    assert by_name["d1"]["role"] == "dispatcher" and by_name["d1"]["healthy"]
    assert by_name["f2"]["healthy"] and by_name["f2"]["http"] == fb.url
    assert "f1" not in by_name or not by_name["f1"]["healthy"]
    assert "passing" in meshctl(consul_topo.agent, "nodes")
    for v in keep + doomed:
        v.close()


async def test_count_changes_are_coalesced(consul_topo, reader):
    consul_topo.dispatcher("d1")
    f = consul_topo.frontend("f1", **{"frontend.count_flush_interval": "1.0"})
    base = await viewer(f.url, "burst")
    await wait_until(lambda: _kv_counts(reader, {"burst": {"f1": 1}}), what="first viewer written")
    before = (await health(f.url))["stats"]["kv_requests"]
    t0 = time.monotonic()
    for _ in range(4):  # 4 rounds of 25 subscribes then 25 unsubscribes: 200 count changes
        burst = [await viewer(f.url, "burst") for _ in range(25)]
        for v in burst:
            v.close()
        await wait_until(lambda: _connections(f.url, 1), what="burst closed")
    elapsed = time.monotonic() - t0
    await wait_until(lambda: _kv_counts(reader, {"burst": {"f1": 1}}), what="settled count")
    writes = (await health(f.url))["stats"]["kv_requests"] - before
    # at most one coalesced write per interval (+1 for the final settle), never per change
    assert writes <= elapsed / 1.0 + 2, (writes, elapsed)
    assert writes < 20
    base.close()
    await wait_until(lambda: _kv_counts(reader, {}), what="last viewer gone: key deleted")


async def test_dispatcher_started_and_stopped_while_running(consul_topo, reader):
    d1 = consul_topo.dispatcher("d1")
    fa, fb = consul_topo.frontend("f1"), consul_topo.frontend("f2")
    videos = [f"mid-{i}" for i in range(10)]
    moved = [v for v in videos if owner(v, ["d1", "d2"]) == "d2"]
    assert moved
    viewers = {v: await viewer(fb.url, v) for v in videos}
    d2 = consul_topo.dispatcher("d2")
    for f in (fa, fb):
        await wait_until(lambda: _dispatchers_are(f.url, ["d1", "d2"]), what="d2 picked up")
    e1, e2 = (await health(d1.url))["epoch"], (await health(d2.url))["epoch"]
    for v in videos:
        sent = await like(fa.url, v)
        got = (await viewers[v].events(1))[0]
        assert json.loads(got.data)["id"] == sent["id"]
        assert int(got.id.split(":")[0]) == (e2 if v in moved else e1)
    assert (await health(d2.url))["stats"]["events_in"] == len(moved)
    d2.terminate()  # graceful: deregisters from Consul
    for f in (fa, fb):
        await wait_until(lambda: _dispatchers_are(f.url, ["d1"]), what="d2 dropped")
    for v in moved:
        sent = await like(fa.url, v)
        got = (await viewers[v].events(1))[0]
        assert json.loads(got.data)["id"] == sent["id"] and int(got.id.split(":")[0]) == e1


async def test_consul_outage_keeps_viewers_served_and_state_is_rewritten(consul_topo, reader):
    consul_topo.dispatcher("d1")
    consul_topo.dispatcher("d2")
    fa, fb = consul_topo.frontend("f1"), consul_topo.frontend("f2")
    for f in (fa, fb):
        await wait_until(lambda: _dispatchers_are(f.url, ["d1", "d2"]), what="both dispatchers")
    videos = ["out-1", "out-2", "out-3", "out-4"]
    viewers = {v: await viewer(fb.url, v) for v in videos}
    extra = await viewer(fa.url, "out-1")
    expected = {v: {"f2": 1} for v in videos}
    expected["out-1"] = {"f1": 1, "f2": 1}
    await wait_until(lambda: _kv_counts(reader, expected), what="counts before the outage")
    consul_topo.agent.stop()
    for round_ in range(3):  # Consul down: publishing and delivery go on
        for v in videos:
            sent = await like(fa.url, v)
            assert json.loads((await viewers[v].events(1))[0].data)["id"] == sent["id"]
        assert json.loads((await extra.events(1))[0].data)["video"] == "out-1"
    late = await viewer(fa.url, "out-2")  # a new viewer while Consul is down
    expected["out-2"] = {"f1": 1, "f2": 1}
    consul_topo.agent.restart()  # a -dev agent comes back empty: everything must be rewritten
    await wait_until(lambda: _kv_counts(reader, expected), timeout=30, interval=0.2,
                     what="counts rewritten after the outage")
    await wait_until(lambda: _node_names(reader, {"d1", "d2", "f1", "f2"}), timeout=30,
                     what="nodes re-registered")
    for v in videos:
        sent = await like(fb.url, v)
        assert json.loads((await viewers[v].events(1))[0].data)["id"] == sent["id"]
    assert json.loads((await late.events(1, kinds={"like"}))[0].data)["video"] == "out-2"


async def _dispatchers_are(url, names):
    return (await health(url))["dispatchers"] == names


async def _connections(url, n):
    return (await health(url))["connections"] == n


async def _kv_counts(kv, expected):
    try:
        return await kv.read_counts() == expected
    except Exception:  # noqa: BLE001 - Consul may be restarting: keep polling
        return False


async def _node_names(kv, names):
    try:
        return {n.name for n in await kv.nodes() if n.healthy} >= names
    except Exception:  # noqa: BLE001
        return False


def test_mesh_up_on_consul_starts_a_dev_agent(tmp_path, consul_binary_path):
    import os
    import signal
    proc = subprocess.Popen([sys.executable, "bin/mesh-up", "--kv", "consul", "--base-port", "0",
                             "--dispatchers", "1", "--frontends", "1", "--log-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "CONSUL_BIN": consul_binary_path})
    try:
        lines = read_lines_until(proc, "ready")
        assert lines[0].startswith("consul agent http://127.0.0.1:")
        addr = lines[0].split("//")[1]
        nodes = json.loads(subprocess.run([sys.executable, "-m", "mesh.tools.meshctl", "--kv", "consul", "--consul-addr",
                                           addr, "nodes", "--json"], capture_output=True, text=True,
                                          check=True).stdout)
        assert sorted(n["role"] for n in nodes) == ["dispatcher", "frontend"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert subprocess.run(["pgrep", "-f", f"http-port={addr.split(':')[1]}"]).returncode == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
