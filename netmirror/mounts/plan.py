"""Which mounts put the target's files at their own paths for one command (no I/O).

The command runs in a mount namespace of its own. There, each of the target's
paths (a volume, ``/etc/hosts``, a path the user named) is bind-mounted from the
FUSE mount of the target's root onto the same path. A path this machine does not
have needs its missing directories made, and they must not reach this machine's
disk: the nearest directory that exists is *covered* with a tmpfs of the namespace
in which each of its entries is bound back from this machine, so everything that
was there is reached on its own file system (reads and writes as before, at full
speed) and only the new entries live in the tmpfs. When that directory is ``/``,
the covered root is built aside and the command is chrooted into it.

:func:`plan` turns the paths into :class:`Step` values; :mod:`.namespace` makes them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from netmirror.mounts.table import Mount, is_under

Kind = Literal["dir", "file", "other"]
"""What a path is: a directory, a file (anything else but a symbolic link that leads
nowhere), or ``other`` (such a link: nothing may be made or mounted through it)."""


@dataclass(frozen=True, slots=True)
class Cover:
    """Cover the directory ``point`` with a tmpfs holding its entries bound back."""

    point: str


@dataclass(frozen=True, slots=True)
class MakeDir:
    path: str


@dataclass(frozen=True, slots=True)
class MakeFile:
    path: str


@dataclass(frozen=True, slots=True)
class Bind:
    """Bind ``source`` (in the FUSE mount) onto ``target``."""

    source: str
    target: str


@dataclass(frozen=True, slots=True)
class KeepLocal:
    """Put this machine's own ``path`` back on top of a remote tree that covers it."""

    path: str


Step = Cover | MakeDir | MakeFile | Bind | KeepLocal


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    placed: list[str] = field(default_factory=list)
    """The target's paths the command will see at their own place."""

    @property
    def chroot(self) -> bool:
        """Whether the command runs in a new root (a covered ``/``)."""
        return any(isinstance(s, Cover) and s.point == "/" for s in self.steps)


@dataclass(frozen=True, slots=True)
class LocalView:
    """What the plan needs to know of this machine's files (I/O injected)."""

    realpath: Callable[[str], str]
    kind: Callable[[str], Kind | None]
    """What a path is (:data:`Kind`), or None when nothing is there."""


def _existing(path: str, local: LocalView) -> tuple[str, list[str]]:
    """The nearest existing entry at or above ``path`` (resolved) and what is missing."""
    missing: list[str] = []
    current = path
    while current != "/" and local.kind(current) is None:
        current, name = posixpath.split(current)
        missing.insert(0, name)
    return local.realpath(current), missing


def plan(
    remote: Iterable[tuple[str, Kind]],
    *,
    fuse_root: str,
    local: LocalView,
    mounts: list[Mount] | None = None,
    keep_local: Iterable[str] = (),
) -> Plan:
    """The steps that show each ``(path, kind)`` of the target at its own path.

    ``mounts`` (this machine's mount table) is not needed any more: every cover binds
    its entries back with the mounts below them. It is accepted for callers.
    """
    result = Plan()
    covers: list[str] = []
    made: list[Step] = []
    binds: list[Step] = []
    bound: list[str] = []
    for path, kind in sorted(set(remote), key=lambda item: (item[0].count("/"), item[0])):
        if any(is_under(path, b) for b in bound):
            continue  # already visible inside a remote tree mounted above it
        here = local.kind(path)
        if here is not None:
            if here != kind:
                what = "a link that leads nowhere" if here == "other" else f"a {here}"
                result.warnings.append(
                    f"{path} is a {kind} in the target but {what} here: left as it is"
                )
                continue
            target = local.realpath(path)
        else:
            parent, missing = _existing(path, local)
            if local.kind(parent) != "dir":
                result.warnings.append(f"{path}: {parent} is not a directory here: left out")
                continue
            # New entries of parent live in its cover; the first missing one is a
            # directory (or the file) of that tmpfs, and the rest are inside it.
            if parent not in covers:
                covers.append(parent)
            current = parent
            for index, name in enumerate(missing):
                current = posixpath.join(current, name)
                last = index == len(missing) - 1
                step: Step = MakeFile(current) if last and kind == "file" else MakeDir(current)
                if step not in made:
                    made.append(step)
            target = current
        binds.append(Bind(fuse_root.rstrip("/") + path, target))
        result.placed.append(path)
        bound.append(path)
    # Covers first, outer ones before inner ones (an inner one is made inside the outer
    # one's bound-back entry); then the new entries; then the binds.
    ordered = sorted(covers, key=lambda p: (p != "/", p.count("/"), p))
    result.steps = [*(Cover(p) for p in ordered), *made, *binds]
    for path in keep_local:
        if not any(is_under(path, b) for b in bound):
            continue  # not covered by anything remote: it is this machine's already
        if local.kind(path) in (None, "other"):
            result.warnings.append(f"{path} (local) does not exist on this machine: left out")
            continue
        result.steps.append(KeepLocal(path))
    return result
