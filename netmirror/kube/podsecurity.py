"""Pod Security admission, predicted: would a namespace's labels let the agent in?

Kubernetes' Pod Security admission reads three labels of a namespace,
``pod-security.kubernetes.io/{enforce,warn,audit}``, each naming a level of the
Pod Security Standards: ``privileged`` (anything), ``baseline`` (no host
namespaces, no privileged containers, capabilities only from a short default
list) or ``restricted`` (baseline, and non-root, no privilege escalation, every
capability dropped, a seccomp profile). ``enforce`` rejects a pod that violates
its level; ``warn`` and ``audit`` only report it.

netmirror knows the pod specs it is about to send, so it checks them against the
labels first and says in one line what would be rejected and how to get
through, instead of creating something the API server refuses (or, for a Job,
a Job whose pod is never created). Only the checks of the standards that a spec
netmirror writes can fail are evaluated; the API server stays the judge.

No I/O here: labels and pod specs (plain dicts, as sent to the API) in,
verdicts out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

LEVELS = ("privileged", "baseline", "restricted")
MODES = ("enforce", "warn", "audit")
LABEL_PREFIX = "pod-security.kubernetes.io/"

#: Capabilities the baseline level lets a container add (the container runtimes'
#: default set); restricted allows only NET_BIND_SERVICE.
BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
RESTRICTED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})


@dataclass(frozen=True)
class Policy:
    """The Pod Security labels of one namespace."""

    namespace: str
    levels: Mapping[str, str] = field(default_factory=dict)
    """mode (enforce, warn, audit) -> level, for the modes the namespace sets."""

    @property
    def enforce(self) -> str:
        return self.levels.get("enforce", "privileged")

    def describe(self, mode: str) -> str:
        """``"baseline"``: the level of ``mode`` as the namespace spells it."""
        return self.levels.get(mode, "privileged")


def policy_from_labels(namespace: str, labels: Mapping[str, str] | None) -> Policy:
    """The policy a namespace's labels set.

    A level the admission controller does not know counts as it counts there:
    ``restricted`` for ``enforce`` (it fails closed), ``privileged`` for ``warn`` and
    ``audit`` (they fail open).
    """
    levels: dict[str, str] = {}
    for mode in MODES:
        value = (labels or {}).get(LABEL_PREFIX + mode)
        if value is None:
            continue
        if value not in LEVELS:
            value = "restricted" if mode == "enforce" else "privileged"
        levels[mode] = value
    return Policy(namespace, levels)


@dataclass(frozen=True)
class Violation:
    """One check of the standards a pod spec fails, in the admission's words."""

    check: str
    """The check's name as the admission controller reports it ("host namespaces")."""
    detail: str
    """What in the spec fails it, briefly ("hostPID=true", "NET_ADMIN, NET_RAW")."""

    def __str__(self) -> str:
        return f"{self.check} ({self.detail})"


def violations(pod_spec: Mapping[str, Any], level: str) -> list[Violation]:
    """The checks of ``level`` that ``pod_spec`` (a PodSpec as a dict) fails.

    Every container counts: ``containers``, ``initContainers`` and
    ``ephemeralContainers``.
    """
    if level not in LEVELS:
        level = "restricted"
    if level == "privileged":
        return []
    found: list[Violation] = []
    containers = list(_containers(pod_spec))
    pod_context = pod_spec.get("securityContext") or {}

    privileged = [name for name, c in containers if _context(c).get("privileged")]
    if privileged:
        found.append(Violation("privileged", ", ".join(privileged)))
    hosts = [f"{key}=true" for key in ("hostNetwork", "hostPID", "hostIPC") if pod_spec.get(key)]
    if hosts:
        found.append(Violation("host namespaces", ", ".join(hosts)))
    allowed = RESTRICTED_CAPABILITIES if level == "restricted" else BASELINE_CAPABILITIES
    added = _unique(
        cap
        for _, c in containers
        for cap in (_context(c).get("capabilities") or {}).get("add") or []
        if cap not in allowed
    )
    if added:
        check = "unrestricted capabilities" if level == "restricted" else "non-default capabilities"
        found.append(Violation(check, ", ".join(added)))
    host_paths = [v.get("name", "?") for v in pod_spec.get("volumes") or [] if "hostPath" in v]
    if host_paths:
        found.append(Violation("hostPath volumes", ", ".join(host_paths)))
    host_ports = _unique(
        str(p["hostPort"]) for _, c in containers for p in c.get("ports") or [] if p.get("hostPort")
    )
    if host_ports:
        found.append(Violation("hostPort", ", ".join(host_ports)))
    if _seccomp(pod_context) == "Unconfined" or any(
        _seccomp(_context(c)) == "Unconfined" for _, c in containers
    ):
        found.append(Violation("seccompProfile", "Unconfined"))
    if level == "baseline":
        return found

    escalating = [
        name for name, c in containers if _context(c).get("allowPrivilegeEscalation") is not False
    ]
    if escalating:
        found.append(Violation("allowPrivilegeEscalation != false", ", ".join(escalating)))
    not_dropping = [
        name
        for name, c in containers
        if "ALL" not in ((_context(c).get("capabilities") or {}).get("drop") or [])
    ]
    if not_dropping and not added:
        found.append(Violation("unrestricted capabilities", "drop ALL: " + ", ".join(not_dropping)))
    # The pod's own setting counts even where every container overrides it.
    root = [] if pod_context.get("runAsNonRoot") is not False else ["pod"]
    root += [
        name
        for name, c in containers
        if _context(c).get("runAsNonRoot") is False
        or not _setting(pod_context, _context(c), "runAsNonRoot")
    ]
    if root:
        found.append(Violation("runAsNonRoot != true", ", ".join(root)))
    uid_zero = ["pod"] if pod_context.get("runAsUser") == 0 else []
    uid_zero += [name for name, c in containers if _context(c).get("runAsUser") == 0]
    if uid_zero:
        found.append(Violation("runAsUser=0", ", ".join(uid_zero)))
    unprofiled = [
        name
        for name, c in containers
        if (_seccomp(_context(c)) or _seccomp(pod_context)) not in ("RuntimeDefault", "Localhost")
    ]
    if unprofiled and not any(v.check == "seccompProfile" for v in found):
        found.append(Violation("seccompProfile", "not set: " + ", ".join(unprofiled)))
    return found


def summary(found: list[Violation]) -> str:
    """The violations in a few words: ``hostPID, NET_ADMIN, NET_RAW, runAsUser=0``."""
    parts: list[str] = []
    for v in found:
        if v.check.endswith("capabilities") and not v.detail.startswith("drop ALL"):
            parts.append(v.detail)
        elif v.check == "host namespaces":
            parts.append(v.detail.replace("=true", ""))
        elif v.check.endswith("capabilities"):
            parts.append("not dropping ALL capabilities")
        else:
            parts.append(v.check)
    return ", ".join(parts)


def _containers(pod_spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod_spec.get(key) or []:
            yield str(container.get("name", "?")), container


def _context(container: Mapping[str, Any]) -> Mapping[str, Any]:
    return container.get("securityContext") or {}


def _setting(pod: Mapping[str, Any], container: Mapping[str, Any], key: str) -> Any:
    """A container's security setting, falling back on the pod's (as the kubelet does)."""
    return container[key] if key in container else pod.get(key)


def _seccomp(context: Mapping[str, Any]) -> str | None:
    profile = context.get("seccompProfile") or {}
    return profile.get("type")


def _unique(items: Iterator[str]) -> list[str]:
    return list(dict.fromkeys(items))
