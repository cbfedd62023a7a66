"""``bin/mesh-up`` as an operator runs it: a real subprocess on free ports (``--base-port 0``),
its node processes, its stdout node list and its stderr reports.  Every wait is a condition
with a deadline; every process is killed at teardown, even on failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from helpers import http, like, read_lines_until, viewer, wait_until

pytestmark = pytest.mark.topology

QUICK_STOP = ("--set", "dispatcher.drain_seconds=0.3", "--set", "frontend.drain_seconds=0.3")


@dataclass
class MeshUp:
    proc: subprocess.Popen
    stderr_path: str
    lines: list[str] = field(default_factory=list)

    def url(self, name: str) -> str:
        """The first endpoint on ``name``'s node line (a frontend's HTTP URL)."""
        return next(ln.split()[2] for ln in self.lines if ln.split()[1:2] == [name])

    @property
    def lb(self) -> str:
        return next(ln.split()[2] for ln in self.lines if ln.startswith("lb haproxy "))

    def children(self) -> dict[str, int]:
        """Node name (or ``haproxy``) -> PID, from the process table."""
        found = {}
        pids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in map(int, pids):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    argv = fh.read().decode().split("\0")
            except FileNotFoundError:
                continue
            names = [a.removeprefix("node.name=") for a in argv if a.startswith("node.name=")]
            found[names[-1] if names else os.path.basename(argv[0])] = pid
        return found

    @property
    def stats_socket(self) -> str:
        return next(ln.split()[4] for ln in self.stderr().splitlines()
                    if ln.startswith("mesh-up: haproxy stats socket "))

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()


def gone(pid: int) -> bool:
    """No such process any more (or only its zombie, waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def mesh_up(tmp_path):
    """``mesh_up(*args, env=..., background=False)``: start bin/mesh-up, wait for ``ready``.
    ``background``: started as a shell starts a background job, with SIGINT ignored."""
    started: list[MeshUp] = []

    def start(*args: str, env: dict | None = None, background: bool = False) -> MeshUp:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("LIVEMESH_")}
        stderr_path = str(tmp_path / f"mesh-up-{len(started)}.err")
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "bin/mesh-up", "--base-port", "0", "--dispatchers", "1",
                 "--kv-path", str(tmp_path / f"kv-{len(started)}.db"), "--log-dir", str(tmp_path),
                 *QUICK_STOP, *args],
                stdout=subprocess.PIPE, stderr=err, env={**clean, **(env or {})}, start_new_session=True,
                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None)
        run = MeshUp(proc, stderr_path)
        started.append(run)
        run.lines = read_lines_until(proc, "ready")
        return run

    try:
        yield start
    finally:
        for run in started:
            pids = run.children().values()
            if run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait()
            for pid in pids:  # restarted nodes and HAProxy: each by its own PID
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
            run.proc.stdout.close()


async def test_config_file_set_and_environment_reach_every_frontend(mesh_up, tmp_path):
    config = tmp_path / "mesh.toml"
    config.write_text("[frontend]\nmax_comment_chars = 5\n")
    run = mesh_up("--config", str(config), "--set", "frontend.retry_ms=1234",
                  env={"LIVEMESH_FRONTEND_MAX_BODY_BYTES": "200"})
    for name in ("frontend-1", "frontend-2"):
        url = run.url(name)
        video = f"cfg-{name}"
        v = await viewer(url, video)
        try:
            await like(url, video)
            await v.events(1)
            assert v.parser.retry == 1234  # --set
        finally:
            v.close()
        status, body = await http("POST", f"{url}/v1/videos/{video}/comments", {"user": "u", "text": "123456"})
        assert status == 400 and body["error"]["code"] == "comment_too_long" \
            and body["error"]["message"].endswith("the limit is 5"), body  # --config
        status, _ = await http("POST", f"{url}/v1/videos/{video}/comments", {"user": "u", "text": "12345"})
        assert status == 202
        status, body = await http("POST", f"{url}/v1/videos/{video}/comments",
                                  {"user": "u", "text": "1234", "pad": "x" * 300})
        assert status == 413, (status, body)  # LIVEMESH_FRONTEND_MAX_BODY_BYTES from the environment


def test_bad_set_is_refused_before_any_node_starts(tmp_path):
    out = subprocess.run([sys.executable, "bin/mesh-up", "--base-port", "0", "--kv-path", str(tmp_path / "kv.db"),
                          "--set", "frontend.retry_ms=soon"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "frontend.retry_ms" in out.stderr, out.stderr
    assert "ready" not in out.stdout.split()


async def test_killed_frontend_is_reported_and_the_others_keep_serving(mesh_up):
    run = mesh_up("--frontends", "3")
    survivors = [run.url("frontend-1"), run.url("frontend-3")]
    os.kill(run.children()["frontend-2"], signal.SIGKILL)
    await wait_until(lambda: "mesh-up: frontend-2 exited (signal 9)" in run.stderr(), what="exit report")
    assert run.proc.poll() is None
    v = await viewer(survivors[0], "after-kill")
    try:
        sent = await like(survivors[1], "after-kill")
        got = await v.events(1)
        assert got[0].id == sent["sse_id"]
    finally:
        v.close()
    assert "frontend-2" not in run.children()


async def test_restart_brings_a_killed_frontend_back_on_its_port(mesh_up):
    run = mesh_up("--restart")
    url = run.url("frontend-2")
    before = run.children()["frontend-2"]
    os.kill(before, signal.SIGKILL)
    await wait_until(lambda: "mesh-up: restarted frontend-2" in run.stderr(), timeout=30, what="restart")
    assert "mesh-up: frontend-2 exited (signal 9)" in run.stderr()
    assert run.children()["frontend-2"] != before
    status, body = await http("GET", f"{url}/healthz")
    assert status == 200 and body["name"] == "frontend-2" and body["url"] == url
    v = await viewer(run.url("frontend-1"), "restarted")
    try:
        sent = await like(url, "restarted")  # the restarted frontend publishes into the mesh
        assert (await v.events(1))[0].id == sent["sse_id"]
    finally:
        v.close()


async def test_lb_holds_every_frontend_and_serves_through_them(mesh_up):
    from mesh.tools.haproxy import server_states
    run = mesh_up("--lb")
    await wait_until(lambda: server_states(run.stats_socket) == {"frontend-1": "UP", "frontend-2": "UP"},
                     what="both frontends UP in HAProxy")
    v = await viewer(run.lb, "through-lb")
    try:
        sent = await like(run.lb, "through-lb")
        assert (await v.events(1))[0].id == sent["sse_id"]
    finally:
        v.close()


@pytest.mark.parametrize("signum,background", [(signal.SIGINT, False), (signal.SIGINT, True),
                                               (signal.SIGTERM, True)],
                         ids=["sigint-foreground", "sigint-background", "sigterm-background"])
def test_signal_stops_every_child(mesh_up, signum, background):
    run = mesh_up("--lb", background=background)
    children = run.children()
    assert {"dispatcher-1", "frontend-1", "frontend-2", "haproxy"} <= set(children), children
    run.proc.send_signal(signum)
    assert run.proc.wait(30) == 0
    assert all(gone(pid) for pid in children.values()), children


@pytest.mark.parametrize("launcher", ["bin/mesh-up", "bin/meshctl"])
def test_a_launcher_run_by_a_python_without_the_packages_starts_again_under_the_venv(launcher):
    # ``-S`` leaves site-packages out, so this Python cannot import tornado: the launcher must
    # notice, get .venv's Python from bin/venv and run the same command under it
    out = subprocess.run([sys.executable, "-S", launcher, "--help"], capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "LIVEMESH_REEXEC"})
    assert out.returncode == 0, out.stderr
    assert "using the repository's .venv (bin/venv)" in out.stderr
    assert out.stdout.startswith(f"Usage: {os.path.basename(launcher)}"), out.stdout
