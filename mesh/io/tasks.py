"""The background tasks a node starts per message (a repair, a forward, a batch send).

asyncio keeps only a weak reference to a running task, so a task that nobody holds can be
collected before it ends, and the exception of a task that nobody awaits shows up only as a
warning when the interpreter exits. ``Tasks`` holds each task until it is done, logs a failure
when it happens, and cancels what is still running when the node stops.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Coroutine


class Tasks:
    def __init__(self, log: logging.Logger):
        self.log = log
        self._running: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._running.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("background task %s failed", task.get_coro().__qualname__,
                           exc_info=task.exception())

    def cancel(self) -> None:
        for task in list(self._running):
            task.cancel()

    def __len__(self) -> int:
        return len(self._running)
