"""Target resolution: from ``kind/name`` to a running agent the daemon can reach.

Every kind of target answers the same two questions (:class:`~.base.Target`): how
to start an agent in its network namespace, and how to reach that agent's
websocket. Local targets (``netns/NAME``, ``pid/PID``, :mod:`.local`) start the
agent as a child process that enters the namespace; Kubernetes targets
(``pod/NAME``, :mod:`.kube`) use the same syntax and interface.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from netmirror.daemon.targets.base import AgentHandle, AgentSettings, Target
from netmirror.daemon.targets.local import LocalNamespaceTarget
from netmirror.errors import TargetError
from netmirror.kube.cluster import KINDS as KUBERNETES_KINDS

if TYPE_CHECKING:
    from netmirror.config import Config

__all__ = ["AgentHandle", "AgentSettings", "Target", "resolve_target"]

NETNS_DIR = Path("/run/netns")


#: The agent ports derived from session names (Kubernetes): AGENT_PORT_BASE + 0..999.
AGENT_PORT_BASE = 47070
AGENT_PORT_SPAN = 1000


def agent_port(session: str) -> int:
    """The pod loopback port of a session's agent when ``agent.port`` is unset.

    Each session's agent in a pod needs a port of its own (several developers may
    share a pod through the HTTP filter); the same session always gets the same one,
    so a reconnecting daemon finds its agent.
    """
    return AGENT_PORT_BASE + zlib.crc32(session.encode()) % AGENT_PORT_SPAN


def resolve_target(spec: str, config: Config | None = None, *, session: str = "") -> Target:
    """Turn ``kind/name`` into a :class:`Target`, or raise :class:`TargetError`."""
    kind, sep, name = spec.partition("/")
    if spec == "targetless":
        kind, sep, name = "targetless", "/", "-"
    if not sep or not name:
        raise TargetError(
            f"target {spec!r} is not KIND/NAME (netns/NAME, pid/PID"
            f"{', ' + ', '.join(k + '/NAME' for k in KUBERNETES_KINDS)}) or targetless"
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
    if kind in KUBERNETES_KINDS or kind == "targetless":
        from netmirror.config import Config
        from netmirror.daemon.targets.kube import KubeTarget

        cfg = config or Config()
        return KubeTarget(
            spec,
            namespace=cfg.kubernetes.namespace,
            context=cfg.kubernetes.context,
            image=cfg.agent.image,
            mode=cfg.agent.mode,
            agent_namespace=cfg.agent.namespace,
            port=cfg.agent.port or agent_port(session or cfg.session or spec),
        )
    raise TargetError(f"unknown target kind {kind!r} in {spec!r}; use netns/NAME or pid/PID")
