"""The registered nodes as an operator sees them: each node's own ``/healthz`` answer beside
its registry entry.  ``meshctl nodes`` lists them; ``meshctl tail``, ``presence`` and
``bench`` find their frontends with them, and ``bench`` reads the servers' RSS and CPU there."""

from __future__ import annotations

import asyncio
import json

import click
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from mesh.kv import KV, NodeInfo, ROLE_FRONTEND

#: seconds to wait for one node's /healthz
PROBE_TIMEOUT = 1.5


async def probe_url(base: str, timeout: float = PROBE_TIMEOUT) -> dict | None:
    """The ``/healthz`` JSON of the server at ``base``, or None when it does not answer in time."""
    try:  # an unreachable node answers 599 with no body (raise_error=False)
        resp = await AsyncHTTPClient().fetch(f"{base.rstrip('/')}/healthz", connect_timeout=timeout,
                                             request_timeout=timeout, raise_error=False)
        body = json.loads(resp.body or b"null")
    except (OSError, ValueError, asyncio.TimeoutError, HTTPClientError):
        return None
    return body if isinstance(body, dict) else None


async def probe(node: NodeInfo, timeout: float = PROBE_TIMEOUT) -> dict | None:
    """The node's ``/healthz`` JSON, or None when it has no HTTP server or does not answer."""
    return await probe_url(node.http, timeout) if node.http else None


async def health_fields(urls: list[str], key: str, timeout: float = 5.0) -> dict[str, float | None]:
    """``key`` of each server's ``/healthz`` (``rss_kb``, ``cpu_s``); None when it has none."""
    out = {}
    for u in urls:
        h = await probe_url(u, timeout)
        out[u] = h.get(key) if h else None
    return out


async def probe_all(kv: KV, role: str | None = None) -> list[tuple[NodeInfo, dict | None]]:
    """Registered nodes with their ``/healthz`` answers, probed concurrently."""
    found = await kv.nodes(role)
    healths = await asyncio.gather(*(probe(n) for n in found))
    return list(zip(found, healths))


async def reachable_frontends(kv: KV) -> list[tuple[NodeInfo, dict]]:
    """The registered frontends that answer ``/healthz``, with their answers; none is a
    command-line error that names the way out (``--frontend URL``)."""
    found = [(n, h) for n, h in await probe_all(kv, ROLE_FRONTEND) if h is not None and n.http]
    if not found:
        raise click.ClickException("no reachable frontend in the registry (use --frontend URL)")
    return found


async def pick_frontend(kv: KV) -> str:
    """A frontend from the registry whose /healthz says ok (else any that answers)."""
    found = await reachable_frontends(kv)
    for node, health in found:
        if node.healthy and health.get("status") == "ok":
            return node.http
    return found[0][0].http


async def frontend_urls(kv: KV) -> list[str]:
    """Every reachable frontend's base URL."""
    return [node.http for node, _ in await reachable_frontends(kv)]
