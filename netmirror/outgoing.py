"""The local side of ``netmirror exec``: the command's outgoing TCP and DNS, sent to the target.

The command runs in a cgroup of its own (:class:`Cgroup`); rules of
:mod:`netmirror.firewall.outgoing` redirect that cgroup's TCP to
:class:`OutgoingBridge` listeners and its DNS queries to :class:`DnsServer`,
both in the daemon. Each TCP connection becomes a stream the agent connects
from the target's namespace; each DNS question is resolved by the agent with the
target's resolver configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from netmirror import dns
from netmirror.config import OutgoingConfig
from netmirror.errors import NetmirrorError, ProtocolError
from netmirror.firewall import Guard, detect_backend
from netmirror.firewall.outgoing import OutgoingNat, OutgoingRules
from netmirror.tunnel import PortStats, StreamBridge, Tunnel, abort_with_reset, original_destination

log = logging.getLogger(__name__)

#: Seconds a DNS question may wait for the agent before the client gets SERVFAIL.
DNS_TIMEOUT = 5.0

CGROUP_PREFIX = "netmirror-"


# --- the command's cgroup ---------------------------------------------------------


def cgroup2_root(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or its ``unified``)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "... mount-point options - fstype source super-options"
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            if len(fields) >= 5:
                return Path(fields[4].replace("\\040", " "))
    return None


class Cgroup:
    """A cgroup v2 group holding the command and all its children."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.path = root / name

    @classmethod
    def for_session(cls, session: str) -> Cgroup:
        root = cgroup2_root()
        if root is None:
            raise NetmirrorError(
                "netmirror exec needs the cgroup v2 hierarchy mounted (e.g. at "
                "/sys/fs/cgroup) to send only the command's traffic to the target; "
                "use --no-outgoing to run without that"
            )
        return cls(root, CGROUP_PREFIX + session)

    @property
    def relative(self) -> str:
        """The path iptables' cgroup match takes: relative to the v2 root."""
        return "/" + str(self.path.relative_to(self.root))

    def create(self) -> None:
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as exc:
            raise NetmirrorError(
                f"cannot create the cgroup {self.path}: {exc.strerror or exc}"
            ) from None

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process left in the group, and wait until it is empty."""
        kill_file = self.path / "cgroup.kill"
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
            else:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                log.warning("processes %s of %s do not die", pids, self.path)
                return
            time.sleep(0.02)

    def remove(self) -> None:
        """Remove the group; processes still in it are killed first."""
        if not self.path.exists():
            return
        self.kill_all()
        try:
            self.path.rmdir()
        except OSError as exc:
            log.warning("cannot remove the cgroup %s: %s", self.path, exc.strerror or exc)


# --- TCP ------------------------------------------------------------------------------


class OutgoingBridge(StreamBridge):
    """A connection of the command, redirected here: becomes a stream the agent connects."""

    def __init__(self, tunnel_of: Callable[[], Tunnel | None], stats: PortStats) -> None:
        self._tunnel_of = tunnel_of
        self._refused = False
        self._stats = stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        tunnel = self._tunnel_of()
        dst = original_destination(transport.get_extra_info("socket"))
        if tunnel is None or dst is None:
            # No agent right now (the tunnel is reconnecting), or not redirected.
            self._refused = True
            if tunnel is None:
                self._stats.error("no tunnel to the agent: connection reset")
            abort_with_reset(transport)
            return
        super().__init__(tunnel, self._stats, inbound=False)
        peer = transport.get_extra_info("peername") or ("", 0)
        try:
            self.stream_id = tunnel.conn.open_stream(
                port=0,
                original_dst=dst,
                client=(str(peer[0]), int(peer[1])),
                info={"kind": "connect"},
            )
        except ProtocolError as exc:
            self._refused = True
            self._stats.error(f"cannot open a stream: {exc}")
            abort_with_reset(transport)
            return
        tunnel.attach(self)
        super().connection_made(transport)
        tunnel.kick()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def eof_received(self) -> bool:
        return False if self._refused else super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._refused:
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
            answer = dns.Answer.from_json(result)
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
        self.cgroup = Cgroup.for_session(session)
        self._servers: list[asyncio.AbstractServer] = []
        self._dns: list[tuple[asyncio.DatagramTransport, DnsServer]] = []
        self._firewall: OutgoingNat | None = None
        self._guard: Guard | None = None

    async def start(self) -> None:
        """Create the cgroup, listen, install the rules (with their guard)."""
        loop = asyncio.get_running_loop()
        self.cgroup.create()
        tcp_port = 0
        dns_port = 0
        hosts = ["127.0.0.1"] + (["::1"] if _has_ipv6_loopback() else [])
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

    def _install(self, rules: OutgoingRules) -> None:
        backend = detect_backend()
        firewall = OutgoingNat(self.session, backend=backend, cgroup=rules.cgroup)
        firewall.teardown()  # of an earlier daemon of this session that was killed
        self._guard = Guard.start(self.session, backend, kind="outgoing")
        self._firewall = firewall
        firewall.apply(firewall.plan_for(rules))
        log.info(
            "outgoing TCP of %s -> 127.0.0.1:%d, DNS -> %s",
            self.cgroup.path,
            rules.tcp_port,
            rules.dns_port or "unchanged",
        )

    def status(self) -> dict[str, Any]:
        return {
            "cgroup": str(self.cgroup.path),
            **self.stats.as_dict(),
            "dns_queries": sum(p.queries for _, p in self._dns),
            "dns_failures": sum(p.failures for _, p in self._dns),
        }

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
        await asyncio.to_thread(self.cgroup.remove)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False
