"""Mount tables (``/proc/PID/mountinfo``), parsed."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of a mount table."""

    mount_id: int
    parent_id: int
    device: str
    """``major:minor`` of the file system."""
    root: str
    """The directory of the file system that is mounted (``/`` for a whole one)."""
    point: str
    fstype: str
    source: str


_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(text: str) -> str:
    """A path of a mount table: spaces, tabs, newlines and backslashes are octal there."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse(mountinfo: str) -> list[Mount]:
    """The mounts of a ``mountinfo`` text, in its order (parents before children)."""
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 7 or "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        try:
            mount_id, parent_id = int(fields[0]), int(fields[1])
        except ValueError:
            continue
        fstype = fields[dash + 1] if len(fields) > dash + 1 else ""
        source = unescape(fields[dash + 2]) if len(fields) > dash + 2 else ""
        mounts.append(
            Mount(
                mount_id,
                parent_id,
                fields[2],
                unescape(fields[3]),
                unescape(fields[4]),
                fstype,
                source,
            )
        )
    return mounts


def read(pid: int | str = "self") -> list[Mount]:
    """The mount table of process ``pid``."""
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        return parse(fh.read())


def is_under(path: str, parent: str) -> bool:
    """Whether ``path`` is ``parent`` or inside it."""
    return parent == "/" or path == parent or path.startswith(parent.rstrip("/") + "/")


def mounts_under(mounts: list[Mount], path: str) -> list[Mount]:
    """The mounts strictly below ``path`` that are not below another of them (the
    ones to attach again when ``path`` is covered; each brings its own children)."""
    below = [m for m in mounts if m.point != path and is_under(m.point, path)]
    top: list[Mount] = []
    for mount in sorted(below, key=lambda m: m.point.count("/")):
        if not any(is_under(mount.point, t.point) for t in top):
            top.append(mount)
    # A point mounted twice: the last mount is the one seen.
    seen: dict[str, Mount] = {}
    for mount in below:
        if mount.point in {t.point for t in top}:
            seen[mount.point] = mount
    return [seen[t.point] for t in top]
