"""pytest plugin: real Consul agents on free loopback ports.

Load it with ``pytest_plugins = ["consul_fixtures"]`` in ``tests/conftest.py`` (``tests/`` is
on ``sys.path``).  The binary comes from ``bin/ensure-consul`` (``$CONSUL_BIN``, ``consul`` on
PATH, the user cache, or a build from the Go module proxy), run once per test session: during
collection when a selected test is marked ``consul`` (so a first build is not cut short by the
per-test timeout), else by the first fixture that needs it.  Not getting a binary FAILS the
tests that need one, in CI and locally alike: a skipped Consul test proves nothing.

Agents
------
``start_consul_agent(tmp_path)`` starts ``consul agent -dev`` (in-memory state, leader in
well under a second); ``persistent=True`` starts ``-server -bootstrap-expect=1`` with a data
dir under ``tmp_path`` instead (leader after ~2 s).  Everything binds to 127.0.0.1; HTTP,
serf LAN and server RPC get free ports, DNS, gRPC and gRPC-TLS are disabled, serf WAN too
except in a federation.
Readiness is a condition polled against a deadline: a leader is elected and the agent's own
node is registered with a passing ``serfHealth`` (sessions need both).

``restart()`` keeps the ports.  With ``-dev`` it comes back EMPTY (KV, sessions, services
lost: what clients see when an agent loses its state); with ``persistent=True`` KV, sessions
and the agent's services survive.

Fixtures: ``consul_agent`` (per test, -dev), ``consul_agent_factory`` (per test, any number
of agents, e.g. one per datacenter or ``persistent=True``), ``shared_consul_agent`` (one -dev
agent for the whole session, for tests that only need *a* Consul and use unique key
prefixes), ``consul_binary`` (the path).  Every agent a fixture started is stopped even when
the test fails; the agent's log is attached to startup errors.

``consul_federation(["dc1", "dc2", "dc3"])`` (per test) starts one ``-dev`` agent per
datacenter, all booting at once, WAN-federated on loopback
(``mesh.tools.consul_agent.start_federation``): it returns once ``/v1/catalog/datacenters`` on every
agent lists every datacenter (~0.5 s for three).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from mesh.tools import consul_agent as _agent
from mesh.tools.consul_agent import (ENSURE_CONSUL, START_TIMEOUT, ConsulAgent, ConsulUnavailable,
                               consul_binary, start_federation)


def start_consul_agent(tmp_path: Path, datacenter: str = "dc1", persistent: bool = False,
                       timeout: float = START_TIMEOUT) -> ConsulAgent:
    """Start a ready agent with its files under ``tmp_path``; the caller must ``stop()`` it."""
    return ConsulAgent(consul_binary(), Path(tmp_path), datacenter, persistent).start(timeout)


def _or_fail(start):
    """``start()``, or FAIL the test (never skip: under CI=true and locally alike)."""
    try:
        return start()
    except ConsulUnavailable as exc:
        error = str(exc)
    ci = " (CI=true: Consul tests must run)" if os.environ.get("CI") == "true" else ""
    pytest.fail(f"no Consul agent for this test{ci}: {error}", pytrace=False)


@pytest.fixture(scope="session")
def consul_binary_path() -> str:
    return _or_fail(consul_binary)


@pytest.fixture
def consul_agent_factory(tmp_path, consul_binary_path):
    """``factory(datacenter="dc1", persistent=False) -> ConsulAgent``; all stopped at teardown."""
    agents: list[ConsulAgent] = []

    def factory(datacenter: str = "dc1", persistent: bool = False) -> ConsulAgent:
        agent = ConsulAgent(consul_binary_path, tmp_path / f"consul-{len(agents)}-{datacenter}",
                            datacenter, persistent)
        agents.append(agent)
        return _or_fail(agent.start)

    try:
        yield factory
    finally:
        for agent in agents:
            agent.stop()


@pytest.fixture
def consul_federation(tmp_path, consul_binary_path):
    """``federate(datacenters) -> [ConsulAgent, ...]`` (one per DC, WAN-joined, ready); every
    agent is stopped at teardown."""
    agents: list[ConsulAgent] = []

    def federate(datacenters) -> list[ConsulAgent]:
        started = _or_fail(lambda: start_federation(consul_binary_path, tmp_path / "federation",
                                                    list(datacenters)))
        agents.extend(started)
        return started

    try:
        yield federate
    finally:
        for agent in agents:
            agent.stop()


@pytest.fixture
def consul_agent(consul_agent_factory) -> ConsulAgent:
    """A fresh ``-dev`` agent for this test."""
    return consul_agent_factory()


@pytest.fixture(scope="session")
def shared_consul_agent(tmp_path_factory, consul_binary_path):
    """One ``-dev`` agent for the whole session: use a unique key prefix per test."""
    agent = ConsulAgent(consul_binary_path, tmp_path_factory.mktemp("consul-shared"))
    try:
        yield _or_fail(agent.start)
    finally:
        agent.stop()


def pytest_collection_finish(session):
    """Obtain the binary before the first test runs when a selected test needs Consul, so a
    first-time build (minutes) does not count against a test's timeout."""
    if session.config.option.collectonly or _agent._binary is not None or _agent._binary_error is not None:
        return
    if not any(item.get_closest_marker("consul") for item in session.items):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"consul_fixtures: locating consul via {ENSURE_CONSUL} "
                            "(a first run builds it: a few minutes)")
    with contextlib.suppress(ConsulUnavailable):  # reported by the fixtures, as failures
        path = consul_binary()
        if reporter is not None:
            reporter.write_line(f"consul_fixtures: using {path}")
