"""The waits for the agent's pod follow a watch, against the kmock API emulator.

kmock ignores field and label selectors: other pods in the namespace are sent too, so
these tests also show that the waits filter the events themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from netmirror.daemon.targets.base import AgentSettings
from netmirror.daemon.targets.kube import KubeTarget
from netmirror.errors import AgentError
from netmirror.kube.cluster import KubeCluster

kmock = pytest.importorskip("kmock", reason="the kmock API emulator is not installed")

NS = "shop"
TARGET = "web-1"
AGENT = "netmirror-s-abc123"
IMAGE = "registry.example/netmirror-agent:test"


class Emulator:
    """kmock serving Kubernetes, and a session to seed and change its objects."""

    def __init__(self, emulator: Any, url: str, http: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.url = url
        self.http = http

    async def create_pod(
        self, name: str, *, labels: dict[str, str] | None = None, **status: Any
    ) -> None:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "web", "image": "web:1"}]},
            "status": {"phase": "Running", **status},
        }
        async with self.http.post(f"{self.url}/api/v1/namespaces/{NS}/pods", json=pod) as response:
            assert response.status < 300, await response.text()

    async def set_status(self, name: str, **status: Any) -> None:
        async with self.http.patch(
            f"{self.url}/api/v1/namespaces/{NS}/pods/{name}",
            json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as response:
            assert response.status < 300, await response.text()

    def pod_reads(self) -> int:
        """GET requests for pods that were not watches (lists and reads)."""
        return sum(
            1
            for request in self.emulator
            if request.method == "GET"
            and "/pods" in str(request.url)
            and request.params.get("watch") != "true"
        )


def statuses(name: str, state: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "image": IMAGE,
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": state,
        }
    ]


RUNNING = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
CREATING = {"waiting": {"reason": "ContainerCreating"}}
PULL_ERROR = {"waiting": {"reason": "ErrImagePull", "message": "pull access denied"}}


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emulator = kmock.KubernetesEmulator()
    await emulator.__aenter__()
    try:
        with warnings.catch_warnings():  # kmock 0.8 uses importlib.resources.read_binary
            warnings.simplefilter("ignore", DeprecationWarning)
            emulator.resources.load_bundled()
        server = kmock.Server(emulator)
        await server.__aenter__()
        try:
            async with aiohttp.ClientSession() as http:
                yield Emulator(emulator, str(server.url).rstrip("/"), http)
        finally:
            await server.__aexit__(None, None, None)
    finally:
        await emulator.__aexit__(None, None, None)


@pytest.fixture
async def cluster(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[KubeCluster]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": emulator.url}}],
                "users": [{"name": "dev", "user": {"token": "dev-token"}}],
                "contexts": [
                    {
                        "name": "kmock",
                        "context": {"cluster": "kmock", "user": "dev", "namespace": NS},
                    }
                ],
                "current-context": "kmock",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    cluster = await KubeCluster.connect(context=None, namespace=None)
    try:
        yield cluster
    finally:
        await cluster.close()


def settings(tmp_path: Path, ready_timeout: float = 10) -> AgentSettings:
    return AgentSettings(
        session="s", token="t" * 32, workdir=tmp_path, ttl=60, ready_timeout=ready_timeout
    )


def target(mode: str = "ephemeral") -> KubeTarget:
    return KubeTarget(
        f"pod/{TARGET}", namespace=NS, context=None, image=IMAGE, mode=mode, port=7777
    )


async def wait_ephemeral(cluster: KubeCluster, tmp_path: Path, ready_timeout: float = 10) -> None:
    await target()._wait_running(
        cluster, TARGET, AGENT, settings(tmp_path, ready_timeout), ephemeral=True
    )


async def test_the_wait_sees_the_agent_start_through_a_watch(
    emulator: Emulator, cluster: KubeCluster, tmp_path: Path
) -> None:
    await emulator.create_pod(TARGET, ephemeralContainerStatuses=statuses(AGENT, CREATING))
    await emulator.create_pod("other", ephemeralContainerStatuses=statuses(AGENT, RUNNING))
    wait = asyncio.create_task(wait_ephemeral(cluster, tmp_path))
    await asyncio.sleep(1.5)
    assert not wait.done(), "a running agent in another pod was taken for ours"
    await emulator.set_status(TARGET, ephemeralContainerStatuses=statuses(AGENT, RUNNING))
    await asyncio.wait_for(wait, 5)
    # One listing, then the watch: no polling.
    assert emulator.pod_reads() == 1


async def test_an_agent_already_running_is_not_missed(
    emulator: Emulator, cluster: KubeCluster, tmp_path: Path
) -> None:
    await emulator.create_pod(TARGET, ephemeralContainerStatuses=statuses(AGENT, RUNNING))
    started = time.monotonic()
    await asyncio.wait_for(wait_ephemeral(cluster, tmp_path), 5)
    assert time.monotonic() - started < 2


async def test_an_image_pull_error_is_reported(
    emulator: Emulator, cluster: KubeCluster, tmp_path: Path
) -> None:
    await emulator.create_pod(TARGET, ephemeralContainerStatuses=statuses(AGENT, CREATING))
    wait = asyncio.create_task(wait_ephemeral(cluster, tmp_path))
    await asyncio.sleep(0.5)
    await emulator.set_status(TARGET, ephemeralContainerStatuses=statuses(AGENT, PULL_ERROR))
    with pytest.raises(AgentError) as err:
        await asyncio.wait_for(wait, 5)
    assert str(err.value) == (
        f"the agent image {IMAGE} cannot be pulled (ErrImagePull: pull access denied); "
        "set agent.image or --agent-image"
    )


async def test_an_agent_that_exited_is_reported(
    emulator: Emulator, cluster: KubeCluster, tmp_path: Path
) -> None:
    await emulator.create_pod(TARGET, ephemeralContainerStatuses=statuses(AGENT, CREATING))
    wait = asyncio.create_task(wait_ephemeral(cluster, tmp_path))
    await asyncio.sleep(0.5)
    exited = {"terminated": {"exitCode": 2, "reason": "Error", "message": "bad flag"}}
    await emulator.set_status(TARGET, ephemeralContainerStatuses=statuses(AGENT, exited))
    with pytest.raises(AgentError, match=r"^the agent exited: bad flag$"):
        await asyncio.wait_for(wait, 5)


async def test_the_wait_times_out_with_the_last_state(
    emulator: Emulator, cluster: KubeCluster, tmp_path: Path
) -> None:
    await emulator.create_pod(TARGET, ephemeralContainerStatuses=statuses(AGENT, CREATING))
    started = time.monotonic()
    with pytest.raises(AgentError) as err:
        await wait_ephemeral(cluster, tmp_path, ready_timeout=1)
    assert 0.9 < time.monotonic() - started < 3
    assert str(err.value) == "the agent was not running within 1s (waiting: ContainerCreating)"


async def test_the_wait_times_out_before_the_agent_appears(
    emulator: Emulator, cluster: KubeCluster, tmp_path: Path
) -> None:
    await emulator.create_pod(TARGET)
    with pytest.raises(AgentError, match=r"^the agent was not running within 1s \(not started\)$"):
        await wait_ephemeral(cluster, tmp_path, ready_timeout=1)


def job_pod_status(state: dict[str, Any]) -> dict[str, Any]:
    return {"containerStatuses": statuses("agent", state)}


async def start_job(cluster: KubeCluster, tmp_path: Path, ready_timeout: float = 10) -> str:
    await_pod = await cluster.core.read_namespaced_pod(TARGET, NS)
    return await target("job")._start_job(
        cluster, settings(tmp_path, ready_timeout), await_pod, "web", AGENT, lambda _text: None
    )


async def test_the_job_pod_is_found_and_followed_through_a_watch(
    emulator: Emulator, cluster: KubeCluster, tmp_path: Path
) -> None:
    container_id = "containerd://" + "c" * 64
    web = statuses("web", RUNNING)
    web[0]["containerID"] = container_id
    await emulator.create_pod(TARGET, containerStatuses=web)
    # The pod of another job, running: kmock sends it too, it must not be taken.
    await emulator.create_pod(
        "netmirror-other-x", labels={"job-name": "netmirror-other"}, **job_pod_status(RUNNING)
    )
    job = asyncio.create_task(start_job(cluster, tmp_path))
    await asyncio.sleep(1)
    assert not job.done()
    pod = f"{AGENT}-abcde"
    await emulator.create_pod(pod, labels={"job-name": AGENT}, **job_pod_status(CREATING))
    await asyncio.sleep(0.5)
    assert not job.done()
    await emulator.set_status(pod, **job_pod_status(RUNNING))
    assert await asyncio.wait_for(job, 5) == pod
    # The pod read that start_job was given, and one listing.
    assert emulator.pod_reads() == 2


async def test_a_job_without_a_pod_times_out(
    emulator: Emulator, cluster: KubeCluster, tmp_path: Path
) -> None:
    web = statuses("web", RUNNING)
    web[0]["containerID"] = "containerd://" + "c" * 64
    await emulator.create_pod(TARGET, containerStatuses=web)
    with pytest.raises(AgentError, match=rf"^the agent job {AGENT} made no pod in 1s$"):
        await start_job(cluster, tmp_path, ready_timeout=1)


async def test_a_job_pod_that_cannot_pull_is_reported(
    emulator: Emulator, cluster: KubeCluster, tmp_path: Path
) -> None:
    web = statuses("web", RUNNING)
    web[0]["containerID"] = "containerd://" + "c" * 64
    await emulator.create_pod(TARGET, containerStatuses=web)
    job = asyncio.create_task(start_job(cluster, tmp_path))
    await asyncio.sleep(0.5)
    await emulator.create_pod(
        f"{AGENT}-abcde", labels={"job-name": AGENT}, **job_pod_status(PULL_ERROR)
    )
    with pytest.raises(AgentError, match=r"cannot be pulled \(ErrImagePull: pull access denied\)"):
        await asyncio.wait_for(job, 5)


async def test_every_watch_is_closed(
    emulator: Emulator, cluster: KubeCluster, tmp_path: Path
) -> None:
    """After waits that ended every way, no watch response is left open."""
    await emulator.create_pod(TARGET, ephemeralContainerStatuses=statuses(AGENT, CREATING))
    with contextlib.suppress(AgentError):
        await wait_ephemeral(cluster, tmp_path, ready_timeout=1)  # timeout
    wait = asyncio.create_task(wait_ephemeral(cluster, tmp_path))
    await asyncio.sleep(0.5)
    wait.cancel()  # cancellation
    with contextlib.suppress(asyncio.CancelledError):
        await wait
    wait = asyncio.create_task(wait_ephemeral(cluster, tmp_path))
    await asyncio.sleep(0.5)
    await emulator.set_status(TARGET, ephemeralContainerStatuses=statuses(AGENT, RUNNING))
    await asyncio.wait_for(wait, 5)  # success
    # No connection of the API client is still held by a response (a watch's).
    connector = cluster.api.rest_client.pool_manager.connector
    assert len(connector._acquired) == 0
