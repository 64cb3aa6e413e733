"""The TCP ports a local command (and its children) listens on.

``netmirror exec`` with no ``--steal``/``--mirror`` applies its incoming mode to the
target's ports with the numbers the command listens on, as they come and go. The
command's processes are those of its cgroup (when outgoing traffic has one), else
the descendants of the ``netmirror exec`` process; their listening sockets are
matched, by inode, with the kernel's socket tables of this network namespace.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from netmirror.net.procnet import parse_listeners

__all__ = ["descendants", "listening_ports", "parse_listeners"]


def _socket_inodes(pids: Iterable[int]) -> set[int]:
    inodes: set[int] = set()
    for pid in pids:
        fds = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fds)
        except OSError:
            continue  # gone, or not ours to read
        for name in names:
            try:
                link = os.readlink(f"{fds}/{name}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def listening_ports(pids: Iterable[int], proc_net: Path = Path("/proc/net")) -> set[int]:
    """The TCP ports (IPv4 and IPv6) that any of ``pids`` listens on."""
    inodes = _socket_inodes(pids)
    if not inodes:
        return set()
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            text = (proc_net / table).read_text()
        except OSError:
            continue
        ports.update(port for inode, port in parse_listeners(text).items() if inode in inodes)
    return ports


def descendants(root: int) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ')'.
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry))
    found = {root}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
