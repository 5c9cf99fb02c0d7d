"""Frames: length prefix + orjson, incremental decoding, bounds, descriptor passing."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from conveyor.sandbox.protocol import (
    BlockingReader,
    FrameDecoder,
    ProtocolError,
    encode,
    recv_fds,
    send_frame,
)


def test_roundtrip_byte_by_byte() -> None:
    """Frames split at every byte boundary decode to the original objects, in order."""
    frames = [{"op": "run", "input": {"a": [1, 2.5, None, "é"]}}, [], "x" * 1000]
    data = b"".join(encode(f) for f in frames)
    decoder = FrameDecoder()
    out = []
    for i in range(len(data)):
        out.extend(decoder.feed(data[i : i + 1]))
    assert out == frames
    assert decoder.pending == 0


def test_oversized_frame_is_refused_before_buffering() -> None:
    """A length prefix above max_frame raises at once, before the body arrives."""
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(ProtocolError):
        decoder.feed((101).to_bytes(4, "big"))


def test_garbage_is_a_protocol_error() -> None:
    """A frame whose body is not JSON raises ProtocolError."""
    with pytest.raises(ProtocolError):
        FrameDecoder().feed((3).to_bytes(4, "big") + b"{{{")


def test_descriptor_travels_with_its_frame() -> None:
    """send_frame with fds delivers the descriptor alongside the frame (SCM_RIGHTS)."""
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        send_frame(a, {"op": "spawned", "fds": 1}, [w])
        data, fds = recv_fds(b, 4096)
        assert FrameDecoder().feed(data) == [{"op": "spawned", "fds": 1}]
        assert len(fds) == 1
        os.write(fds[0], b"hi")
        assert os.read(r, 2) == b"hi"
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_blocking_reader_reads_frames_then_eof() -> None:
    """BlockingReader yields each frame and None at end of stream."""
    a, b = socket.socketpair()
    a.sendall(encode(1) + encode({"two": 2}))
    a.close()
    reader = BlockingReader(b)
    assert reader.read() == 1
    assert reader.read() == {"two": 2}
    assert reader.read() is None
    b.close()


def test_decoder_copies_a_partial_frame_out_of_a_reused_buffer() -> None:
    """A frame cut off at the end of one read is kept even though the caller reuses (and
    overwrites) its read buffer before the rest arrives."""
    data = encode({"a": 1}) + encode({"b": "x" * 50})
    buf = bytearray(64)
    view = memoryview(buf)
    decoder = FrameDecoder()
    cut = len(encode({"a": 1})) + 10
    buf[:cut] = data[:cut]
    assert decoder.feed(view[:cut]) == [{"a": 1}]
    assert decoder.pending == 10
    rest = data[cut:]
    buf[:] = b"\xff" * len(buf)
    buf[: len(rest)] = rest
    assert decoder.feed(view[: len(rest)]) == [{"b": "x" * 50}]
    assert decoder.pending == 0


def test_blocking_reader_reassembles_frames_larger_than_its_buffer() -> None:
    """A frame many times bigger than one read arrives whole, and the next one after it."""
    a, b = socket.socketpair()
    big = {"blob": "y" * 300_000}
    sender = threading.Thread(target=a.sendall, args=(encode(big) + encode(2),))
    sender.start()
    try:
        reader = BlockingReader(b)
        assert reader.read() == big
        assert reader.read() == 2
    finally:
        sender.join()
        a.close()
        b.close()


@pytest.mark.parametrize(
    "cuts",
    [(2, 4), (4,), (5, 11 + 4)],
    ids=["header-in-two-reads", "header-alone", "next-header-alone"],
)
def test_a_read_that_ends_right_after_a_header(cuts: tuple[int, ...]) -> None:
    """Reads cut exactly after a frame's header (which the decoder has consumed, leaving its
    buffer empty mid-frame) still decode every frame in order."""
    a, b = encode({"a": 1}), encode({"b": 2})
    assert len(a) == 11  # the third case cuts right after b's header
    data = a + b
    decoder = FrameDecoder()
    out = []
    start = 0
    for cut in (*cuts, len(data)):
        out.extend(decoder.feed(data[start:cut]))
        start = cut
    assert out == [{"a": 1}, {"b": 2}]
    assert decoder.pending == 0
