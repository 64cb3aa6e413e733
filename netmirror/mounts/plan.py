"""Which mounts put the target's files at their own paths for one command (no I/O).

The command runs in a mount namespace of its own. There, each of the target's
paths (a volume, ``/etc/hosts``, a path the user named) is bind-mounted from the
FUSE mount of the target's root onto the same path. A path this machine does not
have needs its missing directories made, and they must not reach this machine's
disk: the nearest directory that exists is covered with an overlay whose upper
layer is a tmpfs of the namespace, the mounts below it are attached again, and the
missing directories are made in the overlay. When that directory is ``/``, the
command is chrooted into a new root on that tmpfs, with this machine's top-level
entries bound back into it (an overlay of ``/`` would slow every local file down).

:func:`plan` turns the paths into :class:`Step` values; :mod:`.namespace` makes them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from netmirror.mounts.table import Mount, is_under, mounts_under

Kind = Literal["dir", "file"]


@dataclass(frozen=True, slots=True)
class Overlay:
    """Cover ``point`` with an overlay of itself (upper layer in the namespace's tmpfs).

    For ``/``, the command gets a new root instead: a tmpfs holding this machine's
    top-level entries bound back, so nothing local goes through an overlay.
    """

    point: str
    reattach: tuple[str, ...]
    """Mount points below ``point`` to attach again on top of the overlay."""


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


Step = Overlay | MakeDir | MakeFile | Bind | KeepLocal


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    placed: list[str] = field(default_factory=list)
    """The target's paths the command will see at their own place."""

    @property
    def chroot(self) -> bool:
        """Whether the command runs in a new root (an overlay of ``/``)."""
        return any(isinstance(s, Overlay) and s.point == "/" for s in self.steps)


@dataclass(frozen=True, slots=True)
class LocalView:
    """What the plan needs to know of this machine's files (I/O injected)."""

    realpath: Callable[[str], str]
    kind: Callable[[str], Kind | None]
    """"dir", "file" (anything else that is not a directory), or None when missing."""


def _mount_of(mounts: list[Mount], path: str) -> str:
    best = "/"
    for mount in mounts:
        if is_under(path, mount.point) and len(mount.point) >= len(best):
            best = mount.point
    return best


def _existing(path: str, local: LocalView) -> tuple[str, list[str]]:
    """The nearest existing directory at or above ``path`` (resolved) and what is missing."""
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
    mounts: list[Mount],
    keep_local: Iterable[str] = (),
) -> Plan:
    """The steps that show each ``(path, kind)`` of the target at its own path."""
    result = Plan()
    overlays: list[str] = []
    bound: list[str] = []
    for path, kind in sorted(set(remote), key=lambda item: (item[0].count("/"), item[0])):
        if any(is_under(path, b) for b in bound):
            continue  # already visible inside a remote tree mounted above it
        here = local.kind(path)
        if here is not None:
            if here != kind:
                result.warnings.append(
                    f"{path} is a {kind} in the target but a {here} here: left as it is"
                )
                continue
            target = local.realpath(path)
        else:
            parent, missing = _existing(path, local)
            if local.kind(parent) != "dir":
                result.warnings.append(f"{path}: {parent} is not a directory here: left out")
                continue
            # An overlay makes new entries in its upper layer anywhere below its point
            # on the same mount (any other mount would take them on this machine's
            # disk); the new root only holds new entries of / itself.
            covering = [
                o
                for o in overlays
                if (parent == "/" if o == "/" else is_under(parent, o))
                and _mount_of(mounts, parent) == _mount_of(mounts, o)
            ]
            if not covering:
                reattach = tuple(m.point for m in mounts_under(mounts, parent))
                result.steps.append(Overlay(parent, reattach))
                overlays.append(parent)
            current = parent
            for index, name in enumerate(missing):
                current = posixpath.join(current, name)
                last = index == len(missing) - 1
                result.steps.append(
                    MakeFile(current) if last and kind == "file" else MakeDir(current)
                )
            target = current
        result.steps.append(Bind(fuse_root.rstrip("/") + path, target))
        result.placed.append(path)
        bound.append(path)
    # Every overlay before anything else, outer ones first: an overlay made after a
    # bind below its point would hide that bind.
    covers = sorted(
        (s for s in result.steps if isinstance(s, Overlay)), key=lambda s: s.point.count("/")
    )
    if "/" in [s.point for s in covers]:
        covers.sort(key=lambda s: s.point != "/")
    made = [s for s in result.steps if isinstance(s, (MakeDir, MakeFile))]
    binds = [s for s in result.steps if isinstance(s, Bind)]
    result.steps = [*covers, *made, *binds]
    for path in keep_local:
        if not any(is_under(path, b) for b in bound):
            continue  # not covered by anything remote: it is this machine's already
        if local.kind(path) is None:
            result.warnings.append(f"{path} (local) does not exist on this machine: left out")
            continue
        result.steps.append(KeepLocal(path))
    return result
