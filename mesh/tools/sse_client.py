"""A small asyncio Server-Sent Events client over raw HTTP/1.1.

Used by ``meshctl tail``, the benchmarks and the tests.  It speaks just enough HTTP/1.1 for an
SSE stream: one GET, status line and headers, then a body that is either chunked or read to
EOF.  "Open" (like the browser's ``open`` event) is when :meth:`SSEClient.connect` returns:
the response headers arrived with status 200 and ``text/event-stream``.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from mesh.core.sse import SSEEvent, SSEParser


class SSEError(Exception):
    def __init__(self, status: int, body: bytes, message: str):
        super().__init__(message)
        self.status = status
        self.body = body


class SSEClient:
    def __init__(self, url: str, last_event_id: str | None = None, headers: dict | None = None,
                 local_addr: tuple[str, int] | None = None, only: set[str] | None = None):
        self.url = url
        self.last_event_id = last_event_id
        self.extra_headers = headers or {}
        self.local_addr = local_addr
        self.status = 0
        self.headers: dict[str, str] = {}
        self.parser = SSEParser()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: list[SSEEvent] = []
        self._chunked = False
        self._chunk_left = 0
        self.eof = False
        self.only = only    # event types to return; others (e.g. presence) are skipped
        self.skipped = 0

    async def connect(self, timeout: float = 10.0) -> "SSEClient":
        await asyncio.wait_for(self._connect(), timeout)
        return self

    async def _connect(self) -> None:
        parts = urlsplit(self.url)
        host, port = parts.hostname, parts.port or 80
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self._reader, self._writer = await asyncio.open_connection(host, port, local_addr=self.local_addr,
                                                                   limit=1 << 20)
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream",
                 "Cache-Control: no-cache"]
        if self.last_event_id is not None:
            lines.append(f"Last-Event-ID: {self.last_event_id}")
        lines += [f"{k}: {v}" for k, v in self.extra_headers.items()]
        self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ", 2)[1])
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                self.headers[k.strip().lower()] = v.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        ctype = self.headers.get("content-type", "")
        if self.status != 200 or not ctype.startswith("text/event-stream"):
            body = b""
            try:
                body = await asyncio.wait_for(self._read_body_rest(), 2.0)
            except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
                pass
            self.close()
            raise SSEError(self.status, body, f"{self.url}: HTTP {self.status} {ctype}")

    async def _read_body_rest(self) -> bytes:
        if "content-length" in self.headers:
            return await self._reader.readexactly(int(self.headers["content-length"]))
        out = b""
        while not self.eof:
            out += await self._read_chunk()
        return out

    async def _read_chunk(self) -> bytes:
        """Next piece of body bytes; sets ``eof`` at the end of the stream."""
        if not self._chunked:
            data = await self._reader.read(65536)
            if not data:
                self.eof = True
            return data
        if self._chunk_left == 0:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.eof = True
                return b""
            self._chunk_left = size
        data = await self._reader.read(min(self._chunk_left, 65536))
        if not data:
            self.eof = True
            return b""
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            await self._reader.readexactly(2)
        return data

    async def next_event(self, timeout: float = 10.0) -> SSEEvent:
        """The next event; raises asyncio.TimeoutError, or EOFError when the stream ended."""
        async def read():
            while not self._pending:
                if self.eof:
                    raise EOFError(f"{self.url}: stream closed")
                try:
                    chunk = await self._read_chunk()
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    self.eof = True
                    raise EOFError(f"{self.url}: stream closed ({exc})") from None
                for ev in self.parser.feed(chunk):
                    if self.only is None or ev.event in self.only:
                        self._pending.append(ev)
                    else:
                        self.skipped += 1
            return self._pending.pop(0)
        return await asyncio.wait_for(read(), timeout)

    async def events(self, n: int, timeout: float = 10.0, kinds: set[str] | None = None) -> list[SSEEvent]:
        """The next ``n`` events (of ``kinds``, if given) within ``timeout`` seconds in total."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        out: list[SSEEvent] = []
        while len(out) < n:
            ev = await self.next_event(max(0.0, deadline - loop.time()))
            if kinds is None or ev.event in kinds:
                out.append(ev)
        return out

    async def no_event(self, within: float, kinds: set[str] | None = None) -> SSEEvent | None:
        """The first event (of ``kinds``) arriving within ``within`` seconds, or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        try:
            while True:
                ev = await self.next_event(max(0.0, deadline - loop.time()))
                if kinds is None or ev.event in kinds:
                    return ev
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
