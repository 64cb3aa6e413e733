"""The netmirror configuration: one validated model, and where its values come from.

A configuration is assembled from three layers, later ones winning:

1. a file (YAML, TOML or JSON), read with :func:`load_file`;
2. ``NETMIRROR_*`` environment variables;
3. command-line flags, collected in :class:`Overrides`.

:func:`build_config` merges them into one frozen :class:`Config`. Every problem is
reported as a :class:`~netmirror.errors.ConfigError` whose message is a single line
naming where the bad value came from and its key path, for example
``config.yaml: ports[1].mode: 'stael' is not one of steal, mirror, off``.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import reprlib
import textwrap
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from netmirror.errors import ConfigError

__all__ = [
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
]

Mode = Literal["steal", "mirror", "off"]
"""What happens to a port: its traffic is taken over, copied, or left alone."""

ENV_TARGET = "NETMIRROR_TARGET"
ENV_SESSION = "NETMIRROR_SESSION"
ENV_AGENT_IMAGE = "NETMIRROR_AGENT_IMAGE"
ENV_AGENT_TTL = "NETMIRROR_AGENT_TTL"

DEFAULT_AGENT_IMAGE = "ghcr.io/netmirror/agent:0.1.0"

DEFAULT_ENV_EXCLUDE: tuple[str, ...] = (
    "PATH",
    "HOME",
    "HOSTNAME",
    "PWD",
    "OLDPWD",
    "SHLVL",
    "TERM",
    "USER",
    "LOGNAME",
    "SHELL",
    "_",
    "LD_*",
    "PYTHONHOME",
)
"""Variables ``netmirror exec`` keeps from the local environment by default.

They describe the process or the machine (where programs and the home directory
are, the shell, the terminal, the dynamic linker) rather than the service's
configuration, so the target's values would break the local command. The
``KUBERNETES_*`` service variables are not among them: services use them.
"""

_SESSION_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,16}[a-z0-9])?")
_SESSION_RULE = "must be 1-18 lowercase letters, digits or '-', not starting or ending with '-'"
# Loose on purpose: each target kind validates its own NAME later; here we only make
# sure the value has the KIND/NAME shape so a typo fails before anything is touched.
_TARGET_RE = re.compile(r"[a-z]+/\S+")
# Underscores are not valid in DNS names, but container runtimes resolve service
# names like "my_app", which is exactly what a local process may listen behind.
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# [0-9] rather than \d: \d also matches non-ASCII digits that int() would accept.
_PORT_SPEC_RE = re.compile(r"([0-9]+)(?::([0-9]+))?")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

# Values end up in one-line messages, and a config file can hold anything (long
# strings, deep or self-referencing lists via YAML anchors): reprlib bounds the size.
_value_repr = reprlib.Repr()
_value_repr.maxstring = 60
_value_repr.maxother = 60
_value_repr.maxlevel = 3
_value_repr.maxlist = _value_repr.maxtuple = _value_repr.maxdict = 4
_value_repr.maxset = _value_repr.maxfrozenset = 4


# --------------------------------------------------------------------------- model


def _reject_bool(problem: str) -> BeforeValidator:
    # Pydantic's lax mode turns true/false into 1/0; in a config file that is always
    # a mistake (YAML reads yes/no/on/off as booleans), never a port or a duration.
    def check(value: object) -> object:
        if isinstance(value, bool):
            raise ValueError(problem)
        return value

    return BeforeValidator(check)


_NOT_A_PORT = "is not a port (1-65535)"


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(_NOT_A_PORT)
    return value


def _mode_from_yaml_bool(value: object) -> object:
    # YAML 1.1 (PyYAML) reads an unquoted `mode: off` as the boolean false. Users
    # write it that way, so accept it rather than make them quote it.
    if value is False:
        return "off"
    return value


def _check_local_host(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if any(ch.isspace() for ch in value):
        raise ValueError("must not contain spaces")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return value
    if value.startswith("["):
        raise ValueError(
            "is not an IP address or host name (write IPv6 addresses without brackets, "
            "and give the port as 'local')"
        )
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        raise ValueError("must not include a port (give the port as 'local')")
    name = value.removesuffix(".")  # a fully qualified name may end with a dot
    if len(name) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ValueError("is not an IP address or host name")
    return value


Port = Annotated[
    int,
    _reject_bool(_NOT_A_PORT),
    AfterValidator(_check_port),
    # The range is checked by _check_port so the error can say "is not a port";
    # the schema still has to tell editors about it.
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 65535}),
]
Seconds = Annotated[float, _reject_bool("is not a number")]


MirrorMethod = Literal["capture", "passthrough"]


class MirrorConfig(BaseModel):
    """How a mirrored port is copied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: MirrorMethod = Field(
        default="capture",
        description="'capture' reads a copy of the packets inside the target (no rule in "
        "the traffic path: the target is unaffected even if netmirror dies); "
        "'passthrough' redirects the port through the agent, which relays to the "
        "original server and copies the client's bytes (lossless while the local "
        "process keeps up; the server sees the agent's address as the client).",
    )


class PcapConfig(BaseModel):
    """Where to save the captured packets of mirrored ports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Annotated[str, AfterValidator(lambda v: _check_path(v))] = Field(
        description="pcap file written on this machine (Wireshark and tcpdump open it).",
    )
    max_bytes: int = Field(
        default=100 * 1024 * 1024,
        ge=4096,
        description="Size at which the file stops growing; netmirror status says so.",
    )


def _check_path(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class PortConfig(BaseModel):
    """One TCP port of the target and what to do with its traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    remote: Port = Field(
        description="TCP port of the target whose traffic is stolen or mirrored (1-65535). "
        "Each remote port may be listed once.",
    )
    mode: Annotated[Mode, BeforeValidator(_mode_from_yaml_bool)] = Field(
        default="steal",
        description="'steal' sends the port's connections to the local process instead of "
        "the target; 'mirror' lets the target answer and sends a copy of the incoming "
        "traffic to the local process; 'off' keeps the entry but leaves the port alone.",
    )
    local: Port | None = Field(
        default=None,
        description="Port the local process listens on (1-65535); unset means the same "
        "number as 'remote'.",
    )
    local_host: Annotated[str, AfterValidator(_check_local_host)] = Field(
        default="127.0.0.1",
        description="IP address or host name the local process listens on, without a port.",
    )
    mirror: MirrorConfig = Field(
        default_factory=MirrorConfig,
        description="How the port is copied when mode is 'mirror'.",
    )
    http_filter: dict[str, Any] | None = Field(
        default=None,
        description="Steal only the HTTP requests that match, e.g. {header: '^x-dev: "
        "feature-42$'}: 'header' (a regular expression searched in each 'name: value' "
        "line, the name in lower case), 'path' (searched in the request target), "
        "'method' (exact), 'any_of' and 'all_of' (lists of such filters); several keys "
        "must all match. Other requests go to the target's own server. Several sessions "
        "may filter the same port; a request goes to the first (in the order they came) "
        "whose filter matches.",
    )

    @field_validator("http_filter")
    @classmethod
    def _check_http_filter(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from netmirror.http.filters import HttpFilter

            try:
                HttpFilter.parse(value, where=_HERE)
            except ValueError as exc:
                # "<here>.any_of[1].method: text": report it at that key, as the
                # other errors of the file are.
                where, _, text = str(exc).partition(": ")
                raise PydanticCustomError(
                    "http_filter", "{text}", {"text": text, "path": where[len(_HERE) :]}
                ) from None
        return value

    @model_validator(mode="after")
    def _filter_only_for_steal(self) -> PortConfig:
        if self.http_filter is not None and self.mode != "steal":
            raise PydanticCustomError(
                "http_filter",
                "{text}",
                {"text": f"applies to mode steal, not {self.mode}", "path": "http_filter"},
            )
        return self

    @property
    def local_port(self) -> int:
        """The port to connect to locally: ``local``, or ``remote`` when unset."""
        return self.remote if self.local is None else self.local


class AgentConfig(BaseModel):
    """The helper that runs inside the target and redirects its traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(
        default=DEFAULT_AGENT_IMAGE,
        description="Container image of the agent, used for Kubernetes targets.",
    )
    ttl: Seconds = Field(
        default=5.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds the agent keeps its redirect rules while no netmirror "
        "daemon is connected, so a short disconnect does not drop traffic; after that "
        "it removes them and the target gets its ports back (0 < ttl <= 3600).",
    )
    ready_timeout: Seconds = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds to wait for the agent to start and answer before giving up.",
    )
    mode: Literal["ephemeral", "job"] = Field(
        default="ephemeral",
        description="Kubernetes targets: 'ephemeral' adds an ephemeral container to the "
        "target pod (capabilities NET_ADMIN and NET_RAW); 'job' runs a privileged pod on "
        "the target's node that enters the target container's network namespace.",
    )
    port: Port = Field(
        default=47070,
        description="Kubernetes targets: loopback port of the agent's websocket inside the "
        "pod, reached through the API server's port-forward.",
    )

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        if any(ch.isspace() for ch in value):
            raise ValueError("must not contain spaces")
        return value


class KubernetesConfig(BaseModel):
    """Where Kubernetes targets are looked up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str | None = Field(
        default=None,
        description="Namespace of the target; unset means the kubeconfig context's.",
    )
    context: str | None = Field(
        default=None,
        description="kubeconfig context to use; unset means the current one.",
    )


_NOT_A_NETWORK = "is not an IP network"


def _check_pattern(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(_NOT_A_NETWORK) from None
    return value


def _env_value_from_yaml(value: object) -> object:
    # `PORT: 8080` in a YAML or TOML file is meant as the text "8080"; booleans are
    # not converted, since yes/on/true would become "True" and surprise everyone.
    if isinstance(value, bool):
        raise ValueError("is not a string (quote it: YAML reads yes/no/on/off as booleans)")
    if isinstance(value, int):
        return str(value)
    return value


def _check_env_value(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


_ENV_NAME_RULE = "is not an environment variable name (it must not be empty or contain '=' or NUL)"

Pattern = Annotated[str, AfterValidator(_check_pattern)]
Network = Annotated[str, AfterValidator(_check_network)]
EnvValue = Annotated[
    str,
    BeforeValidator(_env_value_from_yaml),
    AfterValidator(_check_env_value),
    # Whole numbers are accepted and turned into text (see _env_value_from_yaml).
    WithJsonSchema({"type": ["string", "integer"]}),
]


class EnvConfig(BaseModel):
    """Which environment variables of the target ``netmirror exec`` gives the command."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    include: list[Pattern] = Field(
        default_factory=lambda: ["*"],
        description="Glob patterns (*, ?, [abc]; case-sensitive) of the target's variables "
        "the command gets; a variable matching none keeps its local value.",
    )
    exclude: list[Pattern] = Field(
        default_factory=lambda: list(DEFAULT_ENV_EXCLUDE),
        description="Glob patterns of the target's variables the command does not get, "
        "even if included: these keep their local value (or stay unset). The default "
        "lists variables that describe the process or machine rather than the service: "
        + ", ".join(DEFAULT_ENV_EXCLUDE)
        + ".",
    )
    override: dict[str, EnvValue] = Field(
        default_factory=dict,
        description="Variables set for the command whatever the target and the local "
        "environment say; applied last.",
    )

    @field_validator("override")
    @classmethod
    def _check_names(cls, override: dict[str, str]) -> dict[str, str]:
        bad = [name for name in override if not name or "=" in name or "\0" in name]
        if bad:
            # A ValidationError (not a ValueError) so the value shown is the bad name,
            # not the whole mapping; pydantic prefixes the location with "override".
            raise ValidationError.from_exception_data(
                cls.__name__,
                [
                    {
                        "type": "value_error",
                        "loc": (),
                        "input": name,
                        "ctx": {"error": ValueError(_ENV_NAME_RULE)},
                    }
                    for name in bad
                ],
            )
        return override


_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=64)
def _networks(specs: tuple[str, ...]) -> tuple[_IPNetwork, ...]:
    return tuple(ipaddress.ip_network(spec, strict=False) for spec in specs)


class OutgoingConfig(BaseModel):
    """Which outgoing connections of ``netmirror exec``'s command leave from the target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True,
        description="Send the command's outgoing TCP connections (and, with 'dns', its "
        "name lookups) through the target, so they come from the target's network.",
    )
    include: list[Network] = Field(
        default_factory=lambda: ["0.0.0.0/0", "::/0"],
        description="IP networks (CIDR, e.g. 10.0.0.0/8 or fd00::/8) whose connections go "
        "through the target.",
    )
    exclude: list[Network] = Field(
        default_factory=list,
        description="IP networks whose connections stay on this machine even if included. "
        "Loopback (127.0.0.0/8, ::1) and the unspecified addresses (0.0.0.0, ::) are "
        "always excluded.",
    )
    dns: bool = Field(
        default=True,
        description="Resolve host names with the target's resolver (its /etc/resolv.conf "
        "and search domains), so cluster-internal names work.",
    )
    method: Literal["auto", "transparent", "proxy"] = Field(
        default="auto",
        description="'transparent' redirects the command's TCP and DNS with iptables rules "
        "that match only its cgroup (needs root and cgroup v2); 'proxy' sets ALL_PROXY, "
        "HTTP_PROXY and HTTPS_PROXY to a SOCKS5/HTTP proxy of netmirror instead (only "
        "programs that honour them; names in proxied requests are resolved by the "
        "target); 'auto' is transparent where possible, else proxy.",
    )

    def matches(self, address: str) -> bool:
        """Whether a connection to ``address`` goes through the target.

        True if the address is in an ``include`` network, in no ``exclude`` network,
        and is not loopback or unspecified. IPv4-mapped IPv6 addresses
        (``::ffff:10.0.0.1``) count as their IPv4 address. ``enabled`` is not
        consulted: the caller decides whether to intercept at all.

        :raises ValueError: ``address`` is not an IP address.
        """
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback or ip.is_unspecified:
            return False
        if not any(ip in network for network in _networks(tuple(self.include))):
            return False
        return not any(ip in network for network in _networks(tuple(self.exclude)))


class Config(BaseModel):
    """netmirror configuration: what to attach to, and which of its ports to take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str | None = Field(
        default=None,
        description="What to attach to, as KIND/NAME: netns/NAME (a network namespace), "
        "pid/PID (the network namespace of a process) or pod/NAME (a Kubernetes pod).",
    )
    session: str | None = Field(
        default=None,
        description="Name of the session, so several can run against one target; "
        "1-18 lowercase letters, digits or '-', not starting or ending with '-'.",
    )
    ports: list[PortConfig] = Field(
        default_factory=list,
        description="The target's ports to steal or mirror; each remote port at most once.",
    )
    agent: AgentConfig = Field(
        default_factory=AgentConfig,
        description="Settings of the agent that runs inside the target.",
    )
    pcap: PcapConfig | None = Field(
        default=None,
        description="Save what the capture method sees on mirrored ports to a pcap file.",
    )
    kubernetes: KubernetesConfig = Field(
        default_factory=KubernetesConfig,
        description="Kubernetes targets: namespace and kubeconfig context.",
    )
    env: EnvConfig = Field(
        default_factory=EnvConfig,
        description="netmirror exec: which of the target's environment variables the command gets.",
    )
    outgoing: OutgoingConfig = Field(
        default_factory=OutgoingConfig,
        description="netmirror exec: which of the command's outgoing connections and name "
        "lookups go through the target.",
    )

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str | None) -> str | None:
        if value is not None and not _TARGET_RE.fullmatch(value):
            raise ValueError("must look like KIND/NAME, e.g. netns/NAME, pid/PID or pod/NAME")
        return value

    @field_validator("session")
    @classmethod
    def _check_session(cls, value: str | None) -> str | None:
        if value is not None and not _SESSION_RE.fullmatch(value):
            raise ValueError(_SESSION_RULE)
        return value

    @field_validator("ports")
    @classmethod
    def _check_unique_ports(cls, ports: list[PortConfig]) -> list[PortConfig]:
        seen: set[int] = set()
        for index, port in enumerate(ports):
            if port.remote in seen:
                # Raising a ValidationError (not a ValueError) lets pydantic prefix our
                # location with "ports", so the message can point at ports[i].remote.
                raise ValidationError.from_exception_data(
                    cls.__name__,
                    [
                        {
                            "type": "value_error",
                            "loc": (index, "remote"),
                            "input": port.remote,
                            "ctx": {"error": ValueError("is listed twice")},
                        }
                    ],
                )
            seen.add(port.remote)
        return ports

    def active_ports(self) -> list[PortConfig]:
        """The ports whose mode is not ``off``, in configuration order."""
        return [port for port in self.ports if port.mode != "off"]


# ---------------------------------------------------------------- error messages

_MODELS: dict[str, type[BaseModel]] = {
    model.__name__: model
    for model in (
        Config,
        PortConfig,
        AgentConfig,
        MirrorConfig,
        PcapConfig,
        KubernetesConfig,
        EnvConfig,
        OutgoingConfig,
    )
}

_TYPE_TEXTS: dict[str, str] = {
    "bool_parsing": "is not true or false",
    "bool_type": "is not true or false",
    "dict_type": "is not a mapping",
    "finite_number": "is not a finite number",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "int_from_float": "is not a whole number",
    "int_parsing": "is not an integer",
    "int_parsing_size": "is not an integer of a sensible size",
    "int_type": "is not an integer",
    "list_type": "is not a list",
    "model_attributes_type": "is not a mapping",
    "model_type": "is not a mapping",
    "recursion_loop": "refers to itself",
    "string_type": "is not a string",
    "string_unicode": "is not valid text",
}

_BOUND_TEXTS: dict[str, tuple[str, str]] = {
    "greater_than": ("gt", "must be greater than {}"),
    "greater_than_equal": ("ge", "must be at least {}"),
    "less_than": ("lt", "must be less than {}"),
    "less_than_equal": ("le", "must be at most {}"),
}


def _one_line(text: str) -> str:
    # Last line of defence for the single-line promise of NetmirrorError: parser
    # messages and file names are not ours and may contain line breaks.
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _show(value: object) -> str:
    return _one_line(_value_repr.repr(value))


#: Stands for the http_filter key in messages of the filter parser, to be cut off.
_HERE = "\x00"


def _format_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _KEY_RE.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{_show(part)}]"
    return out


def _expected_keys(title: str, loc: Sequence[int | str]) -> list[str] | None:
    """Field names of the model found at ``loc`` inside the model called ``title``."""
    current: Any = _MODELS.get(title)
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        if isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
            # list[PortConfig] is followed by an index in the location.
            if getattr(current, "__origin__", None) is list:
                current = current.__args__[0]
        # An int is the index into the list whose item type we already stepped into.
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _describe(error: ErrorDetails, title: str) -> tuple[tuple[int | str, ...], str]:
    """Split one pydantic error into the path it concerns and a text for people."""
    loc = tuple(error["loc"])
    if len(loc) >= 2 and loc[-1] == "[key]" and error.get("input") == loc[-2]:
        # pydantic locates a bad key of a mapping as (..., key, "[key]"), with the key
        # as the input: report it at the mapping, as a key. (A value whose key is the
        # text "[key]" has a location ending the same way, but not that input.)
        inner = error.copy()
        inner["loc"] = loc[:-2]
        where, text = _describe(inner, title)
        return where, f"key {text}"
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "missing":
        return loc[:-1], f"missing key {_show(loc[-1])}"
    if kind == "extra_forbidden":
        keys = _expected_keys(title, loc[:-1])
        expected = f" (expected one of {', '.join(keys)})" if keys else ""
        return loc, f"unknown key{expected}"
    if kind == "invalid_key":
        # The location ends in a mangled form of the key; the input is the key itself.
        return loc[:-1], f"key {_show(value)} is not a string"
    if kind == "literal_error":
        # pydantic says "'steal', 'mirror' or 'off'"; we list them plainly.
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return loc, f"{_show(value)} is not one of {expected}"
    if kind == "http_filter":
        sub = tuple(
            int(index) if index else key
            for key, index in re.findall(r"\.?([A-Za-z_]+)|\[(\d+)\]", str(ctx.get("path", "")))
        )
        return loc + sub, _one_line(str(ctx.get("text", "")))
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return loc, f"{_show(value)} {_one_line(str(ctx['error']))}"
    if kind in _BOUND_TEXTS:
        key, template = _BOUND_TEXTS[kind]
        bound = ctx.get(key)
        # Bounds of float fields arrive as floats; "at most 3600" reads better than 3600.0.
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return loc, f"{_show(value)} {template.format(bound)}"
    if kind in _TYPE_TEXTS:
        return loc, f"{_show(value)} {_TYPE_TEXTS[kind]}"
    message = _one_line(error["msg"])
    return loc, f"{_show(value)} is invalid: {message[:1].lower()}{message[1:]}"


_Locator = Callable[[tuple[int | str, ...]], tuple[str | None, tuple[int | str, ...]]]


def _render(err: ValidationError, locate: _Locator) -> str:
    errors = err.errors(include_url=False)
    if not errors:  # pydantic never does this, but a message must still come out
        return "invalid configuration"
    loc, text = _describe(errors[0], err.title)
    source, loc = locate(loc)
    parts = [part for part in (source, _format_path(loc)) if part]
    line = ": ".join([*parts, text])
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return _one_line(line)


def format_validation_error(err: ValidationError, *, source: str | None = None) -> str:
    """Turn a pydantic error into one line: ``[source: ]path: value problem``.

    Only the first error is described; ``(and N more)`` is appended when there are
    others, since fixing one often fixes the rest.
    """
    return _render(err, lambda loc: (source, loc))


def parse_config(data: Mapping[str, Any], *, source: str | None = None) -> Config:
    """Validate already-parsed data into a :class:`Config`.

    :raises ConfigError: one line prefixed with ``source`` when given.
    """
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=source)) from None


# --------------------------------------------------------------------- loading


class _StrictSafeLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys instead of keeping the last one.

    A second ``ports:`` key silently replacing the first is the kind of mistake
    that makes netmirror take the wrong ports, so it is an error.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            # Merge keys (<<) legitimately repeat keys; only plain scalars are compared,
            # anything else is left to the normal constructor and its checks.
            if (
                not isinstance(key_node, yaml.ScalarNode)
                or key_node.tag == "tag:yaml.org,2002:merge"
            ):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_show(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error_text(err: yaml.YAMLError, text: str) -> str:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "syntax error"
        if err.context and err.problem:
            problem = f"{err.context}: {err.problem}"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"invalid YAML{where}: {problem}"
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        return (
            f"invalid YAML at line {line}, column {column}: "
            f"unacceptable character #x{err.character:04x}: {err.reason}"
            if isinstance(err.character, int)
            else f"invalid YAML at line {line}, column {column}: {err.reason}"
        )
    return f"invalid YAML: {err}"


_TOML_POSITION_RE = re.compile(r"(?s)(.*) \(at line (\d+), column (\d+)\)")


def _toml_error_text(err: tomllib.TOMLDecodeError) -> str:
    # Python 3.11's TOMLDecodeError has no line/column attributes, only this text.
    message = str(err)
    match = _TOML_POSITION_RE.fullmatch(message)
    if match:
        return f"invalid TOML at line {match[2]}, column {match[3]}: {match[1]}"
    return f"invalid TOML: {message}"


def _type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}
    return names.get(type(value), type(value).__name__)


def load_file(path: Path) -> dict[str, Any]:
    """Read a configuration file into plain data, without validating it.

    ``.toml`` is read as TOML, ``.json`` as JSON, and everything else (``.yaml``,
    ``.yml``, no extension) as YAML. An empty file gives ``{}``.

    :raises ConfigError: the file is missing or unreadable, does not parse, or its
        top level is not a mapping; the message starts with the path.
    """
    source = _one_line(str(path)) or "config"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"{source}: permission denied") from None
    except OSError as err:
        raise ConfigError(_one_line(f"{source}: cannot read: {err.strerror or err}")) from None
    try:
        # utf-8-sig: editors on Windows like to start files with a byte order mark.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{source}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})"
        ) from None

    suffix = path.suffix.lower()
    language = {".toml": "TOML", ".json": "JSON"}.get(suffix, "YAML")
    data: Any
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text) if text.strip() else None
        else:
            data = yaml.load(text, Loader=_StrictSafeLoader)
    except yaml.YAMLError as err:
        raise ConfigError(_one_line(f"{source}: {_yaml_error_text(err, text)}")) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(_one_line(f"{source}: {_toml_error_text(err)}")) from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{source}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    except (ValueError, OverflowError) as err:
        # Parsers let these escape for values that look right but are not, such as
        # the YAML timestamp 2024-13-01 or an integer with thousands of digits.
        raise ConfigError(_one_line(f"{source}: invalid {language}: {err}")) from None

    if data is None:  # empty, or only comments
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not {_type_name(data)}")
    return data


def parse_port_spec(spec: str, *, flag: str) -> tuple[int, int | None]:
    """Parse ``REMOTE[:LOCAL]`` as given to ``--steal``/``--mirror``.

    ``"80"`` gives ``(80, None)`` and ``"80:3000"`` gives ``(80, 3000)``.

    :raises ConfigError: the text is malformed or a number is not a port; the
        message starts with ``flag``.
    """
    match = _PORT_SPEC_RE.fullmatch(spec)
    if match is None:
        raise ConfigError(f"{flag}: {_show(spec)} is not REMOTE[:LOCAL]")
    ports: list[int | None] = []
    for digits in match.groups():
        if digits is None:
            ports.append(None)
            continue
        # Check the length before int(): a long enough digit string makes int() raise.
        if len(digits) > 5 or not 1 <= int(digits) <= 65535:
            shown = digits if len(digits) <= 10 else f"{digits[:10]}..."
            raise ConfigError(f"{flag}: {shown} {_NOT_A_PORT}")
        ports.append(int(digits))
    remote, local = ports
    assert remote is not None  # the pattern makes REMOTE mandatory
    return remote, local


@dataclass(frozen=True)
class Overrides:
    """Values given on the command line; ``None`` or empty means "not given"."""

    target: str | None = None
    session: str | None = None
    steal: Sequence[str] = ()
    """``REMOTE[:LOCAL]`` specs of ``--steal`` flags."""
    mirror: Sequence[str] = ()
    """``REMOTE[:LOCAL]`` specs of ``--mirror`` flags."""
    agent_image: str | None = None
    mirror_method: str | None = None
    http_filter: Mapping[str, Any] | None = None
    """``--http-header``/``--http-path``/``--http-method``: for the ports of ``--steal``."""
    """``--mirror-method``: applies to the ports named by ``--mirror``."""
    pcap: str | None = None
    """``--pcap FILE``."""
    namespace: str | None = None
    context: str | None = None
    agent_mode: str | None = None
    # The settings of `netmirror exec`. Errors in their values name the key they set
    # (``env.exclude: '' must not be empty``), not a flag.
    env_include: Sequence[str] | None = None
    """Patterns that replace ``env.include`` when given."""
    env_exclude: Sequence[str] = ()
    """Patterns appended to ``env.exclude``."""
    env_override: Mapping[str, str] | None = None
    """Variables set on top of ``env.override`` (a flag's value wins over the file's)."""
    outgoing: bool | None = None
    """Sets ``outgoing.enabled``."""
    outgoing_exclude: Sequence[str] = ()
    outgoing_method: str | None = None
    """Sets ``outgoing.method``."""
    """Networks appended to ``outgoing.exclude``."""


def build_config(*, file: Path | None, env: Mapping[str, str], flags: Overrides) -> Config:
    """Merge a config file, environment variables and flags into one :class:`Config`.

    Later layers win: file < environment < flags. The file must be valid on its own.
    Empty environment variables count as unset. Each ``--steal``/``--mirror`` spec
    sets the mode of the file's entry with the same remote port (keeping its
    ``local_host``, and its ``local`` unless the spec gives one) or adds a new entry;
    file ports not named on flags stay as they are. ``env_include`` replaces the file's
    ``env.include``; ``env_exclude`` and ``outgoing_exclude`` are appended to the
    file's lists; ``env_override`` is merged into the file's ``env.override``.

    :raises ConfigError: naming the file, variable or flag the bad value came from.
    """
    file_source = _one_line(str(file)) if file is not None else None
    base = parse_config(load_file(file), source=file_source) if file is not None else Config()
    # Re-validating a dump of the file's config, not the raw file data, means any
    # error from here on comes from a variable or a flag, recorded in `origins`.
    data = base.model_dump()
    origins: dict[tuple[int | str, ...], str] = {}

    def put(path: tuple[str, ...], value: object, origin: str) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        origins[path] = origin

    for name, path in (
        (ENV_TARGET, ("target",)),
        (ENV_SESSION, ("session",)),
        (ENV_AGENT_IMAGE, ("agent", "image")),
        (ENV_AGENT_TTL, ("agent", "ttl")),
    ):
        if env.get(name):
            put(path, env[name], name)

    for flag, value, path in (
        ("--target", flags.target, ("target",)),
        ("--session", flags.session, ("session",)),
        ("--agent-image", flags.agent_image, ("agent", "image")),
        ("--namespace", flags.namespace, ("kubernetes", "namespace")),
        ("--context", flags.context, ("kubernetes", "context")),
        ("--agent-mode", flags.agent_mode, ("agent", "mode")),
    ):
        if value is not None:
            put(path, value, flag)

    ports: list[dict[str, Any]] = data["ports"]
    index_of = {port["remote"]: index for index, port in enumerate(ports)}
    flagged: dict[int, str] = {}
    for flag, mode, specs in (
        ("--steal", "steal", flags.steal),
        ("--mirror", "mirror", flags.mirror),
    ):
        for spec in specs:
            remote, local = parse_port_spec(spec, flag=flag)
            if remote in flagged:
                other = flagged[remote]
                also = "is listed twice" if other == flag else f"is also given to {other}"
                raise ConfigError(f"{flag}: {remote} {also}")
            flagged[remote] = flag
            if remote in index_of:
                index = index_of[remote]
                ports[index]["mode"] = mode
                origins[("ports", index, "mode")] = flag
                if local is not None:
                    ports[index]["local"] = local
                    origins[("ports", index, "local")] = flag
            else:
                index_of[remote] = len(ports)
                origins[("ports", len(ports))] = flag
                ports.append({"remote": remote, "mode": mode, "local": local})
            if mode == "mirror" and flags.mirror_method is not None:
                index = index_of[remote]
                ports[index]["mirror"] = {"method": flags.mirror_method}
                origins[("ports", index, "mirror", "method")] = "--mirror-method"
            if mode == "steal" and flags.http_filter is not None:
                index = index_of[remote]
                ports[index]["http_filter"] = dict(flags.http_filter)
                origins[("ports", index, "http_filter")] = "--http-header/--http-path/--http-method"
                for key in flags.http_filter:
                    origins[("ports", index, "http_filter", key)] = f"--http-{key}"

    if flags.pcap is not None:
        pcap = data.get("pcap") or {}
        data["pcap"] = {**pcap, "path": flags.pcap}
        origins[("pcap", "path")] = "--pcap"

    def add_items(path: tuple[str, str], values: Sequence[str], *, replace: bool) -> None:
        # Each item is labelled with the key it lands in, without its index: the
        # index in the merged list would count the file's items too.
        section: dict[str, Any] = data[path[0]]
        items: list[Any] = [] if replace else section[path[1]]
        section[path[1]] = [*items, *values]
        for index in range(len(items), len(items) + len(values)):
            origins[(*path, index)] = ".".join(path)

    if flags.env_include is not None:
        add_items(("env", "include"), flags.env_include, replace=True)
    add_items(("env", "exclude"), flags.env_exclude, replace=False)
    if flags.env_override is not None:
        data["env"]["override"].update(flags.env_override)
        # Bad names are reported at the mapping, bad values at their name.
        origins[("env", "override")] = "env.override"
        for name in flags.env_override:
            origins[("env", "override", name)] = _format_path(("env", "override", name))
    if flags.outgoing is not None:
        put(("outgoing", "enabled"), flags.outgoing, "outgoing.enabled")
    add_items(("outgoing", "exclude"), flags.outgoing_exclude, replace=False)
    if flags.outgoing_method is not None:
        put(("outgoing", "method"), flags.outgoing_method, "outgoing.method")

    def locate(loc: tuple[int | str, ...]) -> tuple[str | None, tuple[int | str, ...]]:
        # The most specific recorded origin wins; a variable or flag sets exactly
        # one value, so its name replaces the key path instead of preceding it.
        for size in range(len(loc), 0, -1):
            origin = origins.get(loc[:size])
            if origin is not None:
                return origin, loc[size:]
        return file_source, loc

    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_render(err, locate)) from None


# ---------------------------------------------------------------- documentation


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
        f"  port: {agent.port}",
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
        *_comment(OutgoingConfig, "method", "  "),
        f"  method: {_scalar(outgoing.method)}",
    ]
    return "\n".join(lines) + "\n"
