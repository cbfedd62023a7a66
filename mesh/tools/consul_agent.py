"""Run a real Consul agent on loopback: for ``mesh-up --kv consul`` and the test fixtures.

The binary comes from ``bin/ensure-consul`` (``$CONSUL_BIN``, ``consul`` on PATH, the user
cache, or a build of the pinned release from the Go module proxy).  ``ConsulAgent`` starts
``consul agent -dev`` (in-memory state, leader in well under a second) or, with
``persistent=True``, ``-server -bootstrap-expect=1`` with a data dir (leader after ~2 s).
Everything binds to 127.0.0.1; HTTP, serf LAN and server RPC get free ports, DNS, gRPC and
gRPC-TLS are disabled, and so is serf WAN unless ``wan=True``.  Readiness is a condition polled
against a deadline: a leader is elected and the agent's own node is registered with a passing
``serfHealth`` (sessions need both).  ``restart()`` keeps the ports: with ``-dev`` the agent
comes back EMPTY (what clients see when an agent loses its state); with ``persistent=True`` KV,
sessions and services survive.

WAN federation (one Consul datacenter per livemesh DC): :func:`start_federation` starts one
``wan=True`` agent per datacenter at once (``-datacenter dcN``, serf WAN on its own loopback
port, advertised as 127.0.0.1), then every other agent joins the first one's serf WAN
(``PUT /v1/agent/join/<addr>?wan=1``; gossip spreads the rest) and it waits until
``/v1/catalog/datacenters`` on every agent lists every datacenter.  Each agent is its DC's only
server; a request with ``?dc=dcK`` to any agent is forwarded over server RPC to dcK's server.
A federated agent that is restarted joins its peers again.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]  # a source checkout: bin/ sits beside mesh/
ENSURE_CONSUL = REPO / "bin" / "ensure-consul"
ENSURE_TIMEOUT = 30 * 60.0  # a cold build downloads and compiles Consul: minutes
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3          # a free port can be taken between choosing and binding it

_binary: str | None = None
_binary_error: str | None = None


class ConsulUnavailable(RuntimeError):
    """No consul binary, or an agent that would not start."""


def consul_binary() -> str:
    """Path of the consul binary from ``bin/ensure-consul``; the outcome, success or failure,
    is cached for the whole session so a failed build is not retried by every test."""
    global _binary, _binary_error
    if _binary is not None:
        return _binary
    if _binary_error is not None:
        raise ConsulUnavailable(_binary_error)
    try:
        proc = subprocess.run([str(ENSURE_CONSUL)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=ENSURE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _binary_error = f"{ENSURE_CONSUL} failed to run: {exc}"
        raise ConsulUnavailable(_binary_error) from exc
    path = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not path or not os.access(path, os.X_OK):
        _binary_error = (f"{ENSURE_CONSUL} exited {proc.returncode} without a usable consul "
                         f"(stdout {proc.stdout.strip()!r}); stderr:\n{proc.stderr[-4000:]}")
        raise ConsulUnavailable(_binary_error)
    _binary = path
    return path


#: Consul's ports are picked here: below the ephemeral range (32768-60999) so that no socket
#: binding port 0 can take one between choosing and starting, and apart from
#: ``mesh.tools.topology.PICKED_PORTS``
AGENT_PORTS = (10000, 19999)


def _free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (serf listens on both)."""
    import random
    for _ in range(200):
        port = random.randint(*AGENT_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise ConsulUnavailable("no free loopback port for consul")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports, each free for TCP and UDP right now."""
    ports: list[int] = []
    while len(ports) < n:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _die_with_parent() -> None:
    """Child side of Popen (Linux): SIGKILL the agent if the test process dies, so a killed
    pytest leaves no agent behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: fixtures still stop agents; only a SIGKILLed pytest leaks them


class ConsulAgent:
    """One ``consul agent`` process on 127.0.0.1; see the module docstring."""

    def __init__(self, binary: str, workdir: Path, datacenter: str = "dc1",
                 persistent: bool = False, wan: bool = False):
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.datacenter = datacenter
        self.persistent = persistent
        self.wan = wan
        self.wan_peers: list[str] = []  # serf WAN addresses joined (again after a restart)
        self.data_dir: Path | None = self.workdir / "data" if persistent else None
        self.log_path = self.workdir / "consul.log"
        self.host = "127.0.0.1"
        self.port = 0            # HTTP
        self.serf_lan_port = 0
        self.server_port = 0
        self.serf_wan_port = 0   # only with wan=True
        self.node_name = ""
        self.proc: subprocess.Popen | None = None

    @property
    def http_addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def wan_addr(self) -> str:
        """``host:port`` of the serf WAN listener (what other datacenters' agents join)."""
        return f"{self.host}:{self.serf_wan_port}"

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        cmd = [self.binary, "agent"]
        if self.persistent:
            cmd += ["-server", "-bootstrap-expect=1", f"-data-dir={self.data_dir}",
                    # elections in ~1 s instead of ~5 s (production default multiplier 5)
                    "-hcl", "performance { raft_multiplier = 1 }"]
        else:
            cmd += ["-dev"]
        return cmd + [
            f"-datacenter={self.datacenter}", f"-node={self.node_name}",
            "-bind=127.0.0.1", "-client=127.0.0.1", "-advertise=127.0.0.1", "-ui=false",
            f"-http-port={self.port}", f"-serf-lan-port={self.serf_lan_port}",
            f"-server-port={self.server_port}", *self._wan_flags(), "-dns-port=-1",
            "-grpc-port=-1", "-grpc-tls-port=-1",
            "-hcl", "disable_update_check = true", "-log-level=info",
        ]

    def _wan_flags(self) -> list[str]:
        if not self.wan:
            return ["-serf-wan-port=-1"]
        return [f"-serf-wan-port={self.serf_wan_port}", f"-advertise-wan={self.host}"]

    def start(self, timeout: float = START_TIMEOUT, wait: bool = True) -> "ConsulAgent":
        """Start on fresh free ports (retrying when a port was taken meanwhile).  With
        ``wait=False`` it returns once the process is spawned: call :meth:`wait_started`
        (so several agents boot at once; spawn them all from one thread, because the
        kill-on-parent-death signal fires when the *thread* that spawned an agent ends)."""
        if self.running:
            raise ConsulUnavailable(f"consul agent at {self.http_addr} is already running")
        self._attempt = 1
        self._spawn_on_free_ports()
        return self.wait_started(timeout) if wait else self

    def wait_started(self, timeout: float = START_TIMEOUT) -> "ConsulAgent":
        """Wait until the agent spawned by ``start(wait=False)`` is ready."""
        while True:
            try:
                self._wait_ready(timeout)
                return self
            except ConsulUnavailable as exc:
                self.kill()
                if "address already in use" not in str(exc) or self._attempt >= START_ATTEMPTS:
                    raise
            self._attempt += 1
            self._spawn_on_free_ports()

    def _spawn_on_free_ports(self) -> None:
        ports = _free_ports(4 if self.wan else 3) + [0]
        self.port, self.serf_lan_port, self.server_port, self.serf_wan_port = ports[:4]
        self.node_name = f"livemesh-test-{self.port}"
        self._spawn()

    def restart(self, timeout: float = START_TIMEOUT) -> "ConsulAgent":
        """Stop and start again on the same ports (and data dir when persistent)."""
        self.stop()
        self._launch(timeout)
        for addr in self.wan_peers:
            self.join_wan(addr)
        return self

    def join_wan(self, addr: str) -> None:
        """Join the serf WAN pool of the agent at ``addr`` (``host:port``; remembered, so a
        restart joins again)."""
        if not self.wan:
            raise ConsulUnavailable(f"consul agent at {self.http_addr} has serf WAN disabled")
        request = urllib.request.Request(f"{self.url}/v1/agent/join/{addr}?wan=1", method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=5.0) as response:
                response.read()
        except OSError as exc:
            raise ConsulUnavailable(f"consul agent at {self.http_addr} could not join {addr} "
                                    f"over WAN: {exc}") from exc
        if addr not in self.wan_peers:
            self.wan_peers.append(addr)

    def datacenters(self) -> list[str]:
        """The datacenters this agent knows (``/v1/catalog/datacenters``), sorted."""
        return sorted(self.get_json("/v1/catalog/datacenters") or ())

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the agent gets no chance to leave or flush."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None

    def _launch(self, timeout: float) -> None:
        self._spawn()
        self._wait_ready(timeout)

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n==> {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir,
                                         preexec_fn=_die_with_parent if sys.platform == "linux"
                                         else None)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            if self.proc.poll() is not None:
                raise ConsulUnavailable(f"consul agent exited with {self.proc.returncode} during "
                                        f"start-up:\n{self.log_tail()}")
            try:
                leader = self.get_json("/v1/status/leader")
                checks = self.get_json(f"/v1/health/node/{self.node_name}") if leader else []
                if any(c.get("CheckID") == "serfHealth" and c.get("Status") == "passing"
                       for c in checks):
                    return
                last = f"leader {leader!r}, node checks {checks!r}"
            except (OSError, ValueError) as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise ConsulUnavailable(f"consul agent at {self.http_addr} not ready within "
                                        f"{timeout:g} s ({last}):\n{self.log_tail()}")
            time.sleep(0.05)  # readiness poll interval, not a settle delay

    def get_json(self, path: str, timeout: float = 2.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "ConsulAgent":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        mode = "persistent" if self.persistent else "dev"
        return f"<ConsulAgent {mode} {self.datacenter} http={self.http_addr} running={self.running}>"


def start_federation(binary: str, workdir: Path, datacenters: list[str] | tuple[str, ...],
                     timeout: float = START_TIMEOUT) -> list[ConsulAgent]:
    """One ready ``-dev`` agent per datacenter (booting at once), WAN-federated: returns
    once every agent lists every datacenter.  On failure every agent started is stopped."""
    if len(set(datacenters)) != len(datacenters) or not datacenters:
        raise ValueError(f"datacenters must be distinct and non-empty: {datacenters!r}")
    agents = [ConsulAgent(binary, Path(workdir) / f"consul-{dc}", dc, wan=True)
              for dc in datacenters]
    try:
        for agent in agents:  # all boot at once
            agent.start(timeout, wait=False)
        for agent in agents:
            agent.wait_started(timeout)
        for agent in agents[1:]:
            agent.join_wan(agents[0].wan_addr)
        wait_federated(agents, timeout)
        return agents
    except BaseException:
        for agent in agents:
            agent.stop()
        raise


def wait_federated(agents: list[ConsulAgent], timeout: float = START_TIMEOUT) -> None:
    """Wait (condition with a deadline) until every agent lists every agent's datacenter."""
    wanted = sorted(agent.datacenter for agent in agents)
    deadline = time.monotonic() + timeout
    seen: dict[str, object] = {}
    while True:
        for agent in agents:
            try:
                seen[agent.datacenter] = agent.datacenters()
            except (OSError, ValueError) as exc:
                seen[agent.datacenter] = repr(exc)
        if all(known == wanted for known in seen.values()):
            return
        if time.monotonic() > deadline:
            raise ConsulUnavailable(f"consul agents not federated within {timeout:g} s: want "
                                    f"{wanted} everywhere, got {seen}")
        time.sleep(0.05)  # readiness poll interval, not a settle delay
