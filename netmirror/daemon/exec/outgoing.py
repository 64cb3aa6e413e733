"""The local side of ``netmirror exec``: the command's outgoing TCP and DNS, sent to the target.

The command runs in a cgroup of its own (:class:`Cgroup`); rules of
:mod:`netmirror.netfilter.outgoing` redirect that cgroup's TCP to
:class:`OutgoingBridge` listeners and its DNS queries to :class:`DnsServer`,
both in the daemon. Each TCP connection becomes a stream the agent connects
from the target's namespace; each DNS question is resolved by the agent with the
target's resolver configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from netmirror.config import OutgoingConfig
from netmirror.daemon.exec import dns
from netmirror.daemon.exec.proxy import MAX_GREETING, parse_greeting
from netmirror.errors import NetmirrorError
from netmirror.net.sockets import has_ipv6, original_destination
from netmirror.netfilter import Guard, detect_backend
from netmirror.netfilter.cgroup import Cgroup, cgroup2_root
from netmirror.netfilter.outgoing import OutgoingNat, OutgoingRules
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
        self._ask = ask
        self._spawn = spawn
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
        self._spawn(self._answer(parsed, addr))

    async def _answer(self, query: dns.Query, addr: Any) -> None:
        try:
            result = await asyncio.wait_for(
                self._ask("resolve", {"name": query.name, "type": query.rdtype}), DNS_TIMEOUT
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
    ) -> None:
        self.session = session
        self.config = config
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
        self._firewall: OutgoingNat | None = None
        self._guard: Guard | None = None

    async def start(self) -> None:
        """Transparent: the cgroup, listeners, rules and guard. Proxy: one listener."""
        if self.method == "proxy":
            await self._start_proxy()
            return
        loop = asyncio.get_running_loop()
        self.cgroup = Cgroup.for_session(self.session)
        self.cgroup.create()
        tcp_port = 0
        dns_port = 0
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
        rules = OutgoingRules(
            cgroup=self.cgroup.relative,
            tcp_port=tcp_port,
            dns_port=dns_port if self.config.dns else None,
            include=tuple(self.config.include),
            exclude=tuple(self.config.exclude),
        )
        await asyncio.to_thread(self._install, rules)

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
        firewall = OutgoingNat(self.session, backend=backend, cgroup=rules.cgroup)
        firewall.teardown()  # of an earlier daemon of this session that was killed
        self._guard = Guard.start(self.session, backend, kind="outgoing")
        self._firewall = firewall
        firewall.apply(firewall.plan_for(rules))
        log.info(
            "outgoing TCP of cgroup %s -> 127.0.0.1:%d, DNS -> %s",
            rules.cgroup,
            rules.tcp_port,
            rules.dns_port or "unchanged",
        )

    def status(self) -> OutgoingStatus:
        """The command's connections and DNS queries so far."""
        return OutgoingStatus(
            **dataclasses.asdict(self.stats),
            method=self.method,
            cgroup=str(self.cgroup.path) if self.cgroup is not None else None,
            dns_queries=sum(p.queries for _, p in self._dns),
            dns_failures=sum(p.failures for _, p in self._dns),
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
        for server in self._servers:
            server.close()
        for transport, _ in self._dns:
            transport.close()
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.remove)
