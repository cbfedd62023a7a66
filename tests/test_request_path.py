"""Findings about the frontend's request path, each against a real frontend process: the
page's headers, JSON errors for static files, no server version advertised."""

from __future__ import annotations

import asyncio
import json

import pytest
from tornado.httpclient import AsyncHTTPClient

pytestmark = pytest.mark.topology


async def get(url: str):
    return await AsyncHTTPClient().fetch(url, raise_error=False)


async def test_the_page_has_its_csp_and_no_response_names_the_server(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1")
    page = await get(f.url + "/")
    assert page.code == 200 and b"<html" in page.body.lower()
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for path in ("/", "/static/app.js", "/healthz", "/nowhere", "/static/missing.js"):
        response = await get(f.url + path)
        assert "Server" not in response.headers, (path, response.headers.get("Server"))


async def test_a_missing_static_file_is_a_json_404(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1")
    response = await get(f.url + "/static/missing.js")
    assert response.code == 404
    assert response.headers["Content-Type"].startswith("application/json")
    assert json.loads(response.body)["error"]["code"] == "not_found"


async def test_a_5_mib_body_gets_a_json_413_not_a_reset(topology):
    topology.dispatcher("d1")
    f = topology.frontend("f1", **{"frontend.max_body_bytes": "1024"})
    host, port = f.url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b"x" * (5 * 1024 * 1024)
    writer.write(b"POST /v1/videos/big-1/likes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    writer.write(body)
    await asyncio.wait_for(writer.drain(), 10)  # the frontend discards what it does not read
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    answer = json.loads(await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10))
    assert status_line.split()[1] == "413" and headers["connection"] == "close"
    assert headers["content-type"].startswith("application/json")
    assert answer["error"]["code"] == "body_too_large"
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed in order, after the answer
    writer.close()
