"""Pod Security admission predicted for the specs netmirror sends, and refusals worded."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from netmirror.daemon.targets.base import AgentSettings
from netmirror.daemon.targets.kube import agent_job, ephemeral_container, targetless_job
from netmirror.errors import TargetError
from netmirror.kube.cluster import RefusedError, api_error
from netmirror.kube.podsecurity import policy_from_labels, summary, violations

SETTINGS = AgentSettings(
    session="web", token="s3cret-token", workdir=Path("/tmp"), ttl=5.0, ready_timeout=30.0
)


def ephemeral(settings: AgentSettings = SETTINGS) -> dict[str, Any]:
    container = ephemeral_container(settings, name="nm", image="img:1", port=1, target="app")
    return {"ephemeralContainers": [container]}


def job() -> dict[str, Any]:
    body = agent_job(
        SETTINGS, name="nm", namespace="ns", image="img:1", port=1, node="n1", container_id="x"
    )
    spec: dict[str, Any] = body["spec"]["template"]["spec"]
    return spec


def targetless() -> dict[str, Any]:
    body = targetless_job(SETTINGS, name="nm", namespace="ns", image="img:1", port=1)
    spec: dict[str, Any] = body["spec"]["template"]["spec"]
    return spec


def test_privileged_admits_everything() -> None:
    assert violations(job(), "privileged") == []
    assert violations(ephemeral(), "privileged") == []


def test_baseline_rejects_the_ephemeral_agents_capabilities() -> None:
    found = violations(ephemeral(), "baseline")
    assert [str(v) for v in found] == ["non-default capabilities (NET_ADMIN, NET_RAW)"]
    assert summary(found) == "NET_ADMIN, NET_RAW"
    # exec reads the target's environment: one more capability baseline refuses.
    found = violations(ephemeral(replace(SETTINGS, read_environment=True)), "baseline")
    assert summary(found) == "NET_ADMIN, NET_RAW, SYS_PTRACE"


def test_baseline_rejects_the_job_for_host_pid_and_capabilities() -> None:
    found = violations(job(), "baseline")
    assert summary(found) == "hostPID, NET_ADMIN, NET_RAW, SYS_ADMIN, SYS_PTRACE"


def test_restricted_rejects_root_and_missing_seccomp_too() -> None:
    checks = [v.check for v in violations(ephemeral(), "restricted")]
    assert checks == [
        "unrestricted capabilities",
        "runAsNonRoot != true",
        "runAsUser=0",
        "seccompProfile",
    ]


def test_the_targetless_job_passes_restricted() -> None:
    assert violations(targetless(), "restricted") == []
    assert violations(targetless(), "baseline") == []


def test_pod_level_settings_count_for_every_container() -> None:
    spec = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "c",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                },
            }
        ],
    }
    assert violations(spec, "restricted") == []
    spec["containers"][0]["securityContext"]["runAsNonRoot"] = False  # the container's wins
    assert [v.check for v in violations(spec, "restricted")] == ["runAsNonRoot != true"]


def test_the_pods_own_root_settings_fail_even_when_every_container_overrides_them() -> None:
    context = {"runAsNonRoot": True, "runAsUser": 1000}
    container = {
        "name": "c",
        "securityContext": {
            **context,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    spec: dict[str, Any] = {"securityContext": {"runAsNonRoot": False}, "containers": [container]}
    assert [str(v) for v in violations(spec, "restricted")] == ["runAsNonRoot != true (pod)"]
    spec["securityContext"] = {"runAsUser": 0}
    assert [str(v) for v in violations(spec, "restricted")] == ["runAsUser=0 (pod)"]
    spec["securityContext"] = {}
    assert violations(spec, "restricted") == []


def test_baseline_checks_host_paths_ports_privileged_and_unconfined() -> None:
    spec = {
        "hostNetwork": True,
        "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
        "containers": [
            {
                "name": "c",
                "ports": [{"containerPort": 80, "hostPort": 80}],
                "securityContext": {"privileged": True, "seccompProfile": {"type": "Unconfined"}},
            }
        ],
    }
    assert [str(v) for v in violations(spec, "baseline")] == [
        "privileged (c)",
        "host namespaces (hostNetwork=true)",
        "hostPath volumes (root)",
        "hostPort (80)",
        "seccompProfile (Unconfined)",
    ]


def test_labels_make_the_policy() -> None:
    policy = policy_from_labels(
        "shop",
        {
            "pod-security.kubernetes.io/enforce": "baseline",
            "pod-security.kubernetes.io/enforce-version": "v1.30",
            "pod-security.kubernetes.io/warn": "restricted",
            "team": "a",
        },
    )
    assert policy.enforce == "baseline"
    assert dict(policy.levels) == {"enforce": "baseline", "warn": "restricted"}
    assert policy_from_labels("x", None).enforce == "privileged"
    # A level the admission controller does not know fails closed, as the controller does.
    assert policy_from_labels("x", {"pod-security.kubernetes.io/enforce": "strict"}).enforce == (
        "restricted"
    )
    # ... and open for warn and audit, as the controller does: no spurious warnings.
    loose = policy_from_labels(
        "x", {"pod-security.kubernetes.io/warn": "Baseline", "pod-security.kubernetes.io/audit": ""}
    )
    assert dict(loose.levels) == {"warn": "privileged", "audit": "privileged"}


class Refusal(Exception):
    def __init__(self, status: int, message: str | None, reason: str = "Forbidden") -> None:
        self.status = status
        self.reason = reason
        self.body = (
            json.dumps({"kind": "Status", "code": status, "message": message}).encode()
            if message is not None
            else b""
        )


def error(exc: Exception) -> str:
    err = api_error(exc, verb="patch", resource="pods/ephemeralcontainers", namespace="shop")
    assert isinstance(err, TargetError)
    return str(err)


def test_an_rbac_refusal_names_the_role() -> None:
    message = (
        'pods "web" is forbidden: User "dev" cannot patch resource "pods/ephemeralcontainers" '
        'in API group "" in the namespace "shop"'
    )
    for exc in (Refusal(403, message), Refusal(403, None)):
        assert error(exc) == (
            "forbidden: you cannot patch pods/ephemeralcontainers in namespace 'shop' "
            "(netmirror needs the Role in manifests/rbac.yaml)"
        )
        refused = api_error(exc, verb="patch", resource="pods", namespace="shop")
        assert isinstance(refused, RefusedError) and not refused.admission


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (
            403,
            'pods "web" is forbidden: violates PodSecurity "baseline:latest": non-default '
            'capabilities (container "nm" must not include "NET_ADMIN", "NET_RAW" in '
            "securityContext.capabilities.add)",
        ),
        (
            400,
            'admission webhook "validate.kyverno.svc-fail" denied the request: policy '
            "Pod/shop/web for resource violation: no-debug-containers: ephemeral containers "
            "are not allowed here",
        ),
    ],
)
def test_an_admission_refusal_is_shown_in_the_servers_words(status: int, message: str) -> None:
    text = error(Refusal(status, message))
    assert text.startswith(
        "the API server refused to patch pods/ephemeralcontainers in namespace 'shop': " + message
    )
    assert "\n" not in text
    refused = api_error(Refusal(status, message), verb="patch", resource="pods", namespace="s")
    assert isinstance(refused, RefusedError) and refused.admission


def test_a_failure_of_the_server_is_no_refusal() -> None:
    for status in (404, 409, 500, 503):
        err = api_error(Refusal(status, "etcd is sad"), verb="get", resource="pods", namespace="s")
        assert isinstance(err, TargetError) and not isinstance(err, RefusedError)
