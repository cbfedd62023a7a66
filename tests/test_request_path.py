"""Findings about the frontend's request path, each against a real frontend process: the
page's headers, JSON errors for static files, no server version advertised."""

from __future__ import annotations

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
