"""``netmirror exec``: which of the target's files its command sees at their own paths.

The daemon has mounted the target's root; here its volumes, its ``/etc/hosts``,
``resolv.conf`` and ``hostname`` and the user's ``files.read_only`` and
``files.read_write`` paths (globs matched in the target) become a
:class:`~netmirror.mounts.plan.Plan` for the command's mount namespace.
"""

from __future__ import annotations

import glob
import os
import stat
from typing import Any

from netmirror.mounts import table
from netmirror.mounts.plan import Cover, Kind, LocalView, Plan, plan
from netmirror.wire.files import STANDARD_PATHS

_GLOB_CHARS = frozenset("*?[")


def _kind(path: str) -> Kind | None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        # A symbolic link that leads nowhere is something: nothing is made through it.
        return "other" if os.path.islink(path) else None
    return "dir" if stat.S_ISDIR(mode) else "file"


LOCAL = LocalView(realpath=os.path.realpath, kind=_kind)


def expand(root: str, pattern: str) -> list[str]:
    """The target's paths a pattern names (``/a/**`` is the tree ``/a``)."""
    if pattern.endswith("/**"):
        pattern = pattern[:-3]
    pattern = pattern.rstrip("/") or "/"
    if not _GLOB_CHARS & set(pattern):
        return [pattern]
    found = glob.glob(glob.escape(root) + pattern, recursive=True)
    return sorted(path[len(root) :] or "/" for path in found)


def command_plan(info: dict[str, Any]) -> tuple[Plan, list[str]]:
    """The mounts of the command's namespace, and warnings for paths left out."""
    root = str(info["root"])
    warnings: list[str] = []
    wanted: list[tuple[str, bool]] = [(p, False) for p in info.get("volumes", [])]
    wanted += [(p, False) for p in STANDARD_PATHS]
    for key in ("read_only", "read_write"):
        for pattern in info.get(key, []):
            paths = expand(root, pattern)
            if not paths:
                warnings.append(f"{pattern} matches nothing in the target")
            wanted += [(p, True) for p in paths]
    remote: list[tuple[str, Kind]] = []
    for path, named in wanted:
        if path == "/" or path.startswith(("/proc/", "/sys/", "/dev/")):
            continue
        if table.is_under(root, path):
            # Over the mount of the target's root itself (the target's /run, say):
            # $NETMIRROR_ROOT would be hidden. What is below it is placed still.
            if named:
                warnings.append(f"{path} holds netmirror's own mount: left out")
            continue
        kind = _kind(root + path)
        if kind is None or kind == "other":
            if named:
                warnings.append(f"{path} is not in the target (or cannot be read there)")
            continue
        remote.append((path, kind))
    local: list[str] = []
    for pattern in info.get("local", []):
        local += [p for p in expand("", pattern) if p != "/"]
    result = plan(remote, fuse_root=root, local=LOCAL, mounts=table.read(), keep_local=local)
    here = {os.path.realpath(p) for p in (os.getcwd(), os.path.expanduser("~"))}
    for step in result.steps:
        if isinstance(step, Cover) and step.point in here:
            # What was there stays this machine's (bound back), but a new entry made
            # right in this directory lives in the command's namespace only.
            warnings.append(
                f"new files made right in {step.point} (it holds the target's "
                f"{', '.join(p for p in result.placed if table.is_under(p, step.point))}) "
                "last only as long as the command"
            )
    return result, warnings + result.warnings
