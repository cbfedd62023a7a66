"""pytest plugin: a real HAProxy (Debian's ``haproxy``, ``/usr/sbin/haproxy``, installed by
``bin/install-deps``) in front of a test's frontends, configured from
``config/haproxy.cfg.template`` by ``mesh.tools.haproxy`` exactly as ``mesh-up --lb`` does.

``balancer(frontends)`` (per test) writes the configuration, starts HAProxy on a free loopback
port, waits until a request through it reaches a frontend and until every frontend's health
check passed (HAProxy's runtime API, ``HAProxy.server_states``), and returns the ``HAProxy``.
Every HAProxy it started is stopped at teardown, even when the test fails.  A missing binary
FAILS the test: a skipped load-balancer test proves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from helpers import wait_until
from mesh.tools.haproxy import HAPROXY, HAProxy
from mesh.tools.topology import NodeProcess, free_port


async def all_up(lb: HAProxy, names: list[str]) -> dict[str, str]:
    """Until HAProxy holds every one of ``names`` UP (rise 2: about 1 s after it starts)."""
    def every_one_up():
        states = lb.server_states()
        return states if all(states.get(n) == "UP" for n in names) else None

    return await wait_until(every_one_up, timeout=10, what=f"{names} UP in HAProxy")


@pytest.fixture
def balancer(tmp_path):
    if not os.access(HAPROXY, os.X_OK):
        ci = " (CI=true: load-balancer tests must run)" if os.environ.get("CI") == "true" else ""
        pytest.fail(f"no haproxy at {HAPROXY}{ci}: run `bin/install-deps` (bin/test does)", pytrace=False)
    # the stats socket lives beside the configuration: a short directory keeps its path
    # under the 107-byte limit of a Unix socket whatever the test's name
    workdir = tempfile.mkdtemp(prefix="lb-")
    started: list[HAProxy] = []

    async def start(frontends: list[NodeProcess]) -> HAProxy:
        host = "127.0.0.1"
        lb = HAProxy.write_config(os.path.join(workdir, f"haproxy-{len(started)}.cfg"), host, free_port(host),
                                  [(n.name, n.url.removeprefix("http://")) for n in frontends],
                                  log_path=str(tmp_path / f"haproxy-{len(started)}.log"))
        started.append(lb)
        lb.start()
        lb.wait_ready()
        await all_up(lb, [n.name for n in frontends])
        return lb

    try:
        yield start
    finally:
        for lb in started:
            lb.stop()
        shutil.rmtree(workdir, ignore_errors=True)
