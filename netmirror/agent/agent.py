"""The agent's server: one daemon tunnel at a time, and the ports it asks for.

Each steal subscription gets listening sockets and a REDIRECT rule; a mirror gets
a capture or a passthrough relay; an HTTP-filtered steal registers with the port's
HTTP router. Requests (resolve a name, read the environment) are answered as the
target would. Start-up before the event loop is :mod:`netmirror.agent.main`.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from typing import TYPE_CHECKING, Any, assert_never

from aiohttp import web

from netmirror import __version__
from netmirror.agent.bridges import InboundBridge, OutboundBridge
from netmirror.agent.files import FileError, FileService
from netmirror.agent.link import Link
from netmirror.agent.mirror.capture import CaptureMirror
from netmirror.agent.mirror.passthrough import PassthroughBridge
from netmirror.agent.options import AgentOptions
from netmirror.agent.subscription import Subscription
from netmirror.agent.target_process import find_target_pid, read_environment, resolver_dirs
from netmirror.agent.udp import UdpAssociation
from netmirror.errors import AgentError, NetmirrorError, PortInUseError, ProtocolError
from netmirror.net.procnet import listening_here
from netmirror.net.sockets import listen_any_port, tune_tunnel_socket
from netmirror.netfilter import (
    AGENT_MARK,
    Backend,
    IptablesNat,
    list_sessions,
    router_session,
    session_alive,
)
from netmirror.netfilter.mesh import Mesh
from netmirror.tasks import TaskSet
from netmirror.tunnel import WS_MAX_MESSAGE, Tunnel
from netmirror.wire import Connection, Limits, Role
from netmirror.wire import events as ev
from netmirror.wire.kinds import StreamKind, stream_kind
from netmirror.wire.ports import Claim, port_conflict
from netmirror.wire.stats import AgentReport, PortReport, PortStats

if TYPE_CHECKING:  # loaded on first use: a plain steal needs neither DNS nor HTTP parsing
    from netmirror.agent.resolver import TargetResolver

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
TICK = 0.25
WS_HEARTBEAT = 10.0
RESOLVER_REFRESH = 5.0
#: What this agent offers besides ports, announced in its welcome.
FEATURES = ("connect", "resolve", "environ", "files", "udp", "listening")
#: What an agent in a pod of its own (``--targetless``) offers: no target to read.
TARGETLESS_FEATURES = ("connect", "resolve", "udp")


class Agent:
    """Serves one session's daemon in the current network namespace."""

    def __init__(
        self,
        options: AgentOptions,
        *,
        backend: Backend,
        firewall: IptablesNat | None,
        info: dict[str, Any],
        limits: Limits | None = None,
    ) -> None:
        self.options = options
        self.session = options.session
        self.backend = backend
        self.firewall = firewall
        # Our own connections pass our REDIRECT rules; with no rules (targetless) no
        # mark is needed, nor the capability to set one.
        self.mark = AGENT_MARK if firewall is not None else 0
        self.info = info
        self.limits = limits or Limits()
        self.link = Link()
        self.subs: dict[int, Subscription] = {}
        self.capture: CaptureMirror | None = None
        self._fw_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._detached_since: float | None = time.monotonic()
        self.outgoing = PortStats()
        self._resolver: tuple[float, TargetResolver] | None = None
        self.files = FileService(lambda: self.options.target_pid or find_target_pid())

    @property
    def tunnel(self) -> Tunnel | None:
        """The tunnel of the daemon attached now, if any."""
        return self.link.tunnel

    @property
    def tasks(self) -> TaskSet:
        """The tasks the agent owns; stopped at shutdown."""
        return self.link.tasks

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
        previous, self.link.tunnel = self.link.tunnel, tunnel
        self._detached_since = None
        if previous is not None:
            log.info("a new daemon connection replaces the previous one")
            await previous.close()
        log.info("daemon connected")
        reason = await tunnel.run()
        if self.link.tunnel is tunnel:
            self.link.tunnel = None
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
            self._open_stream(tunnel, event)
        elif isinstance(event, ev.RequestReceived) and tunnel is not None:
            self.tasks.spawn(self._serve_request(tunnel, event), name=f"request-{event.op}")
        elif isinstance(event, ev.ErrorReceived):
            if event.code == "shutdown":
                # The session ended on purpose: clean up now, not after the TTL.
                log.info("the daemon ended the session: %s", event.message)
                self._stop.set()
            else:
                log.warning("daemon reported an error: %s: %s", event.code, event.message)

    def _open_stream(self, tunnel: Tunnel, event: ev.StreamOpened) -> None:
        """A stream the daemon opened: only the exec command's outgoing connections."""
        kind = stream_kind(event.info)
        match kind:
            case StreamKind.CONNECT:
                # An outgoing connection of the local process, made here as the target.
                bridge = OutboundBridge(tunnel, self.outgoing, event.stream_id, mark=self.mark)
                tunnel.attach(bridge)
                self.tasks.spawn(
                    bridge.connect(event.original_dst, self._addresses),
                    name=f"connect-{event.stream_id}",
                )
                return
            case StreamKind.UDP:
                # The exec command's datagrams from one of its sockets.
                UdpAssociation(tunnel, self.outgoing, event.stream_id, mark=self.mark)
                return
            case StreamKind.FILE_READ:
                self.tasks.spawn(
                    self.files.serve_read(tunnel, event.stream_id, event.info),
                    name=f"file-read-{event.stream_id}",
                )
                return
            case StreamKind.FILE_WRITE:
                self.tasks.spawn(
                    self.files.open_write(tunnel, event.stream_id, event.info),
                    name=f"file-write-{event.stream_id}",
                )
                return
            case StreamKind.STOLEN | StreamKind.MIRROR | StreamKind.PCAP:
                reason = f"{kind.value} streams are opened by the agent, not the daemon"
            case None:
                reason = "unknown kind of stream"
            case _:
                assert_never(kind)
        tunnel.conn.reset(event.stream_id, reason)
        tunnel.kick()

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
            elif req.op == "listening":
                # The TCP ports the target serves (this is its network namespace).
                result = {"ports": sorted(await asyncio.to_thread(listening_here))}
            elif req.op.startswith("fs."):
                result = await self.files.request(req.op, req.args)
            else:  # the protocol refuses unknown ops before they get here
                raise NetmirrorError(f"unknown request {req.op!r}")
        except (NetmirrorError, OSError, ValueError, FileError) as exc:
            if tunnel is self.tunnel:
                tunnel.conn.reply(req.request_id, error=str(exc))
                tunnel.kick()
            return
        if tunnel is self.tunnel:
            tunnel.conn.reply(req.request_id, result)
            tunnel.kick()

    def resolver(self) -> TargetResolver:
        """The target's resolver; its files are read again every few seconds."""
        from netmirror.agent.resolver import ResolverConfig, TargetResolver

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
        if self.firewall is None:
            self._answer(
                tunnel,
                req.request_id,
                req.port,
                ok=False,
                error="a targetless agent takes no incoming traffic",
            )
            return
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
                if held is not None and req.options.get("drain") is True:
                    # The session ends: new connections go to the target's server.
                    held.draining = True
                    log.info("port %d: draining, new connections go to the target", req.port)
                    self._answer(tunnel, req.request_id, req.port, ok=True)
                    return
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
                keep_from = _source_addresses(req.options.get("keep_from"))
                if req.mode == "steal" and http_filter is not None:
                    sub = await self._share(
                        req.port, http_filter, keep_probes=bool(req.options.get("keep_probes"))
                    )
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
                    if req.mode == "steal":
                        sub.keep_from = keep_from
                    self.subs[req.port] = sub
                    try:
                        await self._apply_rules()
                    except NetmirrorError:
                        del self.subs[req.port]
                        await sub.close()
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
            mesh = Mesh.from_json(self.info.get("mesh"))
            # Behind a known mesh's sidecar the application's traffic is the proxy's
            # plaintext connection over lo; the pod's interface carries ciphertext.
            interface = "lo" if mesh is not None and mesh.known else None
            self.capture = CaptureMirror(self.link, interface=interface)
        return self.capture

    @staticmethod
    def _compile_check() -> None:
        """Load the filter compiler off the event loop (the first import is slow)."""
        from netmirror.agent.capture import bpf

        bpf.compile_ports([1])

    async def _unsubscribe(self, tunnel: Tunnel, req: ev.UnsubscribeRequested) -> None:
        async with self._fw_lock:
            sub = self.subs.pop(req.port, None)
            if sub is not None and sub.http is not None:
                await sub.close()
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
                await sub.close()
                log.info("released port %d", req.port)
        self._answer(tunnel, req.request_id, req.port, ok=True)

    def _check_port_free(self, port: int, *, filtered: bool = False) -> None:
        """Refuse a port that a live session of this namespace holds in a way we cannot share."""
        router = router_session(port)
        held = [
            Claim(other, filtered=other == router, router=other == router)
            for other, ports in list_sessions(self.backend).items()
            if port in ports and session_alive(other)
        ]
        conflict = port_conflict(port, Claim(self.session, filtered=filtered), held)
        if conflict is not None:
            raise PortInUseError(conflict.reason)

    async def _share(self, port: int, filter_json: Any, *, keep_probes: bool) -> Subscription:
        """Steal the requests of ``port`` that match a filter, through the port's router."""
        from netmirror.agent.share import HttpShare
        from netmirror.wire.httpfilter import HttpFilter

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
            factory=functools.partial(InboundBridge, self.link, sub, ("0.0.0.0", port)),
            in_container=self.options.in_container,
            keep_probes=keep_probes,
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
            factory = functools.partial(PassthroughBridge, self.link, sub, sub.counters)
        else:
            factory = functools.partial(InboundBridge, self.link, sub)
        for family, server, to_port in await listen_any_port(factory):
            sub.servers[family] = server
            sub.to_ports[family] = to_port
        return sub

    async def _apply_rules(self) -> None:
        redirects = [r for sub in list(self.subs.values()) for r in sub.redirects()]
        if self.firewall is None:
            raise NetmirrorError("a targetless agent takes no incoming traffic")
        plan = self.firewall.plan(redirects)
        await asyncio.to_thread(self.firewall.apply, plan)

    # --- life --------------------------------------------------------------------

    def report(self) -> AgentReport:
        """Counters only the agent knows, sent to the daemon as STATS."""
        ports = {
            port: PortReport(
                mirror=sub.counters if sub.method else None,
                http=sub.http.stats() if sub.http is not None else None,
            )
            for port, sub in self.subs.items()
            if sub.method or sub.http is not None
        }
        capture = self.capture.stats() if self.capture is not None else None
        return AgentReport(ports=ports, capture=capture)

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
                tunnel.conn.report_stats(self.report().to_wire())
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
                if self.firewall is not None:
                    await asyncio.to_thread(self.firewall.teardown)
                # Together: each HTTP share may wait a little for its port's router.
                await asyncio.gather(*(sub.close() for sub in self.subs.values()))
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


def _source_addresses(value: object) -> tuple[str, ...]:
    """The source addresses a subscription keeps with the target; AgentError if bad."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > 16:
        raise AgentError("keep_from must be a list of at most 16 addresses")
    try:
        return tuple(str(ipaddress.ip_address(str(item))) for item in value)
    except ValueError as exc:
        raise AgentError(f"keep_from: {exc}") from None
