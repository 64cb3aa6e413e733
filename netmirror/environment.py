"""The environment of a ``netmirror exec`` command: the target's, filtered, over the local one.

The command starts from the local environment. Each variable of the target whose
name matches one of :attr:`EnvConfig.include <netmirror.config.EnvConfig.include>`
and none of :attr:`EnvConfig.exclude <netmirror.config.EnvConfig.exclude>` (shell
globs, case-sensitive) replaces or adds to it; :attr:`EnvConfig.override
<netmirror.config.EnvConfig.override>` is applied last and always wins. Variables
of the target that are not taken keep their local value, or stay unset.

Everything here is pure: reading ``/proc/PID/environ`` is the caller's business.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from netmirror.config import EnvConfig

__all__ = ["describe_merge", "merge_environment", "parse_environ"]


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


def _taken(name: str, cfg: EnvConfig) -> bool:
    """Whether the target's variable ``name`` is given to the command."""
    return any(fnmatchcase(name, pattern) for pattern in cfg.include) and not any(
        fnmatchcase(name, pattern) for pattern in cfg.exclude
    )


def merge_environment(
    local: Mapping[str, str], remote: Mapping[str, str], cfg: EnvConfig
) -> dict[str, str]:
    """The environment of the command: ``local``, updated from ``remote``, then ``cfg.override``.

    A variable of ``remote`` is taken when its name matches an include pattern and
    no exclude pattern; the others leave ``local`` as it is. Neither mapping is
    changed; the result is a new dict.
    """
    merged = dict(local)
    merged.update((name, value) for name, value in remote.items() if _taken(name, cfg))
    merged.update(cfg.override)
    return merged


def describe_merge(
    local: Mapping[str, str], remote: Mapping[str, str], cfg: EnvConfig
) -> dict[str, list[str]]:
    """What :func:`merge_environment` does with each name, for a progress message.

    Returns sorted names under three keys, each name under exactly one:

    - ``"taken"``: variables of the target given to the command;
    - ``"kept_local"``: variables of the target not given to it (excluded, or not
      included), which keep their local value or stay unset;
    - ``"overridden"``: the names of ``cfg.override``, whatever the target has.

    ``local`` does not change the answer; it is accepted so the call mirrors
    :func:`merge_environment`.
    """
    overridden = set(cfg.override)
    taken: list[str] = []
    kept_local: list[str] = []
    for name in remote:
        if name in overridden:
            continue
        (taken if _taken(name, cfg) else kept_local).append(name)
    return {
        "taken": sorted(taken),
        "kept_local": sorted(kept_local),
        "overridden": sorted(overridden),
    }
