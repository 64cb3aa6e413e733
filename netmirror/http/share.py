"""An agent's place in the HTTP router of a port (see :mod:`netmirror.http.router`).

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

from netmirror.errors import AgentError
from netmirror.firewall import Backend
from netmirror.http.router import EXIT_IN_USE, registry_address, session_address

log = logging.getLogger(__name__)

ROUTER_START_TIMEOUT = 15.0
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
    ) -> None:
        self.port = port
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

    def stats(self) -> dict[str, Any]:
        return {
            "matched": self.matched,
            "passed": self.passed,
            "order": self.order,
            "sessions": self.sessions,
        }

    async def close(self) -> None:
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
            # Whatever ended the keeper, closing goes on.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keeper
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()

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
            order = answer.get("order")
            self.order = order if isinstance(order, int) else 0
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
            "netmirror.http.router",
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
            while not self._closing:
                try:
                    reader = await self._register()
                    delay = 0.1
                    break
                except (AgentError, OSError, TimeoutError) as exc:
                    log.warning("port %d: %s; retrying in %.1fs", self.port, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
