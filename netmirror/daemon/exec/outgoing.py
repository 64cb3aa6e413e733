"""The local side of ``netmirror exec``: the command's outgoing TCP, UDP and DNS, via the target.

The command runs in a cgroup of its own (:class:`Cgroup`) whose sockets carry the
session's mark; rules of :mod:`netmirror.netfilter.outgoing` and routes of
:mod:`netmirror.netfilter.routing` send that cgroup's TCP to
:class:`OutgoingBridge` listeners, its UDP to the :class:`UdpRelay` and its DNS
queries (UDP and TCP) to :class:`DnsServer` and :class:`DnsTcpServer`, all in the
daemon. Each TCP connection becomes a stream the agent connects from the
target's namespace; each UDP socket an association the agent sends from; each
DNS question is resolved by the agent with the target's resolver configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from netmirror.config import OutgoingConfig
from netmirror.daemon.exec import dns
from netmirror.daemon.exec.proxy import MAX_GREETING, parse_greeting
from netmirror.daemon.exec.udp import UdpRelay
from netmirror.errors import FirewallError, NetmirrorError
from netmirror.net.sockets import has_ipv6, original_destination
from netmirror.netfilter import Guard, detect_backend
from netmirror.netfilter.cgroup import Cgroup, cgroup2_root
from netmirror.netfilter.outgoing import OutgoingFirewall, OutgoingRules, sharing_mark
from netmirror.netfilter.routing import session_mark
from netmirror.netfilter.sockmark import attach_socket_mark
from netmirror.tunnel import OpeningBridge, Tunnel
from netmirror.wire.dns import Answer
from netmirror.wire.kinds import StreamKind, stream_info
from netmirror.wire.stats import OutgoingStatus, PortStats

log = logging.getLogger(__name__)

#: Seconds a DNS question may wait for the agent before the client gets SERVFAIL.
DNS_TIMEOUT = 5.0

# --- TCP ------------------------------------------------------------------------------


class OutgoingBridge(OpeningBridge):
    """A connection of the command, redirected here: becomes a stream the agent connects."""

    def __init__(self, tunnel_of: Callable[[], Tunnel | None], stats: PortStats) -> None:
        self._tunnel_of = tunnel_of
        self.stats = stats
        self._greeting: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        dst = original_destination(transport.get_extra_info("socket"))
        if dst is None:
            self.refuse(transport)  # not redirected: someone connected to us directly
            return
        self._open(transport, dst)

    def _open(self, transport: asyncio.Transport, dst: tuple[str, int]) -> None:
        """Open the stream the agent connects to ``dst``."""
        tunnel = self._tunnel_of()
        if tunnel is None:
            # No agent right now (the tunnel is reconnecting).
            self.refuse(transport, "no tunnel to the agent: connection reset")
            return
        super().__init__(tunnel, self.stats, inbound=False)
        self.open_stream(tunnel, transport, port=0, dst=dst, info=stream_info(StreamKind.CONNECT))


class ForwardBridge(OutgoingBridge):
    """A connection to a forwarded local port: a stream the agent connects to ``dst``."""

    def __init__(
        self, tunnel_of: Callable[[], Tunnel | None], stats: PortStats, dst: tuple[str, int]
    ) -> None:
        super().__init__(tunnel_of, stats)
        self._dst = dst

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._open(cast(asyncio.Transport, transport), self._dst)


# --- proxy (where transparent redirection is impossible) ----------------------------


class ProxyBridge(OutgoingBridge):
    """A proxy client's connection: its destination comes from its first bytes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._greeting = b""

    def data_received(self, data: bytes) -> None:
        if self._greeting is None:
            super().data_received(data)
            return
        self._greeting += data
        parsed = parse_greeting(self._greeting)
        if parsed is None:
            if len(self._greeting) > MAX_GREETING:
                parsed = "proxy greeting too large"
            else:
                return
        if isinstance(parsed, str):
            log.info("proxy client refused: %s", parsed)
            self._refused = True
            self._greeting = None
            self.stats.error(parsed)
            self._transport.close()
            return
        dst, reply, rest = parsed
        self._greeting = None
        if reply:
            self._transport.write(reply)
        self._open(self._transport, dst)
        if rest and not self._refused:
            super().data_received(rest)

    def eof_received(self) -> bool:
        if self._greeting is not None:
            return False
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._greeting is None:
            super().connection_lost(exc)


# --- DNS ------------------------------------------------------------------------------

Ask = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class DnsServer(asyncio.DatagramProtocol):
    """Answers the command's DNS questions with the target's resolver, via the agent."""

    def __init__(self, ask: Ask, spawn: Callable[[Coroutine[Any, Any, None]], object]) -> None:
        self.ask = ask
        self.spawn = spawn
        self.transport: asyncio.DatagramTransport | None = None
        self.queries = 0
        self.failures = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        parsed = dns.parse_query(data)
        if parsed is None:
            return
        if isinstance(parsed, bytes):
            self._send(parsed, addr)
            return
        self.queries += 1
        self.spawn(self._answer(parsed, addr))

    async def _answer(self, query: dns.Query, addr: Any) -> None:
        try:
            result = await asyncio.wait_for(
                self.ask("resolve", {"name": query.name, "type": query.rdtype}), DNS_TIMEOUT
            )
            answer = Answer.from_json(result)
        except (NetmirrorError, ValueError, TimeoutError) as exc:
            self.failures += 1
            log.info("DNS %s %s: %s", query.rdtype, query.name, exc)
            self._send(dns.servfail(query), addr)
            return
        log.debug("DNS %s %s -> %s %s", query.rdtype, query.name, answer.rcode, answer.records)
        self._send(dns.build_response(query, answer), addr)

    def _send(self, data: bytes, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)


#: Largest DNS message over TCP (its two-byte length prefix).
_TCP_MESSAGE = 65535


class DnsTcpServer(asyncio.Protocol):
    """DNS over TCP (RFC 7766): what a client asks after a truncated answer, or at once.

    Length-prefixed messages, answered as they come (each in its own task, so a
    slow name does not hold the next). A message that is not a query closes the
    connection.
    """

    def __init__(self, udp: DnsServer) -> None:
        self._udp = udp  # shares the asking and the counters
        self._buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if original_destination(self.transport.get_extra_info("socket")) is None:
            self.transport.close()  # not redirected: someone connected to us directly
            self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        self._buf += data
        if len(self._buf) > 2 + _TCP_MESSAGE:
            self.transport.close()
            return
        while len(self._buf) >= 2:
            size = int.from_bytes(self._buf[:2], "big")
            if len(self._buf) < 2 + size:
                return
            message, self._buf = self._buf[2 : 2 + size], self._buf[2 + size :]
            parsed = dns.parse_query(message)
            if parsed is None:
                assert self.transport is not None
                self.transport.close()
                return
            if isinstance(parsed, bytes):
                self._write(parsed)
                continue
            self._udp.queries += 1
            self._udp.spawn(self._answer(parsed))

    async def _answer(self, query: dns.Query) -> None:
        try:
            result = await asyncio.wait_for(
                self._udp.ask("resolve", {"name": query.name, "type": query.rdtype}),
                DNS_TIMEOUT,
            )
            response = dns.build_response(query, Answer.from_json(result), max_size=_TCP_MESSAGE)
        except (NetmirrorError, ValueError, TimeoutError) as exc:
            self._udp.failures += 1
            log.info("DNS over TCP %s %s: %s", query.rdtype, query.name, exc)
            response = dns.servfail(query)
        self._write(response)

    def _write(self, message: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(message).to_bytes(2, "big") + message)


# --- the whole --------------------------------------------------------------------------


class Outgoing:
    """Cgroup, listeners, rules and their guard for one ``netmirror exec`` session."""

    def __init__(
        self,
        session: str,
        config: OutgoingConfig,
        *,
        tunnel_of: Callable[[], Tunnel | None],
        ask: Ask,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
        agent_udp: bool = True,
    ) -> None:
        self.session = session
        self.config = config
        self._agent_udp = agent_udp
        #: What works less well than asked, for the user (one line each).
        self.warnings: list[str] = []
        self.udp: UdpRelay | None = None
        self.mark = 0
        self.stats = PortStats()
        self._tunnel_of = tunnel_of
        self._ask = ask
        self._spawn = spawn
        self.method = config.method
        if self.method == "auto":
            transparent = os.geteuid() == 0 and cgroup2_root() is not None
            self.method = "transparent" if transparent else "proxy"
        self.cgroup: Cgroup | None = None
        self.proxy_env: dict[str, str] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._dns: list[tuple[asyncio.DatagramTransport, DnsServer]] = []
        self._firewall: OutgoingFirewall | None = None
        self._guard: Guard | None = None

    async def start(self) -> None:
        """Transparent: the cgroup, listeners, rules and guard. Proxy: one listener."""
        if self.method == "proxy":
            await self._start_proxy()
            return
        loop = asyncio.get_running_loop()
        self.cgroup = Cgroup.for_session(self.session)
        self.cgroup.create()
        self._mark_sockets()
        tcp_port = 0
        dns_port = 0
        dns_tcp_port = 0
        hosts = ["127.0.0.1"] + (["::1"] if has_ipv6() else [])
        for host in hosts:
            server = await loop.create_server(
                lambda: OutgoingBridge(self._tunnel_of, self.stats), host, tcp_port, backlog=1024
            )
            self._servers.append(server)
            tcp_port = server.sockets[0].getsockname()[1]
            if self.config.dns:
                transport, protocol = await loop.create_datagram_endpoint(
                    lambda: DnsServer(self._ask, self._spawn), local_addr=(host, dns_port)
                )
                self._dns.append((transport, protocol))
                dns_port = transport.get_extra_info("sockname")[1]
                tcp_server = await loop.create_server(
                    functools.partial(DnsTcpServer, protocol), host, dns_tcp_port, backlog=1024
                )
                self._servers.append(tcp_server)
                dns_tcp_port = tcp_server.sockets[0].getsockname()[1]
        udp_port = await self._start_udp(hosts)
        rules = OutgoingRules(
            cgroup=self.cgroup.relative,
            tcp_port=tcp_port,
            dns_port=dns_port if self.config.dns else None,
            dns_tcp_port=dns_tcp_port if self.config.dns else None,
            udp_port=udp_port,
            mark=self.mark,
            ipv6=has_ipv6(),
            include=tuple(self.config.include),
            exclude=tuple(self.config.exclude),
        )
        await asyncio.to_thread(self._install, rules)
        if self.udp is not None and not (self._firewall and self._firewall.udp_active):
            self.udp.stop()  # the rules that would lead UDP to it could not be had
            self.udp = None

    def _mark_sockets(self) -> None:
        """Mark the cgroup's sockets, for the routes that work whatever this host routes."""
        assert self.cgroup is not None
        mark = session_mark(self.session)
        try:
            attach_socket_mark(str(self.cgroup.path), mark)
        except NetmirrorError as exc:
            self.warnings.append(
                f"{exc}: the command reaches only addresses this machine has a route to, "
                "and its UDP other than DNS stays here"
            )
            return
        self.mark = mark

    async def _start_udp(self, hosts: list[str]) -> int | None:
        if not self.config.udp or not self.mark:
            return None
        if not self._agent_udp:
            self.warnings.append(
                "the agent cannot carry UDP (an older image): the command's UDP other "
                "than DNS stays on this machine"
            )
            return None
        self.udp = UdpRelay(self._tunnel_of)
        try:
            return await self.udp.start(hosts)
        except OSError as exc:
            self.warnings.append(
                f"no transparent UDP socket ({exc.strerror or exc}): the command's UDP "
                "other than DNS stays on this machine"
            )
            self.udp.stop()
            self.udp = None
            return None

    async def _start_proxy(self) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: ProxyBridge(self._tunnel_of, self.stats), "127.0.0.1", 0, backlog=1024
        )
        self._servers.append(server)
        port = server.sockets[0].getsockname()[1]
        # socks5h: names are resolved at the proxy's end, i.e. by the target.
        socks = f"socks5h://127.0.0.1:{port}"
        http = f"http://127.0.0.1:{port}"
        no_proxy = ",".join(["localhost", "127.0.0.1", "::1", *self.config.exclude])
        for name, value in (
            ("ALL_PROXY", socks),
            ("HTTP_PROXY", http),
            ("HTTPS_PROXY", http),
            ("NO_PROXY", no_proxy),
        ):
            self.proxy_env[name] = value
            self.proxy_env[name.lower()] = value
        log.info("outgoing through the proxy on 127.0.0.1:%d (%s)", port, socks)

    def _install(self, rules: OutgoingRules) -> None:
        backend = detect_backend()
        firewall = OutgoingFirewall(
            self.session, backend=backend, cgroup=rules.cgroup, mark=rules.mark
        )
        if rules.mark:
            others = sharing_mark(self.session, backend)
            if others:
                raise FirewallError(
                    f"the exec session {others[0]!r} is running, and its routing mark is "
                    f"this session's too; give this one another name (--session)"
                )
        firewall.teardown()  # of an earlier daemon of this session that was killed
        self._guard = Guard.start(self.session, backend, kind="outgoing")
        self._firewall = firewall
        self.warnings += firewall.apply(rules)
        log.info(
            "outgoing TCP of cgroup %s -> 127.0.0.1:%d, UDP -> %s, DNS -> %s, mark %#x",
            rules.cgroup,
            rules.tcp_port,
            rules.udp_port or "unchanged",
            rules.dns_port or "unchanged",
            rules.mark,
        )

    def status(self) -> OutgoingStatus:
        """The command's connections and DNS queries so far."""
        return OutgoingStatus(
            **dataclasses.asdict(self.stats),
            method=self.method,
            cgroup=str(self.cgroup.path) if self.cgroup is not None else None,
            dns_queries=sum(p.queries for _, p in self._dns),
            dns_failures=sum(p.failures for _, p in self._dns),
            routed=bool(self.mark),
            udp_associations=self.udp.associations if self.udp is not None else 0,
            udp_datagrams_out=self.udp.datagrams_out if self.udp is not None else 0,
            udp_datagrams_in=self.udp.datagrams_in if self.udp is not None else 0,
        )

    async def stop(self) -> None:
        """Rules first, then listeners; the command's leftovers are killed by its owner."""
        if self._firewall is not None:
            try:
                await asyncio.to_thread(self._firewall.teardown)
            except NetmirrorError as exc:
                log.error("removing the outgoing rules: %s (the guard retries)", exc)
        if self._guard is not None:
            await asyncio.to_thread(self._guard.close)
        if self.udp is not None:
            self.udp.stop()
        for server in self._servers:
            server.close()
        for transport, _ in self._dns:
            transport.close()
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.remove)
