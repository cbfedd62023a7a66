"""A ZeroMQ socket on the asyncio loop without a future per message: the dispatcher's
ROUTER and XPUB at 100 k events/s.

Theory of operation.  Like pyzmq's ``ZMQStream`` (``zmq/eventloop/zmqstream.py``): the
socket's ``FD`` does not say "a message is readable", only "the socket's state may have
changed" (edge-triggered), and any operation on the socket -- a send included -- may consume
that signal.  So on every wake-up of the FD, and once per loop iteration after sends of ours,
``SocketPump`` reads ``EVENTS`` and drains what is readable with non-blocking receives, at most
``max_batch`` messages per callback (the rest on the next loop iteration, so other work gets
its turn), and hands the whole burst to ``on_messages``: the caller decodes and groups a burst
in one go.  Sends are plain non-blocking sends.

Why not ``zmq.asyncio``: each awaited send/recv there costs a future, and while a receive is
pending every send schedules a re-check of the socket; profiled at 15 k likes/s (py-spy), that
is a quarter of the dispatcher's time.  The pump owns only its socket, its loop
registration and its callback.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq
import zmq.asyncio

log = logging.getLogger("mesh.app")

# plain ints: pyzmq's flags are enum.Flag members, and every ``|`` / ``&`` on them builds a new
# one in Python (3 % of the dispatcher's profile, for two frames per message)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_RCVMORE = int(zmq.RCVMORE)


class SocketPump:
    def __init__(self, sock: zmq.Socket, on_messages: Callable[[list[list[bytes]]], None],
                 max_batch: int = 1000, what: str = "socket"):
        if isinstance(sock, zmq.asyncio.Socket):
            raise TypeError("SocketPump needs a plain (synchronous) zmq.Socket")
        self.sock = sock
        self.on_messages = on_messages
        self.max_batch = max_batch
        self.what = what
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._check_scheduled = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = self.sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._drain)
        self._schedule_check()  # messages may have arrived before we watched the FD

    def send_multipart(self, frames: list[bytes]) -> None:
        """Send without blocking (raises ``zmq.ZMQError`` like the socket would: ZeroMQ takes
        all parts of a message once it took the first, so a failure leaves nothing half-sent)."""
        send = self.sock.send
        try:
            for frame in frames[:-1]:
                send(frame, _MORE_NOBLOCK)
            send(frames[-1], _NOBLOCK)
        finally:
            self._schedule_check()

    def poke(self) -> None:
        """Look at the socket on the next loop iteration: after an operation of ours on it
        that is not a send through the pump (``connect``, ``SUBSCRIBE``), which may have taken
        the FD's edge."""
        self._schedule_check()

    def close(self, linger: int = 0) -> None:
        if self._loop is not None and self._fd != -1 and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._fd = -1
        self.sock.close(linger=linger)

    def _schedule_check(self) -> None:
        if not self._check_scheduled and self._loop is not None:
            self._check_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._check_scheduled = False
        if self._fd == -1:
            return  # closed
        sock, batch = self.sock, []
        recv, get = sock.recv, sock.get
        while len(batch) < self.max_batch and get(_EVENTS) & _POLLIN:
            try:
                frames = [recv(_NOBLOCK)]
            except zmq.Again:
                break
            while get(_RCVMORE):  # the rest of a message is there once its first part is
                frames.append(recv(_NOBLOCK))
            batch.append(frames)
        if len(batch) >= self.max_batch:
            self._schedule_check()
        if batch:
            try:
                self.on_messages(batch)
            except Exception:  # noqa: BLE001 - a bug must not stop the socket being served
                log.exception("handling %d messages from the %s failed", len(batch), self.what)
