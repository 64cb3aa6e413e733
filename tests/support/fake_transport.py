"""An asyncio transport that records what is done to it, for tests without sockets."""

from __future__ import annotations

from typing import Any


class FakeTransport:
    """What netmirror's protocols use of a transport, recording every call.

    ``strict``: pausing a paused transport, or resuming a reading one, fails the test
    (for code whose pause and resume must alternate). ``sock`` is what
    ``get_extra_info("socket")`` answers.
    """

    def __init__(self, *, strict: bool = False, sock: Any = None) -> None:
        self.strict = strict
        self.sock = sock
        self.written = bytearray()
        self.buffered = 0
        """What get_write_buffer_size() answers."""
        self.reading = True
        self.pauses = 0
        self.resumes = 0
        self.closing = False
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.high_water: int | None = None

    def write(self, data: bytes | memoryview) -> None:
        assert not self.closing, "write after close"
        self.written += data

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high

    def pause_reading(self) -> None:
        assert self.reading or not self.strict, "paused twice"
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        assert not self.reading or not self.strict, "resumed while reading"
        self.reading = True
        self.resumes += 1

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closing = self.closed = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" and self.sock is not None else default
