"""What every kind of target offers the daemon: start an agent, reach it, stop it.

Every kind of target answers the same two questions: how to start an agent in
its network namespace, and how to reach that agent's websocket. Local targets
(``netns/NAME``, ``pid/PID``) start the agent as a child process that enters the
namespace; Kubernetes targets use the same syntax (``pod/NAME``) and interface.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from netmirror.tunnel import Tunnel

log = logging.getLogger(__name__)


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
    #: Where the target mounts volumes of its own, known once the agent is started
    #: (Kubernetes: the container's volumeMounts); other targets' agents read their
    #: target's mount table instead.
    volume_paths: list[str] | None = None
    #: The health probes of the target's ports, known once the agent is started
    #: (Kubernetes: the container's liveness, readiness and startup probes): port ->
    #: the probes in words. Where they come from: the node's addresses.
    probes: dict[int, list[str]] | None = None
    probe_sources: list[str] | None = None
    #: The mesh the target's own description names (Kubernetes: its sidecar
    #: containers and annotations), to compare with what the agent finds.
    mesh_hint: str | None = None
    #: No target: an agent of its own, for outgoing traffic, DNS and port-forward only
    #: (no incoming traffic, no environment, no files).
    targetless: bool = False

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
        warn: Callable[[str], None] | None = None,
    ) -> AgentHandle:
        """Start an agent in the target and wait until it listens.

        ``progress`` is told each step; ``warn`` gets what the user must see even
        though the start goes on (a namespace that would only warn about the agent).
        """
