"""The frontend's human-facing routes: the live-video page and the operator's ``/metrics``.

* ``GET /``                 the page (``static/index.html``): watch a video, like, comment
* ``GET /static/{file}``    its script and style sheet, served from the installed package
* ``GET /metrics``          Prometheus text format (``mesh.io.metrics``)

The page is plain HTML, CSS and JavaScript (no build step, nothing from a CDN): it holds one
``EventSource`` to this frontend's ``/v1/videos/{video}/events`` and publishes through the same
origin's API, so it works on whichever frontend served it.
"""

from __future__ import annotations

import json
import os

import tornado.web
from prometheus_client import CollectorRegistry

from mesh.errors import ClientError
from mesh.io.metrics import MetricsHandler

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class PageFileHandler(tornado.web.StaticFileHandler):
    """Static files with a short cache lifetime: a redeployed frontend's page is picked up on
    reload (Tornado still answers conditional requests with 304).  Every answer carries the
    page's Content-Security-Policy (``/`` resolves to ``index.html`` only inside Tornado, so the
    policy does not depend on the path), no ``Server`` version, and errors are JSON like the API's."""

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        # the page talks only to its own origin; inline script and style are not needed
        self.set_header("Content-Security-Policy",
                        "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                        "script-src 'self'; connect-src 'self'")
        self.set_header("X-Content-Type-Options", "nosniff")

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")

    def write_error(self, status_code: int, **kwargs) -> None:
        code = "not_found" if status_code == 404 else "bad_request" if status_code < 500 else "internal"
        err = ClientError(status_code, code, f"no file at {self.request.path}" if status_code == 404
                          else "the static file could not be served", retryable=status_code >= 500)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(err.to_json()))


def page_routes(metrics_registry: CollectorRegistry) -> list:
    static = {"path": STATIC_DIR}
    return [
        (r"/()", PageFileHandler, {**static, "default_filename": "index.html"}),
        (r"/static/(.+)", PageFileHandler, static),
        (r"/metrics", MetricsHandler, {"registry": metrics_registry}),
    ]
