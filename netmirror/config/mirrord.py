"""mirrord's config files, read as netmirror's (pure functions).

Projects that used mirrord keep a ``mirrord.json`` (or YAML, or TOML) such as::

    {"target": "deployment/client", "feature": {"network": {"incoming": "steal"}}}

:func:`convert` maps what has an equivalent onto netmirror's config data, and says
of every other key that it is ignored (one :class:`Note` each): those are not
errors, the rest of the file still applies. mirrord's filters on files are regular
expressions, netmirror's are globs: only the ones that name a path (``^/app/config``,
``/data/.*``) are mapped.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Note", "convert", "is_mirrord"]

#: Top-level keys only mirrord has: a file with one of them is mirrord's.
_MIRRORD_ONLY = frozenset(
    {
        "feature",
        "kube_context",
        "kubeconfig",
        "accept_invalid_certificates",
        "operator",
        "skip_processes",
        "skip_build_tools",
        "connect_tcp",
        "pause",
        "telemetry",
        "internal_proxy",
        "external_proxy",
        "use_proxy",
        "sip_binaries",
        "experimental",
        "container",
        "startup_retry",
    }
)


@dataclass(frozen=True)
class Note:
    """What became of one key of a mirrord config."""

    key: str
    """The key's path, dotted: ``feature.network.incoming.mode``."""
    mapped_to: str | None
    """The netmirror key it set, or None: it has no equivalent and was ignored."""
    why: str = ""

    def line(self) -> str:
        if self.mapped_to is None:
            return f"mirrord key {self.key!r} ignored: {self.why or 'netmirror has no equivalent'}"
        return f"mirrord key {self.key!r} -> {self.mapped_to}"


def is_mirrord(data: Mapping[str, Any]) -> bool:
    """Whether config data is in mirrord's dialect rather than netmirror's."""
    if any(key in _MIRRORD_ONLY for key in data):
        return True
    target = data.get("target")
    if isinstance(target, Mapping):
        return True
    agent = data.get("agent")
    return isinstance(agent, Mapping) and ("ephemeral" in agent or "namespace" in agent)


class _Converter:
    def __init__(self) -> None:
        self.out: dict[str, Any] = {}
        self.notes: list[Note] = []

    def mapped(self, key: str, to: str) -> None:
        self.notes.append(Note(key, to))

    def ignored(self, key: str, why: str = "") -> None:
        self.notes.append(Note(key, None, why))

    def ints(self, key: str, value: Any) -> list[int]:
        """A list of ports; anything else is a note and nothing."""
        items = value if isinstance(value, list) else None
        if items is None or not all(_is_int(item) for item in items):
            self.ignored(key, f"not a list of port numbers: {value!r:.40}")
            return []
        return [int(item) for item in items]

    def text(self, key: str, value: Any) -> str | None:
        if isinstance(value, str) and value:
            return value
        self.ignored(key, f"not a string: {value!r:.40}")
        return None

    def section(self, name: str) -> dict[str, Any]:
        return self.out.setdefault(name, {})  # type: ignore[no-any-return]

    # --- top level ------------------------------------------------------------------

    def top(self, data: Mapping[str, Any]) -> None:
        for key, value in data.items():
            if key == "target":
                self.target(value)
            elif key == "feature":
                self.feature(value)
            elif key == "agent":
                self.agent(value)
            elif key == "kube_context":
                if (context := self.text(key, value)) is not None:
                    self.section("kubernetes")["context"] = context
                    self.mapped(key, "kubernetes.context")
            elif key == "targetless":
                if value is True:
                    self.out["target"] = "targetless"
                    self.mapped(key, "target")
                elif value is not False:
                    self.ignored(key, f"not true or false: {value!r:.40}")
            elif key == "kubeconfig":
                self.ignored(key, "set KUBECONFIG in the environment instead")
            else:
                self.ignored(key)

    def target(self, value: Any) -> None:
        if isinstance(value, str):
            self.target_path("target", value)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if key == "path":
                    self.target_path("target.path", item)
                elif key == "namespace":
                    if (namespace := self.text("target.namespace", item)) is not None:
                        self.section("kubernetes")["namespace"] = namespace
                        self.mapped("target.namespace", "kubernetes.namespace")
                else:
                    self.ignored(f"target.{key}")
        else:
            self.ignored("target", "not a string or a {path, namespace} mapping")

    def target_path(self, key: str, value: Any) -> None:
        if value == "targetless" or value is None:
            # mirrord: no target (or "targetless"): an agent pod of its own.
            self.out["target"] = "targetless"
            self.mapped(key, "target")
            return
        if not isinstance(value, str):
            self.ignored(key, f"not a string: {value!r:.40}")
            return
        if isinstance(value, str) and "/" not in value:
            value = f"pod/{value}"  # mirrord takes a bare pod name
        self.out["target"] = value
        self.mapped(key, "target")

    def agent(self, value: Any) -> None:
        if not isinstance(value, Mapping):
            self.ignored("agent", "not a mapping")
            return
        for key, item in value.items():
            if key == "image":
                image = item.get("name") if isinstance(item, Mapping) else item
                if (name := self.text("agent.image", image)) is not None:
                    self.section("agent")["image"] = name
                    self.mapped("agent.image", "agent.image")
            elif key == "ttl":
                if isinstance(item, int | float) and not isinstance(item, bool):
                    self.section("agent")["ttl"] = item
                    self.mapped("agent.ttl", "agent.ttl")
                else:
                    self.ignored("agent.ttl", f"not a number: {item!r:.40}")
            elif key == "ephemeral":
                self.section("agent")["mode"] = "ephemeral" if item else "job"
                self.mapped("agent.ephemeral", "agent.mode")
            elif key == "namespace":
                if (namespace := self.text("agent.namespace", item)) is not None:
                    self.section("agent")["namespace"] = namespace
                    self.mapped("agent.namespace", "agent.namespace")
            else:
                self.ignored(f"agent.{key}")

    # --- feature --------------------------------------------------------------------

    def feature(self, value: Any) -> None:
        if not isinstance(value, Mapping):
            self.ignored("feature", "not a mapping")
            return
        for key, item in value.items():
            if key == "network":
                self.network(item)
            elif key == "env":
                self.env(item)
            elif key == "fs":
                self.fs(item)
            else:
                self.ignored(f"feature.{key}")

    def network(self, value: Any) -> None:
        if not isinstance(value, Mapping):
            self.ignored("feature.network", "not a mapping")
            return
        for key, item in value.items():
            if key == "incoming":
                self.incoming(item)
            elif key == "outgoing":
                self.outgoing(item)
            elif key == "dns":
                enabled = item.get("enabled", True) if isinstance(item, Mapping) else item
                self.section("outgoing")["dns"] = bool(enabled)
                self.mapped("feature.network.dns", "outgoing.dns")
            else:
                self.ignored(f"feature.network.{key}")

    def incoming(self, value: Any) -> None:
        base = "feature.network.incoming"
        settings: Mapping[str, Any] = {"mode": value} if isinstance(value, str) else value
        if not isinstance(settings, Mapping):
            self.ignored(base, "not a mode or a mapping")
            return
        mode = settings.get("mode", "mirror")
        if mode not in ("steal", "mirror", "off"):
            self.ignored(f"{base}.mode", f"unknown mode {mode!r}")
            mode = "mirror"
        given_mode = "mode" in settings and mode == settings.get("mode")
        mapping: dict[int, int] = {}
        pairs = settings.get("port_mapping") or []
        for pair in pairs if isinstance(pairs, list) else [pairs]:
            if isinstance(pair, list) and len(pair) == 2 and all(map(_is_int, pair)):
                mapping[int(pair[1])] = int(pair[0])  # [local, remote]
            else:
                self.ignored(f"{base}.port_mapping", f"not a [local, remote] pair: {pair!r:.40}")
        ignore = set(self.ints(f"{base}.ignore_ports", settings.get("ignore_ports") or []))
        ports = self.ints(f"{base}.ports", settings.get("ports") or [])
        http = settings.get("http_filter")
        http_filter, http_ports = self.http_filter(http) if http is not None else (None, [])
        for port in http_ports:
            if port not in ports:
                ports.append(port)
        for key in settings:
            if key in ("port_mapping", "ignore_ports", "ports"):
                self.mapped(f"{base}.{key}", "ports[]")
            elif key not in ("mode", "http_filter"):
                self.ignored(f"{base}.{key}")
        entries = self.out.setdefault("ports", [])
        for port in ports:
            if port in ignore:
                continue
            entry: dict[str, Any] = {"remote": port, "mode": mode}
            if port in mapping:
                entry["local"] = mapping[port]
            if (
                http_filter is not None
                and mode == "steal"
                and (not http_ports or port in http_ports)
            ):
                entry["http_filter"] = http_filter
            entries.append(entry)
        if given_mode:
            self.mapped(f"{base}.mode", "ports[].mode" if ports else "incoming.mode")
        if not ports:
            # exec applies the mode to the ports the command listens on.
            incoming = self.section("incoming")
            incoming["mode"] = mode
            if mapping:
                incoming["port_mapping"] = {local: remote for remote, local in mapping.items()}
            if ignore:
                incoming["ignore_ports"] = sorted(ignore)

    def http_filter(self, value: Any) -> tuple[dict[str, Any] | None, list[int]]:
        base = "feature.network.incoming.http_filter"
        if not isinstance(value, Mapping):
            self.ignored(base, "not a mapping")
            return None, []
        parts: list[dict[str, Any]] = []
        ports: list[int] = []
        for key, item in value.items():
            if key in ("header_filter", "path_filter", "method_filter"):
                parts.append({key.removesuffix("_filter"): item})
                self.mapped(f"{base}.{key}", "ports[].http_filter")
            elif key in ("all_of", "any_of") and isinstance(item, list):
                inner = [self.filter_item(f"{base}.{key}", part) for part in item]
                parts.append({key: [part for part in inner if part is not None]})
                self.mapped(f"{base}.{key}", f"ports[].http_filter.{key}")
            elif key == "ports":
                ports = self.ints(f"{base}.ports", item or [])
                self.mapped(f"{base}.ports", "ports[]")
            else:
                self.ignored(f"{base}.{key}")
        if not parts:
            return None, ports
        return (parts[0] if len(parts) == 1 else {"all_of": parts}), ports

    def filter_item(self, key: str, value: Any) -> dict[str, Any] | None:
        if isinstance(value, Mapping):
            for name in ("header", "path", "method"):
                if name in value:
                    return {name: value[name]}
        self.ignored(key, f"a filter netmirror cannot read: {value!r}")
        return None

    def outgoing(self, value: Any) -> None:
        base = "feature.network.outgoing"
        if isinstance(value, bool):
            self.section("outgoing")["enabled"] = value
            self.mapped(base, "outgoing.enabled")
            return
        if not isinstance(value, Mapping):
            self.ignored(base, "not a mapping")
            return
        for key, item in value.items():
            if key == "tcp":
                self.section("outgoing")["enabled"] = bool(item)
                self.mapped(f"{base}.tcp", "outgoing.enabled")
            elif key == "udp":
                self.section("outgoing")["udp"] = bool(item)
                self.mapped(f"{base}.udp", "outgoing.udp")
            elif key == "filter" and isinstance(item, Mapping):
                for side, target in (("remote", "include"), ("local", "exclude")):
                    entries = item.get(side) or []
                    entries = entries if isinstance(entries, list) else [entries]
                    networks = [n for n in entries if _network(n)]
                    others = [n for n in entries if not _network(n)]
                    if networks:
                        self.section("outgoing")[target] = [_network(n) for n in networks]
                        self.mapped(f"{base}.filter.{side}", f"outgoing.{target}")
                    if others:
                        self.ignored(
                            f"{base}.filter.{side}",
                            f"only addresses and networks are mapped, not {others[0]!r}",
                        )
            else:
                self.ignored(f"{base}.{key}")

    def env(self, value: Any) -> None:
        base = "feature.env"
        if isinstance(value, bool):
            if not value:
                self.section("env")["include"] = []
                self.mapped(base, "env.include")
            return
        if not isinstance(value, Mapping):
            self.ignored(base, "not a mapping")
            return
        for key, item in value.items():
            if key in ("include", "exclude"):
                self.section("env").setdefault(key, []).extend(_patterns(item))
                self.mapped(f"{base}.{key}", f"env.{key}")
            elif key == "override" and isinstance(item, Mapping):
                self.section("env")["override"] = {str(k): str(v) for k, v in item.items()}
                self.mapped(f"{base}.override", "env.override")
            elif key == "unset":
                exclude = self.section("env").setdefault("exclude", [])
                exclude.extend(_patterns(item))
                self.mapped(f"{base}.unset", "env.exclude")
            else:
                self.ignored(f"{base}.{key}")

    def fs(self, value: Any) -> None:
        base = "feature.fs"
        settings: Mapping[str, Any] = {"mode": value} if isinstance(value, str) else value
        if not isinstance(settings, Mapping):
            self.ignored(base, "not a mode or a mapping")
            return
        for key, item in settings.items():
            if key == "mode":
                self.section("files")["enabled"] = item != "local"
                self.mapped(f"{base}.mode", "files.enabled")
            elif key in ("read_only", "read_write", "local"):
                patterns = item if isinstance(item, list) else [item]
                globs = [g for g in map(_glob, patterns) if g is not None]
                if globs:
                    self.section("files")[key] = globs
                    self.mapped(f"{base}.{key}", f"files.{key}")
                if len(globs) < len(patterns):
                    self.ignored(f"{base}.{key}", "a regular expression that names no path")
            else:
                self.ignored(f"{base}.{key}")


def _network(value: Any) -> str | None:
    """An address or network of a mirrord filter entry (``10.0.0.0/8``, ``1.2.3.4:5432``)."""
    if not isinstance(value, str):
        return None
    text = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return None


def _patterns(value: Any) -> list[str]:
    """mirrord's ``"A;B*"`` or list of patterns (anything else: none)."""
    if isinstance(value, str):
        return [part for part in value.split(";") if part]
    if isinstance(value, list):
        return [part for part in value if isinstance(part, str) and part]
    return []


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.isdigit())


_PATH = re.compile(r"\^?(/[A-Za-z0-9._/-]*?)(/\.\*|\.\*)?\$?")


def _glob(pattern: Any) -> str | None:
    """The glob of a mirrord path regex that names a path, else None."""
    if not isinstance(pattern, str):
        return None
    match = _PATH.fullmatch(pattern)
    if match is None:
        return None
    path, rest = match.group(1).rstrip("/") or "/", match.group(2)
    return f"{path}/**" if rest else path


def convert(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[Note]]:
    """netmirror config data for a mirrord config, and what became of each key."""
    converter = _Converter()
    converter.top(data)
    return converter.out, converter.notes
