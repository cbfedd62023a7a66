"""Test helpers: HTTP calls, SSE viewers, waiting on conditions with a deadline."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from mesh.tools.sse_client import SSEClient


async def http(method: str, url: str, body: Any = None, raw: bytes | None = None,
               headers: dict | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    """``(status, decoded JSON or text)``; never raises for HTTP error statuses."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is None and method in ("POST", "PUT"):
        data = b""
    req = HTTPRequest(url, method=method, body=data, headers=headers, request_timeout=timeout,
                      allow_nonstandard_methods=True)
    resp = await AsyncHTTPClient().fetch(req, raise_error=False)
    if resp.code == 599 and resp.error is not None and not resp.body:
        raise resp.error
    text = resp.body.decode("utf-8", "replace") if resp.body else ""
    try:
        return resp.code, json.loads(text)
    except ValueError:
        return resp.code, text


async def like(front_url: str, video: str, user: str | None = None) -> dict:
    status, body = await http("POST", f"{front_url}/v1/videos/{video}/likes",
                              {"user": user} if user else None)
    assert status == 202, (status, body)
    return body


async def comment(front_url: str, video: str, text: str, user: str = "u1") -> dict:
    status, body = await http("POST", f"{front_url}/v1/videos/{video}/comments", {"user": user, "text": text})
    assert status == 202, (status, body)
    return body


#: what ``viewer`` returns by default: the chain's events, not presence state
CHAIN_KINDS = {"like", "comment", "reset"}


async def viewer(front_url: str, video: str, **kw) -> SSEClient:
    kw.setdefault("only", CHAIN_KINDS)
    return await SSEClient(f"{front_url}/v1/videos/{video}/events", **kw).connect()


#: seconds a timing check adds to the bound it asserts.  A topology test's bound spans several
#: node processes on a 2-core runner that other jobs share: at each hop a process can wait for
#: a core, a garbage collection or an fsync of the embedded KV.  One second is far above such a
#: stall, yet small next to the bounds it is added to (1 to 20 s), so a check still fails when
#: the code misses its bound by a real amount.  README "The two commands" documents it.
SCHEDULING_MARGIN = 1.0


def within(took: float, bound: float, what: str) -> None:
    """Assert that ``took`` seconds met ``bound`` (what the code promises) plus the margin."""
    assert took <= bound + SCHEDULING_MARGIN, \
        f"{what} took {took:.3f}s; the bound is {bound}s (+ {SCHEDULING_MARGIN}s scheduling margin)"


async def wait_until(cond: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0,
                     interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = cond()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


async def health(node_url: str) -> dict:
    status, body = await http("GET", f"{node_url}/healthz")
    assert status == 200, (status, body)
    return body


def read_lines_until(proc, last: str, timeout: float = 60.0) -> list[str]:
    """Lines of ``proc``'s stdout (a binary pipe) up to and including ``last``, with a
    deadline.  Reads the file descriptor directly: a buffered reader would hide lines that
    arrived together from ``select``."""
    import os
    import selectors
    lines: list[str] = []
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while last not in lines:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {last!r}; got {lines}"
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"process exited before {last!r}; got {lines}"
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines += [ln.decode().strip() for ln in done]
    finally:
        sel.close()
    return lines


class Collector:
    """Reads an SSE stream in the background into ``events`` (so its socket never fills)."""

    def __init__(self, client: SSEClient):
        self.client = client
        self.events: list = []
        self.closed = False
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                ev = await self.client.next_event(timeout=3600)
                ev.received = time.time() * 1000.0
                self.events.append(ev)
        except (EOFError, asyncio.CancelledError, ConnectionError):
            self.closed = True

    def of_kind(self, *kinds: str) -> list:
        return [e for e in self.events if e.event in kinds]

    def ids(self, kind: str = "like") -> list[str]:
        return [json.loads(e.data)["id"] for e in self.of_kind(kind)]

    async def close(self) -> None:
        self._task.cancel()
        self.client.close()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
