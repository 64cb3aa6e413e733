"""The environment of a ``netmirror exec`` command: the target's, filtered, over the local one.

The command starts from the local environment. Each variable of the target whose
name matches one of :attr:`EnvConfig.include <netmirror.config.EnvConfig.include>`
and none of :attr:`EnvConfig.exclude <netmirror.config.EnvConfig.exclude>` (shell
globs, case-sensitive) replaces or adds to it; :attr:`EnvConfig.override
<netmirror.config.EnvConfig.override>` is applied last and always wins. Variables
of the target that are not taken keep their local value, or stay unset.

Pure: the agent reads the target's variables (:mod:`netmirror.agent.target_process`).
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from netmirror.config import EnvConfig

__all__ = ["merge_environment"]


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
