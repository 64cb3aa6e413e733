"""Target resolution in the daemon: which agent port a Kubernetes session uses."""

from __future__ import annotations

from netmirror.config import AgentConfig, Config
from netmirror.daemon.targets import AGENT_PORT_BASE, AGENT_PORT_SPAN, agent_port, resolve_target
from netmirror.daemon.targets.kube import KubeTarget


def test_each_session_has_its_own_agent_port_and_always_the_same() -> None:
    ports = {agent_port(name) for name in ("alice", "bob", "carol", "web", "web-2")}
    assert len(ports) == 5
    assert all(AGENT_PORT_BASE <= port < AGENT_PORT_BASE + AGENT_PORT_SPAN for port in ports)
    assert agent_port("alice") == agent_port("alice")


def test_the_configured_port_wins() -> None:
    derived = resolve_target("pod/web", Config(), session="alice")
    assert isinstance(derived, KubeTarget) and derived.port == agent_port("alice")
    fixed = resolve_target("pod/web", Config(agent=AgentConfig(port=7777)), session="alice")
    assert isinstance(fixed, KubeTarget) and fixed.port == 7777
