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


SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the module ``python -m`` runs for each role
MODULES = {"dispatcher": "dispatcher", "frontend": "frontend", "bridge": "dispatcher.bridge"}


#: readiness-line endpoint -> the config key that binds it, per role
BOUND_PORT_KEYS = {
    "frontend": {"http": "frontend.port"},
    "dispatcher": {"router": "dispatcher.router_port", "pub": "dispatcher.pub_port",
                   "http": "dispatcher.http_port"},
    "bridge": {"export": "bridge.export_port", "import": "bridge.import_port",
               "relay": "bridge.relay_port", "http": "bridge.http_port"},
}


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
    #: the ``--set`` overrides it was started with (``Topology.respawn`` starts it again from them)
    settings: dict = field(default_factory=dict)

    def start(self) -> "NodeProcess":
        stderr = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", MODULES[self.role], *self.args],
                                     env=self.env, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,)
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

    def exit_reason(self) -> str:
        """``signal 9`` or ``code 1``: how the process ended (it must have)."""
        code = self.proc.returncode
        return f"signal {-code}" if code < 0 else f"code {code}"

    def bound_ports(self) -> dict[str, int]:
        """The ports it serves on, as ``--set`` overrides: what a restart must bind again
        (a node started on port 0 has its real ports in its readiness line only)."""
        ports = {}
        for endpoint, key in BOUND_PORT_KEYS[self.role].items():
            if self.info.get(endpoint):
                ports[key] = int(self.info[endpoint].rstrip("/").rsplit(":", 1)[1])
        return ports

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
    ``prefix``: a command every node runs under (see ``NodeProcess.prefix``).
    ``config_path``: a TOML file every node reads (``--config``); ``extra``: ``--set`` overrides
    for every node (a node's own settings, such as its ports, win).  ``inherit_env``: pass the
    caller's ``LIVEMESH_*`` variables on (an operator's shell); off, nodes see only the KV
    settings given here, so tests do not depend on the environment they run in."""

    def __init__(self, kv: dict[str, str] | None = None, log_dir: str | None = None,
                 host: str = "127.0.0.1", extra: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = (), config_path: str | None = None,
                 inherit_env: bool = False):
        self.kv = kv or {}
        self.prefix = tuple(prefix)
        self.log_dir = log_dir
        self.host = host
        self.extra = extra or {}
        self.config_path = config_path
        self.inherit_env = inherit_env
        self.nodes: list[NodeProcess] = []

    def _env(self) -> dict:
        env = dict(os.environ) if self.inherit_env else \
            {k: v for k, v in os.environ.items() if not k.startswith("LIVEMESH_")}
        env.update({f"LIVEMESH_KV_{k.upper()}": str(v) for k, v in self.kv.items()})
        env["PYTHONUNBUFFERED"] = "1"
        # ``python -m frontend`` must find this checkout from any working directory
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_ROOT, env.get("PYTHONPATH")]))
        return env

    def spawn(self, role: str, name: str, settings: dict) -> NodeProcess:
        node = self._start(role, name, settings)
        self.nodes.append(node)
        return node

    def _start(self, role: str, name: str, settings: dict) -> NodeProcess:
        merged = {**self.extra, **settings}
        args = ["--config", self.config_path] if self.config_path else []
        args += [a for k, v in merged.items() for a in ("--set", f"{k}={v}")]
        args += ["--set", f"node.name={name}"]
        log_path = os.path.join(self.log_dir, f"{name}.log") if self.log_dir else None
        return NodeProcess(role, name, args, self._env(), log_path, prefix=self.prefix,
                           settings=settings).start()

    def respawn(self, node: NodeProcess) -> NodeProcess:
        """Start an exited ``node`` again with its name, settings and the ports it had bound;
        the new process takes its place in ``nodes``."""
        fresh = self._start(node.role, node.name, {**node.settings, **node.bound_ports()})
        if node.proc is not None and node.proc.stdout:
            node.proc.stdout.close()
        self.nodes[self.nodes.index(node)] = fresh
        return fresh

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


class Stop(BaseException):
    """SIGINT or SIGTERM reached mesh-up: unwind from wherever it is and stop everything."""


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM both stop mesh-up, installed explicitly: a shell starts a background
    job with SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own."""
    def on_signal(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        raise Stop(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def _parse_sets(sets: tuple[str, ...], config_path: str | None) -> dict[str, str]:
    """``--set`` items as overrides, checked with the file the way every node will check them,
    so a typo fails here, before any node starts."""
    from mesh.config import load_config
    from mesh.errors import ConfigError
    overrides = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise click.BadParameter(f"{item!r}: expected SECTION.KEY=VALUE", param_hint="--set")
        overrides[key.strip()] = value
    try:
        load_config(config_path, overrides=overrides)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    return overrides


def _start_lb(topo: Topology, workdir: str, port: int, dc: str, log_dir: str | None):
    from mesh.tools.haproxy import HAProxy, LoadBalancerFailed
    fronts = [(n.name, n.url.removeprefix("http://")) for n in topo.nodes if n.role == "frontend"]
    lb = None
    try:
        lb = HAProxy.write_config(os.path.join(workdir, f"haproxy-{dc}.cfg"), topo.host,
                                  port or free_port(topo.host), fronts,
                                  log_path=os.path.join(log_dir, f"haproxy-{dc}.log") if log_dir else None)
        lb.start()
        lb.wait_ready()
    except LoadBalancerFailed as exc:
        if lb is not None:
            lb.stop()
        raise click.ClickException(str(exc)) from None
    click.echo(f"mesh-up: haproxy stats socket {lb.stats_socket} (echo 'show stat' | socat - UNIX-CONNECT:...)",
               err=True)
    return lb


def _watch(topos: list[Topology], restart: bool) -> None:
    """Until a signal: report every node that exits; with ``restart``, start it again."""
    reported: set[int] = set()
    while True:
        for topo in topos:
            for node in list(topo.nodes):
                if node.alive() or id(node) in reported:
                    continue
                click.echo(f"mesh-up: {node.name} exited ({node.exit_reason()})", err=True)
                reported.add(id(node))
                if not restart:
                    continue
                fresh = topo.respawn(node)
                try:
                    fresh.wait_ready()
                except NodeFailed as exc:
                    click.echo(f"mesh-up: restarting {node.name} failed: {exc}", err=True)
                    continue
                click.echo(f"mesh-up: restarted {node.name}", err=True)
                click.echo(_describe(fresh))
        time.sleep(0.2)


HELP = """Run a local topology: N dispatchers and M frontends on one machine (per datacenter,
with --dcs, plus one bridge each), until SIGINT (Ctrl-C) or SIGTERM, which stop every node
(frontends drain) and any Consul agent or HAProxy it started, in the foreground or the
background.

Stdout lists one line per node (ROLE NAME ENDPOINTS...), then `ready`.  A node that exits is
reported as `mesh-up: NAME exited (signal 9)` or `(code N)` on stderr while the others keep
serving; with --restart it is started again with the same name and ports (`mesh-up: restarted
NAME` on stderr, its node line again on stdout).

Configuration: --config FILE (TOML, as the nodes read it) and --set SECTION.KEY=VALUE
(repeatable) apply to every node; LIVEMESH_* environment variables pass through to the nodes
(mesh-up's own KV and port settings win).  Example: --set frontend.aggregate_likes_above=0.

--lb starts HAProxy (/usr/sbin/haproxy) in front of the frontends (one per DC), configured from
config/haproxy.cfg.template, and prints `lb haproxy http://127.0.0.1:P`; the path of its
runtime API socket (`show stat`: which frontends it holds UP or DOWN) goes to stderr.  A
frontend that exits is out of its rotation within 2 s; on SIGTERM a frontend answers /healthz
with 503 for frontend.drain_seconds while it still serves, so HAProxy takes it out first."""


@click.command(name="mesh-up", help=HELP)
@click.option("--dispatchers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="dispatchers (per DC)")
@click.option("--frontends", default=2, show_default=True, type=click.IntRange(1, 64),
              help="frontends (per DC)")
@click.option("--dcs", default=1, show_default=True, type=click.IntRange(1, 16),
              help="datacenters dc1..dcN, each with its own KV (an embedded file, or with --kv "
                   "consul its own Consul datacenter, WAN-federated) and one bridge")
@click.option("--base-port", default=8080, show_default=True, type=click.IntRange(0, 65000),
              help="frontend i listens on P+i, dispatcher j on P+100+3j (router), +1 (pub), "
                   "+2 (http), the --lb HAProxy on P+80; with --dcs, DC k adds 1000k and its bridge "
                   "uses P+90 (export), +91 (import), +92 (http), +93 (history relay); 0: any free ports")
@click.option("--kv", "kv_backend", default="embedded", show_default=True,
              type=click.Choice(["embedded", "consul"]))
@click.option("--kv-path", default=None, help="embedded KV file (default: a new temporary file; "
                                              "with --dcs: one file per DC, FILE-dcK)")
@click.option("--consul-addr", default=None,
              help="Consul agent host:port (--kv consul, one DC); without it a dev agent is "
                   "started (with --dcs N: one per DC, WAN-federated)")
@click.option("--log-dir", default=None, help="one log file per node here (default: stderr)")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML config file every node reads")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="override one config key on every node (repeatable)")
@click.option("--restart", is_flag=True, help="start a node that exits again, same name and ports")
@click.option("--lb", is_flag=True, help="HAProxy in front of the frontends (per DC)")
def main(dispatchers, frontends, dcs, base_port, kv_backend, kv_path, consul_addr, log_dir,
         config_path, sets, restart, lb):
    _stop_on_signals()
    overrides = _parse_sets(sets, config_path)
    tmp = tempfile.mkdtemp(prefix="livemesh-")
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    names = [f"dc{k + 1}" for k in range(dcs)]
    kv = {"backend": kv_backend}
    agents, balancers, topos = [], [], []
    try:
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
        common = dict(log_dir=log_dir, config_path=config_path, inherit_env=True)
        if dcs == 1:
            topos = [Topology(kv=kv, extra=dict(overrides), **common)]
        elif agents:  # DC k's nodes use DC k's agent
            topos = [Topology(kv={**kv, "consul_addr": agent.http_addr},
                              extra={**overrides, "node.dc": agent.datacenter}, **common) for agent in agents]
        else:
            topos = [Topology(kv={**kv, "path": f"{kv['path']}-{dc}"}, extra={**overrides, "node.dc": dc},
                              **common) for dc in names]
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
        if lb:
            for k, topo in enumerate(topos):
                base = base_port + k * DC_PORT_STRIDE if base_port else 0
                balancers.append(_start_lb(topo, tmp, base + 80 if base else 0, names[k], log_dir))
                click.echo(f"lb haproxy {balancers[-1].url}{' ' + names[k] if dcs > 1 else ''}")
        click.echo("ready")
        _watch(topos, restart)
    except NodeFailed as exc:
        click.echo(f"mesh-up: {exc}", err=True)
        sys.exit(1)
    except Stop:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        for balancer in balancers:
            balancer.stop()
        for topo in topos:
            topo.close()
        for agent in agents:
            agent.stop()
