"""The baseline: a naive Tornado SSE broadcaster, one process, no mesh.

    python tests/bench/naive_broadcaster.py --port 8099

Same HTTP API as a livemesh frontend (``GET /v1/videos/{v}/events``, ``POST .../likes``,
``/healthz`` with ``rss_kb``), so ``meshctl bench`` drives both with the same workload.  What it
does the obvious way: per like, for every viewer of the video, encode the event and
``write`` + ``flush`` it (one syscall per event per viewer); no coalescing, no slicing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time

import tornado.httpserver
import tornado.netutil
import tornado.web

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from mesh.io.node import rss_kb  # noqa: E402

VIEWERS: dict[str, set] = {}
SEQ = itertools.count(1)
EPOCH = int(time.time() * 1000)


class Events(tornado.web.RequestHandler):
    async def get(self, video):
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.write("retry: 2000\n\n")
        await self.flush()
        self.done = asyncio.get_running_loop().create_future()
        VIEWERS.setdefault(video, set()).add(self)
        await self.done

    def on_connection_close(self):
        for viewers in VIEWERS.values():
            viewers.discard(self)
        if hasattr(self, "done") and not self.done.done():
            self.done.set_result(None)


class Likes(tornado.web.RequestHandler):
    def post(self, video):
        body = json.loads(self.request.body or b"{}")
        seq = next(SEQ)
        event = {"id": f"{seq:x}", "video": video, "kind": "like", "user": body.get("user"),
                 "ts": time.time() * 1000.0, "seq": seq}
        for viewer in list(VIEWERS.get(video, ())):
            data = json.dumps(event, separators=(",", ":"))
            viewer.write(f"id: {EPOCH}:{seq}\nevent: like\ndata: {data}\n\n")
            viewer.flush()
        self.set_status(202)
        self.write({"id": event["id"], "seq": seq})


class Health(tornado.web.RequestHandler):
    def get(self):
        self.write({"status": "ok", "connections": sum(len(v) for v in VIEWERS.values()), "rss_kb": rss_kb(),
                    "cpu_s": round(time.process_time(), 3)})


async def main(port: int) -> None:
    app = tornado.web.Application([(r"/v1/videos/([^/]+)/events", Events), (r"/v1/videos/([^/]+)/likes", Likes),
                                   (r"/healthz", Health)])
    sockets = tornado.netutil.bind_sockets(port, address="127.0.0.1")
    tornado.httpserver.HTTPServer(app).add_sockets(sockets)
    real = sockets[0].getsockname()[1]
    print(json.dumps({"ready": True, "http": f"http://127.0.0.1:{real}"}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    asyncio.run(main(ap.parse_args().port))
