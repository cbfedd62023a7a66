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
    # nothing else reaches stderr unformatted: Python warnings and an uncaught exception become
    # log records too, so a JSON log stays one JSON object per line
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    # Tornado's access log is one line per request: keep it out of info-level output
    logging.getLogger("tornado.access").setLevel(max(logging.WARNING, root.level))


def _log_uncaught(exc_type, exc, tb) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        logging.getLogger("mesh.app").warning("interrupted; exiting")
        return
    logging.getLogger("mesh.app").critical("uncaught exception; exiting", exc_info=(exc_type, exc, tb))
