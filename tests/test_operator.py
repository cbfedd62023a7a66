"""The operator's view of a live topology: ``meshctl tail``, ``meshctl nodes`` with health and
connections, and the nodes' logs (JSON lines, level per config)."""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time

import pytest

from mesh.tools.meshctl.watch import escape_text, format_event, json_line
from mesh.kv import NodeInfo, ROLE_FRONTEND
from mesh.kv.embedded import EmbeddedKV

from helpers import comment, health, http, like, viewer, wait_until

pytestmark = pytest.mark.topology


def meshctl(kv_path: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "mesh.tools.meshctl", "--kv-path", kv_path, *args]


class Lines:
    """Lines from a child's stdout and stderr pipes, read with a deadline (no fixed sleeps)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.sel = selectors.DefaultSelector()
        self.bufs = {"out": b"", "err": b""}
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self.sel.register(proc.stdout, selectors.EVENT_READ, "out")
        self.sel.register(proc.stderr, selectors.EVENT_READ, "err")

    def until(self, which: str, cond, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while not cond(self.lines[which]):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; stdout {self.lines['out']} stderr {self.lines['err']}"
            if not self.sel.get_map():
                raise AssertionError(f"process exited; stdout {self.lines['out']} stderr {self.lines['err']}")
            for key, _ in self.sel.select(left):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    self.sel.unregister(key.fileobj)
                    continue
                self.bufs[key.data] += chunk
                *done, self.bufs[key.data] = self.bufs[key.data].split(b"\n")
                self.lines[key.data] += [ln.decode("utf-8") for ln in done]
        return self.lines[which]

    def close(self) -> None:
        self.sel.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def chain(lines: list[str]) -> list[str]:
    """The like and comment lines of ``meshctl tail`` output."""
    return [ln for ln in lines if ln[15:].startswith(("like ", "comment "))]


def watching(lines: list[str]) -> bool:
    return any(ln.startswith("tail: watching") for ln in lines)


async def test_meshctl_tail_prints_events_live(topology, kv_path):
    topology.dispatcher("d1")
    fa, fb = topology.frontend("f1"), topology.frontend("f2")
    # without --frontend: a healthy frontend from the registry
    out = Lines(subprocess.Popen(meshctl(kv_path, "tail", "tail-1", "--count", "3", "--timeout", "30"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        err = out.until("err", watching)
        assert any(fa.url in ln or fb.url in ln for ln in err), err
        await like(fa.url, "tail-1", user="ann")
        await comment(fb.url, "tail-1", "two\nlines 🎉\tend", user="bob")
        await like(fb.url, "tail-1")
        lines = out.until("out", lambda ls: len(chain(ls)) >= 3)
        assert out.proc.wait(10) == 0
        lines = chain(out.lines["out"])  # presence lines (count, join, leave) may come between
        assert len(lines) == 3
        # time, kind, user, text; the comment on one line (escapes: test_tail_formatting)
        assert [ln[15:] for ln in lines] == ["like     ann", "comment  bob  two\\nlines 🎉\\tend",
                                             "like     -"]
        assert all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}Z  ", ln[:15]) for ln in lines), lines
    finally:
        out.close()

    # --json from a given frontend: the raw event JSON, one per line
    out = Lines(subprocess.Popen(meshctl(kv_path, "tail", "tail-2", "--frontend", fb.url, "--json",
                                         "--count", "2", "--timeout", "30"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        out.until("err", watching)
        sent = [await comment(fa.url, "tail-2", "crlf\r\nend", user="cy"), await like(fa.url, "tail-2")]
        out.until("out", lambda ls: len([ln for ln in ls if '"kind":"like"' in ln or '"kind":"comment"' in ln]) >= 2)
        assert out.proc.wait(10) == 0
        events = [json.loads(ln) for ln in out.lines["out"] if ln]
        assert all(e.keys() >= {"kind", "video"} for e in events)
        events = [e for e in events if e["kind"] in ("like", "comment")]
        assert [e["id"] for e in events] == [s["id"] for s in sent]
        assert events[0]["text"] == "crlf\r\nend" and events[0]["kind"] == "comment"
    finally:
        out.close()

    # bounded: --timeout without enough events exits 1 and says so; a bad video id is refused
    done = subprocess.run(meshctl(kv_path, "tail", "quiet", "--frontend", fa.url, "--count", "1",
                                  "--timeout", "0.5"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "0 of 1 events" in done.stderr
    done = subprocess.run(meshctl(kv_path, "tail", "-bad-", "--frontend", fa.url),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "VIDEO" in done.stderr


def test_tail_formatting():
    assert escape_text("a\\b\r\n\t\x00\u2028z") == "a\\\\b\\r\\n\\t\\x00\\u2028z"
    assert escape_text("\x1b[31mred") == "\\x1b[31mred"  # cannot recolour the operator's terminal
    line = format_event("like", json.dumps({"id": "x", "kind": "like", "user": None, "ts": 0}))
    assert line == "00:00:00.000Z  like     -"
    line = format_event("count", json.dumps({"video": "v", "count": 7}))
    assert line[15:] == 'count    -  {"count": 7, "video": "v"}'
    assert json.loads(json_line("count", '{"video":"v","count":7}')) == {"kind": "count", "video": "v", "count": 7}
    assert json_line("like", '{"kind":"like", "x": 1}') == '{"kind":"like", "x": 1}'


async def test_meshctl_nodes_shows_health_and_connections(topology, kv_path):
    topology.dispatcher("d1")
    fa, fb = topology.frontend("f1"), topology.frontend("f2")
    vs = [await viewer(fa.url, "n"), await viewer(fa.url, "n"), await viewer(fb.url, "m")]
    kv = EmbeddedKV(kv_path, ttl=5)
    try:
        # a registered frontend that does not answer: shown, as unreachable
        await kv.register(NodeInfo("zz-gone", ROLE_FRONTEND, http="http://127.0.0.1:9"))
        rows = json.loads(subprocess.run(meshctl(kv_path, "nodes", "--json"), capture_output=True,
                                         text=True, check=True, timeout=30).stdout)
        got = {n["name"]: (n["role"], n["status"], n["connections"]) for n in rows}
        assert got == {"d1": ("dispatcher", "ok", None), "f1": ("frontend", "ok", 2),
                       "f2": ("frontend", "ok", 1), "zz-gone": ("frontend", "unreachable", None)}
        table = subprocess.run(meshctl(kv_path, "nodes"), capture_output=True, text=True, check=True,
                               timeout=30).stdout.splitlines()
        assert table[0].split() == ["ROLE", "NAME", "DC", "HTTP", "ZMQ", "HEALTH", "STATUS", "CONNECTIONS"]
        cells = {ln.split()[1]: ln.split() for ln in table[1:]}
        assert cells["f1"][-2:] == ["ok", "2"] and cells["f2"][-2:] == ["ok", "1"]
        assert cells["d1"][-2:] == ["ok", "-"] and cells["zz-gone"][-2:] == ["unreachable", "-"]
    finally:
        await kv.deregister()
        await kv.close()
        for v in vs:
            v.close()


async def test_json_logs_are_one_object_per_line_at_the_configured_level(topology):
    d = topology.dispatcher("d1", **{"node.log_json": "true"})
    f = topology.frontend("f1", **{"node.log_json": "true"})
    quiet = topology.frontend("f2", **{"node.log_json": "true", "node.log_level": "warning"})
    v = await viewer(f.url, "logs")
    await like(quiet.url, "logs")
    await v.events(1)
    status, _ = await http("GET", f.url + "/no/such/route")  # a 404: one warning access line
    assert status == 404
    v.close()
    for node in (d, f, quiet):
        node.terminate()
    records = {}
    for node in (d, f, quiet):
        lines = [ln for ln in open(node.log_path, encoding="utf-8").read().splitlines() if ln.strip()]
        records[node.name] = [json.loads(ln) for ln in lines]  # every line is one JSON object
        for rec in records[node.name]:
            assert set(rec) >= {"ts", "level", "logger", "msg"}, rec
    msgs = lambda name: [(r["level"], r["logger"], r["msg"]) for r in records[name]]  # noqa: E731
    assert any(lvl == "info" and "frontend f1 serving on" in m for lvl, _, m in msgs("f1"))
    assert any(lvl == "info" and "dispatcher d1 serving" in m for lvl, _, m in msgs("d1"))
    assert any(lg == "tornado.access" and "404" in m and lvl == "warning" for lvl, lg, m in msgs("f1"))
    # log_level=warning: no info lines at all
    assert all(r["level"] in ("warning", "error", "critical") for r in records["f2"]), records["f2"]


async def test_health_still_ok_after_scrapes(topology):
    """/metrics and / are cheap, side-effect-free GETs on a serving node."""
    topology.dispatcher("d1")
    f = topology.frontend("f1")
    for path in ("/", "/static/app.js", "/static/style.css", "/metrics"):
        status, _ = await http("GET", f.url + path)
        assert status == 200, path
    status, body = await http("GET", f.url + "/static/../node.py")
    assert status in (403, 404)
    assert (await health(f.url))["status"] == "ok"
