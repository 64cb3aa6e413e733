"""Routes for the ``netmirror exec`` command alone, whatever routes this machine has.

The outgoing REDIRECT acts after ``connect()`` found a route; to an address this
machine cannot route (no route, a blackhole or unreachable route, IPv6 with no
IPv6 default route) the command's ``connect()`` fails first. So every socket of
the command's cgroup carries a mark (:mod:`netmirror.netfilter.sockmark`), and for
that mark policy-routing rules look a table of the session up first:

* each included network is a ``local`` route on ``lo`` with a loopback source:
  the lookup succeeds, the REDIRECT in nat OUTPUT sends TCP to the daemon, and UDP
  loops through ``lo`` to the daemon's TPROXY socket;
* each excluded network is a ``throw`` route: the lookup goes on to the host's own
  tables, as for any other process;
* loopback and this host's own addresses are found in the ``local`` table, which
  comes before any rule.

The rules match TCP only, and UDP only when it is sent to the target (or only
port 53, for DNS), so nothing else of the command changes. Other processes carry
no mark: the host's routing is theirs unchanged.

A session's mark and table number come from its name (:func:`session_mark`): the
teardown needs nothing else, and a guard can remove them after a crash.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from netmirror.errors import FirewallError

__all__ = ["MARK_BASE", "RoutePlan", "SessionRoutes", "plan_routes", "session_mark"]

log = logging.getLogger(__name__)

#: High bits of every session's mark ("nm"); the low 12 bits come from the session name.
#: Bits 0x4000 and 0x8000 (kube-proxy's masquerade and drop marks) are never set.
MARK_BASE = 0x6E6D0000
#: Priority of the rules: before the main table (32766), after ``local`` (0).
RULE_PRIORITY = 9000

_LOOPBACK_SOURCE = {4: "127.0.0.1", 6: "::1"}
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


def session_mark(session: str) -> int:
    """The socket mark (and routing table number) of ``session``. Pure."""
    return MARK_BASE | (zlib.crc32(session.encode()) & 0x0FFF)


@dataclass(frozen=True)
class Rule:
    """``ip rule add pref P fwmark M ipproto PROTO [dport D] lookup T``."""

    family: int
    ip_proto: int
    dport: int | None = None


@dataclass(frozen=True)
class Route:
    """``ip route add {local NET dev lo src LOOPBACK | throw NET} table T``."""

    family: int
    kind: str  # "local" or "throw"
    network: str


@dataclass(frozen=True)
class RoutePlan:
    mark: int
    rules: tuple[Rule, ...]
    routes: tuple[Route, ...]


def _nets(nets: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(n, strict=False) for n in nets]


def plan_routes(
    session: str,
    *,
    include: Sequence[str],
    exclude: Sequence[str],
    udp: bool,
    dns: bool,
    families: Sequence[int] = (4, 6),
) -> RoutePlan:
    """The rules and routes that give the command's sockets a route. Pure.

    An included network inside an excluded one is left out: the exclusion wins,
    as it does in the REDIRECT chain.
    """
    excluded = _nets(exclude)
    routes: list[Route] = []
    for net in _nets(include):
        if net.version not in families:
            continue
        if any(net.version == ex.version and net.subnet_of(ex) for ex in excluded):  # type: ignore[arg-type]
            continue
        routes.append(Route(net.version, "local", str(net)))
    for ex in excluded:
        if ex.version in families:
            routes.append(Route(ex.version, "throw", str(ex)))
    # Multicast and broadcast (mDNS, SSDP) are this machine's network's, never the target's.
    for family, special in ((4, "224.0.0.0/4"), (4, "255.255.255.255/32"), (6, "ff00::/8")):
        if family in families and Route(family, "throw", special) not in routes:
            routes.append(Route(family, "throw", special))
    rules: list[Rule] = []
    for family in families:
        rules.append(Rule(family, socket.IPPROTO_TCP))
        if udp:
            rules.append(Rule(family, socket.IPPROTO_UDP))
        elif dns:
            rules.append(Rule(family, socket.IPPROTO_UDP, 53))
    return RoutePlan(session_mark(session), tuple(rules), tuple(routes))


class SessionRoutes:
    """The policy-routing rules and table of one session; :meth:`teardown` is idempotent."""

    def __init__(self, session: str) -> None:
        self.session = session
        self.mark = session_mark(session)

    def apply(self, plan: RoutePlan) -> None:
        """Install ``plan`` (after removing whatever this session had)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        if plan.mark != self.mark:
            raise FirewallError(f"route plan for mark {plan.mark:#x} given to {self.session}")
        self.teardown()
        with IPRoute() as ipr:
            try:
                for route in plan.routes:
                    spec: dict[str, Any] = {
                        "family": _FAMILY[route.family],
                        "dst": route.network,
                        "table": self.mark,
                        "type": route.kind,
                    }
                    if route.kind == "local":
                        spec["oif"] = 1  # lo
                        spec["prefsrc"] = _LOOPBACK_SOURCE[route.family]
                        spec["scope"] = 254  # host, as `ip route add local` sets
                    ipr.route("add", **spec)
                for rule in plan.rules:
                    ipr.rule("add", **self._rule_spec(rule))
            except NetlinkError as exc:
                raise FirewallError(
                    f"cannot add the command's routing rules (table {self.mark}): {exc.args[-1]}"
                ) from None

    def _rule_spec(self, rule: Rule) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "family": _FAMILY[rule.family],
            "priority": RULE_PRIORITY,
            "fwmark": self.mark,
            "fwmask": 0xFFFFFFFF,
            "table": self.mark,
            "ip_proto": rule.ip_proto,
        }
        if rule.dport is not None:
            spec["dport_range"] = f"{rule.dport}:{rule.dport}"
        return spec

    def teardown(self) -> None:
        """Remove this session's rules and its table's routes; absent ones are no error."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        errors: list[str] = []
        with IPRoute() as ipr:
            for family in _FAMILY.values():
                try:
                    rules = [
                        r
                        for r in ipr.get_rules(family=family)
                        if r.get_attr("FRA_FWMARK") == self.mark
                        and r.get_attr("FRA_TABLE") == self.mark
                    ]
                    for r in rules:
                        ipr.rule(
                            "del",
                            family=family,
                            priority=r.get_attr("FRA_PRIORITY"),
                            fwmark=self.mark,
                            fwmask=r.get_attr("FRA_FWMASK"),
                            table=self.mark,
                            ip_proto=r.get_attr("FRA_IP_PROTO"),
                            **(
                                {"dport_range": r.get_attr("FRA_DPORT_RANGE")}
                                if r.get_attr("FRA_DPORT_RANGE")
                                else {}
                            ),
                        )
                    routes = ipr.get_routes(family=family, table=self.mark)
                    for route in routes:
                        if route.get_attr("RTA_TABLE") != self.mark:
                            continue
                        ipr.route(
                            "del",
                            family=family,
                            table=self.mark,
                            dst=_dst_of(route),
                            type=route["type"],
                            scope=route["scope"],
                            proto=route["proto"],
                        )
                except NetlinkError as exc:
                    if exc.code not in (2, 3):  # ENOENT, ESRCH: already gone
                        errors.append(str(exc.args[-1]))
        if errors:
            raise FirewallError(
                f"could not remove the command's routing rules (table {self.mark}): "
                + "; ".join(errors)
            )

    def installed(self) -> bool:
        """True if any rule of this session is in place (for checks and tests)."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return any(
                r.get_attr("FRA_FWMARK") == self.mark
                for family in _FAMILY.values()
                for r in ipr.get_rules(family=family)
            )


def _dst_of(route: Any) -> str:
    dst = route.get_attr("RTA_DST")
    family = route["family"]
    if dst is None:
        return "0.0.0.0/0" if family == socket.AF_INET else "::/0"
    return f"{dst}/{route['dst_len']}"
