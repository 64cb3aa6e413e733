"""The validated configuration model: one frozen :class:`Config` and its parts."""

from __future__ import annotations

import functools
import ipaddress
import re
import reprlib
from typing import Annotated, Any, Literal

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
from pydantic_core import PydanticCustomError

from netmirror.wire.session import SESSION_NAME_RULE, is_session_name

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

# Loose on purpose: each target kind validates its own NAME later; here we only make
# sure the value has the KIND/NAME shape so a typo fails before anything is touched.
_TARGET_RE = re.compile(r"[a-z]+/\S+|targetless")
# Underscores are not valid in DNS names, but container runtimes resolve service
# names like "my_app", which is exactly what a local process may listen behind.
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# [0-9] rather than \d: \d also matches non-ASCII digits that int() would accept.
_PORT_SPEC_RE = re.compile(r"([0-9]+)(?::([0-9]+))?")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

#: Stands for the http_filter key in messages of the filter parser, to be cut off.
_HERE = "\x00"

# Values end up in one-line messages, and a config file can hold anything (long
# strings, deep or self-referencing lists via YAML anchors): reprlib bounds the size.
_value_repr = reprlib.Repr()
_value_repr.maxstring = 60
_value_repr.maxother = 60
_value_repr.maxlevel = 3
_value_repr.maxlist = _value_repr.maxtuple = _value_repr.maxdict = 4
_value_repr.maxset = _value_repr.maxfrozenset = 4


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


#: A Kubernetes namespace name (an RFC 1123 label).
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


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
            from netmirror.wire.httpfilter import HttpFilter

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
    namespace: str | None = Field(
        default=None,
        description="Kubernetes targets: the namespace job-mode agents run in, if not the "
        "target's. For clusters whose application namespaces enforce Pod Security "
        "'baseline' or 'restricted': a namespace the cluster admin labelled "
        "pod-security.kubernetes.io/enforce=privileged for netmirror "
        "(manifests/agent-namespace.yaml). The agent job runs on the target pod's node and "
        "enters the target container from there. When the target's namespace would reject "
        "the ephemeral agent, netmirror switches to job mode in this namespace and says so.",
    )
    port: Port | None = Field(
        default=None,
        description="Kubernetes targets: loopback port of the agent's websocket inside the "
        "pod, reached through the API server's port-forward. Unset: a port derived from "
        "the session name (47070-48069), so the agents of several sessions in one pod "
        "do not take each other's port.",
    )

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str | None) -> str | None:
        if value is not None and not _DNS_LABEL.fullmatch(value):
            raise ValueError(
                "is not a namespace name (lower case letters, digits and '-', at most 63)"
            )
        return value

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
    udp: bool = Field(
        default=True,
        description="Send the command's UDP (other than DNS, which 'dns' decides) from the "
        "target too: each of its sockets gets one socket in the target, and the answers "
        "come back to it. Transparent method only.",
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


def _check_file_pattern(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must be an absolute path (a glob such as /app/config/** is allowed)")
    if "\0" in value or not value.rstrip("/*"):
        raise ValueError("must name a path below /")
    return value


FilePattern = Annotated[str, AfterValidator(_check_file_pattern)]


class FilesConfig(BaseModel):
    """The target's files, for the local process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True,
        description="Mount the target container's root (read-only) at $NETMIRROR_ROOT for "
        "netmirror exec's command (and under the session's directory for up), and put its "
        "volume mounts, /etc/hosts, /etc/resolv.conf, /etc/hostname and the paths below at "
        "their own paths for the command.",
    )
    read_only: list[FilePattern] = Field(
        default_factory=list,
        description="More of the target's paths the command sees at their own path, "
        "read-only (absolute; '/app/config/**' means the tree; other globs are matched "
        "against the target's files).",
    )
    read_write: list[FilePattern] = Field(
        default_factory=list,
        description="The target's paths the command sees at their own path and may change: "
        "creating, writing, truncating, renaming, removing and chmod go to the target.",
    )
    local: list[FilePattern] = Field(
        default_factory=list,
        description="Paths inside the trees above that stay this machine's.",
    )
    timeout: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="Seconds a file operation waits for the tunnel to the target before it "
        "fails with EIO.",
    )


class ForwardConfig(BaseModel):
    """A local port that reaches HOST:PORT as the target reaches it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_port: Port = Field(description="The port on this machine.")
    local_host: Annotated[str, AfterValidator(_check_local_host)] = Field(
        default="127.0.0.1", description="The address on this machine it listens on."
    )
    host: str = Field(
        min_length=1,
        max_length=253,
        description="Where the target connects: an address, or a name the target resolves "
        "(its DNS and hosts file).",
    )
    port: Port = Field(description="The port the target connects to.")

    @classmethod
    def parse(cls, spec: str) -> ForwardConfig:
        """``[LHOST:]LPORT:HOST:PORT`` (``[...]`` around IPv6 addresses); ValueError."""
        parts = _split_forward(spec)
        if len(parts) == 3:
            parts = ["127.0.0.1", *parts]
        if len(parts) != 4 or not all(parts):
            raise ValueError(f"{spec!r} is not [LHOST:]LPORT:HOST:PORT")
        lhost, lport, host, port = parts
        if not lport.isdigit() or not port.isdigit():
            raise ValueError(f"{spec!r}: the ports must be numbers")
        return cls(local_host=lhost, local_port=int(lport), host=host, port=int(port))


def _split_forward(spec: str) -> list[str]:
    parts: list[str] = []
    rest = spec
    while rest:
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                raise ValueError(f"{spec!r}: unclosed '['")
            parts.append(rest[1:end])
            rest = rest[end + 1 :].removeprefix(":")
        else:
            head, sep, rest = rest.partition(":")
            parts.append(head)
            if not sep:
                break
    return parts


class IncomingConfig(BaseModel):
    """netmirror exec without ports: the ports the command listens on, taken as they come."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Field(
        default="mirror",
        description="What happens to the target's port with the number the command listens "
        "on: mirror (the pod keeps answering, the command gets a copy), steal, or off.",
    )
    port_mapping: dict[Port, Port] = Field(
        default_factory=dict,
        description="Local port -> the target's port, where the numbers differ.",
    )
    ignore_ports: list[Port] = Field(
        default_factory=list,
        description="Local ports left alone.",
    )


class Config(BaseModel):
    """netmirror configuration: what to attach to, and which of its ports to take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str | None = Field(
        default=None,
        description="What to attach to, as KIND/NAME: netns/NAME (a network namespace), "
        "pid/PID (the network namespace of a process), pod/NAME, deployment/NAME or "
        "statefulset/NAME (Kubernetes; each with /container/C), or targetless (Kubernetes: "
        "an agent pod of its own, for outgoing traffic, DNS and port-forward only).",
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
    files: FilesConfig = Field(
        default_factory=FilesConfig,
        description="The target's files: its root, its volumes and the paths named here.",
    )
    port_forward: list[ForwardConfig] = Field(
        default_factory=list,
        description="Local ports that reach a host and port as the target reaches them "
        "(netmirror port-forward -L, or part of a session).",
    )
    incoming: IncomingConfig = Field(
        default_factory=IncomingConfig,
        description="netmirror exec with no ports given: what happens to the target's ports "
        "with the numbers the command listens on.",
    )
    steal_probes: bool = Field(
        default=False,
        description="Kubernetes: steal the kubelet's health probes of stolen ports too "
        "(by default they stay with the target's own server, so a slow or stopped local "
        "process does not get the pod restarted or taken out of its Service).",
    )

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str | None) -> str | None:
        if value is not None and not _TARGET_RE.fullmatch(value):
            raise ValueError(
                "must look like KIND/NAME, e.g. netns/NAME, pid/PID or pod/NAME, or be targetless"
            )
        return value

    @field_validator("session")
    @classmethod
    def _check_session(cls, value: str | None) -> str | None:
        if value is not None and not is_session_name(value):
            raise ValueError(f"must be {SESSION_NAME_RULE}")
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
