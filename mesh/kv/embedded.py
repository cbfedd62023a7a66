"""Embedded KV backend: one SQLite file shared by every node process of one host.

Theory of operation: SQLite in WAL mode lets many processes read while one writes, with no
server to run.  Liveness is a heartbeat: each registered node rewrites its ``expires`` time
every ``ttl/3`` seconds; readers ignore nodes past their ``expires`` and the counts they wrote,
and any process sweeps expired nodes' rows.  A node killed with SIGKILL therefore vanishes
within ``ttl`` (``liveness_bound``).  Watches poll the node table every ``WATCH_POLL``
seconds: cheap on a local file, and the only way without a
server.  Limits: one host only (the file must be local; SQLite locking on network file systems
is unreliable); wall clocks of the processes are the same clock.

All SQLite calls run on one worker thread per handle, so the event loop never blocks on
fsync or a writer's lock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

from mesh.errors import KVError
from mesh.kv import KV, Counts, NodeInfo

CONNECT_TIMEOUT = 10.0  # seconds to wait for a file another node holds locked

log = logging.getLogger("mesh.kv")

WATCH_POLL = 0.2

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    info TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counts (
    video TEXT NOT NULL,
    frontend TEXT NOT NULL,
    count INTEGER NOT NULL CHECK (count > 0),
    PRIMARY KEY (video, frontend)
);
CREATE INDEX IF NOT EXISTS counts_by_frontend ON counts (frontend);
"""


class EmbeddedKV(KV):
    def __init__(self, path: str, ttl: float = 5.0):
        self.path = path
        self.ttl = ttl
        self.liveness_bound = ttl
        self.node: NodeInfo | None = None
        self.kv_writes = 0
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-embedded")
        self._renew_task: asyncio.Task | None = None

    # --- plumbing ---------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            # Several nodes opening one new file at once: switching to WAL and creating the
            # schema can fail with "database is locked" without SQLite's busy handler being
            # consulted (WAL recovery, journal-mode change), so retry that until a deadline.
            deadline = time.monotonic() + CONNECT_TIMEOUT
            while True:
                db = sqlite3.connect(self.path, timeout=CONNECT_TIMEOUT, isolation_level=None,
                                     check_same_thread=False)
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                    db.executescript(SCHEMA)
                    break
                except sqlite3.OperationalError as exc:
                    db.close()
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self._db = db
        return self._db

    async def _run(self, fn, *args):
        def call():
            try:
                return fn(self._connect(), *args)
            except sqlite3.Error as exc:
                raise KVError(f"embedded KV {self.path}: {exc}") from exc
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def open(self) -> None:
        await self._run(lambda db: None)

    async def close(self) -> None:
        if self._renew_task:
            self._renew_task.cancel()
            self._renew_task = None
        def shut(db):
            db.close()
        if self._db is not None:
            await self._run(shut)
            self._db = None
        self._pool.shutdown(wait=False)

    # --- registry -----------------------------------------------------------------------

    async def register(self, node: NodeInfo) -> None:
        self.node = node
        await self._heartbeat()
        if self._renew_task is None:
            self._renew_task = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _heartbeat(self) -> None:
        node, ttl = self.node, self.ttl

        def beat(db):
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT expires FROM nodes WHERE name = ?", (node.name,)).fetchone()
                lost = row is None or row[0] < now
                if lost:
                    # our registration expired (or never existed): whatever we wrote is void
                    db.execute("DELETE FROM counts WHERE frontend = ?", (node.name,))
                db.execute("INSERT OR REPLACE INTO nodes (name, role, info, expires) VALUES (?,?,?,?)",
                           (node.name, node.role, json.dumps(node.to_dict()), now + ttl))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return lost

        lost = await self._run(beat)
        if lost and self._renew_task is not None:
            log.warning("embedded KV: registration of %s had expired; re-registered", node.name)
            self.generation += 1

    async def _renew_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                await asyncio.sleep(self.ttl / 3)
                await self._heartbeat()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except KVError as exc:
                log.warning("embedded KV heartbeat failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.ttl / 3)

    async def deregister(self) -> None:
        if self.node is None:
            return
        name = self.node.name
        if self._renew_task:
            self._renew_task.cancel()
            self._renew_task = None

        def drop(db):
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM counts WHERE frontend = ?", (name,))
            db.execute("DELETE FROM nodes WHERE name = ?", (name,))
            db.execute("COMMIT")

        await self._run(drop)
        self.node = None

    # --- counts -------------------------------------------------------------------------

    async def write_counts(self, frontend: str, counts: Mapping[str, int]) -> None:
        items = list(counts.items())

        def write(db):
            db.execute("BEGIN IMMEDIATE")
            try:
                for video, count in items:
                    if count > 0:
                        db.execute("INSERT OR REPLACE INTO counts (video, frontend, count) VALUES (?,?,?)",
                                   (video, frontend, count))
                    else:
                        db.execute("DELETE FROM counts WHERE video = ? AND frontend = ?", (video, frontend))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(write)
        self.kv_writes += 1

    async def read_counts(self, video: str | None = None) -> Counts:
        def read(db):
            now = time.time()
            self._sweep(db, now)
            sql = ("SELECT c.video, c.frontend, c.count FROM counts c JOIN nodes n ON n.name = c.frontend"
                   " WHERE n.expires >= ?")
            args: tuple = (now,)
            if video is not None:
                sql += " AND c.video = ?"
                args += (video,)
            out: Counts = {}
            for v, f, c in db.execute(sql + " ORDER BY c.video, c.frontend", args):
                out.setdefault(v, {})[f] = c
            return out

        return await self._run(read)

    @staticmethod
    def _sweep(db: sqlite3.Connection, now: float) -> None:
        dead = [r[0] for r in db.execute("SELECT name FROM nodes WHERE expires < ?", (now,))]
        if not dead:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            for name in dead:
                db.execute("DELETE FROM counts WHERE frontend = ?", (name,))
                db.execute("DELETE FROM nodes WHERE name = ? AND expires < ?", (name, now))
            db.execute("COMMIT")
        except sqlite3.OperationalError:
            db.execute("ROLLBACK")  # busy: another process sweeps; readers filter anyway

    async def nodes(self, role: str | None = None) -> list[NodeInfo]:
        def read(db):
            now = time.time()
            sql, args = "SELECT info FROM nodes WHERE expires >= ?", (now,)
            if role is not None:
                sql += " AND role = ?"
                args += (role,)
            return [NodeInfo.from_dict(json.loads(r[0])) for r in db.execute(sql + " ORDER BY name", args)]

        return await self._run(read)

    async def watch_nodes(self, role, index, wait):
        deadline = time.monotonic() + wait
        while True:
            nodes = await self.nodes(role)
            key = hash(tuple(nodes)) & 0x7FFFFFFFFFFF or 1
            if key != index or time.monotonic() >= deadline:
                return key, nodes
            await asyncio.sleep(min(WATCH_POLL, max(0.0, deadline - time.monotonic())))
