"""The daemon: a background process per session, on the developer's machine.

It starts the agent through the target, holds the websocket tunnel to it, opens
one local connection per stream, and answers ``status`` and ``down`` on a control
socket. Progress until it is ready goes to a pipe the CLI reads (``--ready-fd``).
The data path runs on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, assert_never, cast

import aiohttp

from netmirror import __version__
from netmirror.config import Config, PortConfig
from netmirror.config.model import ForwardConfig
from netmirror.daemon.listeners import descendants, listening_ports
from netmirror.daemon.pcap import PcapSink, PcapWriter
from netmirror.daemon.targets import AgentHandle, AgentSettings, resolve_target
from netmirror.errors import AgentError, NetmirrorError, ProtocolError, TargetError
from netmirror.net.sockets import open_local, tune_tunnel_socket
from netmirror.netfilter.mesh import Mesh
from netmirror.tasks import TaskSet, keep_heap_mapped, raise_fd_limit
from netmirror.tunnel import WS_MAX_MESSAGE, StreamBridge, Tunnel
from netmirror.wire import Connection, Limits, Role
from netmirror.wire import events as ev
from netmirror.wire.kinds import StreamKind, stream_kind
from netmirror.wire.session import SessionDir, SessionRecord, pid_alive, pid_start
from netmirror.wire.stats import (
    AgentReport,
    AgentStatus,
    FilesStatus,
    ForwardStatus,
    HttpStatus,
    MirrorCounters,
    PortReport,
    PortStats,
    PortStatus,
    SessionStatus,
    UnservedPort,
    to_json,
)

if TYPE_CHECKING:  # loaded by `netmirror exec` only
    from netmirror.daemon.exec.outgoing import Outgoing
    from netmirror.daemon.files import FilesMount
    from netmirror.daemon.targets.base import Target

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
SUBSCRIBE_TIMEOUT = 15.0
WS_HEARTBEAT = 10.0
BACKOFF_MAX = 2.0
#: Seconds between two looks at the ports an exec command listens on.
LISTEN_POLL = 0.5


class Progress:
    """Lines for the waiting CLI, on a pipe closed once ready or failed."""

    def __init__(self, fd: int | None) -> None:
        self._file: IO[str] | None = os.fdopen(fd, "w") if fd is not None else None

    def send(self, **message: Any) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(message) + "\n")
            self._file.flush()
        except OSError:
            self._file = None  # the CLI went away; carry on

    def step(self, text: str) -> None:
        log.info("%s", text)
        self.send(progress=text)

    def warn(self, text: str) -> None:
        """A line the user is shown whatever the terminal, as ``warning: ...``."""
        log.warning("%s", text)
        self.send(warning=text)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class Daemon:
    """Owns one session: agent, tunnel, local connections, control socket."""

    def __init__(
        self,
        sdir: SessionDir,
        record: SessionRecord,
        config: Config,
        *,
        progress: Progress,
        log_file: IO[bytes],
        debug: bool = False,
    ) -> None:
        self.sdir = sdir
        self.record = record
        self.config = config
        self.progress = progress
        self.log_file = log_file
        self.debug = debug
        self.token = secrets.token_urlsafe(32)
        self.ports: dict[int, PortConfig] = {p.remote: p for p in config.active_ports()}
        self.stats: dict[int, PortStats] = {p: PortStats() for p in self.ports}
        self.port_state: dict[int, str] = {p: "pending" for p in self.ports}
        self.state = "starting"
        self.agent: AgentHandle | None = None
        self.tunnel: Tunnel | None = None
        self.tasks = TaskSet("daemon")
        self.started = time.time()
        self.reconnects = 0
        self._stop = asyncio.Event()
        self._welcomed: asyncio.Future[ev.Welcomed] | None = None
        self._answers: dict[int, asyncio.Future[ev.SubscriptionAnswered]] = {}
        self._replies: dict[int, asyncio.Future[ev.ReplyReceived]] = {}
        # netmirror exec: the command's outgoing traffic, and who runs the command.
        self.exec: dict[str, Any] = dict(record.extra.get("exec") or {})
        self.outgoing: Outgoing | None = None
        self._session: aiohttp.ClientSession | None = None
        self.agent_report = AgentReport()
        self._agent_stopping = False
        self._probes_said: set[int] = set()  # ports whose probes the user was told of
        self._dynamic: set[int] = set()  # ports taken because the exec command listens
        #: Ports the command listens on that the target does not serve: remote -> local.
        self.unserved: dict[int, int] = {}
        self._subscribing = asyncio.Lock()  # one (re)subscription round at a time
        self._drain = 0.0  # seconds stolen connections may finish in, at down
        self._forwards: list[tuple[ForwardConfig, asyncio.AbstractServer, PortStats]] = []
        self.pcap: PcapWriter | None = None
        self.target: Target | None = None
        self.files: FilesMount | None = None
        self.files_status: FilesStatus | None = None

    # --- tunnel events -----------------------------------------------------------

    def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.StreamOpened):
            self._open_local(event)
        elif isinstance(event, ev.SubscriptionAnswered):
            future = self._answers.pop(event.request_id, None)
            if future is not None and not future.done():
                future.set_result(event)
        elif isinstance(event, ev.ReplyReceived):
            reply = self._replies.pop(event.request_id, None)
            if reply is not None and not reply.done():
                reply.set_result(event)
        elif isinstance(event, ev.StatsReported):
            try:
                self.agent_report = AgentReport.from_wire(event.stats)
            except ValueError as exc:
                log.warning("the agent's counters are unreadable: %s", exc)
        elif isinstance(event, ev.Welcomed):
            if self._welcomed is not None and not self._welcomed.done():
                self._welcomed.set_result(event)
        elif isinstance(event, ev.ErrorReceived):
            if event.code == "stopping":
                self._agent_stopping = True
            log.warning("agent reported an error: %s: %s", event.code, event.message)
            if self._welcomed is not None and not self._welcomed.done():
                self._welcomed.set_exception(AgentError(f"the agent refused us: {event.message}"))

    def _open_local(self, event: ev.StreamOpened) -> None:
        tunnel = self.tunnel
        assert tunnel is not None
        kind = stream_kind(event.info)
        match kind:
            case StreamKind.PCAP:
                if self.pcap is None:
                    tunnel.conn.reset(event.stream_id, "no pcap file was asked for")
                else:
                    tunnel.attach(PcapSink(tunnel, event.stream_id, self.pcap))
                tunnel.kick()
            case StreamKind.STOLEN | StreamKind.MIRROR:
                self._open_connection(tunnel, event, copy=kind is StreamKind.MIRROR)
            case StreamKind.CONNECT | StreamKind.UDP | StreamKind.FILE_READ | StreamKind.FILE_WRITE:
                tunnel.conn.reset(event.stream_id, f"{kind.value} streams are opened by the daemon")
                tunnel.kick()
            case None:
                tunnel.conn.reset(event.stream_id, "unknown kind of stream")
                tunnel.kick()
            case _:
                assert_never(kind)

    def _open_connection(self, tunnel: Tunnel, event: ev.StreamOpened, *, copy: bool) -> None:
        """A stolen connection, or a mirrored copy: a connection to the local port."""
        port = self.ports.get(event.port)
        if port is None:
            tunnel.conn.reset(event.stream_id, f"port {event.port} is not subscribed")
            tunnel.kick()
            return
        stats = self.stats[event.port]
        bridge = StreamBridge(
            tunnel,
            stats,
            inbound=True,
            stream_id=event.stream_id,
            discard_replies=copy,
        )
        tunnel.attach(bridge)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "stream %d from %s:%d to %s:%d", event.stream_id, *event.client, *event.original_dst
            )
        self.tasks.spawn(
            self._connect_local(tunnel, bridge, port), name=f"connect-{event.stream_id}"
        )

    async def _connect_local(self, tunnel: Tunnel, bridge: StreamBridge, port: PortConfig) -> None:
        loop = asyncio.get_running_loop()
        try:
            await open_local(loop, lambda: bridge, port.local_host, port.local_port)
        except OSError as exc:
            reason = (
                f"local {port.local_host}:{port.local_port} refused the connection"
                if isinstance(exc, ConnectionRefusedError)
                else f"cannot connect to local {port.local_host}:{port.local_port}: {exc}"
            )
            log.warning("%s; resetting the client's connection", reason)
            bridge.stats.error(reason)
            tunnel.conn.reset(bridge.stream_id, reason)
            tunnel.forget(bridge)
            tunnel.kick()

    async def ask(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Send a request to the agent and wait for its reply."""
        tunnel = self.tunnel
        if tunnel is None or tunnel.ws.closed:
            raise AgentError("no tunnel to the agent")
        try:
            request_id = tunnel.conn.request(op, args)
        except ProtocolError as exc:
            raise AgentError(f"cannot ask the agent: {exc}") from None
        reply: asyncio.Future[ev.ReplyReceived] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = reply
        tunnel.kick()
        ended: asyncio.Future[None] = asyncio.ensure_future(tunnel.closed())
        try:
            # A lost tunnel ends the wait: the agent will never answer.
            await asyncio.wait(
                [cast("asyncio.Future[Any]", reply), ended], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ended.cancel()
            self._replies.pop(request_id, None)
        if not reply.done():
            reply.cancel()
            raise AgentError("the tunnel closed before the agent answered")
        event = reply.result()
        if not event.ok:
            raise AgentError(event.error)
        return event.result

    def _live_tunnel(self) -> Tunnel | None:
        tunnel = self.tunnel
        return tunnel if tunnel is not None and not tunnel.ws.closed else None

    async def _start_exec(self) -> dict[str, Any]:
        """For netmirror exec: the target's environment, and its outgoing traffic."""
        assert self.tunnel is not None
        features = self.tunnel.conn.peer_info.get("features") or []
        targetless = self.target is not None and self.target.targetless
        needed = ("connect", "resolve") if targetless else ("connect", "resolve", "environ")
        missing = [f for f in needed if f not in features]
        if missing:
            version = self.tunnel.conn.peer_info.get("version", "unknown")
            raise AgentError(
                f"the agent (netmirror {version}) cannot run commands: it lacks "
                f"{', '.join(missing)}; use an agent image of netmirror {__version__}"
            )
        result: dict[str, Any] = {}
        if self.target is not None and self.target.targetless:
            result["targetless"] = True  # no target: no environment to read
        else:
            self.progress.step("reading the target's environment")
            try:
                environ = await asyncio.wait_for(self.ask("environ", {}), SUBSCRIBE_TIMEOUT)
                result.update(env=environ.get("env", {}), env_pid=environ.get("pid"))
            except (NetmirrorError, TimeoutError) as exc:
                result["env_error"] = str(exc) or "no answer"
        if self.config.outgoing.enabled:
            self.progress.step("sending the command's outgoing traffic through the target")
            from netmirror.daemon.exec.outgoing import Outgoing

            self.outgoing = Outgoing(
                self.record.name,
                self.config.outgoing,
                tunnel_of=self._live_tunnel,
                ask=self.ask,
                spawn=lambda coro: self.tasks.spawn(coro, name="dns"),
                agent_udp="udp" in features,
            )
            await self.outgoing.start()
            for warning in self.outgoing.warnings:
                self.progress.warn(warning)
            if self.outgoing.cgroup is not None:
                result["cgroup"] = str(self.outgoing.cgroup.path)
            else:
                result["proxy_env"] = self.outgoing.proxy_env
        return result

    async def _start_files(self) -> dict[str, Any]:
        """Mount the target's root; what the command needs to see its files at their paths.

        Files are an addition: when they cannot be had, the session goes on without
        them and says why (``error``).
        """
        assert self.tunnel is not None
        files = self.config.files
        if "files" not in (self.tunnel.conn.peer_info.get("features") or []):
            version = self.tunnel.conn.peer_info.get("version", "unknown")
            return {"error": f"the agent (netmirror {version}) cannot serve files"}
        self.progress.step("mounting the target's files")
        try:
            info = await asyncio.wait_for(self.ask("fs.info", {}), SUBSCRIBE_TIMEOUT)
            if "errno" in info:
                return {"error": f"the target's files cannot be read ({info['errno']})"}
            from netmirror.daemon.files import FilesMount, new_volumes
            from netmirror.daemon.files.fuse import TargetFS
            from netmirror.daemon.files.remote import RemoteFiles

            remote = RemoteFiles(tunnel_of=self._live_tunnel, ask=self.ask, timeout=files.timeout)
            writable = list(files.read_write)
            operations = TargetFS(
                remote,
                writable=writable,
                spawn=lambda coro, name: self.tasks.spawn(coro, name=name),
            )
            mount = FilesMount(
                self.sdir.path / "root",
                operations,
                spawn=lambda coro, name: self.tasks.spawn(coro, name=name),
            )
            await mount.start()
        except (NetmirrorError, TimeoutError, OSError, ImportError) as exc:
            log.warning("the target's files are not available: %s", exc)
            return {"error": str(exc) or "no answer"}
        self.files = mount
        known = self.target.volume_paths if self.target is not None else None
        if known is None:
            from netmirror.mounts import table

            volumes = new_volumes(list(info.get("mounts") or []), table.read())
        else:
            volumes = list(known)
        self.files_status = FilesStatus(root=str(mount.point), volumes=volumes, writable=writable)
        return {
            "root": str(mount.point),
            "volumes": volumes,
            "read_only": list(files.read_only),
            "read_write": list(files.read_write),
            "local": list(files.local),
        }

    async def _watch_owner(self, pid: int, start: int) -> None:
        """End the session when the netmirror exec that owns it is gone."""
        # No event tells us a non-child process exited; poll (pidfds need 3.12+ helpers).
        while pid_alive(pid, start):  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        log.info("the command's netmirror exec (pid %d) is gone: ending the session", pid)
        self._stop.set()

    # --- the tunnel --------------------------------------------------------------

    async def _connect(self) -> Tunnel:
        """Open the websocket and do the handshake."""
        assert self.agent is not None
        if self._session is not None:
            await self._session.close()
        # The timeout bounds the websocket handshake only, not the tunnel's life.
        self._session = aiohttp.ClientSession(
            connector=self.agent.connector(),
            timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT),
        )
        deadline = time.monotonic() + CONNECT_TIMEOUT
        delay = 0.05
        while True:
            try:
                ws = await self._session.ws_connect(
                    self.agent.url,
                    max_msg_size=WS_MAX_MESSAGE,
                    heartbeat=WS_HEARTBEAT,
                    compress=0,
                    autoping=True,
                )
                tune_tunnel_socket(ws.get_extra_info("socket"))
                break
            except (aiohttp.ClientError, OSError) as exc:
                if self.agent.exit_status() is not None:
                    raise AgentError(
                        f"the agent exited with code {self.agent.exit_status()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise AgentError(f"cannot reach the agent: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        conn = Connection(Role.DAEMON, token=self.token, session=self.record.name, limits=Limits())
        tunnel = Tunnel(ws, conn, handler=self._on_event, name="tunnel")
        self.tunnel = tunnel
        self._welcomed = asyncio.get_running_loop().create_future()
        tunnel.kick()
        return tunnel

    async def _subscribe_all(self, tunnel: Tunnel) -> None:
        async with self._subscribing:
            for remote, port in list(self.ports.items()):
                self.progress.step(
                    f"taking port {remote} ({port.mode} -> {port.local_host}:{port.local_port})"
                )
                try:
                    await self._subscribe_one(tunnel, remote, port)
                except AgentError as exc:
                    if remote not in self._dynamic:
                        raise
                    # A port the command listens on: not worth failing the session for.
                    log.warning("the command's port %d is not taken again: %s", remote, exc)
                    self._dynamic.discard(remote)
                    self.ports.pop(remote, None)

    async def _subscribe_one(self, tunnel: Tunnel, remote: int, port: PortConfig) -> None:
        """Take one port in the agent; AgentError if it refuses or does not answer."""
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = {}
        if port.mode == "mirror":
            options = {"method": port.mirror.method, "pcap": self.pcap is not None}
        elif port.http_filter is not None:
            options = {"http_filter": port.http_filter}
        options.update(self._probe_options(remote, port))
        request_id = tunnel.conn.subscribe(remote, port.mode, options)
        future: asyncio.Future[ev.SubscriptionAnswered] = loop.create_future()
        self._answers[request_id] = future
        tunnel.kick()
        try:
            answer = await asyncio.wait_for(future, SUBSCRIBE_TIMEOUT)
        except TimeoutError:
            raise AgentError(f"the agent did not answer for port {remote}") from None
        if not answer.ok:
            self.port_state[remote] = "failed"
            raise AgentError(f"port {remote}: {answer.error}")
        self.port_state[remote] = "active"

    # --- netmirror exec: the ports the command listens on ------------------------

    def _command_pids(self) -> set[int]:
        """The exec command's processes: its cgroup's, else the exec process's tree."""
        cgroup = self.outgoing.cgroup if self.outgoing is not None else None
        if cgroup is not None:
            try:
                text = (cgroup.path / "cgroup.procs").read_text()
                return {int(pid) for pid in text.split()}
            except OSError:
                pass
        # The exec process's tree, without this daemon's (its listeners are netmirror's).
        return descendants(int(self.exec["owner_pid"])) - descendants(os.getpid())

    async def _watch_listeners(self) -> None:
        """Apply the incoming mode to the ports the command listens on, as they come
        (within LISTEN_POLL) and go."""
        incoming = self.config.incoming
        refused: set[int] = set()  # remote ports the agent would not take: said once
        while True:
            await asyncio.sleep(LISTEN_POLL)
            pids = await asyncio.to_thread(self._command_pids)
            ports = await asyncio.to_thread(listening_ports, pids)
            wanted = {
                incoming.port_mapping.get(local, local): local
                for local in ports
                if local not in incoming.ignore_ports
            }
            refused &= set(wanted)  # closed and opened again: tried again
            for remote in [r for r in self.unserved if r not in wanted]:
                del self.unserved[remote]
            tunnel = self._live_tunnel()
            if tunnel is None:
                continue  # the reconnect subscribes self.ports again
            async with self._subscribing:
                await self._follow_listeners(tunnel, wanted, refused)

    async def _follow_listeners(
        self, tunnel: Tunnel, wanted: dict[int, int], refused: set[int]
    ) -> None:
        mode = self.config.incoming.mode
        new = {r: loc for r, loc in wanted.items() if r not in refused and r not in self.ports}
        features = self.agent.info.get("features") or [] if self.agent is not None else []
        if new and "listening" in features:
            try:
                answer = await asyncio.wait_for(self.ask("listening", {}), SUBSCRIBE_TIMEOUT)
                served = {int(p) for p in answer.get("ports", [])}
            except (NetmirrorError, TimeoutError, TypeError, ValueError) as exc:
                log.info("cannot ask which ports the target serves: %s", exc)
                served = set(new)  # take them, as without the question
            for remote, local in sorted(new.items()):
                if remote not in served and remote not in self.unserved:
                    # Not an error (a debugger's port, a port still being written): said
                    # once. A copy of nothing is pointless; a steal of it still gets
                    # the connections made to the pod's address.
                    self.unserved[remote] = local
                    if mode != "steal":
                        refused.add(remote)
                    log.warning(
                        "the command listens on %d, but the target does not serve port %d: %s",
                        local,
                        remote,
                        "stolen anyway" if mode == "steal" else "left alone",
                    )
        for remote, local in sorted(wanted.items()):
            if remote in refused or remote in self.ports:
                continue
            port = PortConfig(remote=remote, mode=mode, local=local)
            self.ports[remote] = port
            self._dynamic.add(remote)
            self.stats.setdefault(remote, PortStats())
            self.port_state[remote] = "pending"
            try:
                await self._subscribe_one(tunnel, remote, port)
            except AgentError as exc:
                if self._live_tunnel() is not tunnel:
                    return  # lost meanwhile: the reconnect takes it, with the others
                refused.add(remote)
                self._dynamic.discard(remote)
                del self.ports[remote]
                log.warning("the command listens on %d, but %s", local, exc)
                continue
            log.info("the command listens on %d: %s port %d", local, mode, remote)
        for remote in [r for r in self._dynamic if r not in wanted]:
            self._dynamic.discard(remote)
            self.ports.pop(remote, None)
            self.port_state[remote] = "off"
            tunnel.conn.unsubscribe(remote)
            tunnel.kick()
            log.info("the command closed port %d: given back", remote)

    async def _run_tunnel(self, tunnel: Tunnel) -> asyncio.Task[str]:
        task = self.tasks.spawn(tunnel.run(), name="tunnel")
        assert self._welcomed is not None
        done, _ = await asyncio.wait(
            [task, self._welcomed], timeout=CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if self._welcomed in done:
            welcome = self._welcomed.result()
            if self.agent is not None:
                self.agent.info.update(welcome.info)
            return task
        self._welcomed.cancel()
        reason = task.result() if task in done else "no answer to the hello"
        raise AgentError(f"the agent did not accept the tunnel: {reason}")

    # --- control socket ----------------------------------------------------------

    def status(self) -> SessionStatus:
        """What ``netmirror status`` shows."""
        agent = AgentStatus()
        if self.agent is not None:
            code = self.agent.exit_status()
            agent = AgentStatus(
                pid=self.agent.pid,
                state=(
                    f"exited ({code})"
                    if code is not None
                    else "connected"
                    if self.tunnel is not None and not self.tunnel.ws.closed
                    else "disconnected"
                ),
                backend=self.agent.info.get("backend"),
                addresses=list(self.agent.info.get("addresses", [])),
                mesh=_mesh_line(self.agent.info.get("mesh")),
                where=_agent_where(self.agent.info),
            )
        ports = []
        configured = {p.remote for p in self.config.ports}
        shown = [*self.config.ports, *(p for r, p in self.ports.items() if r not in configured)]
        for port in shown:
            counters = self.stats.get(port.remote, PortStats())
            report = self.agent_report.ports.get(port.remote, PortReport())
            entry = PortStatus(
                **dataclasses.asdict(counters),
                remote=port.remote,
                mode=port.mode,
                local=f"{port.local_host}:{port.local_port}",
                state=self.port_state.get(port.remote, "off"),
                probes=self._probes_line(port.remote, port),
            )
            if port.http_filter is not None:
                from netmirror.wire.httpfilter import describe_filter

                share = dataclasses.asdict(report.http) if report.http is not None else {}
                entry.http = HttpStatus(filter=describe_filter(port.http_filter), **share)
            if port.mode == "mirror":
                entry.method = port.mirror.method
                entry.mirror = report.mirror or MirrorCounters()
            ports.append(entry)
        return SessionStatus(
            session=self.record.name,
            target=self.record.target,
            state=self.state,
            daemon_pid=os.getpid(),
            version=__version__,
            started=self.started,
            reconnects=self.reconnects,
            agent=agent,
            ports=ports,
            capture=self.agent_report.capture,
            outgoing=self.outgoing.status() if self.outgoing is not None else None,
            unserved=[
                UnservedPort(remote=remote, local=local, taken=self.config.incoming.mode == "steal")
                for remote, local in sorted(self.unserved.items())
            ],
            pcap=self.pcap.status() if self.pcap is not None else None,
            files=self._files_status(),
            forwards=[
                ForwardStatus(
                    **dataclasses.asdict(stats),
                    local=f"{forward.local_host}:{forward.local_port}",
                    to=f"{forward.host}:{forward.port}",
                    state="listening",
                )
                for forward, _server, stats in self._forwards
            ],
        )

    def _files_status(self) -> FilesStatus | None:
        status = self.files_status
        if status is None or self.files is None:
            return status
        fs = self.files.operations
        status.requests = fs.requests
        status.bytes_read = fs.remote.stats.bytes_in
        status.bytes_written = fs.remote.stats.bytes_out
        return status

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                request = json.loads(line)
                command = request.get("command") if isinstance(request, dict) else None
            except ValueError:
                command = None
            response: dict[str, Any]
            if command == "status":
                response = {"ok": True, "status": to_json(self.status())}
            elif command == "down":
                response = {"ok": True}
                drain = request.get("drain", 0)
                if isinstance(drain, int | float) and not isinstance(drain, bool):
                    self._drain = min(max(float(drain), 0.0), 600.0)
                self._stop.set()
            else:
                response = {"ok": False, "error": f"unknown command {command!r}"}
            writer.write(json.dumps(response).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    # --- life --------------------------------------------------------------------

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._stop.set)
        control = await asyncio.start_unix_server(self._control, path=str(self.sdir.control_socket))
        os.chmod(self.sdir.control_socket, 0o600)
        if self.exec:
            self.tasks.spawn(
                self._watch_owner(int(self.exec["owner_pid"]), int(self.exec["owner_start"])),
                name="owner",
            )
        try:
            start = self.tasks.spawn(self._start(), name="start")
            stop = self.tasks.spawn(self._stop.wait(), name="stop-while-starting")
            await asyncio.wait([start, stop], return_when=asyncio.FIRST_COMPLETED)
            if not start.done():
                start.cancel()
                self.progress.send(error="stopped while starting")
                return 1
            try:
                tunnel_task = start.result()
            except NetmirrorError as exc:
                log.error("%s", exc)
                self.progress.send(error=str(exc))
                return 1
            exec_info: dict[str, Any] = {}
            if self.exec:
                exec_start = self.tasks.spawn(self._start_exec(), name="exec")
                await asyncio.wait([exec_start, stop], return_when=asyncio.FIRST_COMPLETED)
                if not exec_start.done():
                    exec_start.cancel()
                    self.progress.send(error="stopped while starting")
                    return 1
                try:
                    exec_info = exec_start.result()
                except NetmirrorError as exc:
                    log.error("%s", exc)
                    self.progress.send(error=str(exc))
                    return 1
            targetless = self.target is not None and self.target.targetless
            if self.config.files.enabled and not targetless:
                files_start = self.tasks.spawn(self._start_files(), name="files-start")
                await asyncio.wait([files_start, stop], return_when=asyncio.FIRST_COMPLETED)
                if not files_start.done():
                    files_start.cancel()
                    self.progress.send(error="stopped while starting")
                    return 1
                exec_info["files"] = files_start.result()
            if (
                self.exec
                and not self.ports
                and self.config.incoming.mode != "off"
                and not targetless
            ):
                self.tasks.spawn(self._watch_listeners(), name="listeners")
            self.state = "ready"
            self.progress.send(ready=True, status=to_json(self.status()), exec=exec_info)
            self.progress.close()
            await self._serve(tunnel_task)
            return 0
        finally:
            self.state = "stopping"
            self.progress.close()
            control.close()
            await self._shutdown()

    async def _start(self) -> asyncio.Task[str]:
        target = resolve_target(self.record.target, self.config, session=self.record.name)
        self.target = target
        if target.targetless and self.config.active_ports():
            ports = ", ".join(str(p.remote) for p in self.config.active_ports())
            raise TargetError(
                f"a targetless session takes no incoming traffic (ports {ports}): "
                "drop --steal/--mirror and ports:, or give a target (--target pod/NAME)"
            )
        if self.config.pcap is not None:
            self.pcap = PcapWriter(Path(self.config.pcap.path), self.config.pcap.max_bytes)
        self.progress.step(f"starting the agent in {target.describe()}")
        settings = AgentSettings(
            session=self.record.name,
            token=self.token,
            workdir=self.sdir.path,
            ttl=self.config.agent.ttl,
            ready_timeout=self.config.agent.ready_timeout,
            debug=self.debug,
            # Reading another user's environment and root takes the same capability.
            read_environment=(bool(self.exec) or self.config.files.enabled)
            and not target.targetless,
        )
        self.agent = await target.start_agent(
            settings, log_file=self.log_file, progress=self.progress.step, warn=self.progress.warn
        )
        self.record.agent_pid = self.agent.pid
        self.record.agent_start = pid_start(self.agent.pid) or 0 if self.agent.pid else 0
        self.sdir.write(self.record)
        self.progress.step("connecting to the agent")
        tunnel = await self._connect()
        task = await self._run_tunnel(tunnel)
        self._announce_mesh()
        await self._subscribe_all(tunnel)
        await self._start_forwards()
        return task

    async def _start_forwards(self) -> None:
        """Listen on the local ports of ``port_forward``: each connection reaches its host
        and port from the target (the agent resolves names as the target does)."""
        if not self.config.port_forward or self._forwards:
            return
        features = self.agent.info.get("features") or [] if self.agent is not None else []
        if "connect" not in features:
            raise AgentError("the agent cannot connect for port-forward: use a newer agent image")
        from netmirror.daemon.exec.outgoing import ForwardBridge

        loop = asyncio.get_running_loop()
        for forward in self.config.port_forward:
            stats = PortStats()
            dst = (forward.host, forward.port)
            local = f"{forward.local_host}:{forward.local_port}"
            self.progress.step(f"forwarding {local} to {forward.host}:{forward.port}")
            try:
                server = await loop.create_server(
                    functools.partial(ForwardBridge, self._live_tunnel, stats, dst),
                    forward.local_host,
                    forward.local_port,
                )
            except OSError as exc:
                raise AgentError(f"cannot listen on {local}: {exc.strerror or exc}") from None
            self._forwards.append((forward, server, stats))

    def _probe_options(self, remote: int, port: PortConfig) -> dict[str, Any]:
        """How a stolen port's health probes stay with the target (say so once)."""
        target = self.target
        probes = (target.probes or {}).get(remote) if target is not None else None
        if port.mode != "steal" or not probes or self.config.steal_probes:
            return {}
        if port.http_filter is not None:
            return {"keep_probes": True}  # the router tells them by their User-Agent
        sources = (target.probe_sources if target is not None else None) or []
        mesh = self._mesh()
        if mesh is not None and mesh.known:
            # Behind the sidecar every connection comes from the proxy, probes too (the
            # mesh rewrites them): they cannot be told apart by address.
            if remote not in self._probes_said:
                self._probes_said.add(remote)
                self.progress.warn(
                    f"port {remote}: behind the {mesh.describe().split(' (')[0]} the kubelet's"
                    f" probes ({', '.join(probes)}) reach the application through the proxy,"
                    " so a whole-port steal takes them too; a filtered steal (--http-header)"
                    " keeps httpGet probes with the target"
                )
            return {}
        if not sources:
            return {}
        if remote not in self._probes_said:
            self._probes_said.add(remote)
            self.progress.warn(
                f"port {remote}: the kubelet's probes ({', '.join(probes)}) stay with the"
                f" target, so every connection from the node's address"
                f" ({', '.join(sources)}) does, NodePort and host-network clients' too;"
                " --steal-probes steals them, a filtered steal (--http-header) tells probes"
                " apart by their User-Agent"
            )
        return {"keep_from": sources}

    def _probes_line(self, remote: int, port: PortConfig) -> str | None:
        target = self.target
        probes = (target.probes or {}).get(remote) if target is not None else None
        if not probes:
            return None
        if port.mode != "steal":
            where = "the target (not stolen)"
        elif self.config.steal_probes:
            where = "the local process (--steal-probes)"
        elif port.http_filter is not None:
            where = "the target (told apart by their User-Agent)"
        elif (mesh := self._mesh()) is not None and mesh.known:
            where = "the local process (behind the mesh's proxy they cannot be told apart)"
        else:
            sources = ", ".join((target.probe_sources if target is not None else None) or [])
            where = f"the target (connections from {sources or 'the node'})"
        return f"{'; '.join(probes)}: go to {where}"

    def _mesh(self) -> Mesh | None:
        """The mesh the agent found in the target's namespace, if any."""
        return Mesh.from_json(self.agent.info.get("mesh")) if self.agent is not None else None

    def _announce_mesh(self) -> None:
        """Say which mesh the agent found, and where netmirror hooked because of it."""
        mesh = Mesh.from_json(self.agent.info.get("mesh")) if self.agent is not None else None
        if not any(port.mode != "off" for port in self.config.ports):
            return
        hint = self.target.mesh_hint if self.target is not None else None
        if hint is not None and (
            mesh is None or "ambient" in hint or hint.split()[0] != mesh.describe().split()[0]
        ):
            # e.g. ambient mode, or a CNI that redirects outside the pod's nat table.
            self.progress.warn(
                f"the pod says it runs in a mesh ({hint}) but its nat table shows"
                f" {'no mesh rules' if mesh is None else mesh.describe()}: netmirror hooks as"
                " in a pod without one, so what it steals or mirrors may be the mesh's"
                " encrypted traffic"
            )
            return
        if mesh is None:
            return
        if mesh.known:
            self.progress.step(
                f"found {mesh.describe()}: stealing behind it, on the plaintext connection"
                " its proxy makes to the application"
            )
        else:
            self.progress.warn(
                f"the target's nat table has {mesh.describe()}: a proxy netmirror does not"
                " know may change what the application receives; what netmirror steals or"
                " mirrors is what arrives before it"
            )

    async def _serve(self, tunnel_task: asyncio.Task[str]) -> None:
        stop = self.tasks.spawn(self._stop.wait(), name="stop")
        while True:
            await asyncio.wait([tunnel_task, stop], return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                return
            reason = tunnel_task.result() if not tunnel_task.cancelled() else "cancelled"
            assert self.agent is not None
            if self._agent_stopping:
                log.error("the agent stopped (%s); ending the session", reason)
                return
            if self.agent.exit_status() is not None:
                log.error(
                    "the agent exited with code %s; ending the session", self.agent.exit_status()
                )
                return
            log.warning("tunnel lost (%s); reconnecting", reason)
            # Answers the lost tunnel owed will not come: their askers hear it now.
            for future in self._answers.values():
                if not future.done():
                    future.set_exception(AgentError("the tunnel to the agent was lost"))
            self._answers.clear()
            self.state = "reconnecting"
            for remote in self.port_state:
                self.port_state[remote] = "pending"
            next_task = await self._reconnect(stop)
            if next_task is None:
                return
            tunnel_task = next_task
            self.reconnects += 1
            self.state = "ready"

    async def _reconnect(self, stop: asyncio.Task[Any]) -> asyncio.Task[str] | None:
        delay = 0.1
        while not stop.done():
            try:
                tunnel = await self._connect()
                task = await self._run_tunnel(tunnel)
                await self._subscribe_all(tunnel)
                log.info("tunnel re-established")
                return task
            except NetmirrorError as exc:
                assert self.agent is not None
                if self.agent.exit_status() is not None:
                    log.error("the agent exited with code %s", self.agent.exit_status())
                    return None
                log.warning("reconnect failed: %s; retrying in %.1fs", exc, delay)
                await asyncio.wait([stop], timeout=delay)
                delay = min(delay * 2, BACKOFF_MAX)
        return None

    async def _drain_stolen(self) -> None:
        """At down: new connections go to the target at once, and those still open may
        finish, for ``--drain`` seconds. The agent keeps its rules meanwhile (removing
        them would cut the live connections' NAT) and relays the new ones itself."""
        stolen = [remote for remote, port in self.ports.items() if port.mode == "steal"]
        tunnel = self._live_tunnel()

        def still_open() -> int:
            return sum(self.stats[r].connections_open for r in stolen if r in self.stats)

        if self._drain <= 0 or tunnel is None or not still_open():
            return
        log.info("draining: %d connection(s) may finish", still_open())
        for remote in stolen:
            tunnel.conn.subscribe(remote, "steal", {"drain": True})
        tunnel.kick()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain
        while still_open() and loop.time() < deadline:  # noqa: ASYNC110 - counters, no event
            await asyncio.sleep(0.05)
        if still_open():
            log.info("%d connection(s) still open after the drain: reset", still_open())

    async def _shutdown(self) -> None:
        log.info("stopping the session")
        for _forward, server, _stats in self._forwards:
            server.close()
        if self.files is not None:
            await self.files.stop()
        if self.outgoing is not None:
            await self.outgoing.stop()
        await self._drain_stolen()
        # The agent first: it removes its rules before it closes its listeners and
        # the tunnel, so new connections go straight back to the target.
        if self.agent is not None:
            await self.agent.stop(self.tunnel)
            log.info("agent stopped (exit code %s)", self.agent.exit_status())
        if self.tunnel is not None:
            await self.tunnel.close()
            self.tunnel.abort_streams("the session is stopping")
        await self.tasks.close()
        if self._session is not None:
            await self._session.close()
        if self.pcap is not None:
            self.pcap.close()


def run(session: str, *, ready_fd: int | None, debug: bool = False) -> int:
    """Entry point of ``netmirror daemon`` (started by ``netmirror up``)."""
    import sys

    import uvloop

    from netmirror import logs

    sdir = SessionDir(session)
    progress = Progress(ready_fd)
    logs.setup(session=session, role="daemon", debug=debug)
    try:
        record = sdir.read()
        config = Config.model_validate(record.config)
    except (NetmirrorError, ValueError) as exc:
        progress.send(error=f"cannot read the session: {exc}")
        return 1
    raise_fd_limit()
    keep_heap_mapped()
    record.daemon_pid = os.getpid()
    record.daemon_start = pid_start(os.getpid()) or 0
    sdir.write(record)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            daemon = Daemon(
                sdir, record, config, progress=progress, log_file=sys.stderr.buffer, debug=debug
            )
            return runner.run(daemon.main())
    finally:
        log.info("session ended")
        sdir.remove()


def _agent_where(info: dict[str, Any]) -> str | None:
    """How and where a Kubernetes agent runs, for ``status``; None for a local one."""
    mode, name = info.get("mode"), info.get("agent")
    if not mode or not name:
        return None
    if mode == "ephemeral":
        return f"ephemeral container {name} in pod {info.get('namespace')}/{info.get('pod')}"
    namespace = info.get("agent_namespace") or info.get("namespace")
    node = f", on node {info['node']}" if info.get("node") else ""
    return f"{mode} {name} in namespace {namespace}{node}"


def _mesh_line(data: object) -> str | None:
    """The mesh an agent reported, and where netmirror hooked, for ``status``."""
    mesh = Mesh.from_json(data)
    if mesh is None:
        return None
    if mesh.known:
        return f"{mesh.describe()}; stolen on the proxy's connection to the application (lo)"
    return f"{mesh.describe()}; netmirror hooks in front of it"
