"""The HTTP router of one port of a target, shared by every session that filters it.

Sessions that steal only some HTTP requests of a port cannot each own the port's
REDIRECT rule, so the first agent that needs one starts this process (in the
target's network namespace) and every agent registers with it:

* the router binds the abstract unix socket ``"\\0netmirror-http/<port>"``; an agent
  connects, sends one JSON line ``{"session", "filter", "socket"}`` and keeps the
  connection open: that connection *is* the registration (EOF ends it), and the
  router writes counters on it once a second;
* the router takes the port with an ordinary steal chain, session ``http-<port>``,
  guarded like an agent's (:mod:`netmirror.netfilter.guard`), so the rule goes even
  if the router is killed;
* each client connection gets a :class:`~netmirror.router.http1.Relay`: each request
  goes to the first registered session (in order of registration) whose filter
  matches, through that agent's own abstract socket; the others go to the original
  server over pooled connections; responses return in order;
* when the last registration is gone, the router removes its rule and exits.

Run: ``python -m netmirror.router --port P --backend nft|legacy``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

from netmirror.errors import NetmirrorError
from netmirror.net.sockets import (
    abort_with_reset,
    connect_marked,
    listen_any_port,
    original_destination,
)
from netmirror.netfilter import AGENT_MARK, Backend, Guard, IptablesNat, Redirect, router_session
from netmirror.netfilter.mesh import find_mesh
from netmirror.router import http2
from netmirror.router.http1 import (
    ORIGINAL,
    Close,
    Connect,
    Pipe,
    Relay,
    Release,
    ToClient,
    ToUpstream,
    parse_request_head,
)
from netmirror.tasks import TaskSet, keep_heap_mapped, raise_fd_limit
from netmirror.wire.httpfilter import HttpFilter, RequestHead
from netmirror.wire.registry import EXIT_IN_USE, ROUTER_LINGER, registry_address, session_address

log = logging.getLogger(__name__)

#: Seconds a new connection may take to send its first request head; after that it
#: is passed to the original server as it is (a protocol where the server speaks first).
HEAD_TIMEOUT = 5.0
#: Seconds a keep-alive client connection may stay idle between requests.
IDLE_TIMEOUT = 300.0
#: Seconds between two looks for idle connections (one sweep, rather than a timer
#: set and cancelled on every request).
IDLE_SWEEP = 5.0
#: Seconds connections already relayed may go on once the router stops taking new ones.
DRAIN_TIMEOUT = 30.0
#: Seconds a probe's answer (does the original server speak HTTP/2?) is trusted.
H2C_PROBE_TTL = 60.0
#: Largest first request head looked at for an h2c upgrade.
MAX_SNIFF = 64 * 1024
#: Bytes of a request sent to a session that are kept to give it to the original
#: server instead if the session goes away before answering.
MAX_KEPT_REQUEST = 1024 * 1024
#: Idle pooled connections to the original server, per destination.
POOL_SIZE = 32
HIGH_WATER = 1024 * 1024


@dataclass
class Registration:
    session: str
    filter: HttpFilter
    address: str
    writer: asyncio.StreamWriter
    matched: int = 0
    keep_probes: bool = False
    """The kubelet's probes (User-Agent ``kube-probe/``) stay with the target."""


@dataclass
class Counters:
    """What the router reports to every registered agent once a second."""

    passed: int = 0
    """Requests no session's filter matched, given to the original server."""


class Router:
    """Serves one port: registrations, the redirect rule, and the client connections."""

    def __init__(self, port: int, backend: Backend) -> None:
        self.port = port
        self.backend = backend
        self.registrations: OrderedDict[str, Registration] = OrderedDict()
        self.counters = Counters()
        self.pool: dict[tuple[str, int], list[Upstream]] = {}
        self._h2c: dict[tuple[str, int], tuple[float, bool]] = {}
        self.clients: set[ClientConnection] = set()
        self._changed = asyncio.Event()
        self._firewall = IptablesNat(router_session(port), backend=backend)
        self.tasks = TaskSet(f"router-{port}")

    # --- routing ---------------------------------------------------------------------

    def route(self, head: RequestHead) -> str:
        probe: bool | None = None
        for reg in self.registrations.values():
            if reg.keep_probes:
                if probe is None:
                    probe = is_probe(head)
                if probe:
                    continue
            if reg.filter.matches(head):
                reg.matched += 1
                return reg.session
        self.counters.passed += 1
        return ORIGINAL

    async def speaks_h2c(self, dst: tuple[str, int]) -> bool:
        """Whether the original server at ``dst`` speaks HTTP/2 with prior knowledge."""
        known = self._h2c.get(dst)
        if known is not None and time.monotonic() - known[0] < H2C_PROBE_TTL:
            return known[1]
        loop = asyncio.get_running_loop()
        answer = b""
        with contextlib.suppress(OSError, TimeoutError):
            sock = await asyncio.wait_for(connect_marked(dst, mark=AGENT_MARK), 1.0)
            with sock:
                # The preface and an empty SETTINGS frame; a server of HTTP/2 answers
                # with its SETTINGS frame (type 4), one of HTTP/1.1 with an error or nothing.
                await loop.sock_sendall(
                    sock, http2.PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
                )
                while len(answer) < 9:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 9 - len(answer)), 1.0)
                    if not chunk:
                        break
                    answer += chunk
        result = len(answer) >= 9 and answer[3] == 4
        self._h2c[dst] = (time.monotonic(), result)
        log.info("%s:%d %s HTTP/2", dst[0], dst[1], "speaks" if result else "does not speak")
        return result

    # --- registrations --------------------------------------------------------------

    async def _registration(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        session = ""
        try:
            if not _same_user(writer):
                # Abstract sockets have no permissions: anyone in the namespace could
                # otherwise take requests, or have the router connect somewhere.
                writer.write(b'{"ok": false, "error": "registrations come from agents only"}\n')
                return
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                request = json.loads(line)
                session = str(request["session"])
                filt = HttpFilter.parse(request["filter"])
                # Requests go only to the session's own agent socket, never elsewhere.
                address = session_address(self.port, session)
                if request.get("socket") != address:
                    raise ValueError(f"the socket of session {session!r} is {address[1:]!r}")
            except (ValueError, KeyError, TypeError) as exc:
                writer.write(
                    json.dumps({"ok": False, "error": f"bad registration: {exc}"}).encode() + b"\n"
                )
                return
            if session in self.registrations:
                writer.write(
                    json.dumps(
                        {"ok": False, "error": f"session {session!r} is already registered"}
                    ).encode()
                    + b"\n"
                )
                return
            self.registrations[session] = Registration(
                session, filt, address, writer, keep_probes=request.get("keep_probes") is True
            )
            order = list(self.registrations).index(session) + 1
            log.info(
                "session %s filters port %d (%s), place %d",
                session,
                self.port,
                filt.describe(),
                order,
            )
            answer = {"ok": True, "order": order, "sessions": list(self.registrations)}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
            self._changed.set()
            # The registration lasts as long as this connection.
            while await reader.read(4096):
                pass
        except (ConnectionError, TimeoutError):
            pass
        finally:
            if (
                session
                and session in self.registrations
                and self.registrations[session].writer is writer
            ):
                del self.registrations[session]
                log.info("session %s left port %d", session, self.port)
                self._changed.set()
            writer.close()

    async def _report(self) -> None:
        """Counters to every registered agent, once a second."""
        while True:
            await asyncio.sleep(1.0)
            for reg in list(self.registrations.values()):
                line = {
                    "matched": reg.matched,
                    "passed": self.counters.passed,
                    "sessions": list(self.registrations),
                }
                with contextlib.suppress(ConnectionError, RuntimeError):
                    reg.writer.write(json.dumps(line).encode() + b"\n")

    async def _sweep(self) -> None:
        """Close the client connections idle between requests for over IDLE_TIMEOUT."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(IDLE_SWEEP)
            now = loop.time()
            for client in list(self.clients):
                if client.idle_since is not None and now - client.idle_since > IDLE_TIMEOUT:
                    try:
                        client.expire()
                    except Exception:  # one connection's bug must not stop the sweep
                        log.exception("closing an idle connection")
                        client.abort()

    # --- life ---------------------------------------------------------------------------

    async def run(self, registry: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        reg_server = await asyncio.start_unix_server(self._registration, sock=registry)
        servers: list[asyncio.AbstractServer] = []
        redirects: list[Redirect] = []
        for family, server, to_port in await listen_any_port(lambda: ClientConnection(self)):
            servers.append(server)
            redirects.append(Redirect(self.port, to_port, family))
        mesh = await asyncio.to_thread(find_mesh)
        if mesh is not None and mesh.known:
            # Behind the mesh's sidecar, as the agents' own steals are.
            self._firewall = IptablesNat(
                router_session(self.port), backend=self.backend, behind_mesh=True
            )
        guard = await asyncio.to_thread(Guard.start, router_session(self.port), self.backend)
        try:
            await asyncio.to_thread(self._firewall.apply, self._firewall.plan(redirects))
            reporter = self.tasks.spawn(self._report(), name="report")
            sweeper = self.tasks.spawn(self._sweep(), name="sweep")
            print("ready", flush=True)
            empty_since: float | None = time.monotonic()
            while not stop.is_set():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.25)
                if self.registrations:
                    empty_since = None
                elif empty_since is None:
                    empty_since = time.monotonic()
                elif time.monotonic() - empty_since > ROUTER_LINGER:
                    break
            reporter.cancel()
            sweeper.cancel()
        finally:
            # The rule first: new connections reach the original server directly. Then
            # the name and the registry go, so a new router may start at once.
            with contextlib.suppress(NetmirrorError):
                await asyncio.to_thread(self._firewall.teardown)
            await asyncio.to_thread(guard.close)
            reg_server.close()
            for listener in servers:
                listener.close()
            # Connections already here (passing through to the target's server, most of
            # them) finish rather than being cut, for a while.
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while self.clients and time.monotonic() < deadline and not stop.is_set():
                for client in list(self.clients):
                    if client.idle():
                        client.abort(reset=False)  # between requests: nothing is lost
                await asyncio.sleep(0.1)
            for client in list(self.clients):
                client.abort()
            await self.tasks.close()
            log.info("router of port %d stopped", self.port)
        return 0


# --- connections ------------------------------------------------------------------------


class Upstream(asyncio.Protocol):
    """A connection to the original server or to a session's agent."""

    def __init__(self, target: str, key: tuple[str, int] | None) -> None:
        self.target = target
        self.key = key
        self.owner: ClientConnection | H2Handler | None = None
        self.transport: asyncio.Transport | None = None
        self.backlog: list[bytes] = []
        self.closed = False
        self.cancelled = False  # closed by us while it was still connecting
        self.paused = False  # its write buffer is over the high-water mark
        self._ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.cancelled:
            self.transport.close()
            return
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        # What was written while connecting goes first, in order.
        for chunk in self.backlog:
            self.transport.write(chunk)
        self.backlog.clear()

    def write(self, data: bytes) -> None:
        """Send ``data``, or keep it until the connection is made."""
        if self.transport is None:
            self.backlog.append(data)
        elif not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner.from_upstream(self, data)

    @property
    def reusable(self) -> bool:
        """Still open both ways: the server has not closed its side (it may, while idle)."""
        if self.closed or self._ended:
            return False
        return self.transport is None or not self.transport.is_closing()

    def eof_received(self) -> bool:
        owner = self.owner
        self._end(None)
        # A piped connection stays open for what the client still sends.
        return isinstance(owner, ClientConnection) and owner.piping

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._end(exc)

    def _end(self, exc: Exception | None) -> None:
        if not self._ended:
            self._ended = True
            if self.owner is not None:
                self.owner.upstream_ended(self, exc)

    def pause_writing(self) -> None:
        self.paused = True
        if self.owner is not None:
            self.owner.upstream_full()

    def resume_writing(self) -> None:
        self.paused = False
        if self.owner is not None:
            self.owner.upstream_full()

    def close(self) -> None:
        self.owner = None
        if self.transport is None:
            self.cancelled = True  # closed as soon as it connects
        elif not self.transport.is_closing():
            self.transport.close()


class ClientConnection(asyncio.Protocol):
    """One client of the port: its requests routed one by one."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.relay = Relay(router.route)
        self.transport: asyncio.Transport | None = None
        self.dst: tuple[str, int] = ("127.0.0.1", router.port)
        self.upstream: Upstream | None = None
        self.kept: dict[str, Upstream] = {}
        self.pending: list[bytes] = []
        self.sent_to_session: list[bytes] = []
        self.sent_bytes = 0
        """The size of :attr:`sent_to_session`."""
        self.answered = False
        self.piping = False
        self.client_eof = False
        self.upstream_eof = False  # the piped upstream closed its side
        self.keep_for_fallback = True  # the request sent to a session is kept whole
        self.done = False
        self.h2: H2Handler | None = None
        # The first bytes, until they show whether this is HTTP/2 with prior knowledge.
        self._first: bytes | None = b""
        self._timer: asyncio.TimerHandle | None = None  # for the first request head
        self.idle_since: float | None = None
        """The loop's time since when the connection waits between requests."""
        self._reading = True  # whether the client's transport is being read
        self._upgrading = False  # waiting to know whether the server speaks HTTP/2
        self._connecting: asyncio.Task[None] | None = None

    # client side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dst = original_destination(sock)
        if dst is not None:
            self.dst = dst
        self.router.clients.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HEAD_TIMEOUT, self._head_timeout)

    def _head_timeout(self) -> None:
        if self._first:
            data, self._first = self._first, None
            self.relay.client_data(data)
        self._first = None
        self.relay.head_timeout()
        self._act()

    def _begin_upgrade(self, upgrade: http2.H2cUpgrade, seen: bytes, head_end: int) -> None:
        """An h2c upgrade: answered here, if the original server speaks HTTP/2."""
        assert self.transport is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._upgrading = True
        self._update_reading()
        self.router.tasks.spawn(self._upgrade(upgrade, seen, head_end), name="h2c-upgrade")

    async def _upgrade(self, upgrade: http2.H2cUpgrade, seen: bytes, head_end: int) -> None:
        try:
            speaks_h2 = await self.router.speaks_h2c(self.dst)
        except Exception as exc:  # any failure: the request goes on as HTTP/1.1
            log.info("probing %s:%d for HTTP/2: %r", *self.dst, exc)
            speaks_h2 = False
        if self.done or self.transport is None:
            return
        if not speaks_h2:
            # An HTTP/1.1 server: it will answer in HTTP/1.1; route the request as such.
            self.relay.client_data(seen)
            self._act()
        else:
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            )
            self.h2 = H2Handler(self, upgrade=upgrade)
            if seen[head_end:]:
                self.h2.client_data(seen[head_end:])
        self._upgrading = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self.h2 is not None:
            self.h2.client_data(data)
            return
        if self._first is not None:
            seen = self._first + data
            preface = http2.PREFACE
            if preface.startswith(seen[: len(preface)]):
                if len(seen) < len(preface):
                    self._first = seen  # could still be HTTP/2: wait for the rest
                    return
                self._first = None
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self.h2 = H2Handler(self)
                self.h2.client_data(seen)
                return
            end = seen.find(b"\r\n\r\n")
            if end < 0 and len(seen) < MAX_SNIFF and _may_be_request(seen):
                self._first = seen  # an HTTP/1 head: it may ask for an h2c upgrade
                return
            self._first = None
            upgrade = _h2c_upgrade(seen[: end + 4]) if end >= 0 else None
            if upgrade is not None:
                self._begin_upgrade(upgrade, seen, end + 4)
                return
            data = seen
        if self.piping:
            self._send_upstream(data)
            return
        self.relay.client_data(data)
        self._act()

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.h2 is not None:
            self.h2.client_eof()
            return True
        if self._first:
            # EOF in the middle of what looked like an HTTP/2 preface: plain bytes.
            data, self._first = self._first, None
            self.relay.client_data(data)
        self._first = None
        if self.piping:
            self._upstream_eof_if_piping()
            return True
        self.relay.client_eof()
        self._act()
        return True

    def _upstream_eof_if_piping(self) -> None:
        """A piped connection passes the client's half-close on to the upstream."""
        up = self.upstream
        if self.piping and self.client_eof and up is not None and up.transport is not None:
            with contextlib.suppress(OSError, RuntimeError):
                if up.transport.can_write_eof():
                    up.transport.write_eof()
            self._close_if_piped_out()

    def _close_if_piped_out(self) -> None:
        """Both ends of a piped connection said they are done: close it."""
        if self.piping and self.client_eof and self.upstream_eof:
            if self.upstream is not None:
                self.upstream.close()
            if self.transport is not None:
                self.transport.close()

    def abort(self, *, reset: bool = True) -> None:
        """Close the connection (the router is going away)."""
        self._close(reset=reset)

    def idle(self) -> bool:
        """Between requests: no exchange, pipe or HTTP/2 stream in progress."""
        if self.h2 is not None:
            return self.h2.relay.streams == 0
        return self.upstream is None and not self.piping and not self._first

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.router.clients.discard(self)
        if self.h2 is not None:
            self.h2.close_upstreams()
        if self._timer is not None:
            self._timer.cancel()
        if self.upstream is not None:
            self.upstream.close()
        for up in self.kept.values():
            pool = self.router.pool.setdefault(self.dst, [])
            if up.target == ORIGINAL and up.reusable and len(pool) < POOL_SIZE:
                pool.append(up)  # idle between requests: another client may use it
            else:
                up.close()
        self.kept.clear()
        self.upstream = None

    def pause_writing(self) -> None:
        ups = self.h2.ups.values() if self.h2 is not None else [self.upstream]
        for up in ups:
            if up is not None and up.transport is not None:
                up.transport.pause_reading()

    def resume_writing(self) -> None:
        ups = self.h2.ups.values() if self.h2 is not None else [self.upstream]
        for up in ups:
            if up is not None and up.transport is not None:
                up.transport.resume_reading()

    # upstream side

    def _forget_sent(self) -> None:
        """What was sent to a session is no longer needed for a replay."""
        self.sent_to_session.clear()
        self.sent_bytes = 0

    def from_upstream(self, up: Upstream, data: bytes) -> None:
        if up is not self.upstream or self.transport is None:
            return
        self.answered = True
        self._forget_sent()
        if self.piping:
            self.transport.write(data)
            return
        self.relay.upstream_data(data)
        self._act()

    def upstream_ended(self, up: Upstream, exc: Exception | None) -> None:
        for target, kept in list(self.kept.items()):
            if kept is up:
                del self.kept[target]
        if up is not self.upstream or self.done:
            return
        if self.piping:
            self.upstream_eof = True
            if exc is None and self.transport is not None and self.transport.can_write_eof():
                self.transport.write_eof()
                self._close_if_piped_out()
            else:
                abort_with_reset(self.transport)
            return
        if not self.answered and up.target != ORIGINAL and self.sent_to_session:
            # The session went away before it answered: the request is whole here,
            # so the original server takes it instead of the client getting an error.
            replay = list(self.sent_to_session)
            self._forget_sent()
            self.upstream = None
            self._attach(ORIGINAL)
            for chunk in replay:
                self._send_upstream(chunk)
            return
        if exc is not None:
            self.relay.upstream_failed(str(exc))
        else:
            self.relay.upstream_eof()
        self._act()

    # actions

    def _act(self) -> None:
        for action in self.relay.actions():
            if self.done:
                return
            if isinstance(action, Connect):
                self._attach(action.target)
            elif isinstance(action, ToUpstream):
                up = self.upstream
                if up is not None and up.target != ORIGINAL and self.keep_for_fallback:
                    self.sent_to_session.append(action.data)
                    self.sent_bytes += len(action.data)
                    if self.sent_bytes > MAX_KEPT_REQUEST:
                        # Too big to keep: if this session fails, the client gets an error.
                        self.keep_for_fallback = False
                        self._forget_sent()
                self._send_upstream(action.data)
            elif isinstance(action, ToClient):
                if self.transport is not None:
                    self.transport.write(action.data)
            elif isinstance(action, Release):
                self._release(action.reusable)
            elif isinstance(action, Pipe):
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self.piping = True
                self._upstream_eof_if_piping()
            elif isinstance(action, Close):
                self._close(action.reset)
        self._update_reading()

    def upstream_full(self) -> None:
        """An upstream's write buffer filled up or drained: stop or go on reading."""
        self._update_reading()

    def _upstream_is_full(self) -> bool:
        """Whether an upstream the client's bytes go to cannot take more now."""
        if self.h2 is not None:
            return any(up.paused and not up.closed for up in self.h2.ups.values())
        up = self.upstream
        return up is not None and up.paused and not up.closed

    def _update_reading(self) -> None:
        """Read the client only while the relay wants its bytes and the upstream takes them."""
        if self.transport is None or self.done:
            return
        want = not self._upgrading and not self._upstream_is_full()
        if want and self.h2 is None and not self.piping:
            want = self.relay.want_client_data
        if want != self._reading:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def expire(self) -> None:
        """Idle for too long between requests: the connection is closed."""
        if self.h2 is not None:
            self.h2.expire()
        else:
            self.relay.head_timeout()
            self._act()

    def _attach(self, target: str) -> None:
        self.idle_since = None  # an exchange runs
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.answered = False
        self.keep_for_fallback = True
        self._forget_sent()
        kept = self.kept.pop(target, None)
        if kept is not None:
            if kept.reusable:
                self._use(kept)
                return
            kept.close()
        if target == ORIGINAL:
            pool = self.router.pool.get(self.dst, [])
            while pool:
                up = pool.pop()
                if up.reusable:
                    self._use(up)
                    return
                up.close()
        up = Upstream(target, self.dst if target == ORIGINAL else None)
        self._use(up)
        self._connecting = self.router.tasks.spawn(self._connect(up), name="connect")

    def _use(self, up: Upstream) -> None:
        up.owner = self
        self.upstream = up
        for chunk in self.pending:
            up.write(chunk)
        self.pending.clear()

    async def _connect(self, up: Upstream) -> None:
        try:
            await connect_upstream(self.router, self.dst, up)
        except OSError as exc:
            up.closed = True
            log.info("upstream %s: %s", up.target or "original server", exc)
            self.upstream_ended(up, exc)
            return
        if up.owner is None or up.transport is None:
            return
        self._upstream_eof_if_piping()

    def _send_upstream(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def _release(self, reusable: bool) -> None:
        up = self.upstream
        self.upstream = None
        if not self.done:
            # Back to waiting for a request: a keep-alive connection idle for long goes.
            self.idle_since = asyncio.get_running_loop().time()
        if up is None:
            return
        if up.transport is not None:
            # It may have been paused for a slow client: the next user must read it.
            up.transport.resume_reading()
        if not reusable or not up.reusable:
            up.close()
            return
        up.owner = None
        # Kept on this client connection for its next request to the same target (the
        # original server's too: handing it to the shared pool between requests made
        # busy clients connect anew all the time); the pool gets it when the client
        # leaves.
        old = self.kept.pop(up.target, None)
        if old is not None:
            old.close()
        self.kept[up.target] = up

    def _close(self, reset: bool) -> None:
        self.done = True
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if reset:
            abort_with_reset(self.transport)
        elif self.transport is not None:
            self.transport.close()


class H2Handler:
    """An HTTP/2 (prior knowledge) client connection: routed stream by stream."""

    def __init__(self, conn: ClientConnection, upgrade: http2.H2cUpgrade | None = None) -> None:
        self.conn = conn
        self.relay = http2.H2Relay(conn.router.route, upgrade=upgrade)
        self.ups: dict[str, Upstream] = {}
        self.pending: dict[str, list[bytes]] = {}

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.conn.transport

    def upstream_full(self) -> None:
        self.conn.upstream_full()

    def client_data(self, data: bytes) -> None:
        self.relay.client_data(data)
        self._act()

    def client_eof(self) -> None:
        self.relay.client_eof()
        self._act()

    def from_upstream(self, up: Upstream, data: bytes) -> None:
        if self.ups.get(up.target) is up:
            self.relay.upstream_data(up.target, data)
            self._act()

    def upstream_ended(self, up: Upstream, exc: Exception | None) -> None:
        if self.ups.get(up.target) is not up:
            return  # replaced or closed on purpose: the relay must not hear of it
        del self.ups[up.target]
        self.conn._update_reading()  # what it held is gone
        self.pending.pop(up.target, None)
        if exc is not None:
            self.relay.upstream_failed(up.target, str(exc))
        else:
            self.relay.upstream_eof(up.target)
        self._act()

    def close_upstreams(self) -> None:
        for up in self.ups.values():
            up.close()
        self.ups.clear()
        self.pending.clear()

    def _act(self) -> None:
        conn = self.conn
        for action in self.relay.actions():
            if conn.done:
                return
            if isinstance(action, http2.OpenUpstream):
                self._open(action.target)
            elif isinstance(action, http2.ToUpstream):
                up = self.ups.get(action.target)
                if up is not None:
                    up.write(action.data)
                else:
                    self.pending.setdefault(action.target, []).append(action.data)
            elif isinstance(action, ToClient):
                if conn.transport is not None:
                    conn.transport.write(action.data)
            elif isinstance(action, http2.CloseUpstream):
                up = self.ups.pop(action.target, None)
                self.pending.pop(action.target, None)
                if up is not None:
                    up.close()
            elif isinstance(action, Close):
                self.close_upstreams()
                conn._close(action.reset)
        self._watch_idle()
        conn._update_reading()  # an upstream that was full may be gone

    def _watch_idle(self) -> None:
        """No stream for IDLE_TIMEOUT seconds: the connection is closed (by the sweep)."""
        conn = self.conn
        if conn.done:
            return
        if conn._timer is not None:
            conn._timer.cancel()
            conn._timer = None
        if self.relay.streams:
            conn.idle_since = None
        elif conn.idle_since is None:
            conn.idle_since = asyncio.get_running_loop().time()

    def expire(self) -> None:
        if self.relay.streams == 0 and not self.conn.done:
            self.close_upstreams()
            self.conn._close(False)

    def _open(self, target: str) -> None:
        old = self.ups.pop(target, None)
        if old is not None:
            old.close()
        up = Upstream(target, self.conn.dst if target == ORIGINAL else None)
        up.owner = self
        self.ups[target] = up
        for chunk in self.pending.pop(target, []):
            up.write(chunk)
        self.conn.router.tasks.spawn(self._connect(up), name="connect-h2")

    async def _connect(self, up: Upstream) -> None:
        try:
            await connect_upstream(self.conn.router, self.conn.dst, up)
        except OSError as exc:
            up.closed = True
            self.upstream_ended(up, exc)
            return


def is_probe(head: RequestHead) -> bool:
    """Whether a request is one of the kubelet's HTTP probes (``User-Agent: kube-probe/``)."""
    return any(
        name.lower() == "user-agent" and value.startswith("kube-probe/")
        for name, value in head.headers
    )


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer of a unix connection runs as root or as this process's user."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def _may_be_request(data: bytes) -> bool:
    """Whether ``data`` can be the start of an HTTP/1 request line (``METHOD SP``)."""
    method = data[:16].split(b" ", 1)[0]
    return bool(method) and method.isalpha() and method.isupper()


def _h2c_upgrade(head: bytes) -> http2.H2cUpgrade | None:
    """The h2c upgrade a complete, bodiless first request head asks for, if any."""
    if b"h2c" not in head.lower():
        return None
    parsed = parse_request_head(head)
    if parsed is None:
        return None
    method, version, request = parsed
    if version != "1.1" or not request.values(b"host"):
        return None
    if request.values(b"content-length") not in ([], [b"0"]) or request.values(
        b"transfer-encoding"
    ):
        return None  # a body: the request goes as HTTP/1.1, and the connection follows it
    return http2.H2cUpgrade.from_http1(method, request.target, request.headers, b"")


async def connect_upstream(router: Router, dst: tuple[str, int], up: Upstream) -> None:
    """Connect ``up``: to the original server at ``dst``, or to its session's agent."""
    loop = asyncio.get_running_loop()
    if up.target == ORIGINAL:
        # Marked: the original server, not this router again.
        sock = await connect_marked(dst, mark=AGENT_MARK)
    else:
        reg = router.registrations.get(up.target)
        if reg is None:
            raise ConnectionRefusedError(f"session {up.target} left")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, reg.address)
        except OSError:
            sock.close()
            raise
    try:
        await loop.create_connection(lambda: up, sock=sock)
    except OSError:
        sock.close()
        raise


# --- process ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netmirror.router")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True, choices=[b.value for b in Backend])
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format=f"%(asctime)s %(levelname)-7s [http router {args.port}] %(message)s",
    )
    registry = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        registry.bind(registry_address(args.port))
    except OSError as exc:
        registry.close()
        print(f"another router serves port {args.port}: {exc}", file=sys.stderr, flush=True)
        return EXIT_IN_USE
    registry.listen(64)
    registry.setblocking(False)
    raise_fd_limit()
    keep_heap_mapped()
    # Own session: signals to the agent that started us are not for us.
    with contextlib.suppress(OSError):
        os.setsid()
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(Router(args.port, Backend(args.backend)).run(registry))
    except NetmirrorError as exc:
        print(f"error: {exc}", flush=True)
        return 1
