"""The target's files on this machine: a FUSE mount of its root, served over the tunnel.

The daemon mounts the target's root at ``<session directory>/root`` for the
session's lifetime (read-only except under ``files.read_write``). ``netmirror
exec`` puts the target's volumes and chosen paths at their own paths for its
command, in a mount namespace of the command's own (:mod:`netmirror.mounts`).

The mount is made with libfuse's ``auto_unmount``: if the daemon dies, even by
SIGKILL, the kernel connection closes and fusermount3 unmounts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from netmirror.errors import NetmirrorError
from netmirror.mounts import table
from netmirror.mounts.namespace import detach

log = logging.getLogger(__name__)


def unmount(point: Path) -> bool:
    """Unmount ``point`` if something is mounted there (lazily: users may hold it)."""
    if not is_mounted(point):
        return False
    with contextlib.suppress(OSError):
        detach(str(point))
        return True
    # Not root: the FUSE helper may unmount what this user mounted.
    with contextlib.suppress(OSError):
        subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True, check=False)
    return not is_mounted(point)


def is_mounted(point: Path) -> bool:
    try:
        mounts = table.read()
    except OSError:
        return False
    return any(m.point == str(point) for m in mounts)


def new_volumes(target_mounts: list[Any], local_mounts: list[table.Mount]) -> list[str]:
    """The target's mount points this machine's root does not have (the same file
    system at the same place): for targets on this machine, whose mount table
    includes what they share with it."""
    here = {(m.point, m.device, m.root) for m in local_mounts}
    out = []
    for item in target_mounts:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not all(isinstance(v, str) for v in item)
        ):
            continue
        if tuple(item) not in here and item[0] not in out:
            out.append(item[0])
    return out


class FilesMount:
    """One FUSE mount of the target's root, served on the daemon's event loop."""

    def __init__(
        self,
        point: Path,
        operations: Any,
        *,
        spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]],
    ) -> None:
        self.point = point
        self.operations = operations
        self._spawn = spawn
        self._task: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        import pyfuse3
        import pyfuse3.asyncio

        self.point.mkdir(mode=0o755, parents=True, exist_ok=True)
        unmount(self.point)  # a mount left by a daemon of this session that was killed
        pyfuse3.asyncio.enable()
        options = {
            "fsname=netmirror",
            "subtype=netmirror",
            "allow_other",  # the command may run as another user than the daemon
            "auto_unmount",
        }
        try:
            pyfuse3.init(self.operations, str(self.point), options)
        except RuntimeError as exc:
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=False)
            raise NetmirrorError(
                f"cannot mount the target's files at {self.point}: {exc}"
            ) from None
        self._task = self._spawn(pyfuse3.main(), "files")
        log.info("the target's files are mounted at %s", self.point)

    async def stop(self) -> None:
        if self._task is None:
            return
        import pyfuse3

        task, self._task = self._task, None
        # Operations waiting on the target end now, with EIO: the FUSE session must
        # not be closed under an operation that will still answer the kernel.
        self.operations.remote.close()
        with contextlib.suppress(Exception):
            pyfuse3.terminate()
        finished = False
        try:
            await asyncio.wait_for(asyncio.shield(task), 5)
            finished = True
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        except Exception as exc:  # the loop ended with an error: it is over all the same
            log.warning("the FUSE loop ended with %r", exc)
            finished = True
        if finished:
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=True)
        else:
            log.warning("file operations did not finish: leaving the FUSE session open")
        unmount(self.point)
        with contextlib.suppress(OSError):
            os.rmdir(self.point)
        log.info("the target's files are unmounted")
