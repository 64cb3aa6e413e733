"""Owned asyncio tasks: every task is named, referenced and awaited at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    """Keeps references to the tasks it starts and cancels them together.

    A task that fails is logged (never silently dropped); :meth:`close` cancels
    the rest and waits, naming any task that will not stop.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Start ``coro`` as a task named ``name`` owned by this set."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "task %s failed: %r", task.get_name(), task.exception(), exc_info=task.exception()
            )

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every task and wait for them; log the ones that do not stop."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.warning("task %s did not stop within %.1fs", task.get_name(), timeout)


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one: each stolen connection holds
    a socket (two in the agent for passthrough), and 1,024 is the usual default."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            log.debug("cannot raise the open-files limit above %d", soft)
    return soft


#: glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap, not from a mapping of their own.
HEAP_MMAP_THRESHOLD = 8 * 1024 * 1024
#: Free memory the heap keeps mapped before it gives any back to the kernel.
HEAP_TRIM_THRESHOLD = 32 * 1024 * 1024


def keep_heap_mapped() -> bool:
    """Keep freed buffers mapped, so the data path reuses memory instead of faulting.

    Relaying allocates a buffer of up to a few hundred KiB per chunk. By default glibc
    serves those with mmap()/munmap() or grows and trims the heap around them, and
    every chunk then pays for fresh zeroed pages: profiles showed page faults as the
    largest single cost of a bulk transfer. Returns False where this is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))
    return bool(mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD)) and ok
