"""Send one process tree's outgoing TCP and DNS to the daemon, on this machine.

``netmirror exec`` runs the command in a cgroup (v2) of its own. One chain per
session, ``NMOUT-<session>``, in the ``nat`` table of both families, is entered
from ``OUTPUT`` only for sockets of that cgroup (``-m cgroup --path``), so no
other process of the machine is touched. In the chain:

* UDP to port 53 goes to the daemon's DNS listener (whatever the nameserver:
  the local resolver may well be on loopback);
* TCP to loopback returns (the command's local traffic stays local), so does TCP
  to the excluded networks;
* TCP to the included networks is redirected to the daemon's listener, which reads
  the original destination with ``SO_ORIGINAL_DST``.

The rules are removed by :meth:`OutgoingNat.teardown`, and by a guard process
(:mod:`netmirror.netfilter.guard`, kind ``outgoing``) if the daemon dies first.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

from netmirror.errors import FirewallError
from netmirror.netfilter.iptables import Backend, IptablesNat, NatPlan, validate_session

__all__ = ["OUTGOING_PREFIX", "OutgoingNat", "OutgoingRules", "outgoing_chain", "render_outgoing"]

#: Chains of outgoing rules start with this (not the steal prefix: never cleared as stale
#: steal chains, and never mistaken for a stolen port).
OUTGOING_PREFIX = "NMOUT-"

_LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}


def outgoing_chain(session: str) -> str:
    """``NMOUT-<session>``; ValueError for an invalid session name."""
    return OUTGOING_PREFIX + validate_session(session)


@dataclass(frozen=True)
class OutgoingRules:
    """What to redirect, for one cgroup."""

    cgroup: str
    """Path of the cgroup relative to the cgroup v2 root, e.g. ``/netmirror-web``."""
    tcp_port: int
    """The daemon's transparent TCP listener (on 127.0.0.1 and ::1)."""
    dns_port: int | None = None
    """The daemon's DNS listener (UDP), or None to leave DNS alone."""
    include: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.cgroup.startswith("/") or any(c in self.cgroup for c in "\"'\n\\ "):
            raise ValueError(f"cgroup path {self.cgroup!r} must be absolute and plain")
        for port in (self.tcp_port, self.dns_port):
            if port is not None and (type(port) is not int or not 1 <= port <= 65535):
                raise ValueError(f"port {port!r} is not in 1..65535")
        for net in (*self.include, *self.exclude):
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad one


def _networks(nets: Sequence[str], family: int) -> list[str]:
    out = []
    for net in nets:
        network = ipaddress.ip_network(net, strict=False)
        if network.version == family:
            out.append(str(network))
    return out


def render_outgoing(session: str, rules: OutgoingRules, family: int) -> str:
    """``iptables-restore --noflush`` input that (re)defines the session's chain. Pure."""
    chain = outgoing_chain(session)
    comment = f'-m comment --comment "netmirror exec session={session}"'
    lines = ["*nat", f":{chain} - [0:0]"]
    if rules.dns_port is not None:
        lines.append(
            f"-A {chain} -p udp -m udp --dport 53 {comment} -j REDIRECT --to-ports {rules.dns_port}"
        )
    for net in [_LOOPBACK[family], *_networks(rules.exclude, family)]:
        lines.append(f"-A {chain} -p tcp -d {net} -j RETURN")
    for net in _networks(rules.include, family):
        lines.append(
            f"-A {chain} -p tcp -d {net} {comment} -j REDIRECT --to-ports {rules.tcp_port}"
        )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class OutgoingNat(IptablesNat):
    """The outgoing rules of one session in this network namespace.

    Same life as the steal rules: :meth:`plan_for`, :meth:`apply`, and a
    :meth:`teardown` that is idempotent and needs nothing but the session name.
    """

    def __init__(self, session: str, *, backend: Backend, cgroup: str = "") -> None:
        super().__init__(session, backend=backend)
        self._chain = outgoing_chain(session)
        self._cgroup = cgroup

    def _hook_rules(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        if not self._cgroup:
            raise FirewallError("no cgroup given: these rules can only be torn down")
        return (("OUTPUT", ("-m", "cgroup", "--path", self._cgroup)),)

    def plan_for(self, rules: OutgoingRules) -> NatPlan:
        """The chain content for ``rules``; pure."""
        if rules.cgroup != self._cgroup:
            raise FirewallError(f"rules for cgroup {rules.cgroup} given to {self._cgroup}")
        texts = {family: render_outgoing(self.session, rules, family) for family in self.families}
        return NatPlan(
            session=self.session, chain=self._chain, redirects=(), texts=MappingProxyType(texts)
        )
