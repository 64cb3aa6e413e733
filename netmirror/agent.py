"""The agent: runs in the target's network namespace and hands its traffic over.

Start-up is synchronous and happens before the event loop: read the token, enter
the namespace, pick the iptables backend, start the guard (which undoes our rules
even if this process is killed), clear stale chains of dead sessions, describe
the namespace with pyroute2. Then an aiohttp server takes one daemon tunnel at a
time; each steal subscription gets listening sockets and a REDIRECT rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from netmirror import __version__
from netmirror.errors import AgentError, NetmirrorError, PortInUseError, ProtocolError
from netmirror.firewall import (
    AGENT_MARK,
    Backend,
    Guard,
    IptablesNat,
    Redirect,
    clear_stale,
    detect_backend,
    list_sessions,
    router_session,
    session_alive,
)
from netmirror.mirror import CaptureMirror, MirrorCounters, PassthroughBridge
from netmirror.protocol import Connection, Limits, Role
from netmirror.protocol import events as ev
from netmirror.target_info import find_target_pid, read_environment, resolver_dirs
from netmirror.tasks import TaskSet, keep_heap_mapped, raise_fd_limit
from netmirror.tunnel import (
    WS_MAX_MESSAGE,
    OpeningBridge,
    PortStats,
    StreamBridge,
    Tunnel,
    original_destination,
    tune_tunnel_socket,
)

if TYPE_CHECKING:  # loaded on first use: a plain steal needs neither DNS nor HTTP parsing
    from netmirror.dns import TargetResolver
    from netmirror.http.share import HttpShare

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
TICK = 0.25
WS_HEARTBEAT = 10.0
RESOLVER_REFRESH = 5.0
#: What this agent offers besides ports, announced in its welcome.
FEATURES = ("connect", "resolve", "environ")


@dataclass(frozen=True)
class AgentOptions:
    """Command-line options of ``netmirror agent``."""

    session: str
    listen: str
    token_digest: bytes
    """SHA-256 of the session token: the agent never needs the token itself."""
    ttl: float
    netns: Path | None = None
    container_id: str | None = None
    """Enter the network namespace of the container with this id (job mode)."""
    target_pid: int | None = None
    """The target's main process (environment, resolver files); found when unset."""
    debug: bool = False


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass
class Subscription:
    """One stolen port: its listening sockets and counters."""

    port: int
    mode: str
    method: str = ""
    """For mirror: capture or passthrough."""
    servers: dict[int, asyncio.AbstractServer] = field(default_factory=dict)
    to_ports: dict[int, int] = field(default_factory=dict)
    stats: PortStats = field(default_factory=PortStats)
    counters: MirrorCounters = field(default_factory=MirrorCounters)
    http: HttpShare | None = None
    """For a steal of only the HTTP requests that match a filter."""

    def redirects(self) -> list[Redirect]:
        return [Redirect(self.port, to_port, family) for family, to_port in self.to_ports.items()]

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        if self.http is not None:
            share, self.http = self.http, None
            asyncio.get_running_loop().create_task(share.close())


class InboundBridge(OpeningBridge):
    """A connection the REDIRECT rule sent to us: becomes a stream to the daemon.

    ``dst`` is given for connections the HTTP router hands over (on a unix socket,
    where there is no original destination to read).
    """

    def __init__(self, agent: Agent, sub: Subscription, dst: tuple[str, int] | None = None) -> None:
        self.agent = agent
        self.sub = sub
        self.dst = dst
        tunnel = agent.tunnel
        if tunnel is None:
            self._refused = True
            self.stats = sub.stats
            return
        super().__init__(tunnel, sub.stats, inbound=False)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        tunnel = self.agent.tunnel
        if (self._refused or tunnel is None or tunnel is not self.tunnel) and self.dst:
            # A request from the HTTP router while no daemon is here: refuse it
            # before reading; the router gives it to the original server.
            self._refused = True
            transport.abort()
            return
        if self._refused or tunnel is None or tunnel is not self.tunnel:
            # No daemon (it crashed, or the tunnel is reconnecting): rather than
            # reset the client, let the target's own server answer it.
            self._refused = True
            relay = PassthroughBridge(self.agent, self.sub, self.sub.counters, copy=False)
            transport.set_protocol(relay)
            relay.connection_made(transport)
            return
        dst = self.dst or original_destination(transport.get_extra_info("socket"))
        if dst is None:
            # Not redirected: someone connected to our listening port directly.
            self.refuse(transport)
            return
        self.open_stream(tunnel, transport, port=self.sub.port, dst=dst)


class OutboundBridge(StreamBridge):
    """A connection the daemon asked for: made from the target's namespace, as the target."""

    def __init__(self, tunnel: Tunnel, stats: PortStats, stream_id: int) -> None:
        super().__init__(tunnel, stats, inbound=True, stream_id=stream_id)

    async def connect(self, dst: tuple[str, int], resolver: Callable[[str], Any]) -> None:
        loop = asyncio.get_running_loop()
        host, port = dst
        sock: socket.socket | None = None
        try:
            addresses = [host] if _is_ip(host) else await resolver(host)
            if not addresses:
                raise OSError(f"{host} has no address")
            last: OSError | None = None
            for address in addresses:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                # Marked: a connection to one of our own stolen ports reaches the
                # target's server, not the daemon again.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, (address, port))
                    break
                except OSError as exc:
                    sock.close()
                    sock = None
                    last = exc
            if sock is None:
                assert last is not None
                raise last
            await loop.create_connection(lambda: self, sock=sock)
        except (OSError, NetmirrorError) as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, ConnectionRefusedError):
                reason = f"{host}:{port} refused the connection"
            else:
                reason = f"cannot connect to {host}:{port}: {getattr(exc, 'strerror', '') or exc}"
            log.info("outgoing connection: %s", reason)
            self.stats.error(reason)
            if self.tunnel.conn.is_open(self.stream_id):
                self.tunnel.conn.reset(self.stream_id, reason)
            self.tunnel.forget(self)
            self.tunnel.kick()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Agent:
    """Serves one session's daemon in the current network namespace."""

    def __init__(
        self,
        options: AgentOptions,
        *,
        backend: Backend,
        firewall: IptablesNat,
        info: dict[str, Any],
        limits: Limits | None = None,
    ) -> None:
        self.options = options
        self.session = options.session
        self.backend = backend
        self.firewall = firewall
        self.info = info
        self.limits = limits or Limits()
        self.tunnel: Tunnel | None = None
        self.subs: dict[int, Subscription] = {}
        self.capture: CaptureMirror | None = None
        self.tasks = TaskSet("agent")
        self._fw_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._detached_since: float | None = time.monotonic()
        self._ipv6 = _has_ipv6()
        self.outgoing = PortStats()
        self._resolver: tuple[float, TargetResolver] | None = None

    # --- websocket endpoint ------------------------------------------------------

    async def handle_tunnel(self, request: web.Request) -> web.StreamResponse:
        if self._stop.is_set():
            raise web.HTTPServiceUnavailable(text="the agent is stopping")
        ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE, heartbeat=WS_HEARTBEAT)
        await ws.prepare(request)
        if request.transport is not None:
            tune_tunnel_socket(request.transport.get_extra_info("socket"))
        conn = Connection(
            Role.AGENT,
            token_digest=self.options.token_digest,
            session=self.session,
            limits=self.limits,
            info=self.info,
        )
        try:
            authenticated = await asyncio.wait_for(self._handshake(ws, conn), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            log.warning("a client connected but sent no hello within %.0fs", HANDSHAKE_TIMEOUT)
            authenticated = False
        if not authenticated:
            with contextlib.suppress(ConnectionError, RuntimeError):
                data = conn.data_to_send()
                if data:
                    await ws.send_bytes(data)
            await ws.close()
            return ws
        tunnel = Tunnel(ws, conn, handler=self._on_event, name="tunnel")
        previous, self.tunnel = self.tunnel, tunnel
        self._detached_since = None
        if previous is not None:
            log.info("a new daemon connection replaces the previous one")
            await previous.close()
        log.info("daemon connected")
        reason = await tunnel.run()
        if self.tunnel is tunnel:
            self.tunnel = None
            self._detached_since = time.monotonic()
            if self.capture is not None:
                self.capture.tunnel_lost()
            log.info(
                "daemon disconnected (%s); keeping the rules for %.0fs", reason, self.options.ttl
            )
        return ws

    async def _handshake(self, ws: web.WebSocketResponse, conn: Connection) -> bool:
        """Read until the hello is accepted; False if it was refused."""
        from aiohttp import WSMsgType

        while True:
            msg = await ws.receive()
            if msg.type != WSMsgType.BINARY:
                return False
            try:
                conn.receive_data(msg.data)
            except ProtocolError as exc:
                log.warning("refused a tunnel: %s", exc)
                return False
            events = conn.events_received()
            if any(isinstance(e, ev.HelloReceived) for e in events):
                data = conn.data_to_send()
                if data:
                    await ws.send_bytes(data)
                return True

    # --- events ------------------------------------------------------------------

    def _on_event(self, event: ev.Event) -> None:
        tunnel = self.tunnel
        if isinstance(event, ev.SubscribeRequested) and tunnel is not None:
            self.tasks.spawn(self._subscribe(tunnel, event), name=f"subscribe-{event.port}")
        elif isinstance(event, ev.UnsubscribeRequested) and tunnel is not None:
            self.tasks.spawn(self._unsubscribe(tunnel, event), name=f"unsubscribe-{event.port}")
        elif isinstance(event, ev.StreamOpened) and tunnel is not None:
            if event.info.get("kind") != "connect":
                tunnel.conn.reset(event.stream_id, "unknown kind of stream")
                tunnel.kick()
                return
            # An outgoing connection of the local process, made here as the target.
            bridge = OutboundBridge(tunnel, self.outgoing, event.stream_id)
            tunnel.attach(bridge)
            self.tasks.spawn(
                bridge.connect(event.original_dst, self._addresses),
                name=f"connect-{event.stream_id}",
            )
        elif isinstance(event, ev.RequestReceived) and tunnel is not None:
            self.tasks.spawn(self._serve_request(tunnel, event), name=f"request-{event.op}")
        elif isinstance(event, ev.ErrorReceived):
            if event.code == "shutdown":
                # The session ended on purpose: clean up now, not after the TTL.
                log.info("the daemon ended the session: %s", event.message)
                self._stop.set()
            else:
                log.warning("daemon reported an error: %s: %s", event.code, event.message)

    # --- requests ------------------------------------------------------------------

    async def _serve_request(self, tunnel: Tunnel, req: ev.RequestReceived) -> None:
        try:
            if req.op == "resolve":
                name, rdtype = req.args.get("name"), req.args.get("type", "A")
                if not isinstance(name, str) or not isinstance(rdtype, str):
                    raise NetmirrorError("resolve needs a name and a type")
                answer = await self.resolver().resolve(name, rdtype)
                result = answer.to_json()
            elif req.op == "environ":
                pid = self.options.target_pid or await asyncio.to_thread(find_target_pid)
                if pid is None:
                    raise NetmirrorError("no process of the target was found to read")
                env = await asyncio.to_thread(read_environment, pid)
                result = {"pid": pid, "env": env}
            else:  # the protocol refuses unknown ops before they get here
                raise NetmirrorError(f"unknown request {req.op!r}")
        except (NetmirrorError, OSError, ValueError) as exc:
            if tunnel is self.tunnel:
                tunnel.conn.reply(req.request_id, error=str(exc))
                tunnel.kick()
            return
        if tunnel is self.tunnel:
            tunnel.conn.reply(req.request_id, result)
            tunnel.kick()

    def resolver(self) -> TargetResolver:
        """The target's resolver; its files are read again every few seconds."""
        from netmirror.dns import ResolverConfig, TargetResolver

        now = time.monotonic()
        if self._resolver is None or now - self._resolver[0] > RESOLVER_REFRESH:
            dirs = resolver_dirs(self.options.netns, self.options.target_pid)
            self._resolver = (now, TargetResolver(ResolverConfig.load(dirs)))
        return self._resolver[1]

    async def _addresses(self, host: str) -> list[str]:
        """Addresses of ``host`` as the target resolves it, IPv4 first."""
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            answer = await self.resolver().resolve(host, rdtype)
            found.extend(answer.records)
        if not found:
            raise NetmirrorError(f"the target cannot resolve {host}")
        return found

    def _answer(
        self, tunnel: Tunnel, request_id: int, port: int, *, ok: bool, error: str = ""
    ) -> None:
        if tunnel is not self.tunnel or tunnel.conn.state.value != "open":
            return  # that daemon connection is gone; its successor asks again
        tunnel.conn.answer(request_id, port, ok=ok, error=error)
        tunnel.kick()

    async def _subscribe(self, tunnel: Tunnel, req: ev.SubscribeRequested) -> None:
        method = ""
        if req.mode == "mirror":
            method = str(req.options.get("method", "capture"))
            if method not in ("capture", "passthrough"):
                self._answer(
                    tunnel,
                    req.request_id,
                    req.port,
                    ok=False,
                    error=f"unknown mirror method {method[:20]!r}",
                )
                return
        try:
            async with self._fw_lock:
                # Checked under the lock: two tunnels may ask for the same port.
                held = self.subs.get(req.port)
                filtered = req.options.get("http_filter") is not None
                if held is not None:
                    same = (
                        held.mode == req.mode
                        and held.method == method
                        and (held.http is not None) == filtered
                    )
                    error = "" if same else f"port {req.port} is already taken in {held.mode} mode"
                    self._answer(tunnel, req.request_id, req.port, ok=same, error=error)
                    return
                http_filter = req.options.get("http_filter")
                if req.mode == "steal" and http_filter is not None:
                    sub = await self._share(req.port, http_filter)
                    self.subs[req.port] = sub
                elif method == "capture":
                    sub = Subscription(req.port, req.mode, method)
                    self.subs[req.port] = sub
                    try:
                        await asyncio.to_thread(self._compile_check)
                        self._capture_mirror().add(sub, pcap_enabled=bool(req.options.get("pcap")))
                    except (NetmirrorError, OSError) as exc:
                        del self.subs[req.port]
                        raise AgentError(f"cannot capture port {req.port}: {exc}") from None
                else:
                    await asyncio.to_thread(self._check_port_free, req.port)
                    sub = await self._listen(req.port, req.mode, method)
                    self.subs[req.port] = sub
                    try:
                        await self._apply_rules()
                    except NetmirrorError:
                        del self.subs[req.port]
                        sub.close()
                        raise
        except NetmirrorError as exc:
            log.warning("cannot take port %d: %s", req.port, exc)
            self._answer(tunnel, req.request_id, req.port, ok=False, error=str(exc))
            return
        if sub.http is not None:
            log.info("stealing the HTTP requests of port %d that match its filter", req.port)
        elif method:
            log.info("mirroring port %d by %s", req.port, method)
        else:
            log.info("stealing port %d (redirected to %s)", req.port, sub.to_ports)
        self._answer(tunnel, req.request_id, req.port, ok=True)

    def _capture_mirror(self) -> CaptureMirror:
        if self.capture is None:
            self.capture = CaptureMirror(self)
        return self.capture

    @staticmethod
    def _compile_check() -> None:
        """Load the filter compiler off the event loop (the first import is slow)."""
        from netmirror.capture import bpf

        bpf.compile_ports([1])

    async def _unsubscribe(self, tunnel: Tunnel, req: ev.UnsubscribeRequested) -> None:
        async with self._fw_lock:
            sub = self.subs.pop(req.port, None)
            if sub is not None and sub.http is not None:
                share, sub.http = sub.http, None
                await share.close()
                log.info("stopped stealing HTTP requests of port %d", req.port)
            elif sub is not None and sub.method == "capture":
                if self.capture is not None:
                    self.capture.remove(req.port)
                log.info("stopped mirroring port %d", req.port)
            elif sub is not None:
                try:
                    await self._apply_rules()
                except NetmirrorError as exc:
                    self._answer(tunnel, req.request_id, req.port, ok=False, error=str(exc))
                    return
                sub.close()
                log.info("released port %d", req.port)
        self._answer(tunnel, req.request_id, req.port, ok=True)

    def _check_port_free(self, port: int, *, filtered: bool = False) -> None:
        for other, ports in list_sessions(self.backend).items():
            if other == self.session or port not in ports or not session_alive(other):
                continue
            if other == router_session(port):
                if filtered:
                    continue  # the router of the port: filtered sessions share it
                raise PortInUseError(
                    f"port {port} is shared by sessions that steal only some HTTP requests; "
                    "a whole-port steal would take theirs too (steal with an HTTP filter)"
                )
            if filtered:
                raise PortInUseError(
                    f"port {port} is stolen whole by session {other!r}; "
                    "an HTTP-filtered steal cannot share it"
                )
            raise PortInUseError(f"port {port} is already stolen by session {other!r}")

    async def _share(self, port: int, filter_json: Any) -> Subscription:
        """Steal the requests of ``port`` that match a filter, through the port's router."""
        from netmirror.http.filters import HttpFilter
        from netmirror.http.share import HttpShare

        try:
            HttpFilter.parse(filter_json)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        await asyncio.to_thread(self._check_port_free, port, filtered=True)
        sub = Subscription(port, "steal", "")
        share = HttpShare(
            port=port,
            session=self.session,
            filter_json=filter_json,
            backend=self.backend,
            factory=functools.partial(InboundBridge, self, sub, ("0.0.0.0", port)),
        )
        try:
            await share.start()
        except OSError as exc:
            raise AgentError(f"cannot share port {port}: {exc}") from None
        sub.http = share
        return sub

    async def _listen(self, port: int, mode: str, method: str = "") -> Subscription:
        sub = Subscription(port, mode, method)
        factory: Callable[[], asyncio.Protocol]
        if method == "passthrough":
            factory = functools.partial(PassthroughBridge, self, sub, sub.counters)
        else:
            factory = functools.partial(InboundBridge, self, sub)
        loop = asyncio.get_running_loop()
        families = [(4, socket.AF_INET, "0.0.0.0")]
        if self._ipv6:
            families.append((6, socket.AF_INET6, "::"))
        for family, af, host in families:
            sock = socket.socket(af, socket.SOCK_STREAM)
            try:
                if af == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, 0))
                sock.listen(4096)
                sock.setblocking(False)
                server = await loop.create_server(factory, sock=sock, backlog=4096)
            except OSError:
                sock.close()
                sub.close()
                raise
            sub.servers[family] = server
            sub.to_ports[family] = sock.getsockname()[1]
        return sub

    async def _apply_rules(self) -> None:
        redirects = [r for sub in list(self.subs.values()) for r in sub.redirects()]
        plan = self.firewall.plan(redirects)
        await asyncio.to_thread(self.firewall.apply, plan)

    # --- life --------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Counters only the agent knows, sent to the daemon as STATS."""
        ports: dict[str, Any] = {
            str(port): sub.counters.as_dict() for port, sub in self.subs.items() if sub.method
        }
        for port, sub in self.subs.items():
            if sub.http is not None:
                ports[str(port)] = {"http": sub.http.stats()}
        capture = self.capture.stats() if self.capture is not None else None
        return {"ports": ports, "capture": capture}

    async def _ticker(self) -> None:
        """Gap timeouts of the capture, and counters to the daemon once a second."""
        last_report = 0.0
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            if self.capture is not None:
                self.capture.tick(now)
            tunnel = self.tunnel
            if (
                tunnel is not None
                and now - last_report >= 1.0
                and any(sub.method or sub.http for sub in self.subs.values())
            ):
                last_report = now
                tunnel.conn.report_stats(self.report())
                tunnel.kick()

    async def run(self, ready: dict[str, Any], *, listen_sock: socket.socket | None = None) -> None:
        """Serve until stopped or until no daemon was attached for ``ttl`` seconds."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._stop.set)
        app = web.Application()
        app.router.add_get("/tunnel", self.handle_tunnel)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        kind, _, where = self.options.listen.partition(":")
        site: web.BaseSite
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)
            old_umask = os.umask(0o177)
            try:
                site = web.UnixSite(runner, where)
                await site.start()
            finally:
                os.umask(old_umask)
        else:
            assert listen_sock is not None
            site = web.SockSite(runner, listen_sock)
            await site.start()
        self.tasks.spawn(self._ticker(), name="ticker")
        ready["listen"] = self.options.listen
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        log.info("agent %s ready on %s", __version__, self.options.listen)
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=0.5)
                since = self._detached_since
                if since is not None and time.monotonic() - since > self.options.ttl:
                    log.info("no daemon for %.0fs: cleaning up and exiting", self.options.ttl)
                    break
        finally:
            log.info("shutting down")
            # Rules first: from here on new connections reach the target's own
            # server; only then close our listeners, and last the tunnel.
            async with self._fw_lock:
                await asyncio.to_thread(self.firewall.teardown)
                for sub in self.subs.values():
                    if sub.http is not None:
                        share, sub.http = sub.http, None
                        await share.close()
                    sub.close()
                self.subs.clear()
            if self.capture is not None:
                self.capture.stop()
            if self.tunnel is not None:
                # Tell the daemon not to reconnect: this agent is going away.
                self.tunnel.conn.fail("stopping", "the agent is stopping")
                await self.tunnel.close()
            await self.tasks.close()
            await runner.cleanup()
            if kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(where)  # leave no socket file behind


def describe_namespace() -> dict[str, Any]:
    """Interfaces and addresses of the current namespace (pyroute2, before the loop)."""
    from pyroute2 import IPRoute

    addresses: list[str] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in ipr.get_addr():
            ifname = names.get(addr["index"], "?")
            if ifname != "lo":
                addresses.append(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']} ({ifname})")
    return {"interfaces": sorted(n for n in names.values() if n), "addresses": addresses}


def enter_namespace(path: Path) -> None:
    """Move this process into the network namespace at ``path``."""
    from pyroute2 import netns

    try:
        # flags=0: never create a namespace that is not there.
        netns.setns(str(path), flags=0)
    except OSError as exc:
        raise NetmirrorError(
            f"cannot enter the network namespace {path}: {exc.strerror or exc}"
        ) from None


def tcp_listener(where: str) -> socket.socket:
    """A listening TCP socket for ``HOST:PORT``."""
    host, _, port = where.rpartition(":")
    try:
        sock = socket.create_server((host or "127.0.0.1", int(port)), reuse_port=False)
    except (OSError, ValueError) as exc:
        raise NetmirrorError(f"cannot listen on {where}: {exc}") from None
    sock.setblocking(False)
    return sock


def find_container_pid(container_id: str, proc: Path = Path("/proc")) -> int:
    """The lowest pid whose cgroup names the container (its init), from a host-pid view.

    ``container_id`` may carry the runtime prefix of the pod status
    (``containerd://abc...``); the bare id is searched for.
    """
    bare = container_id.rsplit("://", 1)[-1]
    if len(bare) < 12 or not bare.isalnum():
        raise NetmirrorError(f"{container_id!r} is not a container id")
    found: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if bare in (entry / "cgroup").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    if not found:
        raise NetmirrorError(f"no process of container {bare[:12]} on this node (is hostPID set?)")
    return min(found)


def run(options: AgentOptions) -> int:
    """Entry point of ``netmirror agent``; returns the exit code."""
    guard: Guard | None = None
    firewall: IptablesNat | None = None
    listen_sock: socket.socket | None = None
    raise_fd_limit()
    keep_heap_mapped()
    try:
        kind, _, where = options.listen.partition(":")
        if kind == "tcp":
            # Bound before entering the target: in job mode the port-forward reaches
            # the agent's own pod, not the target's namespace.
            listen_sock = tcp_listener(where)
        elif kind != "unix":
            raise NetmirrorError(f"--listen {options.listen!r} is not unix:PATH or tcp:HOST:PORT")
        netns = options.netns
        if options.container_id:
            pid = find_container_pid(options.container_id)
            netns = Path(f"/proc/{pid}/ns/net")
            options = dataclasses.replace(options, target_pid=pid)
        if netns is not None:
            enter_namespace(netns)
        backend = detect_backend()
        firewall = IptablesNat(options.session, backend=backend)
        firewall.teardown()  # leftovers of an earlier agent of this session
        guard = Guard.start(options.session, backend)
        cleared = clear_stale(backend, alive=session_alive)
        if cleared:
            log.info("cleared stale rules of dead sessions: %s", ", ".join(cleared))
        info = describe_namespace()
        info.update(
            backend=backend.name.lower(),
            pid=os.getpid(),
            version=__version__,
            features=list(FEATURES),
        )
    except NetmirrorError as exc:
        log.error("%s", exc)
        sys.stdout.write(json.dumps({"error": str(exc)}) + "\n")
        sys.stdout.flush()
        if guard is not None:
            guard.close()
        return 1
    agent_firewall = firewall
    ready = {"ready": True, **info}
    try:
        import uvloop

        # pyroute2 stays off this loop: it ran above, before the loop started.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            agent = Agent(options, backend=backend, firewall=agent_firewall, info=info)
            runner.run(agent.run(ready, listen_sock=listen_sock))
    finally:
        agent_firewall.teardown()
        guard.close()
    return 0
