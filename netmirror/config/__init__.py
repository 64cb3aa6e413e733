"""The netmirror configuration: one validated model, and where its values come from.

A configuration is assembled from three layers, later ones winning:

1. a file (YAML, TOML or JSON), read with :func:`load_file`;
2. ``NETMIRROR_*`` environment variables;
3. command-line flags, collected in :class:`Overrides`.

:func:`build_config` merges them into one frozen :class:`Config`. Every problem is
reported as a :class:`~netmirror.errors.ConfigError` whose message is a single line
naming where the bad value came from and its key path, for example
``config.yaml: ports[1].mode: 'stael' is not one of steal, mirror, off``.

Modules: :mod:`.model` (the validated model), :mod:`.loading` (file, environment,
flags), :mod:`.messages` (one-line errors), :mod:`.schema` (JSON Schema, example),
:mod:`.environment` (the environment of an exec command).
"""

from __future__ import annotations

from netmirror.config.loading import (
    Overrides,
    build_config,
    load_file,
    parse_config,
    parse_port_spec,
    read_dialect,
)
from netmirror.config.messages import format_validation_error
from netmirror.config.model import (
    DEFAULT_AGENT_IMAGE,
    DEFAULT_ENV_EXCLUDE,
    ENV_AGENT_IMAGE,
    ENV_AGENT_TTL,
    ENV_SESSION,
    ENV_TARGET,
    AgentConfig,
    Config,
    EnvConfig,
    KubernetesConfig,
    MirrorConfig,
    Mode,
    OutgoingConfig,
    PcapConfig,
    PortConfig,
)
from netmirror.config.schema import dump_example, json_schema

__all__ = [
    "DEFAULT_AGENT_IMAGE",
    "DEFAULT_ENV_EXCLUDE",
    "ENV_AGENT_IMAGE",
    "ENV_AGENT_TTL",
    "ENV_SESSION",
    "ENV_TARGET",
    "AgentConfig",
    "Config",
    "EnvConfig",
    "KubernetesConfig",
    "MirrorConfig",
    "Mode",
    "OutgoingConfig",
    "Overrides",
    "PcapConfig",
    "PortConfig",
    "build_config",
    "dump_example",
    "format_validation_error",
    "json_schema",
    "load_file",
    "parse_config",
    "parse_port_spec",
    "read_dialect",
]
