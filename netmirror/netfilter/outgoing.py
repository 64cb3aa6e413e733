"""Send one process tree's outgoing TCP, UDP and DNS to the daemon, on this machine.

``netmirror exec`` runs the command in a cgroup (v2) of its own, and every socket
created there carries the session's mark (:mod:`netmirror.netfilter.sockmark`).
Three chains per session, in both families, touch only that cgroup's packets:

``NMOUT-<session>`` (``nat``, from ``OUTPUT`` for the cgroup, ``-m cgroup --path``):

* DNS (UDP and TCP port 53) goes to the daemon's DNS listeners, whatever the
  nameserver (the local resolver may well be on loopback);
* TCP to loopback returns (the command's local traffic stays local), so does TCP
  to the excluded networks;
* TCP to the included networks is redirected to the daemon's listener, which reads
  the original destination with ``SO_ORIGINAL_DST``.

``NMUDP-<session>`` (``mangle``, from ``PREROUTING`` on ``lo`` for the mark): the
command's other UDP, routed onto ``lo`` by the session's routes
(:mod:`netmirror.netfilter.routing`), is handed with ``TPROXY`` to the daemon's
transparent UDP socket, which learns each datagram's destination and answers
from it.

``NMREP-<session>`` (``mangle``, from ``OUTPUT`` for the cgroup): packets that
answer connections made *to* the command (a client on the LAN) lose the mark, so
they are routed as before instead of into the session's table.

Everything is removed by :meth:`OutgoingFirewall.teardown`, and by a guard process
(:mod:`netmirror.netfilter.guard`, kind ``outgoing``) if the daemon dies first.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

from netmirror.errors import FirewallError
from netmirror.netfilter.iptables import Backend, IptablesNat, NatPlan, validate_session
from netmirror.netfilter.routing import SessionRoutes

log = logging.getLogger(__name__)

__all__ = [
    "OUTGOING_PREFIX",
    "OutgoingFirewall",
    "OutgoingNat",
    "OutgoingRules",
    "outgoing_chain",
    "render_outgoing",
]

#: Chains of outgoing rules start with this (not the steal prefix: never cleared as stale
#: steal chains, and never mistaken for a stolen port).
OUTGOING_PREFIX = "NMOUT-"
#: The chain handing the command's UDP to the daemon (mangle PREROUTING).
UDP_PREFIX = "NMUDP-"
#: The chain taking the mark off answers to connections made to the command (mangle OUTPUT).
REPLY_PREFIX = "NMREP-"

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
    dns_tcp_port: int | None = None
    """The daemon's DNS-over-TCP listener, or None."""
    udp_port: int | None = None
    """The daemon's transparent UDP socket (TPROXY), or None to leave UDP alone."""
    mark: int = 0
    """The mark of the cgroup's sockets (0: no routes, no UDP)."""
    ipv6: bool = True
    """This machine has IPv6 (loopback): routes and UDP for IPv6 too."""

    def __post_init__(self) -> None:
        if not self.cgroup.startswith("/") or any(c in self.cgroup for c in "\"'\n\\ "):
            raise ValueError(f"cgroup path {self.cgroup!r} must be absolute and plain")
        for port in (self.tcp_port, self.dns_port, self.dns_tcp_port, self.udp_port):
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
    if rules.dns_tcp_port is not None:
        lines.append(
            f"-A {chain} -p tcp -m tcp --dport 53 {comment}"
            f" -j REDIRECT --to-ports {rules.dns_tcp_port}"
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


def render_udp(session: str, rules: OutgoingRules, family: int) -> str:
    """``iptables-restore`` input for the mangle chain that TPROXYs the command's UDP. Pure."""
    chain = UDP_PREFIX + validate_session(session)
    comment = f'-m comment --comment "netmirror exec session={session}"'
    lines = ["*mangle", f":{chain} - [0:0]"]
    if rules.udp_port is not None:
        for net in [_LOOPBACK[family], *_networks(rules.exclude, family)]:
            lines.append(f"-A {chain} -d {net} -j RETURN")
        on_ip = "127.0.0.1" if family == 4 else "::1"
        for net in _networks(rules.include, family):
            lines.append(
                f"-A {chain} -p udp -d {net} {comment}"
                f" -j TPROXY --on-ip {on_ip} --on-port {rules.udp_port}"
            )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_replies(session: str, family: int) -> str:
    """The mangle chain that unmarks answers to connections made to the command. Pure."""
    chain = REPLY_PREFIX + validate_session(session)
    return (
        f"*mangle\n:{chain} - [0:0]\n"
        f"-A {chain} -m conntrack --ctdir REPLY -j MARK --set-mark 0\n"
        "COMMIT\n"
    )


class _MangleChain(IptablesNat):
    """One mangle chain of an exec session; the hook is given, the content rendered."""

    TABLE = "mangle"

    def __init__(
        self, session: str, prefix: str, *, backend: Backend, hook: tuple[str, tuple[str, ...]]
    ) -> None:
        super().__init__(session, backend=backend)
        self._chain = prefix + validate_session(session)
        self._hook = hook

    def _hook_rules(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        if not self._hook[1]:
            raise FirewallError("no hook match given: these rules can only be torn down")
        return (self._hook,)

    def plan_text(self, texts: dict[int, str]) -> NatPlan:
        return NatPlan(
            session=self.session, chain=self._chain, redirects=(), texts=MappingProxyType(texts)
        )


class OutgoingFirewall:
    """All of an exec session's rules and routes, applied together, torn down together."""

    def __init__(self, session: str, *, backend: Backend, cgroup: str = "", mark: int = 0) -> None:
        self.session = session
        self.nat = OutgoingNat(session, backend=backend, cgroup=cgroup)
        mark_match: tuple[str, ...] = (
            ("-i", "lo", "-m", "mark", "--mark", f"{mark:#x}") if mark else ()
        )
        # On the mark, not the cgroup: a SYN-ACK belongs to no full socket, so the
        # cgroup match misses it, and it is what must not be routed into lo.
        reply_match: tuple[str, ...] = ("-m", "mark", "--mark", f"{mark:#x}") if mark else ()
        self.udp = _MangleChain(
            session, UDP_PREFIX, backend=backend, hook=("PREROUTING", mark_match)
        )
        self.replies = _MangleChain(
            session, REPLY_PREFIX, backend=backend, hook=("OUTPUT", reply_match)
        )
        self.routes = SessionRoutes(session)
        #: Whether the command's UDP goes to the daemon's relay (after :meth:`apply`).
        self.udp_active = False

    def apply(self, rules: OutgoingRules) -> list[str]:
        """Chains first (each replaced atomically), then the routes that lead into them.

        Only the nat chain is required. What the routes and UDP need (BPF, TPROXY,
        policy routing, IPv6) may be missing here: then that part is left out, and
        the returned lines say what the command loses.
        """
        from netmirror.netfilter.routing import plan_routes

        self.nat.apply(self.nat.plan_for(rules))
        if not rules.mark:
            return []
        warnings: list[str] = []
        families = tuple(
            f for f in self.nat.families if f == 4 or (rules.ipv6 and self.nat._family_usable(f))
        )
        udp = rules.udp_port is not None
        no_routes = (
            "the command reaches only addresses this machine has a route to, and its UDP "
            "other than DNS stays here"
        )
        try:
            # Without it, answers to connections made to the command would be routed
            # into lo: no routes then.
            self.replies.apply(
                self.replies.plan_text({f: render_replies(self.session, f) for f in families})
            )
        except FirewallError as exc:
            self._quietly(self.replies)
            warnings.append(f"{exc}: {no_routes}")
            self.udp_active = False
            return warnings
        if udp:
            try:
                self.udp.apply(
                    self.udp.plan_text({f: render_udp(self.session, rules, f) for f in families})
                )
            except FirewallError as exc:
                warnings.append(f"{exc}: the command's UDP other than DNS stays on this machine")
                udp = False
                self._quietly(self.udp)
        try:
            self.routes.apply(
                plan_routes(
                    self.session,
                    include=rules.include,
                    exclude=rules.exclude,
                    udp=udp,
                    dns=rules.dns_port is not None,
                    families=families,
                )
            )
        except FirewallError as exc:
            for part in (self.routes, self.udp, self.replies):
                self._quietly(part)
            udp = False
            warnings.append(f"{exc}: {no_routes}")
        self.udp_active = udp
        return warnings

    @staticmethod
    def _quietly(part: IptablesNat | SessionRoutes) -> None:
        """Take back a part that could not be applied; the guard retries what stays."""
        try:
            part.teardown()
        except FirewallError as exc:
            log.warning("%s", exc)

    def teardown(self) -> None:
        """Routes first (nothing is led into the chains any more), then every chain."""
        errors: list[str] = []
        for part in (self.routes, self.udp, self.replies, self.nat):
            try:
                part.teardown()
            except FirewallError as exc:
                errors.append(str(exc))
        if errors:
            raise FirewallError("; ".join(errors))


def sharing_mark(session: str, backend: Backend) -> list[str]:
    """Other exec sessions running here whose routing mark is ``session``'s (rare: 12 bits)."""
    from netmirror.netfilter.guard import session_alive
    from netmirror.netfilter.iptables import _parse_save, _save
    from netmirror.netfilter.routing import session_mark

    mark = session_mark(session)
    found: set[str] = set()
    for family in (4, 6):
        nat = _parse_save(_save(backend, family) or "").get("nat")
        if nat is None:
            continue
        for chain in nat.chains:
            other = chain[len(OUTGOING_PREFIX) :]
            if chain.startswith(OUTGOING_PREFIX) and other != session:
                if session_mark(other) == mark:
                    found.add(other)
    return sorted(s for s in found if session_alive(s, kind="outgoing"))
