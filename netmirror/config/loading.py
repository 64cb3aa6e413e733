"""Where a configuration comes from: a file, ``NETMIRROR_*`` variables, flags."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from netmirror.config.messages import (
    _format_path,
    _one_line,
    _render,
    _show,
    format_validation_error,
)
from netmirror.config.mirrord import Note, convert, is_mirrord
from netmirror.config.model import (
    _NOT_A_PORT,
    _PORT_SPEC_RE,
    ENV_AGENT_IMAGE,
    ENV_AGENT_TTL,
    ENV_SESSION,
    ENV_TARGET,
    Config,
    ForwardConfig,
)
from netmirror.errors import ConfigError


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
    agent_namespace: str | None = None
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
    outgoing_udp: bool | None = None
    """Sets ``outgoing.udp``."""
    files: bool | None = None
    """Sets ``files.enabled``."""
    files_ro: Sequence[str] = ()
    """Paths appended to ``files.read_only``."""
    files_rw: Sequence[str] = ()
    """Paths appended to ``files.read_write``."""
    files_local: Sequence[str] = ()
    """Paths appended to ``files.local``."""
    steal_probes: bool | None = None
    """``--steal-probes``: sets ``steal_probes``."""
    incoming_mode: str | None = None
    """``exec --incoming``: sets ``incoming.mode``."""
    port_forward: Sequence[str] = ()
    """``-L [LHOST:]LPORT:HOST:PORT`` specs, appended to ``port_forward``."""
    """Networks appended to ``outgoing.exclude``."""


def read_dialect(path: Path) -> tuple[dict[str, Any], str, list[Note]]:
    """A config file's data as netmirror's, the dialect it was written in (``netmirror``
    or ``mirrord``), and, for mirrord's, what became of each key."""
    data = load_file(path)
    if not is_mirrord(data):
        return data, "netmirror", []
    try:
        converted, notes = convert(data)
    except (TypeError, ValueError, AttributeError) as exc:  # a shape no mapping foresaw
        raise ConfigError(_one_line(f"{path}: cannot read this mirrord config: {exc}")) from None
    return converted, "mirrord", notes


def build_config(
    *,
    file: Path | None,
    env: Mapping[str, str],
    flags: Overrides,
    notes: list[Note] | None = None,
) -> Config:
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
    base = Config()
    if file is not None:
        data, _dialect, found = read_dialect(file)
        if notes is not None:
            notes.extend(found)
        base = parse_config(data, source=file_source)
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
        ("--agent-namespace", flags.agent_namespace, ("agent", "namespace")),
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
    if flags.outgoing_udp is not None:
        put(("outgoing", "udp"), flags.outgoing_udp, "outgoing.udp")

    if flags.files is not None:
        put(("files", "enabled"), flags.files, "--files")
    add_items(("files", "read_only"), flags.files_ro, replace=False)
    add_items(("files", "read_write"), flags.files_rw, replace=False)
    add_items(("files", "local"), flags.files_local, replace=False)
    if flags.steal_probes is not None:
        put(("steal_probes",), flags.steal_probes, "--steal-probes")
    if flags.incoming_mode is not None:
        put(("incoming", "mode"), flags.incoming_mode, "--incoming")
    for spec in flags.port_forward:
        try:
            forward = ForwardConfig.parse(spec)
        except ValueError as exc:
            raise ConfigError(f"-L {_one_line(str(exc))}") from None
        data["port_forward"].append(forward.model_dump())
        origins[("port_forward", len(data["port_forward"]) - 1)] = f"-L {spec}"

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


def parse_config(data: Mapping[str, Any], *, source: str | None = None) -> Config:
    """Validate already-parsed data into a :class:`Config`.

    :raises ConfigError: one line prefixed with ``source`` when given.
    """
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=source)) from None
