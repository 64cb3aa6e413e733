"""Finding a test's own processes, never another test run's.

``pgrep -f`` sees the whole machine: a second test run has guards and routers
with the same command lines. Each test has its own sandbox network namespace,
and the processes that act on its rules (agent, guards, HTTP router) run in it,
so a process is the test's when ``/proc/<pid>/ns/net`` is that namespace.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    argv: tuple[str, ...]

    def has_args(self, *args: str) -> bool:
        """Whether ``args`` appear in ``argv`` consecutively, each one whole."""
        n = len(args)
        return any(self.argv[i : i + n] == args for i in range(len(self.argv) - n + 1))


def argv_of(pid: int) -> tuple[str, ...] | None:
    """The command line of ``pid``; None if it is gone (or a zombie, which has none)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return tuple(part.decode(errors="replace") for part in raw.split(b"\0")[:-1]) or None


def pid_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a child of anyone, not only ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def netns_inode(netns: str) -> int:
    """The inode of the named network namespace (``ip netns`` name)."""
    return os.stat(f"/run/netns/{netns}").st_ino


def in_netns(netns: str, match: Callable[[Proc], bool] = lambda _p: True) -> list[Proc]:
    """Processes whose network namespace is ``netns`` and that ``match`` accepts."""
    inode = netns_inode(netns)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino != inode:
                continue
        except OSError:
            continue
        argv = argv_of(pid)
        if argv is not None and match(Proc(pid, argv)):
            found.append(Proc(pid, argv))
    return found


def only_pid(procs: list[Proc], what: str) -> int:
    """The pid of the one process in ``procs``; fails naming ``what`` otherwise."""
    assert len(procs) == 1, f"expected one {what}, found {[(p.pid, p.argv) for p in procs]}"
    return procs[0].pid
