"""The objects netmirror sends to the API, checked against the API's own models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from netmirror.daemon.targets.base import AgentSettings
from netmirror.daemon.targets.kube import agent_job, ephemeral_container
from netmirror.errors import TargetError
from netmirror.kube.cluster import parse_spec
from netmirror.wire.connection import token_sha256
from tests.unit.test_manifests import field_problems

SETTINGS = AgentSettings(
    session="web", token="s3cret-token", workdir=Path("/tmp"), ttl=5.0, ready_timeout=30.0
)


def test_ephemeral_container_is_a_valid_v1_ephemeral_container() -> None:
    spec = ephemeral_container(
        SETTINGS, name="netmirror-web-abc123", image="img:1", port=47070, target="app"
    )
    assert field_problems(spec, "V1EphemeralContainer", "ephemeralContainer") == []
    patch = {"spec": {"ephemeralContainers": [spec]}}
    assert field_problems(patch, "V1Pod", "pod") == []
    assert spec["securityContext"]["capabilities"] == {
        "add": ["NET_ADMIN", "NET_RAW"],
        "drop": ["ALL"],
    }
    assert spec["targetContainerName"] == "app"


def test_exec_adds_only_sys_ptrace_to_read_the_environment() -> None:
    settings = dataclasses.replace(SETTINGS, read_environment=True)
    spec = ephemeral_container(settings, name="n", image="i", port=1, target="app")
    assert spec["securityContext"]["capabilities"] == {
        "add": ["NET_ADMIN", "NET_RAW", "SYS_PTRACE"],
        "drop": ["ALL"],
    }
    assert field_problems(spec, "V1EphemeralContainer", "ephemeralContainer") == []


def test_the_token_never_appears_in_a_spec_only_its_digest() -> None:
    spec = ephemeral_container(SETTINGS, name="n", image="i", port=1, target=None)
    job = agent_job(
        SETTINGS,
        name="n",
        namespace="ns",
        image="i",
        port=1,
        node="node-1",
        container_id="containerd://" + "a" * 64,
    )
    for text in (repr(spec), repr(job)):
        assert "s3cret-token" not in text
        assert token_sha256("s3cret-token").hex() in text


def test_job_is_a_valid_v1_job_pinned_to_the_node() -> None:
    job = agent_job(
        SETTINGS,
        name="netmirror-web-x",
        namespace="shop",
        image="img:1",
        port=47070,
        node="node-7",
        container_id="containerd://" + "b" * 64,
    )
    assert field_problems(job, "V1Job", "job") == []
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeName"] == "node-7" and pod["hostPID"] is True
    assert job["spec"]["activeDeadlineSeconds"] > 0
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    args = pod["containers"][0]["args"]
    assert args[args.index("--container-id") + 1].endswith("b" * 64)


@pytest.mark.parametrize(
    ("text", "kind", "name", "container"),
    [
        ("pod/web-1", "pod", "web-1", None),
        ("deployment/web", "deployment", "web", None),
        ("statefulset/db/container/main", "statefulset", "db", "main"),
    ],
)
def test_parse_spec(text: str, kind: str, name: str, container: str | None) -> None:
    spec = parse_spec(text)
    assert (spec.kind, spec.name, spec.container) == (kind, name, container)


@pytest.mark.parametrize("text", ["pod/", "pod/a/b", "pod/a/container/", "job/x"])
def test_parse_spec_errors(text: str) -> None:
    with pytest.raises(TargetError, match="is not KIND/NAME"):
        parse_spec(text)
