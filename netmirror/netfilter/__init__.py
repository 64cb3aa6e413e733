"""The packet filter: iptables nat rules for steal and exec, and the guard that removes them.

See :mod:`netmirror.netfilter.iptables` for the rules and :mod:`netmirror.netfilter.guard`
for the process that tears them down when the agent dies;
:mod:`netmirror.netfilter.outgoing` redirects an exec command's connections and
:mod:`netmirror.netfilter.cgroup` is the cgroup those rules match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from netmirror.netfilter.iptables import (
    AGENT_MARK,
    CHAIN_PREFIX,
    Backend,
    IptablesNat,
    NatPlan,
    Redirect,
    chain_name,
    clear_stale,
    detect_backend,
    list_sessions,
    parse_sessions,
    render_chain,
    router_session,
    tables_in_use,
    validate_session,
)

__all__ = [
    "AGENT_MARK",
    "CHAIN_PREFIX",
    "Backend",
    "Guard",
    "IptablesNat",
    "NatPlan",
    "Redirect",
    "chain_name",
    "clear_stale",
    "detect_backend",
    "list_sessions",
    "parse_sessions",
    "render_chain",
    "router_session",
    "session_alive",
    "tables_in_use",
    "validate_session",
]

if TYPE_CHECKING:
    from netmirror.netfilter.guard import Guard, session_alive


def __getattr__(name: str) -> Any:
    # The guard module is imported on first use only: `python -m netmirror.netfilter.guard`
    # imports this package first, and finding the module already imported there makes
    # runpy print a RuntimeWarning on the guard's stderr, which is read as its error line.
    if name in ("Guard", "session_alive"):
        from netmirror.netfilter import guard

        return getattr(guard, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
