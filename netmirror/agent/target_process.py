"""What the agent reads about its target: the main process, its environment, its resolver.

The agent runs in the target's network namespace but not always in its mount or
pid namespace, so each fact is looked up the way the target would see it:

* a named namespace (``ip netns``) has no process of its own; its processes are
  found by their ``/proc/PID/ns/net``, and its resolver files live in
  ``/etc/netns/NAME`` (falling back to ``/etc``), as ``ip netns exec`` arranges;
* a process or container target is read through ``/proc/PID`` (``environ``, and
  ``root/etc`` for its resolver files);
* in a Kubernetes ephemeral container, the pod's ``/etc/resolv.conf`` and
  ``/etc/hosts`` are the agent's own, and the target container's processes share
  its pid namespace.
"""

from __future__ import annotations

import os
from pathlib import Path

from netmirror.errors import NetmirrorError

NETNS_DIR = Path("/run/netns")


def _net_inode(pid: int | str, proc: Path) -> int | None:
    try:
        return os.stat(proc / str(pid) / "ns" / "net").st_ino
    except OSError:
        return None


def children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Direct children of a process."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command may hold spaces and parentheses: the ppid follows the last ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def find_target_pid(proc: Path = Path("/proc")) -> int | None:
    """The lowest pid in this network namespace that is not the agent or its guard."""
    mine = _net_inode("self", proc)
    if mine is None:
        return None
    # This process and its children (the guard) are never the target.
    excluded = {os.getpid(), *children(os.getpid(), proc)}
    pids = sorted(int(e.name) for e in proc.iterdir() if e.name.isdigit())
    for pid in pids:
        if pid not in excluded and _net_inode(pid, proc) == mine:
            return pid
    return None


def parse_environ(raw: bytes) -> dict[str, str]:
    """Parse the content of ``/proc/PID/environ``: ``NAME=VALUE`` entries ended by NUL.

    Entries without ``=`` or with an empty name are skipped; a last entry without
    its NUL is kept. Bytes that are not valid in the file system encoding are
    decoded with ``surrogateescape`` (:func:`os.fsdecode`), so
    :func:`os.fsencode` gives the original bytes back. When a name appears twice
    the first entry wins, as with ``getenv()`` and :data:`os.environ`.
    """
    environ: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if not sep or not name:
            continue
        environ.setdefault(os.fsdecode(name), os.fsdecode(value))
    return environ


def read_environment(pid: int, proc: Path = Path("/proc")) -> dict[str, str]:
    """The environment ``pid`` was started with."""
    try:
        raw = (proc / str(pid) / "environ").read_bytes()
    except PermissionError:
        raise NetmirrorError(
            f"cannot read the environment of process {pid}: permission denied "
            "(the agent needs the same user as the target, or CAP_SYS_PTRACE)"
        ) from None
    except OSError as exc:
        raise NetmirrorError(
            f"cannot read the environment of process {pid}: {exc.strerror or exc}"
        ) from None
    return parse_environ(raw)


def resolver_dirs(netns: Path | None, target_pid: int | None) -> list[Path]:
    """Where the target's ``resolv.conf`` and ``hosts`` are, most specific first."""
    if netns is not None and netns.parent == NETNS_DIR:
        return [Path("/etc/netns") / netns.name, Path("/etc")]
    if target_pid is not None:
        return [Path(f"/proc/{target_pid}/root/etc"), Path("/etc")]
    return [Path("/etc")]
