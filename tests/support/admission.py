"""The API server's Pod Security admission, for the emulated cluster of the tests.

Written from the Pod Security Standards and the messages a real API server gives,
independently of netmirror's own prediction (``netmirror.kube.podsecurity``), so
the tests check netmirror against the server's behaviour rather than against
itself. Only the checks a netmirror agent can fail are here.
"""

from __future__ import annotations

from typing import Any

DEFAULT_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
RANK = {"privileged": 0, "baseline": 1, "restricted": 2}


def level_of(labels: dict[str, str], mode: str) -> str:
    """The level of ``mode``; one the server does not know fails closed only for enforce."""
    value = labels.get(f"pod-security.kubernetes.io/{mode}", "privileged")
    if value in RANK:
        return value
    return "restricted" if mode == "enforce" else "privileged"


def _quoted(items: list[str]) -> str:
    return ", ".join(f'"{item}"' for item in items)


def _ctx(container: dict[str, Any]) -> dict[str, Any]:
    return container.get("securityContext") or {}


def _failure(check_name: str, messages: list[str]) -> list[str]:
    return [f"{check_name} ({'; '.join(messages)})"] if messages else []


def check(spec: dict[str, Any], level: str) -> list[str]:
    """The failed checks of ``level`` for a pod spec, worded as the API server words them."""
    if RANK[level] == 0:
        return []
    pod_ctx = spec.get("securityContext") or {}
    containers = [
        c
        for key in ("initContainers", "containers", "ephemeralContainers")
        for c in spec.get(key) or []
    ]
    out = _failure(
        "privileged",
        [
            f'container "{c["name"]}" must not set securityContext.privileged=true'
            for c in containers
            if _ctx(c).get("privileged")
        ],
    )
    hosts = [f"{k}=true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    if hosts:
        out.append(f"host namespaces ({', '.join(hosts)})")
    allowed = {"NET_BIND_SERVICE"} if level == "restricted" else DEFAULT_CAPS
    adding = {
        c["name"]: extra
        for c in containers
        if (
            extra := [
                cap
                for cap in (_ctx(c).get("capabilities") or {}).get("add") or []
                if cap not in allowed
            ]
        )
    }
    add_messages = {
        name: f'container "{name}" must not include {_quoted(caps)} in '
        "securityContext.capabilities.add"
        for name, caps in adding.items()
    }
    if level == "baseline":
        return out + _failure("non-default capabilities", list(add_messages.values()))
    out += _failure(
        "allowPrivilegeEscalation != false",
        [
            f'container "{c["name"]}" must set securityContext.allowPrivilegeEscalation=false'
            for c in containers
            if _ctx(c).get("allowPrivilegeEscalation") is not False
        ],
    )
    capability_messages: list[str] = []
    for c in containers:
        if "ALL" not in ((_ctx(c).get("capabilities") or {}).get("drop") or []):
            capability_messages.append(
                f'container "{c["name"]}" must set securityContext.capabilities.drop=["ALL"]'
            )
        if c["name"] in add_messages:
            capability_messages.append(add_messages[c["name"]])
    out += _failure("unrestricted capabilities", capability_messages)
    out += _failure(
        "runAsNonRoot != true",
        (
            ["pod must not set securityContext.runAsNonRoot=false"]
            if pod_ctx.get("runAsNonRoot") is False
            else []
        )
        + [
            f'pod or container "{c["name"]}" must set securityContext.runAsNonRoot=true'
            for c in containers
            if _ctx(c).get("runAsNonRoot") is False
            or not _ctx(c).get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
        ],
    )
    out += _failure(
        "runAsUser=0",
        (["pod must not set runAsUser=0"] if pod_ctx.get("runAsUser") == 0 else [])
        + [
            f'container "{c["name"]}" must not set runAsUser=0'
            for c in containers
            if _ctx(c).get("runAsUser") == 0
        ],
    )
    pod_profile = (pod_ctx.get("seccompProfile") or {}).get("type")
    out += _failure(
        "seccompProfile",
        [
            f'pod or container "{c["name"]}" must set securityContext.seccompProfile.type to '
            '"RuntimeDefault" or "Localhost"'
            for c in containers
            if (_ctx(c).get("seccompProfile") or {}).get("type", pod_profile)
            not in ("RuntimeDefault", "Localhost")
        ],
    )
    return out


def forbidden(pod: str, level: str, failures: list[str]) -> dict[str, Any]:
    """The Status body of a pod the enforce level rejects (HTTP 403)."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'pods "{pod}" is forbidden: violates PodSecurity "{level}:latest": '
        + ", ".join(failures),
        "reason": "Forbidden",
        "details": {"name": pod, "kind": "pods"},
        "code": 403,
    }


def warning(level: str, failures: list[str]) -> str:
    """The ``Warning`` header value for a pod a warn level would reject."""
    text = f'would violate PodSecurity "{level}:latest": ' + ", ".join(failures)
    return '299 - "' + text.replace('"', '\\"') + '"'
