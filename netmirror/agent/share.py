"""An agent's place in the HTTP router of a port (see :mod:`netmirror.router.router`).

The agent listens on its own abstract socket for the requests routed to its
session, makes sure a router runs for the port (starting one if needed), and
registers its filter there. The registration is a connection held open; if the
router goes away, the agent starts or finds a new one and registers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netmirror.errors import AgentError, NetmirrorError
from netmirror.netfilter import Backend, IptablesNat, router_session
from netmirror.wire.registry import (
    EXIT_IN_USE,
    ROUTER_LINGER,
    registry_address,
    router_listening,
    session_address,
)
from netmirror.wire.stats import HttpShareStats

log = logging.getLogger(__name__)

ROUTER_START_TIMEOUT = 15.0
#: Seconds a router may take to give its port back once it has lingered.
ROUTER_STOP_WAIT = 2.0
#: Seconds a router this agent started may take to finish relaying, once it gave the port back.
ROUTER_DRAIN_WAIT = 0.5
#: The directory netmirror is imported from: the router must import this very copy.
SOURCE_ROOT = str(Path(__file__).resolve().parents[2])


class HttpShare:
    """One session's filter on one port."""

    def __init__(
        self,
        *,
        port: int,
        session: str,
        filter_json: dict[str, Any],
        backend: Backend,
        factory: Callable[[], asyncio.Protocol],
        in_container: bool = False,
        keep_probes: bool = False,
    ) -> None:
        self.port = port
        self.keep_probes = keep_probes
        """The kubelet's probes (User-Agent kube-probe/) stay with the target."""
        self.in_container = in_container
        """A router this agent starts ends with the agent's container."""
        self.session = session
        self.filter_json = filter_json
        self.backend = backend
        self.factory = factory
        self.order = 0
        self.matched = 0
        self.passed = 0
        self.sessions: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._router: asyncio.subprocess.Process | None = None
        """The router this agent started, if it did."""
        self._closing = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Abstract names: bound by hand (uvloop takes only file paths).
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(session_address(self.port, self.session))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._server = await loop.create_unix_server(self.factory, sock=sock)
        try:
            reader = await self._register()
        except BaseException:
            self._server.close()
            raise
        self._keeper = asyncio.create_task(self._keep(reader), name=f"http-share-{self.port}")

    def stats(self) -> HttpShareStats:
        """This session's counters, as the router last reported them."""
        return HttpShareStats(
            matched=self.matched, passed=self.passed, order=self.order, sessions=list(self.sessions)
        )

    async def close(self) -> None:
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
            # Whatever ended the keeper, closing goes on.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keeper
        last = not [s for s in self.sessions if s != self.session]
        registered = self._writer is not None
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
        # In a container, a router is a process of the agent that started it and dies
        # with that agent's container, before it could give the port back: when this
        # was the port's last session, wait until the router has removed its rule and
        # left. If other sessions still use it, it dies with us (their agents then
        # start another).
        router, self._router = self._router, None
        ours = router is not None and router.returncode is None
        wait = ROUTER_LINGER + ROUTER_STOP_WAIT
        if ours and self.in_container:
            assert router is not None
            # It ends with this container. When this was the last session it leaves by
            # itself; otherwise (or if it does not) stop it now, so it gives the port
            # back (clients reach the target's own server, not a dead port) and the
            # other sessions' agents start another at once.
            if not last or not await _exited(router, wait + ROUTER_DRAIN_WAIT):
                log.info("port %d: handing the HTTP router over to the other sessions", self.port)
                with contextlib.suppress(ProcessLookupError):
                    router.terminate()
                await _exited(router, ROUTER_STOP_WAIT)
            return
        if ours:
            assert router is not None
            # Ours, maybe still starting: it leaves by itself once no session is
            # registered, after giving the port back and finishing what it relays.
            if not last or not await _exited(router, wait + ROUTER_DRAIN_WAIT):
                log.info("port %d: other sessions use the HTTP router; it stays", self.port)
                return
        elif last and registered and not await self._router_gone(wait):
            return  # still there: another session registered meanwhile
        if not router_listening(self.port):
            # No router holds the port: a chain of its session is one a router left when
            # it was killed with another agent's container. Nothing else would remove it.
            with contextlib.suppress(NetmirrorError):
                nat = IptablesNat(router_session(self.port), backend=self.backend)
                await asyncio.to_thread(nat.teardown)

    async def _router_gone(self, timeout: float) -> bool:
        """Wait until no router holds the port (its rule is removed before it lets go)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while router_listening(self.port):
            if loop.time() > deadline:
                log.info("port %d: the HTTP router stays (other sessions use it)", self.port)
                return False
            await asyncio.sleep(0.05)
        return True

    async def _register(self) -> asyncio.StreamReader:
        last = ""
        for _ in range(5):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, registry_address(self.port))
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                sock.close()
                last = str(exc)
                await self._start_router()
                continue
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            try:
                answer = await self._ask(reader, writer)
            except BaseException:
                writer.close()  # an orphan registration would block this session's name
                raise
            if not answer.get("ok"):
                writer.close()
                raise AgentError(f"port {self.port}: {answer.get('error')}")
            order, sessions = answer.get("order"), answer.get("sessions")
            self.order = order if isinstance(order, int) else 0
            if isinstance(sessions, list):
                self.sessions = [str(s) for s in sessions]
            self._writer = writer
            log.info("port %d: HTTP filter registered (place %d)", self.port, self.order)
            return reader
        raise AgentError(f"cannot reach the HTTP router of port {self.port}: {last}")

    async def _ask(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any]:
        request = {
            "session": self.session,
            "filter": self.filter_json,
            "socket": session_address(self.port, self.session),
            "keep_probes": self.keep_probes,
        }
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            return {"ok": False, "error": "the router closed the registration"}
        return answer

    async def _start_router(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SOURCE_ROOT, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "netmirror.router",
            "--port",
            str(self.port),
            "--backend",
            self.backend.value,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        assert proc.stdout is not None
        self._router = proc  # known at once: closing while it starts waits for it too
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), ROUTER_START_TIMEOUT)
        except TimeoutError:
            proc.kill()
            raise AgentError(f"the HTTP router of port {self.port} did not start") from None
        if line.strip() == b"ready":
            return
        code = await proc.wait()
        if code != EXIT_IN_USE:  # in use: another agent started one at the same time
            raise AgentError(
                f"the HTTP router of port {self.port} failed: "
                f"{line.decode(errors='replace').strip() or f'exit code {code}'}"
            )

    async def _keep(self, reader: asyncio.StreamReader) -> None:
        """Read the router's counters; if it goes away, register with its successor."""
        delay = 0.1
        while not self._closing:
            line = await reader.readline()
            if line:
                with contextlib.suppress(ValueError, TypeError):
                    report = json.loads(line)
                    self.matched = int(report["matched"])
                    self.passed = int(report["passed"])
                    self.sessions = [str(s) for s in report["sessions"]]
                continue
            if self._closing:
                return
            log.warning("port %d: the HTTP router went away; registering again", self.port)
            # Who shares the port is unknown until the next router answers.
            self.sessions = []
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            while not self._closing:
                try:
                    reader = await self._register()
                    delay = 0.1
                    break
                except (AgentError, OSError, TimeoutError) as exc:
                    log.warning("port %d: %s; retrying in %.1fs", self.port, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)


async def _exited(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """Whether ``proc`` exits within ``timeout`` seconds."""
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        return False
    return True
