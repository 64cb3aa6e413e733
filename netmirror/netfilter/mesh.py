"""Service meshes found in a network namespace's nat table (pure functions).

A sidecar mesh redirects the pod's incoming TCP to its proxy before the application
sees it (usually mTLS between sidecars), and the proxy then opens a plaintext
connection to the application's port over ``lo``. A steal hooked in front of the
mesh would hand the developer the mTLS bytes and bypass the mesh's policy, so where
a known mesh is found netmirror hooks behind it: its ``PREROUTING`` rule goes after
the mesh's (so only what the mesh lets through unredirected reaches it), and its
``OUTPUT -o lo`` rule, ahead of the mesh's, takes the proxy's plaintext connection
to the application, which is what the application itself would have received.

Known meshes, by the rules their init containers (or CNI plugins) install:

* Istio (``istio-iptables``): chains ``ISTIO_INBOUND``, ``ISTIO_IN_REDIRECT``
  (REDIRECT to 15006), ``ISTIO_OUTPUT``, ``ISTIO_REDIRECT`` (15001); the proxy runs
  as uid 1337 and connects to the application from 127.0.0.6;
* Linkerd (``proxy-init``): chains ``PROXY_INIT_REDIRECT`` (REDIRECT to 4143) and
  ``PROXY_INIT_OUTPUT`` (4140); the proxy runs as uid 2102.

Any other REDIRECT (or TPROXY, in ``mangle``) rule that is not netmirror's is an
unknown mesh or proxy: it is described in one line, so the user is told that what
netmirror steals may not be what the application sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from netmirror.netfilter.iptables import CHAIN_PREFIX, _parse_save

__all__ = ["Mesh", "detect_mesh"]


@dataclass(frozen=True)
class Mesh:
    """A mesh (or an unknown redirecting proxy) found in the namespace."""

    name: str
    """``istio``, ``linkerd`` or ``unknown``."""
    inbound_port: int | None = None
    """Where the mesh redirects incoming connections (its proxy's inbound port)."""
    outbound_port: int | None = None
    """Where it redirects outgoing ones."""
    proxy_uid: int | None = None
    """The uid the proxy runs as (its own connections are exempt from the redirects)."""
    found: str = ""
    """For an unknown one: the rules found, in one line."""

    @property
    def known(self) -> bool:
        return self.name != "unknown"

    def describe(self) -> str:
        """One line, for ``up`` and ``status``."""
        if not self.known:
            return f"unknown redirect rules ({self.found})"
        parts = []
        if self.inbound_port is not None:
            parts.append(f"inbound to {self.inbound_port}")
        if self.outbound_port is not None:
            parts.append(f"outbound to {self.outbound_port}")
        if self.proxy_uid is not None:
            parts.append(f"proxy uid {self.proxy_uid}")
        label = {"istio": "Istio sidecar", "linkerd": "Linkerd proxy"}.get(self.name, self.name)
        return f"{label} ({', '.join(parts)})" if parts else label

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Mesh | None:
        """The mesh an agent reported, or None (nothing, or not a mesh record)."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        fields = {key: data.get(key) for key in cls.__dataclass_fields__}
        try:
            return cls(**fields)  # type: ignore[arg-type]
        except TypeError:
            return None


def _value(args: Sequence[str], *flags: str) -> str | None:
    for i, word in enumerate(args[:-1]):
        if word in flags:
            return args[i + 1]
    return None


def _port(args: Sequence[str]) -> int | None:
    value = _value(args, "--to-ports", "--on-port")
    if value is None:
        return None
    first = value.split("-", 1)[0].split(":", 1)[0]
    return int(first) if first.isdigit() else None


def _uid(rules: list[tuple[str, tuple[str, ...]]], prefix: str) -> int | None:
    """The uid a mesh's output chain exempts (``-m owner --uid-owner N -j RETURN``)."""
    for chain, args in rules:
        if not chain.startswith(prefix) or "!" in args:
            continue
        uid = _value(args, "--uid-owner")
        if uid is not None and uid.isdigit() and _value(args, "-j") == "RETURN":
            return int(uid)
    return None


def _is_ours(chain: str) -> bool:
    return chain.startswith(CHAIN_PREFIX)


def detect_mesh(save_text: str) -> Mesh | None:
    """The mesh that ``iptables-save`` output (nat, and mangle for TPROXY) shows, if any."""
    tables = _parse_save(save_text)
    nat = tables.get("nat")
    rules = list(nat.rules) if nat is not None else []
    chains = set(nat.chains) if nat is not None else set()
    redirects = [
        (chain, args) for chain, args in rules if not _is_ours(chain) and "REDIRECT" in args
    ]
    if "ISTIO_INBOUND" in chains or any(c.startswith("ISTIO_") for c, _ in redirects):
        inbound = next((_port(a) for c, a in redirects if c == "ISTIO_IN_REDIRECT"), None)
        outbound = next((_port(a) for c, a in redirects if c == "ISTIO_REDIRECT"), None)
        return Mesh("istio", inbound, outbound, _uid(rules, "ISTIO_OUTPUT"))
    if "PROXY_INIT_REDIRECT" in chains or any(c.startswith("PROXY_INIT_") for c, _ in redirects):
        inbound = next((_port(a) for c, a in redirects if c == "PROXY_INIT_REDIRECT"), None)
        outbound = next((_port(a) for c, a in redirects if c == "PROXY_INIT_OUTPUT"), None)
        return Mesh("linkerd", inbound, outbound, _uid(rules, "PROXY_INIT_OUTPUT"))
    mangle = tables.get("mangle")
    tproxies = [
        (chain, args)
        for chain, args in (mangle.rules if mangle is not None else [])
        if not _is_ours(chain) and "TPROXY" in args
    ]
    found = [
        f"{chain}: {kind} to port {_port(args) or '?'}"
        for kind, group in (("REDIRECT", redirects), ("TPROXY", tproxies))
        for chain, args in group
    ]
    if not found:
        return None
    more = f" and {len(found) - 2} more" if len(found) > 2 else ""
    return Mesh("unknown", found="; ".join(found[:2]) + more)


def find_mesh() -> Mesh | None:
    """The mesh of the current network namespace, reading both iptables backends
    (a mesh's init container may use either)."""
    from netmirror.netfilter.iptables import Backend, _save

    texts = [_save(backend, 4) or "" for backend in Backend]
    for text in texts:
        mesh = detect_mesh(text)
        if mesh is not None and mesh.known:
            return mesh
    return next((m for m in map(detect_mesh, texts) if m is not None), None)
