"""What every node process shares: the KV from config, the readiness line, signals, GC tuning."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys

from .config import Config
from .kv import KV


def make_kv(cfg: Config) -> KV:
    kind = cfg.kv.backend
    if kind == "memory":
        from .kv_memory import MemoryKV
        return MemoryKV()
    if kind == "embedded":
        from .kv_embedded import EmbeddedKV
        return EmbeddedKV(cfg.kv.path, ttl=cfg.kv.liveness_ttl)
    from .kv_consul import ConsulKV
    host, _, port = cfg.kv.consul_addr.rpartition(":")
    return ConsulKV(host=host or "127.0.0.1", port=int(port or 8500), dc=cfg.node.dc,
                    prefix=cfg.kv.prefix, session_ttl=cfg.kv.session_ttl,
                    scheme=cfg.kv.consul_scheme, token=cfg.kv.consul_token or None)


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
