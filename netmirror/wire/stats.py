"""Counters and status both sides exchange, as typed records.

The agent sends what only it sees (mirror and HTTP filter counters, the capture's)
in STATS frames as an :class:`AgentReport`; the daemon adds its own counters and
answers ``netmirror status`` on its control socket with a :class:`SessionStatus`,
which the CLI renders or prints as JSON. Every record is a dataclass that
:func:`to_json` turns into JSON-ready data and :func:`from_json` reads back,
checking types, so no side reads another's counters by string keys. Unknown keys
are ignored (a newer peer may send more); a value of the wrong type is a
``ValueError``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

T = TypeVar("T")


@dataclass
class PortStats:
    """Counters of one subscribed port, kept by whichever side holds its sockets."""

    connections_total: int = 0
    connections_open: int = 0
    bytes_in: int = 0
    """Client to local process."""
    bytes_out: int = 0
    """Local process to client."""
    errors: int = 0
    last_error: str = ""

    def error(self, message: str) -> None:
        """Count an error and remember its text."""
        self.errors += 1
        self.last_error = message

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        view: dict[str, Any] = to_json(self)
        return view


@dataclass
class MirrorCounters:
    """Per mirrored port, what only the agent sees."""

    flows: int = 0
    partial: int = 0
    gaps: int = 0
    dropped: int = 0
    """Copies abandoned because the daemon or local process fell behind."""
    no_daemon: int = 0
    """Connections not copied because no daemon was connected."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        view: dict[str, Any] = to_json(self)
        return view


@dataclass
class HttpShareStats:
    """A session's place in the HTTP router of a port, and what the router counted."""

    matched: int = 0
    """Requests this session's filter took."""
    passed: int = 0
    """Requests no session took, given to the target's own server."""
    order: int = 0
    """This session's place among the port's sessions (the first match wins)."""
    sessions: list[str] = field(default_factory=list)


@dataclass
class CaptureStats:
    """The agent's packet capture, for every port mirrored by capture."""

    packets: int = 0
    kernel_packets: int = 0
    kernel_drops: int = 0
    truncated: int = 0
    duplicate_bytes: int = 0
    refused_flows: int = 0
    open_flows: int = 0
    pcap_records: int = 0
    pcap_dropped: int = 0


@dataclass
class PortReport:
    """What the agent knows of one port: a mirror's counters, or an HTTP share's."""

    mirror: MirrorCounters | None = None
    http: HttpShareStats | None = None


@dataclass
class AgentReport:
    """The body of a STATS frame.

    On the wire a port's mirror counters sit at the top of its entry, beside ``http``
    (``{"ports": {"8080": {"flows": 3, ...}}}``), as agents of this version have
    always sent them: :meth:`to_wire` and :meth:`from_wire` keep that layout.
    """

    ports: dict[int, PortReport] = field(default_factory=dict)
    capture: CaptureStats | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON body of the STATS frame."""
        ports: dict[str, Any] = {}
        for port, report in self.ports.items():
            entry: dict[str, Any] = to_json(report.mirror) if report.mirror is not None else {}
            if report.http is not None:
                entry["http"] = to_json(report.http)
            ports[str(port)] = entry
        body: dict[str, Any] = {"ports": ports}
        if self.capture is not None:
            body["capture"] = to_json(self.capture)
        return body

    @classmethod
    def from_wire(cls, body: Any) -> AgentReport:
        """Read a STATS body; ``ValueError`` names what is wrong with it."""
        if not isinstance(body, dict):
            raise ValueError("AgentReport: expected an object")
        entries = body.get("ports", {})
        if not isinstance(entries, dict):
            raise ValueError("AgentReport.ports: expected an object")
        mirror_keys = {f.name for f in dataclasses.fields(MirrorCounters)}
        ports: dict[int, PortReport] = {}
        for key, entry in entries.items():
            if not isinstance(entry, dict):
                raise ValueError(f"AgentReport.ports[{key}]: expected an object")
            try:
                port = int(key)
            except ValueError:
                raise ValueError(f"AgentReport.ports: bad key {key!r}") from None
            where = f"AgentReport.ports[{port}]"
            counters = {k: v for k, v in entry.items() if k in mirror_keys}
            mirror = _decode(MirrorCounters, counters, where) if counters else None
            http = entry.get("http")
            share = _decode(HttpShareStats, http, f"{where}.http") if http is not None else None
            ports[port] = PortReport(mirror=mirror, http=share)
        capture = body.get("capture")
        stats = _decode(CaptureStats, capture, "AgentReport.capture") if capture else None
        return cls(ports=ports, capture=stats)


@dataclass
class AgentStatus:
    """The agent as the daemon sees it."""

    state: str = "not started"
    pid: int | None = None
    backend: str | None = None
    addresses: list[str] = field(default_factory=list)
    mesh: str | None = None
    """The service mesh found in the target's namespace, and where netmirror hooked."""
    where: str | None = None
    """Kubernetes: how and where the agent runs ("job netmirror-web-1a2b3c in namespace
    netmirror, on node node-1")."""


@dataclass
class HttpStatus(HttpShareStats):
    """An HTTP-filtered port's share, with the filter in words."""

    filter: str = ""


@dataclass
class PortStatus(PortStats):
    """One port of ``netmirror status``."""

    remote: int = 0
    mode: str = "off"
    local: str = ""
    state: str = "off"
    method: str | None = None
    """How a mirrored port is copied (capture or passthrough)."""
    mirror: MirrorCounters | None = None
    http: HttpStatus | None = None
    probes: str | None = None
    """The kubelet's probes of this port, and where their connections go."""


@dataclass
class OutgoingStatus(PortStats):
    """A ``netmirror exec`` command's outgoing connections and DNS."""

    method: str = ""
    cgroup: str | None = None
    dns_queries: int = 0
    dns_failures: int = 0
    routed: bool = False
    """The command has routes of its own (it reaches what this machine cannot route)."""
    udp_associations: int = 0
    udp_datagrams_out: int = 0
    udp_datagrams_in: int = 0


@dataclass
class PcapStatus:
    """The pcap file of the mirrored ports."""

    path: str = ""
    bytes: int = 0
    records: int = 0
    max_bytes: int = 0
    state: str = ""


@dataclass
class FilesStatus:
    """The target's files: where its root is mounted, and what went over the tunnel."""

    root: str = ""
    volumes: list[str] = field(default_factory=list)
    writable: list[str] = field(default_factory=list)
    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


@dataclass
class ForwardStatus(PortStats):
    """A local port that reaches a host and port as the target reaches it."""

    local: str = ""
    to: str = ""
    state: str = ""


@dataclass
class UnservedPort:
    """A port the exec command listens on that the target does not serve."""

    remote: int = 0
    local: int = 0
    taken: bool = False
    """Stolen anyway (connections made to the target's address reach the command)."""


@dataclass
class SessionStatus:
    """What ``netmirror status`` shows of one session."""

    session: str = ""
    state: str = ""
    target: str = "?"
    daemon_pid: int | None = None
    version: str = ""
    started: float = 0.0
    reconnects: int = 0
    agent: AgentStatus | None = None
    ports: list[PortStatus] = field(default_factory=list)
    capture: CaptureStats | None = None
    outgoing: OutgoingStatus | None = None
    pcap: PcapStatus | None = None
    files: FilesStatus | None = None
    forwards: list[ForwardStatus] = field(default_factory=list)
    unserved: list[UnservedPort] = field(default_factory=list)
    error: str = ""
    """Why the session did not answer, when it did not."""


# --- JSON ------------------------------------------------------------------------------


def to_json(record: Any) -> Any:
    """JSON-ready data for a record of this module (fields that are None are left out)."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {
            f.name: to_json(getattr(record, f.name))
            for f in dataclasses.fields(record)
            if getattr(record, f.name) is not None
        }
    if isinstance(record, dict):
        return {str(key): to_json(value) for key, value in record.items()}
    if isinstance(record, list):
        return [to_json(value) for value in record]
    return record


def from_json(cls: type[T], obj: Any) -> T:
    """Read a record of type ``cls`` from what :func:`to_json` made."""
    return typing.cast(T, _decode(cls, obj, cls.__name__))


def _decode(kind: Any, obj: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if obj is None:
            return None
        return _decode(options[0], obj, where)
    if dataclasses.is_dataclass(kind):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
        hints = typing.get_type_hints(kind)
        values = {
            f.name: _decode(hints[f.name], obj[f.name], f"{where}.{f.name}")
            for f in dataclasses.fields(kind)
            if f.name in obj
        }
        return typing.cast(Any, kind)(**values)
    if origin is list:
        if not isinstance(obj, list):
            raise ValueError(f"{where}: expected a list, got {type(obj).__name__}")
        (item,) = typing.get_args(kind)
        return [_decode(item, value, f"{where}[{n}]") for n, value in enumerate(obj)]
    if origin is dict:
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
        key_type, value_type = typing.get_args(kind)
        out = {}
        for key, value in obj.items():
            try:
                decoded_key = key_type(key)
            except ValueError:
                raise ValueError(f"{where}: bad key {key!r}") from None
            out[decoded_key] = _decode(value_type, value, f"{where}[{key}]")
        return out
    if kind is float:
        if isinstance(obj, bool) or not isinstance(obj, int | float):
            raise ValueError(f"{where}: expected a number, got {type(obj).__name__}")
        return float(obj)
    if kind in (int, str, bool):
        if not isinstance(obj, kind) or (kind is int and isinstance(obj, bool)):
            raise ValueError(f"{where}: expected {kind.__name__}, got {type(obj).__name__}")
        return obj
    raise TypeError(f"{where}: cannot decode {kind!r}")
