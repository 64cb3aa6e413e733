"""The options of one agent process, as ``netmirror agent`` was given them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    targetless: bool = False
    """The agent runs in a pod of its own, for nobody's incoming traffic: no firewall,
    no marks (it may run without any capability), only outgoing, DNS and forwards."""
    in_container: bool = False
    """The agent runs in a container of its own (Kubernetes): the processes it starts
    end with it, the HTTP routers of shared ports among them."""
