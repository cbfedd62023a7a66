"""Logging setup, called only from entry points (bin/ scripts, ``__main__`` modules).

Loggers by concern: ``mesh.app`` (node life cycle), ``mesh.access`` (HTTP access, Tornado's),
``mesh.wire`` (ZeroMQ peers and malformed frames), ``mesh.kv`` (KV backends)."""

from __future__ import annotations

import json
import logging
import sys
import time


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str = "info", as_json: bool = False, node: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JSONFormatter())
    else:
        fmt = logging.Formatter(f"%(asctime)s {node} %(levelname)s %(name)s: %(message)s")
        fmt.converter = time.gmtime
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Tornado's access log is one line per request: keep it out of info-level output
    logging.getLogger("tornado.access").setLevel(max(logging.WARNING, root.level))
