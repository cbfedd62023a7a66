"""Shared fixtures.

* ``async def`` tests run in a fresh event loop (no plugin needed: ``pytest_pyfunc_call``).
* ``topology``: real dispatcher and frontend processes on free loopback ports sharing an
  embedded KV in the test's tmp dir; every process is stopped at teardown, even on failure.
* ``balancer``: a real HAProxy in front of a test's frontends (``tests/lb_fixtures.py``).
* the global per-test timeout comes from pytest-timeout (``PYTEST_TIMEOUT`` overrides the
  ``timeout`` in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import inspect
import os

import pytest

from mesh.tools.topology import Topology

pytest_plugins = ["consul_fixtures", "lb_fixtures"]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        funcargs = pyfuncitem.funcargs
        args = {name: funcargs[name] for name in inspect.signature(pyfuncitem.obj).parameters
                if name in funcargs}

        async def main():
            try:
                await pyfuncitem.obj(**args)
            finally:  # async clean-ups run in the test's own loop
                for cleanup in reversed(funcargs.get("aclose") or []):
                    await cleanup()

        asyncio.run(main())
        return True
    return None


@pytest.fixture
def aclose():
    """Async clean-ups (``async def`` callables) run after an async test, in its loop."""
    return []


@pytest.fixture
def kv_path(tmp_path):
    return str(tmp_path / "kv.db")


@pytest.fixture
def topology(tmp_path, kv_path):
    """A factory for node processes on one embedded KV: ``topology.dispatcher("d1")``."""
    # keep teardown quick; drain is tested on its own
    extra = {"dispatcher.drain_seconds": "0.3", "frontend.drain_seconds": "0.3"}
    if os.environ.get("LIVEMESH_TEST_DEBUG"):
        extra["node.log_level"] = "debug"
    topo = Topology(kv={"backend": "embedded", "path": kv_path, "liveness_ttl": "2"},
                    log_dir=str(tmp_path), extra=extra)
    try:
        yield topo
    finally:
        topo.close()
