"""The interface the agent uses to steal ports, whatever packet filter implements it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    # Only for annotations: the implementation module must not be imported by its interface.
    from netmirror.firewall.iptables import NatPlan, Redirect

__all__ = ["Firewall"]


class Firewall(Protocol):
    """Redirect rules of one session in the current network namespace."""

    def plan(self, redirects: Iterable[Redirect]) -> NatPlan:
        """Compute the rules for ``redirects`` without touching the system."""
        ...

    def apply(self, plan: NatPlan) -> None:
        """Make the installed rules match ``plan``; raise FirewallError on failure."""
        ...

    def teardown(self) -> None:
        """Remove every rule of the session; idempotent, absent rules are not errors."""
        ...
