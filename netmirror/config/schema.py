"""The configuration described for people and tools: its JSON Schema, an example file."""

from __future__ import annotations

import textwrap
from typing import Any

import yaml
from pydantic import (
    BaseModel,
)

from netmirror.config.model import (
    AgentConfig,
    Config,
    EnvConfig,
    FilesConfig,
    ForwardConfig,
    IncomingConfig,
    KubernetesConfig,
    MirrorConfig,
    OutgoingConfig,
    PcapConfig,
    PortConfig,
)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`Config`, for editors and documentation."""
    schema = Config.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": "netmirror configuration",
    }


def _comment(model: type[BaseModel], field: str, indent: str) -> list[str]:
    description = model.model_fields[field].description or ""
    return textwrap.wrap(
        description, width=88, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# "
    )


def _scalar(value: object) -> str:
    dumped: str = yaml.safe_dump(value, default_flow_style=True)
    return dumped.removesuffix("\n").removesuffix("\n...").strip()


def dump_example() -> str:
    """A commented YAML configuration using every key, for documentation.

    The comments are the field descriptions of the model, so they cannot drift
    from the schema.
    """
    agent = AgentConfig()
    env = EnvConfig()
    outgoing = OutgoingConfig()
    files = FilesConfig()
    lines = [
        "# netmirror configuration (YAML; TOML and JSON files take the same keys).",
        "# Precedence: this file < NETMIRROR_* environment variables < command-line flags.",
        "",
        *_comment(Config, "target", ""),
        "target: netns/demo",
        "",
        *_comment(Config, "session", ""),
        "session: demo",
        "",
        *_comment(Config, "ports", ""),
        "ports:",
        *_comment(PortConfig, "remote", "  "),
        "  - remote: 80",
        *_comment(PortConfig, "mode", "    "),
        "    mode: steal",
        *_comment(PortConfig, "local", "    "),
        "    local: 8080",
        *_comment(PortConfig, "local_host", "    "),
        "    local_host: 127.0.0.1",
        *_comment(PortConfig, "http_filter", "    "),
        "    # http_filter:",
        '    #   header: "^x-dev: feature-42$"',
        "  - remote: 9090",
        "    mode: mirror",
        *_comment(PortConfig, "mirror", "    "),
        "    mirror:",
        *_comment(MirrorConfig, "method", "      "),
        "      method: capture",
        "  - remote: 5432",
        '    mode: "off"',
        "",
        *_comment(Config, "agent", ""),
        "agent:",
        *_comment(AgentConfig, "image", "  "),
        f"  image: {_scalar(agent.image)}",
        *_comment(AgentConfig, "ttl", "  "),
        f"  ttl: {_scalar(agent.ttl)}",
        *_comment(AgentConfig, "ready_timeout", "  "),
        f"  ready_timeout: {_scalar(agent.ready_timeout)}",
        *_comment(AgentConfig, "mode", "  "),
        f"  mode: {agent.mode}",
        *_comment(AgentConfig, "port", "  "),
        "  # port: 47070",
        "",
        *_comment(Config, "pcap", ""),
        "pcap:",
        *_comment(PcapConfig, "path", "  "),
        "  path: mirror.pcap",
        *_comment(PcapConfig, "max_bytes", "  "),
        "  max_bytes: 104857600",
        "",
        *_comment(Config, "kubernetes", ""),
        "kubernetes:",
        *_comment(KubernetesConfig, "namespace", "  "),
        "  namespace: default",
        *_comment(KubernetesConfig, "context", "  "),
        "  context: staging",
        "",
        *_comment(Config, "env", ""),
        "env:",
        *_comment(EnvConfig, "include", "  "),
        "  include:",
        *[f"    - {_scalar(pattern)}" for pattern in env.include],
        *_comment(EnvConfig, "exclude", "  "),
        "  exclude:",
        *[f"    - {_scalar(pattern)}" for pattern in env.exclude],
        *_comment(EnvConfig, "override", "  "),
        "  override:",
        "    LOG_LEVEL: debug",
        "",
        *_comment(Config, "outgoing", ""),
        "outgoing:",
        *_comment(OutgoingConfig, "enabled", "  "),
        f"  enabled: {_scalar(outgoing.enabled)}",
        *_comment(OutgoingConfig, "include", "  "),
        "  include:",
        *[f"    - {_scalar(network)}" for network in outgoing.include],
        *_comment(OutgoingConfig, "exclude", "  "),
        "  exclude:",
        "    - 192.168.0.0/16",
        *_comment(OutgoingConfig, "dns", "  "),
        f"  dns: {_scalar(outgoing.dns)}",
        *_comment(OutgoingConfig, "udp", "  "),
        f"  udp: {_scalar(outgoing.udp)}",
        *_comment(OutgoingConfig, "method", "  "),
        f"  method: {_scalar(outgoing.method)}",
        "",
        *_comment(Config, "files", ""),
        "files:",
        *_comment(FilesConfig, "enabled", "  "),
        f"  enabled: {_scalar(files.enabled)}",
        *_comment(FilesConfig, "read_only", "  "),
        "  read_only:",
        '    - "/app/config/**"',
        *_comment(FilesConfig, "read_write", "  "),
        "  read_write:",
        "    - /var/lib/app/uploads",
        *_comment(FilesConfig, "local", "  "),
        "  local:",
        "    - /app/config/dev-overrides.yaml",
        *_comment(FilesConfig, "timeout", "  "),
        f"  timeout: {_scalar(files.timeout)}",
        "",
        *_comment(Config, "port_forward", ""),
        "port_forward:",
        *_comment(ForwardConfig, "local_port", "  "),
        "  - local_port: 5432",
        *_comment(ForwardConfig, "local_host", "    "),
        "    local_host: 127.0.0.1",
        *_comment(ForwardConfig, "host", "    "),
        "    host: orders-db.internal",
        *_comment(ForwardConfig, "port", "    "),
        "    port: 5432",
        "",
        *_comment(Config, "incoming", ""),
        "incoming:",
        *_comment(IncomingConfig, "mode", "  "),
        "  mode: mirror",
        *_comment(IncomingConfig, "port_mapping", "  "),
        "  port_mapping:",
        "    3000: 8080",
        *_comment(IncomingConfig, "ignore_ports", "  "),
        "  ignore_ports:",
        "    - 9229",
        "",
        *_comment(Config, "steal_probes", ""),
        "steal_probes: false",
    ]
    return "\n".join(lines) + "\n"
