"""Start and stop whole local topologies: ``mesh-up`` and the test fixtures share this code.

Each node is a child process (``python -m dispatcher`` / ``python -m frontend`` /
``python -m dispatcher.bridge``) configured by
``--set`` overrides; it prints one JSON readiness line on stdout once it serves
(``mesh.io.node.announce_ready``), which :meth:`NodeProcess.wait_ready` waits for with a deadline.
Logs go to stderr (a file per node when ``log_dir`` is given).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import click


class NodeFailed(RuntimeError):
    pass


#: the module ``python -m`` runs for each role
MODULES = {"dispatcher": "dispatcher", "frontend": "frontend", "bridge": "dispatcher.bridge"}


@dataclass
class NodeProcess:
    role: str
    name: str
    args: list[str]
    env: dict
    log_path: str | None = None
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)
    #: a command the node runs under, e.g. ``("ip", "netns", "exec", NS)`` (it must exec the node)
    prefix: tuple[str, ...] = ()

    def start(self) -> "NodeProcess":
        stderr = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", MODULES[self.role], *self.args],
                                     env=self.env, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)
        if stderr:
            stderr.close()
        return self

    def wait_ready(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buf = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NodeFailed(f"{self.role} {self.name}: not ready within {timeout}s{self._log_tail()}")
                if not sel.select(left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    self.proc.wait(5)
                    raise NodeFailed(f"{self.role} {self.name}: exited with {self.proc.returncode} "
                                     f"before it was ready{self._log_tail()}")
                buf += chunk
                for line in buf.split(b"\n")[:-1]:
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(msg, dict) and msg.get("ready"):
                        self.info = msg
                        self.name = msg.get("name", self.name)
                        return msg
        finally:
            sel.close()

    def _log_tail(self) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as fh:
            return "\n--- log tail ---\n" + fh.read()[-3000:].decode("utf-8", "replace")

    @property
    def url(self) -> str:
        return self.info.get("http", "")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.terminate()
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()


class Topology:
    """A set of node processes sharing one KV; ``close()`` stops every one of them.
    ``prefix``: a command every node runs under (see ``NodeProcess.prefix``)."""

    def __init__(self, kv: dict[str, str] | None = None, log_dir: str | None = None,
                 host: str = "127.0.0.1", extra: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()):
        self.kv = kv or {}
        self.prefix = tuple(prefix)
        self.log_dir = log_dir
        self.host = host
        self.extra = extra or {}
        self.nodes: list[NodeProcess] = []

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEMESH_")}
        env.update({f"LIVEMESH_KV_{k.upper()}": str(v) for k, v in self.kv.items()})
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def spawn(self, role: str, name: str, settings: dict) -> NodeProcess:
        merged = {**self.extra, **settings}
        args = [a for k, v in merged.items() for a in ("--set", f"{k}={v}")]
        args += ["--set", f"node.name={name}"]
        log_path = os.path.join(self.log_dir, f"{name}.log") if self.log_dir else None
        node = NodeProcess(role, name, args, self._env(), log_path, prefix=self.prefix).start()
        self.nodes.append(node)
        return node

    def dispatcher(self, name: str, port_base: int = 0, wait: bool = True, **settings) -> NodeProcess:
        ports = {"dispatcher.router_port": port_base, "dispatcher.pub_port": port_base + 1 if port_base else 0,
                 "dispatcher.http_port": port_base + 2 if port_base else 0, "dispatcher.host": self.host}
        node = self.spawn("dispatcher", name, {**ports, **settings})
        if wait:
            node.wait_ready()
        return node

    def frontend(self, name: str, port: int = 0, wait: bool = True, **settings) -> NodeProcess:
        node = self.spawn("frontend", name, {"frontend.port": port, "frontend.host": self.host, **settings})
        if wait:
            node.wait_ready()
        return node

    def bridge(self, name: str, peers: list[str] | tuple[str, ...] = (), export_port: int = 0,
               import_port: int = 0, wait: bool = True, **settings) -> NodeProcess:
        """A DC's bridge; ``peers``: the other DCs' export endpoints, ``dc=tcp://host:port``."""
        node = self.spawn("bridge", name, {"bridge.host": self.host, "bridge.export_port": export_port,
                                           "bridge.import_port": import_port,
                                           "bridge.peers": ";".join(peers), **settings})
        if wait:
            node.wait_ready()
        return node

    def close(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.proc.terminate()
        for node in self.nodes:
            node.close()


#: ports ``free_port`` chooses from: below Linux's ephemeral range (32768-60999), so no socket
#: that binds port 0 (every other node here) can take a port between choosing and binding it
PICKED_PORTS = (20000, 32000)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now, for endpoints other nodes must know before a node starts
    (such as a bridge's export port).  Chosen at random outside the ephemeral range and
    checked by binding it; only another program picking the same port could still race."""
    import random
    import socket
    for _ in range(200):
        port = random.randint(*PICKED_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {PICKED_PORTS} on {host}")


def _start_consul(workdir: str, datacenters: list[str]) -> list:
    """A dev agent for one DC; for several, one per DC, WAN-federated (``start_federation``)."""
    from mesh.tools.consul_agent import ConsulAgent, ConsulUnavailable, consul_binary, start_federation
    try:
        if len(datacenters) == 1:
            return [ConsulAgent(consul_binary(), workdir).start()]
        return start_federation(consul_binary(), workdir, datacenters)
    except ConsulUnavailable as exc:
        raise click.ClickException(f"no --consul-addr and no Consul dev agent: {exc}") from None


#: with --dcs N and --base-port P, DC k (0-based) uses ports P + k * DC_PORT_STRIDE + ...
DC_PORT_STRIDE = 1000


def _describe(node: NodeProcess) -> str:
    info = node.info or node.wait_ready()
    if node.role == "frontend":
        where = info.get("http")
    elif node.role == "bridge":
        where = f"{info.get('export')} {info.get('import')} {info.get('http')}"
    else:
        where = f"{info.get('router')} {info.get('pub')} {info.get('http')}"
    return f"{node.role} {node.name} {where}"


@click.command(name="mesh-up")
@click.option("--dispatchers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="dispatchers (per DC)")
@click.option("--frontends", default=2, show_default=True, type=click.IntRange(1, 64),
              help="frontends (per DC)")
@click.option("--dcs", default=1, show_default=True, type=click.IntRange(1, 16),
              help="datacenters dc1..dcN, each with its own KV (an embedded file, or with --kv "
                   "consul its own Consul datacenter, WAN-federated) and one bridge")
@click.option("--base-port", default=8080, show_default=True, type=click.IntRange(0, 65000),
              help="frontend i listens on P+i, dispatcher j on P+100+3j (router), +1 (pub), "
                   "+2 (http); with --dcs, DC k adds 1000k and its bridge uses P+90 (export), "
                   "+91 (import), +92 (http), +93 (history relay); 0: any free ports")
@click.option("--kv", "kv_backend", default="embedded", show_default=True,
              type=click.Choice(["embedded", "consul"]))
@click.option("--kv-path", default=None, help="embedded KV file (default: a new temporary file; "
                                              "with --dcs: one file per DC, FILE-dcK)")
@click.option("--consul-addr", default=None,
              help="Consul agent host:port (--kv consul, one DC); without it a dev agent is "
                   "started (with --dcs N: one per DC, WAN-federated)")
@click.option("--log-dir", default=None, help="one log file per node here (default: stderr)")
def main(dispatchers, frontends, dcs, base_port, kv_backend, kv_path, consul_addr, log_dir):
    """Run a local topology: N dispatchers and M frontends on one machine (per datacenter,
    with --dcs, plus one bridge each), until Ctrl-C."""
    tmp = tempfile.mkdtemp(prefix="livemesh-")
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    names = [f"dc{k + 1}" for k in range(dcs)]
    kv = {"backend": kv_backend}
    agents = []
    if kv_backend == "embedded":
        kv["path"] = kv_path or os.path.join(tmp, "kv.db")
    elif consul_addr:
        if dcs > 1:
            raise click.ClickException("--dcs N --kv consul starts its own federated agent per DC; "
                                       "--consul-addr is for one DC")
        kv["consul_addr"] = consul_addr
    else:
        agents = _start_consul(os.path.join(tmp, "consul"), names)
        for agent in agents:  # `consul agent URL [DC]`: the DC only when there are several
            click.echo(f"consul agent http://{agent.http_addr}{' ' + agent.datacenter if dcs > 1 else ''}")
        kv["consul_addr"] = agents[0].http_addr  # with several DCs each DC's topology gets its own
    if kv_backend == "embedded":  # on stderr: stdout is the node list scripts read
        click.echo(f"mesh-up: embedded KV {kv['path']}{'-dcN' if dcs > 1 else ''} "
                   f"(meshctl --kv-path ...)", err=True)
    if dcs == 1:
        topos = [Topology(kv=kv, log_dir=log_dir)]
    elif agents:  # DC k's nodes use DC k's agent
        topos = [Topology(kv={**kv, "consul_addr": agent.http_addr}, log_dir=log_dir,
                          extra={"node.dc": agent.datacenter}) for agent in agents]
    else:
        topos = [Topology(kv={**kv, "path": f"{kv['path']}-{dc}"}, log_dir=log_dir,
                          extra={"node.dc": dc}) for dc in names]
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        nodes: list[NodeProcess] = []
        exports, relays = {}, {}
        if dcs > 1:  # on embedded KVs every bridge must know the others' export and relay
            # endpoints when it starts; on federated Consul they find each other in the catalog
            for k in range(dcs):
                base = base_port + k * DC_PORT_STRIDE if base_port else 0
                exports[f"dc{k + 1}"] = f"tcp://127.0.0.1:{base + 90 if base else 0 if agents else free_port()}"
                relays[f"dc{k + 1}"] = f"tcp://127.0.0.1:{base + 93 if base else 0 if agents else free_port()}"
        for k, topo in enumerate(topos):
            base = base_port + k * DC_PORT_STRIDE if base_port else 0
            prefix = f"dc{k + 1}-" if dcs > 1 else ""
            # dispatchers first: a frontend announces readiness once it knows the dispatchers
            batch = [topo.dispatcher(f"{prefix}dispatcher-{j + 1}", base + 100 + 3 * j if base else 0,
                                     wait=False) for j in range(dispatchers)]
            for node in batch:
                node.wait_ready()
            if dcs > 1:
                dc = f"dc{k + 1}"
                peers = ["consul"] if agents else [f"{d}={ep}" for d, ep in exports.items() if d != dc]
                relaying = {} if agents else {  # on Consul the relays are discovered with the peers
                    "bridge.relay_peers": ";".join(f"{d}={ep}" for d, ep in relays.items() if d != dc)}
                batch.append(topo.bridge(
                    f"bridge-{dc}", peers,
                    export_port=int(exports[dc].rsplit(":", 1)[1]),
                    import_port=base + 91 if base else 0, wait=False,
                    **{"bridge.http_port": base + 92 if base else 0,
                       "bridge.relay_port": int(relays[dc].rsplit(":", 1)[1]), **relaying}))
            batch += [topo.frontend(f"{prefix}frontend-{i + 1}", base + i if base else 0, wait=False)
                      for i in range(frontends)]
            nodes += batch
        for node in nodes:
            click.echo(_describe(node))
        click.echo("ready")
        everyone = [n for t in topos for n in t.nodes]
        while all(n.alive() for n in everyone):
            time.sleep(0.5)
        dead = [n for n in everyone if not n.alive()]
        click.echo(f"mesh-up: {', '.join(n.name for n in dead)} exited; stopping", err=True)
        sys.exit(1)
    except NodeFailed as exc:
        click.echo(f"mesh-up: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        for topo in topos:
            topo.close()
        for agent in agents:
            agent.stop()
