"""Start and stop whole local topologies: ``mesh-up`` and the test fixtures share this code.

Each node is a child process (``python -m dispatcher`` / ``python -m frontend``) configured by
``--set`` overrides; it prints one JSON readiness line on stdout once it serves
(``mesh.node.announce_ready``), which :meth:`NodeProcess.wait_ready` waits for with a deadline.
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


@dataclass
class NodeProcess:
    role: str
    name: str
    args: list[str]
    env: dict
    log_path: str | None = None
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)

    def start(self) -> "NodeProcess":
        stderr = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen([sys.executable, "-m", self.role, *self.args], env=self.env,
                                     stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)
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
    """A set of node processes sharing one KV; ``close()`` stops every one of them."""

    def __init__(self, kv: dict[str, str] | None = None, log_dir: str | None = None,
                 host: str = "127.0.0.1", extra: dict[str, str] | None = None):
        self.kv = kv or {}
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
        node = NodeProcess(role, name, args, self._env(), log_path).start()
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

    def close(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.proc.terminate()
        for node in self.nodes:
            node.close()


@click.command(name="mesh-up")
@click.option("--dispatchers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--frontends", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--base-port", default=8080, show_default=True, type=click.IntRange(0, 65000),
              help="frontend i listens on P+i, dispatcher j on P+100+3j (router), +1 (pub), "
                   "+2 (http); 0: any free ports")
@click.option("--kv", "kv_backend", default="embedded", show_default=True,
              type=click.Choice(["embedded", "consul"]))
@click.option("--kv-path", default=None, help="embedded KV file (default: a new temporary file)")
@click.option("--consul-addr", default=None,
              help="Consul agent host:port (--kv consul); without it a dev agent is started")
@click.option("--log-dir", default=None, help="one log file per node here (default: stderr)")
def main(dispatchers, frontends, base_port, kv_backend, kv_path, consul_addr, log_dir):
    """Run a local topology: N dispatchers and M frontends on one machine, until Ctrl-C."""
    tmp = tempfile.mkdtemp(prefix="livemesh-")
    kv = {"backend": kv_backend}
    agent = None
    if kv_backend == "embedded":
        kv["path"] = kv_path or os.path.join(tmp, "kv.db")
    elif consul_addr:
        kv["consul_addr"] = consul_addr
    else:
        from .consul_agent import ConsulAgent, ConsulUnavailable, consul_binary
        try:
            agent = ConsulAgent(consul_binary(), os.path.join(tmp, "consul")).start()
        except ConsulUnavailable as exc:
            raise click.ClickException(f"no --consul-addr and no Consul dev agent: {exc}") from None
        kv["consul_addr"] = agent.http_addr
        click.echo(f"consul agent http://{agent.http_addr}")
    topo = Topology(kv=kv, log_dir=log_dir)
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        # dispatchers first: a frontend announces readiness once it knows the dispatchers
        nodes = [topo.dispatcher(f"dispatcher-{j + 1}", base_port + 100 + 3 * j if base_port else 0,
                                 wait=False) for j in range(dispatchers)]
        for node in nodes:
            node.wait_ready()
        nodes += [topo.frontend(f"frontend-{i + 1}", base_port + i if base_port else 0, wait=False)
                  for i in range(frontends)]
        for node in nodes:
            info = node.info or node.wait_ready()
            where = info.get("http") if node.role == "frontend" else \
                f"{info.get('router')} {info.get('pub')} {info.get('http')}"
            click.echo(f"{node.role} {node.name} {where}")
        click.echo("ready")
        while all(n.alive() for n in topo.nodes):
            time.sleep(0.5)
        dead = [n for n in topo.nodes if not n.alive()]
        click.echo(f"mesh-up: {', '.join(n.name for n in dead)} exited; stopping", err=True)
        sys.exit(1)
    except NodeFailed as exc:
        click.echo(f"mesh-up: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        topo.close()
        if agent is not None:
            agent.stop()
