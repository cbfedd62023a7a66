"""HAProxy in front of a topology's frontends, for ``mesh-up --lb``.

The configuration is ``config/haproxy.cfg.template`` with its two placeholders filled (the bind
address and one ``server`` line per frontend); the template's comments say why each timeout and
health-check setting is what it is.  HAProxy runs in the foreground (``-db``) as a child of the
launcher, its log on stderr.  Its runtime API listens on a Unix socket beside the configuration
(``stats socket``, level ``user``: read-only), where :meth:`HAProxy.server_states` reads which
frontends it holds UP or DOWN; an operator reads the same with
``echo "show stat" | socat - UNIX-CONNECT:PATH``.
"""

from __future__ import annotations

import csv
import io
import os
import socket
import string
import subprocess
import time
import urllib.error
import urllib.request

HAPROXY = os.environ.get("LIVEMESH_HAPROXY", "/usr/sbin/haproxy")
TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "config", "haproxy.cfg.template")


#: the template's backend, whose servers are the frontends
BACKEND = "livemesh_frontends"

#: appended to the filled template: a second ``global`` section (HAProxy merges them) with the
#: runtime API socket, which only the launcher knows a path for
STATS_SECTION = "\nglobal\n    stats socket {path} mode 600 level user\n"

#: a Unix socket path's limit (``sun_path`` is 108 bytes on Linux, with its NUL)
MAX_SOCKET_PATH = 107


class LoadBalancerFailed(RuntimeError):
    pass


def render(template: str, bind: str, servers: list[tuple[str, str]]) -> str:
    """``template`` with ``${bind}`` and ``${servers}`` filled; ``servers``: (name, host:port)."""
    lines = "\n".join(f"    server {name} {addr} check" for name, addr in servers)
    return string.Template(template).substitute(bind=bind, servers=lines)


def server_states(stats_socket: str, timeout: float = 2.0) -> dict[str, str]:
    """Frontend name -> the view of the HAProxy whose runtime API is at ``stats_socket``:
    ``UP``, ``DOWN``, or a transition such as ``UP 1/2`` (one failed check of the two that
    mark it down), from ``show stat``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(stats_socket)
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):  # HAProxy closes after one command's answer
            chunks.append(chunk)
    # CSV with a header row that starts with "# "
    text = b"".join(chunks).decode("utf-8", "replace").removeprefix("# ")
    return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
            if row.get("pxname") == BACKEND and row.get("svname") not in ("FRONTEND", "BACKEND")}


class HAProxy:
    def __init__(self, config_path: str, host: str, port: int, log_path: str | None = None,
                 stats_socket: str = ""):
        self.config_path = config_path
        self.host, self.port = host, port
        self.log_path = log_path
        self.stats_socket = stats_socket
        self.proc: subprocess.Popen | None = None

    @classmethod
    def write_config(cls, path: str, host: str, port: int, frontends: list[tuple[str, str]],
                     template_path: str = TEMPLATE, log_path: str | None = None) -> "HAProxy":
        """The filled template at ``path``, its stats socket at ``path`` with ``.sock``."""
        stats_socket = os.path.splitext(os.path.abspath(path))[0] + ".sock"
        if len(stats_socket.encode()) > MAX_SOCKET_PATH:
            raise LoadBalancerFailed(f"stats socket path {stats_socket!r} is longer than "
                                     f"{MAX_SOCKET_PATH} bytes: write the configuration to a shorter path")
        with open(template_path, encoding="utf-8") as fh:
            text = render(fh.read(), f"{host}:{port}", frontends)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + STATS_SECTION.format(path=stats_socket))
        return cls(path, host, port, log_path, stats_socket)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HAProxy":
        if not os.access(HAPROXY, os.X_OK):
            raise LoadBalancerFailed(f"no haproxy at {HAPROXY}: run bin/install-deps")
        check = subprocess.run([HAPROXY, "-c", "-f", self.config_path], capture_output=True, text=True)
        if check.returncode != 0:
            alerts = [ln for ln in (check.stdout + check.stderr).splitlines() if "ALERT" in ln]
            raise LoadBalancerFailed(f"haproxy rejects {self.config_path}: " + "; ".join(alerts))
        stderr = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", self.config_path], stdin=subprocess.DEVNULL,
                                     stdout=stderr, stderr=stderr)
        if stderr:
            stderr.close()
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until a request through it reaches a frontend's ``/healthz``."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LoadBalancerFailed(f"haproxy exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise LoadBalancerFailed(f"haproxy not serving {self.url}/healthz within {timeout}s: {last}")

    def server_states(self, timeout: float = 2.0) -> dict[str, str]:
        return server_states(self.stats_socket, timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
