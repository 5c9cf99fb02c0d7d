"""Length-prefixed orjson frames: the one wire format between worker, fork-server and child.

A frame is a 4-byte big-endian length followed by that many bytes of orjson. The same
encoder serves both sides; the fork-server and the children use the blocking helpers here
(they are single-threaded loops with nothing else to do), the worker uses
:class:`conveyor.sandbox.channel.FrameChannel` on its event loop. File descriptors travel as
``SCM_RIGHTS`` ancillary data attached to the frame that announces them (``"fds": n``);
the receiver keeps them in arrival order, which is the frame order on a stream socket.

Message shapes (``op`` names the message)::

    worker → fork-server  {"op": "spawn", "id", "slot", "uid", "limits", "locked"}
                          {"op": "kill", "id"}          {"op": "shutdown"}
    fork-server → worker  {"op": "hello", "probe": {...}}
                          {"op": "spawned", "id", "pid", "fds": 1}   (+ the worker's socket end)
                          {"op": "exit", "id", "pid", "code", "signal", "cpu_s", "killed"}
    worker → child        {"op": "run", "step", "code", "input", "timeout_s"}
    child → worker        {"status", "output", "error", "logs", "recycle"}
"""

from __future__ import annotations

import array
import socket
import struct
from typing import Any

import orjson

from conveyor.errors import InternalError

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
#: Largest frame either side accepts; a bigger length prefix is a protocol error, so a
#: corrupt or hostile peer cannot make the reader allocate without bound.
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
#: Room for this many descriptors in one ``recvmsg``; only ``spawned`` carries one.
MAX_FDS = 4


class ProtocolError(InternalError):
    """The peer sent something that is not a well-formed frame (too large, not JSON)."""


def encode(obj: Any) -> bytes:
    """One frame: length prefix + orjson body."""
    body = orjson.dumps(obj)
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: :meth:`feed` bytes as they arrive, get whole frames back.

    Parameters: ``max_frame`` — bytes; a length prefix above it raises :class:`ProtocolError`.
    """

    __slots__ = ("_buf", "_need", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        # Length of the frame being assembled, once its header is in; keeps a large frame
        # arriving in many chunks from being re-parsed on every chunk.
        self._need = -1
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Whole frames decoded from what came so far; ``data`` is not kept (a buffer the
        caller reuses may be passed)."""
        buf = self._buf
        if not buf and self._need < 0:  # not mid-frame (a header alone may have been eaten)
            return self._feed_direct(data)
        buf += data
        out: list[Any] = []
        pos = 0
        while True:
            if self._need < 0:
                if len(buf) - pos < HEADER_SIZE:
                    break
                (self._need,) = _HEADER.unpack_from(buf, pos)
                if self._need > self.max_frame:
                    raise ProtocolError(f"frame of {self._need} bytes over {self.max_frame}")
                pos += HEADER_SIZE
            if len(buf) - pos < self._need:
                break
            end = pos + self._need
            try:
                out.append(orjson.loads(memoryview(buf)[pos:end]))
            except orjson.JSONDecodeError as exc:
                raise ProtocolError(f"frame is not JSON: {exc}") from None
            pos = end
            self._need = -1
        if pos:
            del buf[:pos]
        return out

    def _feed_direct(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """The common case, nothing buffered: decode straight from ``data`` (one answer in
        one read), keeping only an incomplete tail."""
        view = memoryview(data)
        size = len(view)
        out: list[Any] = []
        pos = 0
        while size - pos >= HEADER_SIZE:
            (need,) = _HEADER.unpack_from(view, pos)
            if need > self.max_frame:
                raise ProtocolError(f"frame of {need} bytes over {self.max_frame}")
            end = pos + HEADER_SIZE + need
            if end > size:
                break
            try:
                out.append(orjson.loads(view[pos + HEADER_SIZE : end]))
            except orjson.JSONDecodeError as exc:
                raise ProtocolError(f"frame is not JSON: {exc}") from None
            pos = end
        if pos < size:
            self._buf += view[pos:]
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered but not yet part of a complete frame."""
        return len(self._buf)


def send_frame(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    """Blocking send of one frame, with ``fds`` attached as ``SCM_RIGHTS`` when given."""
    data = encode(obj)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
        data = data[sent:]
    if data:
        sock.sendall(data)


def recv_fds(sock: socket.socket, bufsize: int) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: the bytes and any descriptors that came with them."""
    data, anc, _flags, _addr = sock.recvmsg(bufsize, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return data, fds


class BlockingReader:
    """Frames from a blocking socket, one at a time (the child's and fork-server's side)."""

    __slots__ = ("_decoder", "_queue", "_rbuf", "sock")

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.sock = sock
        self._decoder = FrameDecoder(max_frame)
        self._queue: list[Any] = []
        # Read into, again and again: a fresh bytes object per recv of this size would be
        # an mmap, page faults and an munmap for every request.
        self._rbuf = memoryview(bytearray(1 << 16))

    def read(self) -> Any | None:
        """The next frame, or ``None`` at end of stream."""
        while not self._queue:
            n = self.sock.recv_into(self._rbuf)
            if not n:
                return None
            self._queue.extend(self._decoder.feed(self._rbuf[:n]))
        return self._queue.pop(0)

    def feed(self, data: bytes) -> list[Any]:
        """Decode bytes read elsewhere (the fork-server reads from its selector loop)."""
        return self._decoder.feed(data)
