"""Frames over a unix socket on the worker's event loop, with descriptor passing.

asyncio's stream API cannot receive ``SCM_RIGHTS``, and a transport plus protocol plus
``StreamReader`` costs more per message than the whole warm-execution budget, so this is a
thin reader registered with ``loop.add_reader``: one ``recv``/``recvmsg`` per readiness
event, decoded in place, handed to a callback. Writes go straight to the socket and fall
back to ``add_writer`` only when the kernel buffer is full (large inputs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from conveyor.sandbox.protocol import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    ProtocolError,
    encode,
    recv_fds,
)

_READ_SIZE = 1 << 18
_local = threading.local()


def _read_buffer() -> memoryview:
    """This thread's read buffer, shared by its channels: a frame is decoded (or copied
    into the channel's decoder) before the next read, so reads never overlap. A fresh
    ``bytes`` of ``_READ_SIZE`` per ``recv`` would cost a malloc of that size each time."""
    try:
        buf: memoryview = _local.buf
    except AttributeError:
        buf = _local.buf = memoryview(bytearray(_READ_SIZE))
    return buf


class FrameChannel:
    """One connected ``AF_UNIX`` stream socket carrying frames both ways.

    Parameters:
        sock: connected socket; the channel owns it and closes it in :meth:`close`.
        on_frame: called with each decoded frame, on the loop.
        on_close: called once with ``None`` (EOF, or :meth:`close`) or the error.
        max_frame: bytes; a larger frame closes the channel with :class:`ProtocolError`.
        accept_fds: read with ``recvmsg`` and queue received descriptors in :attr:`fds`.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_frame: Callable[[Any], None],
        on_close: Callable[[BaseException | None], None],
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        accept_fds: bool = False,
    ) -> None:
        self.sock = sock
        self._fd = sock.fileno()
        self._on_frame = on_frame
        self._on_close = on_close
        self._decoder = FrameDecoder(max_frame)
        self._accept_fds = accept_fds
        self._wbuf = bytearray()
        self._loop = asyncio.get_running_loop()
        self.fds: deque[int] = deque()
        self.closed = False
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        data: bytes | memoryview
        try:
            if self._accept_fds:
                data, fds = recv_fds(self.sock, _READ_SIZE)
                self.fds.extend(fds)
            else:
                rbuf = _read_buffer()
                data = rbuf[: self.sock.recv_into(rbuf)]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(exc)
            return
        if not data:
            self._close(None)
            return
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self._close(exc)
            return
        for frame in frames:
            if self.closed:
                return
            self._on_frame(frame)

    def send(self, obj: Any) -> None:
        """Queue one frame; written at once unless the socket is full."""
        self.send_bytes(encode(obj))

    def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("sandbox channel is closed")
        if self._wbuf:
            self._wbuf += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._close(exc)
            raise ConnectionResetError(str(exc)) from exc
        if sent < len(data):
            self._wbuf += data[sent:]
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(exc)
            return
        del self._wbuf[:sent]
        if not self._wbuf:
            self._loop.remove_writer(self._fd)

    def _close(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        if self._wbuf:
            self._loop.remove_writer(self._fd)
            self._wbuf.clear()
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.popleft())
        self.sock.close()
        self._on_close(exc)

    def close(self) -> None:
        """Stop reading, drop unsent data, close the socket; ``on_close(None)`` fires once."""
        self._close(None)
