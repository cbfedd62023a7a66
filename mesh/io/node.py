"""What every node process shares: the KV from config, the readiness line, signals, GC tuning."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sys
from typing import Any, Callable

import zmq.asyncio

from mesh.config import Config
from mesh.kv import KV

log = logging.getLogger("mesh.app")


def make_kv(cfg: Config) -> KV:
    kind = cfg.kv.backend
    if kind == "memory":
        from mesh.kv.memory import MemoryKV
        return MemoryKV()
    if kind == "embedded":
        from mesh.kv.embedded import EmbeddedKV
        return EmbeddedKV(cfg.kv.path, ttl=cfg.kv.liveness_ttl)
    from mesh.kv.consul import ConsulKV
    host, _, port = cfg.kv.consul_addr.rpartition(":")
    return ConsulKV(host=host or "127.0.0.1", port=int(port or 8500), dc=cfg.node.dc,
                    prefix=cfg.kv.prefix, session_ttl=cfg.kv.session_ttl,
                    scheme=cfg.kv.consul_scheme, token=cfg.kv.consul_token or None)


def rss_kb() -> int:
    """This process's resident set size now, in KiB (Linux ``/proc/self/statm``)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


def announce_ready(**fields) -> None:
    """One JSON line on stdout once the node serves: launchers and tests wait for it."""
    sys.stdout.write(json.dumps({"ready": True, **fields}) + "\n")
    sys.stdout.flush()


def settle_gc() -> None:
    """Long-lived start-up objects leave the collector's view (``gc.freeze``), and the young
    generation threshold is raised so full passes over many connection objects are rare."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50000, 20, 100)


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve(cfg: Config, make_node: Callable[[Config, KV, zmq.asyncio.Context], Any], role: str) -> None:
    """A node's whole life: start, announce readiness, serve until SIGTERM/SIGINT, leave
    gracefully (``node.shutdown()``), release everything (``node.stop()``), even on failure."""
    ctx = zmq.asyncio.Context()
    node = make_node(cfg, make_kv(cfg), ctx)
    stop = asyncio.Event()
    stop_on_signals(stop)
    try:
        await node.start()
        settle_gc()
        announce_ready(role=role, name=node.name, **node.endpoints)
        await stop.wait()
        log.info("%s %s shutting down", role, node.name)
        await node.shutdown()
    finally:
        await node.stop()
        ctx.destroy(linger=0)
        log.info("%s %s stopped", role, node.name)


async def release(kv: KV, *, deregister: bool = True, http_server=None, sockets=(), zap=None) -> None:
    """The common end of every node's ``stop()``: leave the registry (unless it already left
    gracefully), close the KV handle, the HTTP server, the ZeroMQ sockets (linger 0) and the
    CURVE authenticator -- each step even when an earlier one failed."""
    if deregister:
        try:
            await kv.deregister()
        except Exception as exc:  # noqa: BLE001 - shutting down: report, keep closing
            log.warning("deregister failed: %s", exc)
    await kv.close()
    if http_server is not None:
        http_server.stop()
    for sock in sockets:
        if sock is not None:
            sock.close(linger=0)
    if zap is not None:
        zap.stop()
