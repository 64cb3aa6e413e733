"""Target resolution: from ``kind/name`` to a running agent the daemon can reach.

Every kind of target answers the same two questions: how to start an agent in
its network namespace, and how to reach that agent's websocket. Local targets
(``netns/NAME``, ``pid/PID``) start the agent as a child process that enters the
namespace; Kubernetes targets use the same syntax (``pod/NAME``) and interface.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import aiohttp

from netmirror.errors import AgentError, TargetError

if TYPE_CHECKING:
    from netmirror.config import Config
    from netmirror.tunnel import Tunnel

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
KUBERNETES_KINDS = ("pod", "deployment", "statefulset")


@dataclass(frozen=True)
class AgentSettings:
    """What the daemon tells a target about the agent it wants."""

    session: str
    token: str
    workdir: Path
    ttl: float
    ready_timeout: float
    debug: bool = False
    read_environment: bool = False
    """netmirror exec: the agent must read the target process's environment."""


class AgentHandle(abc.ABC):
    """A running agent: how to reach it and how to stop it."""

    info: dict[str, Any]

    @abc.abstractmethod
    def connector(self) -> aiohttp.BaseConnector:
        """A connector that reaches the agent's websocket."""

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The websocket URL, used with :meth:`connector`."""

    @property
    @abc.abstractmethod
    def pid(self) -> int:
        """Local pid of the agent process, 0 when it does not run here."""

    @abc.abstractmethod
    def exit_status(self) -> int | None:
        """The agent's exit code, or None while it runs."""

    @abc.abstractmethod
    async def stop(self, tunnel: Tunnel | None, timeout: float = 5.0) -> None:
        """Ask the agent to clean up and exit (through ``tunnel`` where there is no
        other way); kill it after ``timeout`` where possible."""


class Target(abc.ABC):
    """Something whose network namespace an agent can join."""

    spec: str

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for people."""

    @abc.abstractmethod
    async def start_agent(
        self,
        settings: AgentSettings,
        *,
        log_file: IO[bytes],
        progress: Callable[[str], None] | None = None,
    ) -> AgentHandle:
        """Start an agent in the target and wait until it listens."""


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


def resolve_target(spec: str, config: Config | None = None) -> Target:
    """Turn ``kind/name`` into a :class:`Target`, or raise :class:`TargetError`."""
    kind, sep, name = spec.partition("/")
    if not sep or not name:
        raise TargetError(
            f"target {spec!r} is not KIND/NAME (netns/NAME, pid/PID"
            f"{', ' + ', '.join(k + '/NAME' for k in KUBERNETES_KINDS)})"
        )
    if kind == "netns":
        path = NETNS_DIR / name
        if "/" in name or not path.exists():
            known = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
            hint = (
                f" (known: {', '.join(known)})"
                if known
                else " (there are none; see `ip netns list`)"
            )
            raise TargetError(f"network namespace {name!r} not found{hint}")
        return LocalNamespaceTarget(spec, path)
    if kind == "pid":
        if not name.isdigit():
            raise TargetError(f"target {spec!r}: {name!r} is not a process id")
        path = Path(f"/proc/{name}/ns/net")
        if not path.exists():
            raise TargetError(f"no process with pid {name}")
        if not os.access(path, os.R_OK):
            raise TargetError(f"cannot enter the network namespace of pid {name}: run as root")
        return LocalNamespaceTarget(spec, path, pid=int(name))
    if kind in KUBERNETES_KINDS:
        from netmirror.config import Config
        from netmirror.kube.target import KubeTarget

        cfg = config or Config()
        return KubeTarget(
            spec,
            namespace=cfg.kubernetes.namespace,
            context=cfg.kubernetes.context,
            image=cfg.agent.image,
            mode=cfg.agent.mode,
            port=cfg.agent.port,
        )
    raise TargetError(f"unknown target kind {kind!r} in {spec!r}; use netns/NAME or pid/PID")
