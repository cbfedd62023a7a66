"""ConsulKV against a real Consul agent (``consul_fixtures``): counts, transactions, the node
registry, liveness of a SIGKILLed process, and agent outages."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mesh.errors import KVError
from mesh.kv import ROLE_DISPATCHER, ROLE_FRONTEND, NodeInfo
from mesh.kv.consul import TXN_MAX_OPS, ConsulKV

pytestmark = pytest.mark.consul

REPO = Path(__file__).resolve().parent.parent
POLL = 0.2  # condition poll interval while waiting on Consul's own timers


async def wait_for(check, timeout: float, what: str):
    """Poll the async ``check()`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(POLL)


def kv_for(agent, **kwargs) -> ConsulKV:
    return ConsulKV(host=agent.host, port=agent.port, **kwargs)


def frontend(name: str) -> NodeInfo:
    return NodeInfo(name, ROLE_FRONTEND, "dc1", http=f"http://127.0.0.1:1/{name}")


def dispatcher(name: str) -> NodeInfo:
    return NodeInfo(name, ROLE_DISPATCHER, "dc1", http="http://127.0.0.1:2",
                    router="tcp://127.0.0.1:5001", pub="tcp://127.0.0.1:5002")


def test_counts_round_trip(consul_agent):
    async def main():
        kv1, kv2 = kv_for(consul_agent), kv_for(consul_agent)
        try:
            await kv1.register(frontend("fe-1"))
            await kv2.register(frontend("fe-2"))
            await kv1.write_counts("fe-1", {"video-1": 2, "video-10": 5, "a/b c": 1})
            await kv2.write_counts("fe-2", {"video-1": 4})
            assert await kv1.read_counts() == {"video-1": {"fe-1": 2, "fe-2": 4},
                                               "video-10": {"fe-1": 5}, "a/b c": {"fe-1": 1}}
            # a video's read must not pick up a video whose id it prefixes
            assert await kv2.read_counts("video-1") == {"video-1": {"fe-1": 2, "fe-2": 4}}
            assert await kv2.read_counts("a/b c") == {"a/b c": {"fe-1": 1}}
            assert await kv2.read_counts("nobody") == {}

            await kv1.write_counts("fe-1", {"video-1": 3, "video-10": 0, "a/b c": -1})
            assert await kv2.read_counts() == {"video-1": {"fe-1": 3, "fe-2": 4}}
            assert kv1.kv_writes == 2 and kv1.kv_ops == 6

            raw = consul_agent.get_json("/v1/kv/livemesh/dc1/subs/?recurse=1")
            assert sorted(e["Key"] for e in raw) == ["livemesh/dc1/subs/video-1/fe-1",
                                                     "livemesh/dc1/subs/video-1/fe-2"]
        finally:
            await kv1.close()
            await kv2.close()

    asyncio.run(main())


def test_write_before_register_is_refused(consul_agent):
    async def main():
        kv = kv_for(consul_agent)
        try:
            with pytest.raises(KVError, match="before register"):
                await kv.write_counts("fe-1", {"v": 1})
        finally:
            await kv.close()

    asyncio.run(main())


def test_many_keys_are_chunked_into_transactions(consul_agent):
    async def main():
        kv = kv_for(consul_agent)
        try:
            await kv.register(frontend("fe-1"))
            counts = {f"video-{i}": i + 1 for i in range(150)}
            await kv.write_counts("fe-1", counts)
            assert kv.kv_writes == -(-150 // TXN_MAX_OPS) == 3
            assert await kv.read_counts() == {v: {"fe-1": c} for v, c in counts.items()}

            await kv.write_counts("fe-1", {v: 0 for v in counts})
            assert kv.kv_writes == 6 and kv.kv_ops == 300
            assert await kv.read_counts() == {}
        finally:
            await kv.close()

    asyncio.run(main())


def test_nodes_and_blocking_watch(consul_agent):
    async def main():
        kv_fe, kv_disp = kv_for(consul_agent), kv_for(consul_agent)
        try:
            await kv_fe.register(frontend("fe-1"))
            assert await kv_fe.nodes() == [frontend("fe-1")]
            assert await kv_fe.nodes(ROLE_DISPATCHER) == []

            # A watch with nothing changing blocks for its wait (a real blocking query).
            index, _ = await kv_fe.watch_nodes(ROLE_DISPATCHER, 0, wait=1.0)
            started = time.monotonic()
            same_index, nodes = await kv_fe.watch_nodes(ROLE_DISPATCHER, index, wait=1.0)
            assert nodes == [] and time.monotonic() - started >= 0.9

            # A registration wakes a pending watch long before its wait expires.
            index_all, _ = await kv_fe.watch_nodes(None, 0, wait=20.0)
            watch_one = asyncio.ensure_future(kv_fe.watch_nodes(ROLE_DISPATCHER, same_index, 20.0))
            watch_all = asyncio.ensure_future(kv_fe.watch_nodes(None, index_all, 20.0))
            # the marker: a third watch, started after them, that Consul holds for its whole
            # 0.5 s wait and answers unchanged; by then the two watches started before it
            # are pending at Consul too, and neither answered early
            started = time.monotonic()
            probe = await kv_fe.watch_nodes(ROLE_DISPATCHER, same_index, wait=0.5)
            assert probe == (same_index, []) and time.monotonic() - started >= 0.5 - 0.01
            assert not watch_one.done() and not watch_all.done()
            started = time.monotonic()
            await kv_disp.register(dispatcher("disp-1"))
            (new_index, nodes), (new_index_all, nodes_all) = await asyncio.wait_for(
                asyncio.gather(watch_one, watch_all), timeout=5.0)
            woke_after = time.monotonic() - started
            assert woke_after < 5.0
            assert new_index > same_index and new_index_all > index_all
            assert nodes == [dispatcher("disp-1")]
            assert nodes_all == [dispatcher("disp-1"), frontend("fe-1")]
            print(f"watch woke {woke_after:.3f} s after the registration")
        finally:
            await kv_fe.close()
            await kv_disp.close()

    asyncio.run(main())


def test_deregister_removes_node_and_counts(consul_agent):
    async def main():
        kv, other = kv_for(consul_agent), kv_for(consul_agent)
        try:
            await kv.register(frontend("fe-1"))
            await other.register(frontend("fe-2"))
            await kv.write_counts("fe-1", {"v1": 1, "v2": 2})
            await other.write_counts("fe-2", {"v1": 5})
            await kv.deregister()
            assert await other.read_counts() == {"v1": {"fe-2": 5}}
            assert [n.name for n in await other.nodes()] == ["fe-2"]
            with pytest.raises(KVError, match="before register"):
                await kv.write_counts("fe-1", {"v1": 1})
        finally:
            await kv.close()
            await other.close()

    asyncio.run(main())


def test_restarted_node_replaces_its_predecessors_session(consul_agent, caplog):
    async def main():
        old, new = kv_for(consul_agent), kv_for(consul_agent)
        try:
            await old.register(frontend("fe-1"))
            await old.write_counts("fe-1", {"v1": 1})
            await old.close()  # crashed: no deregister, its session is still live
            with caplog.at_level(logging.WARNING, logger="mesh.kv"):
                await new.register(frontend("fe-1"))
            assert "left by an earlier fe-1" in caplog.text
            assert await new.read_counts() == {}
            await new.write_counts("fe-1", {"v1": 2})  # no key is held by the old session
            assert await new.read_counts() == {"v1": {"fe-1": 2}}
        finally:
            await old.close()
            await new.close()

    asyncio.run(main())


CHILD = textwrap.dedent("""
    import asyncio, json, sys
    from mesh.kv import NodeInfo
    from mesh.kv.consul import ConsulKV

    async def main():
        kv = ConsulKV(host="127.0.0.1", port=int(sys.argv[1]))
        await kv.register(NodeInfo("fe-child", "frontend", "dc1", http="http://127.0.0.1:9"))
        await kv.write_counts("fe-child", {"v1": 1, "v2": 7})
        print(json.dumps({"ready": True, "liveness_bound": kv.liveness_bound}), flush=True)
        await asyncio.Event().wait()  # keep renewing until killed

    asyncio.run(main())
""")


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            return proc.stdout.readline()
    pytest.fail(f"child gave no line within {timeout:g} s (exit code {proc.poll()})")


def test_sigkilled_frontend_loses_its_counts_within_liveness_bound(consul_agent):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                     os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(consul_agent.port)], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, text=True)
    try:
        ready = json.loads(read_line(child, timeout=15.0))
        bound = ready["liveness_bound"]
        assert bound == 20.0

        async def main():
            kv = kv_for(consul_agent)
            try:
                assert await kv.read_counts() == {"v1": {"fe-child": 1}, "v2": {"fe-child": 7}}
                assert [(n.name, n.healthy) for n in await kv.nodes()] == [("fe-child", True)]
                child.send_signal(signal.SIGKILL)
                child.wait()
                killed = time.monotonic()

                async def gone():
                    return await kv.read_counts() == {}

                await wait_for(gone, bound + 2.0, "the killed frontend's counts vanish")
                vanished = time.monotonic() - killed

                async def unhealthy():
                    return [(n.name, n.healthy) for n in await kv.nodes()] == [("fe-child", False)]

                # its TTL check is already past its TTL (10 s) when the session (2 x TTL) expires
                await wait_for(unhealthy, 2.0, "the killed frontend is reported unhealthy")
                print(f"counts vanished {vanished:.1f} s after SIGKILL (bound {bound:g} s)")
                assert vanished <= bound + 2.0
            finally:
                await kv.close()

        asyncio.run(main())
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        child.stdout.close()


def test_outage_of_a_dev_agent_recreates_the_session(consul_agent, caplog):
    """A -dev agent forgets everything on restart: the session is gone, so the keep-alive makes
    a new one, registers the node again and bumps the generation."""
    async def main():
        kv = kv_for(consul_agent)
        try:
            await kv.register(frontend("fe-1"))
            await kv.write_counts("fe-1", {"v1": 1})
            consul_agent.stop()
            for call in (lambda: kv.write_counts("fe-1", {"v1": 2}), kv.read_counts, kv.nodes,
                         lambda: kv.watch_nodes(None, 5, 1.0)):
                with pytest.raises(KVError, match=r"consul http://127\.0\.0\.1:\d+: .* failed"):
                    await call()

            async def renewal_failed():
                return "keeping fe-1 alive failed" in caplog.text

            await wait_for(renewal_failed, kv.session_ttl / 2 + 2.0, "a failed renewal is logged")
            consul_agent.restart()
            restarted = time.monotonic()

            async def new_generation():
                return kv.generation == 1

            await wait_for(new_generation, 10.0, "the keep-alive recreates the session")
            print(f"generation bumped {time.monotonic() - restarted:.1f} s after the restart")
            assert await kv.read_counts() == {}  # the owner's job now: write its counts again
            await kv.write_counts("fe-1", {"v1": 2})
            assert await kv.read_counts() == {"v1": {"fe-1": 2}}
            assert await kv.nodes() == [frontend("fe-1")]
        finally:
            await kv.close()

    with caplog.at_level(logging.WARNING, logger="mesh.kv"):
        asyncio.run(main())
    assert "generation 1: counts must be written again" in caplog.text


def test_outage_of_a_persistent_agent_keeps_the_session(consul_agent_factory):
    """A server with a data dir keeps KV, sessions and services across a restart (session
    timers restart on leader election): no new generation, the counts are still there."""
    agent = consul_agent_factory(persistent=True)

    async def main():
        kv = kv_for(agent)
        try:
            await kv.register(frontend("fe-1"))
            await kv.write_counts("fe-1", {"v1": 1})
            agent.stop()
            with pytest.raises(KVError):
                await kv.read_counts()
            agent.restart()
            assert await kv.read_counts() == {"v1": {"fe-1": 1}}
            await kv.write_counts("fe-1", {"v1": 3})
            assert await kv.read_counts() == {"v1": {"fe-1": 3}}
            await kv._renew_once()  # what the keep-alive does next: the same session renews
            assert kv.generation == 0
            assert await kv.nodes() == [frontend("fe-1")]
        finally:
            await kv.close()

    asyncio.run(main())
