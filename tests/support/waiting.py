"""Waiting in tests: for a condition, or for a line from a child process, never forever.

Every wait has a deadline and fails with a message that says what did not happen.
A sleep as synchronisation ("wait 0.5 s and hope it happened") has no place in a
test; :func:`eventually` polls the condition itself instead.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, TypeVar

T = TypeVar("T")

Message = str | Callable[[], str]


def _text(message: Message) -> str:
    return message() if callable(message) else message


def eventually(
    condition: Callable[[], T],
    timeout: float,
    message: Message,
    *,
    interval: float = 0.05,
) -> T:
    """Call ``condition`` until it returns something true; return that value.

    ``condition`` is called at least once, and once more at the deadline, so a
    ``timeout`` of 0 checks once. After ``timeout`` seconds an AssertionError says
    ``message`` (a string, or a callable called then, to show the state at the end).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{_text(message)} (waited {timeout:g} s)")
        time.sleep(min(interval, remaining))  # polling, not synchronisation


async def eventually_async(
    condition: Callable[[], Awaitable[T]],
    timeout: float,
    message: Message,
    *,
    interval: float = 0.05,
) -> T:
    """:func:`eventually` for a test running in an event loop, which it never blocks.

    ``condition`` is a coroutine function, awaited at each try.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await condition()
        if value:
            return value
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"{_text(message)} (waited {timeout:g} s)")
        await asyncio.sleep(min(interval, remaining))


def read_line(stream: IO[Any], timeout: float, what: str) -> str:
    """One line from a child's pipe (text or bytes), within ``timeout`` seconds.

    Reads the file descriptor a byte at a time, so nothing past the line is taken
    from the pipe (the stream's own buffer stays empty): read every line of that
    pipe with this function. Fails with ``what`` when the deadline passes or the
    pipe ends first. Returns the line without its end.
    """
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    line = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                raise AssertionError(
                    f"{what}: no complete line within {timeout:g} s (got {bytes(line)!r})"
                )
            byte = os.read(fd, 1)
            if not byte:
                raise AssertionError(f"{what}: output ended before a line (got {bytes(line)!r})")
            line += byte
    return line.decode(errors="replace").rstrip("\r\n")
