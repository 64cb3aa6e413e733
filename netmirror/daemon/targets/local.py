"""Targets on this machine: a named network namespace (``netns/NAME``) or a process's (``pid/PID``).

The agent runs as a child process that enters the namespace; the daemon reaches
its websocket on a unix socket in the session's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import aiohttp

from netmirror.daemon.targets.base import AgentHandle, AgentSettings, Target
from netmirror.errors import AgentError

if TYPE_CHECKING:
    from netmirror.tunnel import Tunnel

log = logging.getLogger(__name__)


class LocalAgent(AgentHandle):
    """An agent running as a child process on this machine."""

    def __init__(
        self, proc: asyncio.subprocess.Process, socket_path: Path, info: dict[str, Any]
    ) -> None:
        self._proc = proc
        self._socket = socket_path
        self.info = info

    def connector(self) -> aiohttp.BaseConnector:
        return aiohttp.UnixConnector(path=str(self._socket))

    @property
    def url(self) -> str:
        return "http://agent/tunnel"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def exit_status(self) -> int | None:
        return self._proc.returncode

    async def stop(self, tunnel: Tunnel | None, timeout: float = 5.0) -> None:
        if self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            log.warning("agent %d did not exit within %.0fs; killing it", self._proc.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()


class LocalNamespaceTarget(Target):
    """A network namespace on this machine, named or by process."""

    def __init__(self, spec: str, netns_path: Path, pid: int | None = None) -> None:
        self.spec = spec
        self.netns_path = netns_path
        self.pid = pid

    def describe(self) -> str:
        return f"{self.spec} ({self.netns_path})"

    async def start_agent(
        self,
        settings: AgentSettings,
        *,
        log_file: IO[bytes],
        progress: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> AgentHandle:
        socket_path = settings.workdir / "agent.sock"
        cmd = [
            sys.executable,
            "-m",
            "netmirror",
            "agent",
            "--session",
            settings.session,
            "--netns",
            str(self.netns_path),
            "--listen",
            f"unix:{socket_path}",
            "--ttl",
            str(settings.ttl),
            "--token-stdin",
        ]
        if self.pid is not None:
            cmd += ["--target-pid", str(self.pid)]
        if settings.debug:
            cmd.insert(3, "--debug")  # a global option: before the subcommand
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            start_new_session=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        # The token goes through a pipe: never argv, environment or disk.
        proc.stdin.write(settings.token.encode() + b"\n")
        await proc.stdin.drain()
        proc.stdin.close()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), settings.ready_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AgentError(
                f"the agent did not start within {settings.ready_timeout:.0f}s"
            ) from None
        try:
            message = json.loads(line) if line else {}
        except ValueError:
            message = {"error": line.decode(errors="replace").strip()}
        if not isinstance(message, dict) or "error" in message or not message.get("ready"):
            await proc.wait()
            error = message.get("error") if isinstance(message, dict) else None
            raise AgentError(
                str(error or f"the agent exited with code {proc.returncode} before it was ready")
            )
        return LocalAgent(proc, socket_path, message)
