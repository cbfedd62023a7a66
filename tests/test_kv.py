"""The KV contract, run against every backend (Consul: a real agent)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from mesh.kv import NodeInfo
from mesh.kv.embedded import EmbeddedKV
from mesh.kv.memory import MemoryKV, MemoryStore

BACKENDS = ["memory", "embedded", pytest.param("consul", marks=pytest.mark.consul)]


@pytest.fixture(params=BACKENDS)
def make_kv(request, tmp_path, aclose):
    """A factory of KV handles that share one store (two handles ~ two processes)."""
    made = []
    if request.param == "memory":
        store = MemoryStore()
        factory = lambda: MemoryKV(store)  # noqa: E731
    elif request.param == "embedded":
        path = str(tmp_path / "kv.db")
        factory = lambda: EmbeddedKV(path, ttl=2.0)  # noqa: E731
    else:
        from mesh.kv.consul import ConsulKV
        agent = request.getfixturevalue("shared_consul_agent")
        prefix = f"t{uuid.uuid4().hex[:8]}"
        factory = lambda: ConsulKV(agent.host, agent.port, prefix=prefix)  # noqa: E731

    def make():
        kv = factory()
        made.append(kv)
        return kv

    async def close_all():
        for kv in made:
            try:
                await kv.deregister()
            finally:
                await kv.close()

    aclose.append(close_all)
    return make


def _name(base):
    return f"{base}-{uuid.uuid4().hex[:6]}"


async def test_counts_round_trip_only_positive(make_kv):
    a, b = make_kv(), make_kv()
    fa, fb = _name("fa"), _name("fb")
    await a.open(), await b.open()
    await a.register(NodeInfo(fa, "frontend"))
    await b.register(NodeInfo(fb, "frontend"))
    await a.write_counts(fa, {"v1": 3, "v2": 1})
    await b.write_counts(fb, {"v1": 2})
    assert await b.read_counts("v1") == {"v1": {fa: 3, fb: 2}}
    await a.write_counts(fa, {"v2": 0, "v1": 4})
    counts = await a.read_counts()
    assert counts["v1"] == {fa: 4, fb: 2} and "v2" not in counts
    assert await a.read_counts("nothing") == {}


async def test_many_keys_in_one_write(make_kv):
    kv = make_kv()
    f = _name("f")
    await kv.open()
    await kv.register(NodeInfo(f, "frontend"))
    await kv.write_counts(f, {f"v{i}": i + 1 for i in range(150)})   # > 64 ops (Consul txn limit)
    counts = await kv.read_counts()
    assert len([v for v in counts if f in counts[v]]) == 150 and counts["v149"][f] == 150
    await kv.write_counts(f, {f"v{i}": 0 for i in range(150)})
    assert not any(f in c for c in (await kv.read_counts()).values())


async def test_deregister_removes_node_and_its_counts(make_kv):
    a, b = make_kv(), make_kv()
    fa = _name("fa")
    await a.open(), await b.open()
    await a.register(NodeInfo(fa, "frontend", http="http://x"))
    await a.write_counts(fa, {"gone": 1})
    assert fa in [n.name for n in await b.nodes("frontend")]
    await a.deregister()
    assert (await b.read_counts("gone")) == {}
    assert fa not in [n.name for n in await b.nodes()]


async def test_watch_nodes_wakes_on_a_new_dispatcher(make_kv):
    watcher, joiner = make_kv(), make_kv()
    await watcher.open(), await joiner.open()
    index, before = await watcher.watch_nodes("dispatcher", 0, wait=1.0)
    # nothing changes: the watch blocks for its whole wait and answers the same index and
    # nodes (the clock starts before the call, so the lower bound holds under any load; 10 ms
    # for the event loop's timer resolution)
    started = time.monotonic()
    quiet = await watcher.watch_nodes("dispatcher", index, wait=0.5)
    assert time.monotonic() - started >= 0.5 - 0.01
    assert quiet == (index, before)
    name = _name("d")
    started = time.monotonic()
    pending = asyncio.ensure_future(watcher.watch_nodes("dispatcher", index, wait=20.0))
    await joiner.register(NodeInfo(name, "dispatcher", router="tcp://127.0.0.1:1", pub="tcp://127.0.0.1:2"))
    # the registration is the only change: the watch's first answer has it
    index, nodes = await asyncio.wait_for(pending, 10)
    assert name in [n.name for n in nodes], nodes
    assert time.monotonic() - started < 10  # woken by the change, not the 20 s wait
    node = next(n for n in nodes if n.name == name)
    assert (node.role, node.router, node.pub) == ("dispatcher", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
