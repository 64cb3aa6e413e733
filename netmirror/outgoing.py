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
from netmirror.errors import NetmirrorError
from netmirror.firewall import Guard, detect_backend
from netmirror.firewall.outgoing import OutgoingNat, OutgoingRules
from netmirror.tunnel import OpeningBridge, PortStats, Tunnel, original_destination

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
        self.open_stream(tunnel, transport, port=0, dst=dst, info={"kind": "connect"})


# --- proxy (where transparent redirection is impossible) ----------------------------

#: Largest proxy greeting (SOCKS request or HTTP request head) buffered.
MAX_GREETING = 16 * 1024


def parse_greeting(buf: bytes) -> tuple[tuple[str, int], bytes, bytes] | str | None:
    """Where a proxy client wants to go. Pure.

    Returns ``((host, port), reply, rest)``: the destination, what to answer the
    client at once, and the bytes that already belong to the connection; ``None``
    while more bytes are needed; a string for an error (the connection is closed).
    SOCKS5 (``CONNECT`` with no authentication; host names are resolved by the
    target: ``socks5h``) and HTTP proxy requests (``CONNECT host:port``, and
    ``GET http://host/...``, which is forwarded as it is: servers accept the
    absolute form; it is sent with ``Connection: close``, so the client's next
    request comes on a new connection) are understood.
    """
    if not buf:
        return None
    if buf[0] == 5:
        return _socks5(buf)
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return "proxy request head too large" if len(buf) > MAX_GREETING else None
    line = buf[: buf.find(b"\r\n")].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "not a SOCKS5 or HTTP proxy request"
    method, target, _ = parts
    if method == "CONNECT":
        host, port = _host_port(target, 443)
        if host is None:
            return f"bad CONNECT target {target[:100]!r}"
        reply = b"HTTP/1.1 200 Connection established\r\n\r\n"
        return (host, port), reply, buf[head_end + 4 :]
    if target.startswith("http://"):
        authority = target[len("http://") :].split("/", 1)[0]
        host, port = _host_port(authority, 80)
        if host is None:
            return f"bad proxy URL {target[:100]!r}"
        # The connection is piped to this host from here on; a client that would send
        # its next request (maybe for another host) on it is told to open a new one.
        return (host, port), b"", _one_request(buf[: head_end + 4]) + buf[head_end + 4 :]
    return f"{method} {target[:100]!r} is not a proxy request"


def _one_request(head: bytes) -> bytes:
    """``head`` with ``Connection: close`` instead of any connection header."""
    lines = head[:-4].split(b"\r\n")
    kept = [
        line
        for line in lines[1:]
        if line.split(b":", 1)[0].strip().lower() not in (b"connection", b"proxy-connection")
    ]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


def _host_port(authority: str, default: int) -> tuple[str | None, int]:
    authority = authority.rsplit("@", 1)[-1]
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    else:
        host, port_text = authority, ""
    if not host:
        return None, 0
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None, 0
    return host, int(port_text)


def _socks5(buf: bytes) -> tuple[tuple[str, int], bytes, bytes] | str | None:
    if len(buf) < 2:
        return None
    methods_end = 2 + buf[1]
    if len(buf) < methods_end:
        return None
    if 0 not in buf[2:methods_end]:
        return "SOCKS5 client offers no method without authentication"
    req = buf[methods_end:]
    if len(req) < 5:
        return None
    if req[0] != 5 or req[1] != 1:
        return "only SOCKS5 CONNECT is supported"
    atyp = req[3]
    if atyp == 1:
        end = 4 + 4
        host = socket.inet_ntop(socket.AF_INET, req[4:end]) if len(req) >= end else ""
    elif atyp == 4:
        end = 4 + 16
        host = socket.inet_ntop(socket.AF_INET6, req[4:end]) if len(req) >= end else ""
    elif atyp == 3:
        end = 5 + req[4]
        host = req[5:end].decode("ascii", "replace") if len(req) >= end else ""
    else:
        return f"unknown SOCKS5 address type {atyp}"
    if len(req) < end + 2:
        return None
    port = int.from_bytes(req[end : end + 2], "big")
    # Method choice and success at once: the client waits for both before sending.
    reply = b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6)
    return (host, port), reply, req[end + 2 :]


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

    def status(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "cgroup": str(self.cgroup.path) if self.cgroup is not None else None,
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
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.remove)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False
