"""Kubernetes targets end to end, without a cluster.

The API server is the kmock emulator (REST: deployments, pods, patches), fronted by
a small aiohttp app for what an emulator cannot do: the pod port-forward websocket
(relayed into the sandbox namespace's loopback) and the kubelet's part of an
ephemeral container (it runs the container's command, from the spec netmirror
sent, as a real agent in the sandbox namespace). `netmirror up --target
deployment/web` then runs for real: resolution, patch, port-forward, steal,
traffic from the host to the "pod" answered locally, and `down`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from netmirror.sandbox import Sandbox
from tests.integration.conftest import REPO, Env, free_port
from tests.support.fake_portforward import FakePortForward
from tests.unit.test_manifests import field_problems

kmock = pytest.importorskip("kmock", reason="the kmock API emulator is not installed")
pytestmark = pytest.mark.integration

NS = "shop"
POD = "web-7c9d8f6b5-x2k4q"
POD_PORT = 8080


def connect_in_netns(netns: str, target: tuple[str, int]) -> socket.socket:
    """A TCP connection made from inside ``netns`` (as the kubelet reaches a pod)."""
    from pyroute2 import netns as pyroute_netns

    result: dict[str, Any] = {}

    def work() -> None:  # setns changes only this short-lived thread
        try:
            pyroute_netns.setns(netns, flags=0)
            result["sock"] = socket.create_connection(target, timeout=5)
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=work, name="connect-in-netns")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    sock: socket.socket = result["sock"]
    sock.setblocking(False)
    return sock


class FakeCluster:
    """kmock plus the kubelet's side of ephemeral containers and port-forward."""

    def __init__(self, sandbox: Sandbox, env: dict[str, str], log: Path) -> None:
        self.sandbox = sandbox
        self.env = env
        self.log = log
        self.agents: list[subprocess.Popen[bytes]] = []
        self.patches: list[dict[str, Any]] = []
        self.jobs: list[dict[str, Any]] = []
        self.job_pods: set[str] = set()
        self.spec_problems: list[str] = []
        self.portforward = FakePortForward(self._resolve, connect=self._connect)

    def _resolve(self, ns: str, pod: str, port: int) -> tuple[str, int] | None:
        if (ns, pod) == (NS, POD):
            return ("127.0.0.1", port)  # the target pod's loopback
        if ns == NS and pod in self.job_pods:
            return ("host", port)  # a job pod: here, the host's own loopback
        return None

    async def _connect(
        self, target: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if target[0] == "host":
            return await asyncio.open_connection("127.0.0.1", target[1])
        sock = await asyncio.to_thread(connect_in_netns, self.sandbox.netns, target)
        return await asyncio.open_connection(sock=sock)

    async def _create_job(self, request: web.Request) -> web.StreamResponse:
        """The job controller and kubelet: a pod on the host (hostPID) runs the agent."""
        body = await request.json()
        self.jobs.append(body)
        self.spec_problems += field_problems(body, "V1Job", "job")
        name = body["metadata"]["name"]
        pod_name = f"{name}-abcde"
        container = body["spec"]["template"]["spec"]["containers"][0]
        cmd = [sys.executable, "-m", "netmirror", "agent", *container["args"]]
        with open(self.log, "ab") as log:  # noqa: ASYNC230 - a test log, opened once
            self.agents.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env))  # noqa: ASYNC220
        self.job_pods.add(pod_name)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": NS, "labels": {"job-name": name}},
            "spec": body["spec"]["template"]["spec"],
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {
                        "name": "agent",
                        "ready": True,
                        "restartCount": 0,
                        "image": container["image"],
                        "imageID": "",
                        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                    }
                ],
            },
        }
        async with self.http.post(
            f"{self.kmock_url}/api/v1/namespaces/{NS}/pods", json=pod
        ) as response:
            assert response.status < 300, await response.text()
        async with self.http.post(self.kmock_url + request.path_qs, json=body) as response:
            return web.json_response(await response.json(), status=response.status)

    async def _patch_ephemeral(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.patches.append({"content_type": request.content_type, "body": body})
        self.spec_problems += field_problems(body, "V1Pod", "patch")
        (container,) = body["spec"]["ephemeralContainers"]
        if "--session" in container["args"] and "denied" in container["args"]:
            return web.json_response(
                {
                    "kind": "Status",
                    "status": "Failure",
                    "reason": "Forbidden",
                    "code": 403,
                    "message": 'pods "x" is forbidden: cannot patch ephemeralcontainers',
                },
                status=403,
            )
        state: dict[str, Any] = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        if container["image"].startswith("missing/"):
            state = {
                "waiting": {
                    "reason": "ErrImagePull",
                    "message": f"pull access denied for {container['image']}",
                }
            }
        # The kubelet's part: run the container's command in the pod's namespace.
        cmd = [sys.executable, "-m", "netmirror", "agent", *container["args"]]
        if "running" in state:
            with open(self.log, "ab") as log:  # noqa: ASYNC230 - a test log, opened once
                self.agents.append(self.sandbox.popen(*cmd, stdout=log, stderr=log, env=self.env))
        status = {
            "status": {
                "ephemeralContainerStatuses": [
                    {
                        "name": container["name"],
                        "image": container["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": state,
                    }
                ]
            },
            **body,
        }
        path = f"/api/v1/namespaces/{NS}/pods/{POD}"
        async with self.http.patch(
            self.kmock_url + path,
            json=status,
            headers={"Content-Type": "application/merge-patch+json"},
        ) as response:
            return web.json_response(await response.json(), status=response.status)

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        async with self.http.request(
            request.method,
            self.kmock_url + request.path_qs,
            data=await request.read(),
            headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
        ) as response:
            return web.Response(
                body=await response.read(),
                status=response.status,
                content_type="application/json",
            )

    async def seed(self) -> None:
        labels = {"app": "web"}
        container = {
            "name": "web",
            "image": "web:1",
            "ports": [{"containerPort": POD_PORT, "name": "http"}],
        }
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
            },
            "status": {"readyReplicas": 1, "replicas": 1},
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": POD, "namespace": NS, "labels": labels},
            "spec": {"nodeName": "node-1", "containers": [container]},
            "status": {
                "phase": "Running",
                "podIP": self.sandbox.pod_ip,
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {
                        "name": "web",
                        "ready": True,
                        "restartCount": 0,
                        "image": "web:1",
                        "imageID": "",
                        "containerID": "containerd://" + "c" * 64,
                        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                    }
                ],
            },
        }
        for path, obj in (
            (f"/apis/apps/v1/namespaces/{NS}/deployments", deployment),
            (f"/api/v1/namespaces/{NS}/pods", pod),
        ):
            async with self.http.post(self.kmock_url + path, json=obj) as response:
                assert response.status < 300, await response.text()

    async def __aenter__(self) -> FakeCluster:
        self.emulator = kmock.KubernetesEmulator()
        await self.emulator.__aenter__()
        with warnings.catch_warnings():  # kmock 0.8 uses importlib.resources.read_binary
            warnings.simplefilter("ignore", DeprecationWarning)
            self.emulator.resources.load_bundled()  # discovery of a real cluster's kinds
        self.kserver = kmock.Server(self.emulator)
        await self.kserver.__aenter__()
        self.kmock_url = str(self.kserver.url).rstrip("/")
        self.http = aiohttp.ClientSession()
        app = web.Application()
        self.portforward.add_routes(app)
        app.router.add_patch(
            "/api/v1/namespaces/{ns}/pods/{pod}/ephemeralcontainers", self._patch_ephemeral
        )
        app.router.add_post("/apis/batch/v1/namespaces/{ns}/jobs", self._create_job)
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        self.runner = web.AppRunner(app, shutdown_timeout=2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        await self.seed()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.log.exists():
            # Shown by pytest only when the test failed: what the agents said.
            print(f"--- agents' output ({self.log}) ---")
            print(self.log.read_text(errors="replace")[-20000:])
        for agent in self.agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait()
        await self.portforward.close()
        await self.runner.cleanup()
        await self.http.close()
        await self.kserver.__aexit__(None, None, None)
        await self.emulator.__aexit__(None, None, None)


@pytest.fixture
async def cluster(env: Env, tmp_path: Path) -> AsyncIterator[tuple[FakeCluster, dict[str, str]]]:
    kenv = env.env
    async with FakeCluster(env.sandbox, kenv, tmp_path / "kubelet.log") as fake:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                    "users": [{"name": "dev", "user": {"token": "dev-token"}}],
                    "contexts": [
                        {
                            "name": "fake",
                            "context": {"cluster": "fake", "user": "dev", "namespace": NS},
                        }
                    ],
                    "current-context": "fake",
                }
            )
        )
        kenv = kenv | {"KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(REPO)}
        yield fake, kenv


async def run(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "netmirror",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def steal_web(
    env: dict[str, str], local: int, session: str, *extra: str
) -> tuple[int, str, str]:
    """`netmirror up --target deployment/web --steal 8080:LOCAL --session SESSION ...`."""
    target = ("--target", "deployment/web", "--steal", f"{POD_PORT}:{local}")
    return await run(env, "up", *target, "--session", session, *extra)


async def curl(url: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-m",
        "5",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    return out.decode()


async def test_steal_a_deployment_through_the_api_server(
    env: Env, cluster: tuple[FakeCluster, dict[str, str]]
) -> None:
    fake, kenv = cluster
    env.server("http", POD_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
    assert await curl(url) == "pod\n"

    code, out, err = await run(kenv, "ls", "--json")
    assert code == 0, err
    listed = {t["target"]: t for t in json.loads(out)["targets"]}
    assert listed["deployment/web"]["ports"] == ["8080/http"]
    assert f"pod/{POD}" in listed

    code, out, err = await steal_web(
        kenv, local, "kube", "--agent-image", "registry.example/netmirror-agent:test"
    )
    assert code == 0, err
    assert f"using pod {POD}" in err
    assert await curl(url) == "local\n"
    # The token reached the pod spec only as a digest, through a strategic merge patch.
    (patch,) = fake.patches
    assert patch["content_type"] == "application/strategic-merge-patch+json"
    assert fake.spec_problems == []
    assert "--token-sha256" in patch["body"]["spec"]["ephemeralContainers"][0]["args"]
    assert fake.portforward.requests, "the tunnel did not go through the port-forward"

    code, out, err = await run(kenv, "status", "--json")
    session = json.loads(out)["sessions"][0]
    assert session["agent"]["state"] == "connected"
    assert session["ports"][0]["connections_total"] == 1

    code, out, err = await run(kenv, "down", "--session", "kube")
    assert code == 0, err
    # The agent was asked to leave: it removed its rules and exited.
    (agent,) = fake.agents
    await asyncio.to_thread(agent.wait, 10)
    assert agent.returncode == 0
    assert env.chains() == ""
    assert await curl(url) == "pod\n"


async def test_clear_errors(env: Env, cluster: tuple[FakeCluster, dict[str, str]]) -> None:
    _, kenv = cluster
    code, _, err = await run(kenv, "up", "--target", "deployment/wbe", "--steal", "80")
    assert code == 1
    # Progress lines come first when stderr is not a terminal; the error is one line.
    assert err.strip().splitlines()[-1] == (
        "netmirror: deployment 'wbe' not found in namespace 'shop' (did you mean web?)"
    )
    code, _, err = await run(kenv, "up", "--target", f"pod/{POD}/container/nope", "--steal", "80")
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"netmirror: pod '{POD}' has no container 'nope' (it has web)"
    )
    assert not os.listdir(env.state_dir) if env.state_dir.exists() else True


async def test_rbac_and_image_errors_are_one_line(
    env: Env, cluster: tuple[FakeCluster, dict[str, str]]
) -> None:
    _, kenv = cluster
    code, _, err = await run(
        kenv, "up", "--target", "deployment/web", "--steal", "80", "--session", "denied"
    )
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "netmirror: forbidden: you cannot patch pods/ephemeralcontainers in namespace 'shop' "
        "(netmirror needs the Role in manifests/rbac.yaml)"
    )
    code, _, err = await run(
        kenv,
        "up",
        "--target",
        "deployment/web",
        "--steal",
        "80",
        "--session",
        "pull",
        "--agent-image",
        "missing/agent:1",
    )
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("netmirror: the agent image missing/agent:1 cannot be pulled")
    assert "ErrImagePull" in last


@pytest.fixture
def container_cgroup(env: Env) -> Iterator[Path]:
    """A real cgroup named after the target container, holding the pod's server."""
    root = Path("/sys/fs/cgroup/pids")
    if not root.is_dir() or not os.access(root, os.W_OK):
        pytest.skip("needs a writable cgroup v1 pids hierarchy to stand in for a container")
    group = root / ("netmirror-test-cri-containerd-" + "c" * 64)
    group.mkdir(exist_ok=True)
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(pid)
        group.rmdir()


async def test_job_mode_enters_the_container_namespace(
    env: Env,
    cluster: tuple[FakeCluster, dict[str, str]],
    container_cgroup: Path,
    tmp_path: Path,
) -> None:
    fake, kenv = cluster
    server = env.server("http", POD_PORT, in_pod=True, text="pod\n")
    (container_cgroup / "cgroup.procs").write_text(str(server.pid))
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
    # A job's agent listens in its own pod's namespace; here that namespace is this
    # host's, which other processes share, so the agent gets a free port.
    config = tmp_path / "netmirror.yaml"
    agent_port = free_port()
    config.write_text(f"agent:\n  port: {agent_port}\n")
    code, _, err = await steal_web(
        kenv, local, "job", "--agent-mode", "job", "--config", str(config)
    )
    assert code == 0, err
    assert "starting agent job" in err
    (job,) = fake.jobs
    assert fake.spec_problems == []
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["hostPID"] is True and pod_spec["nodeName"] == "node-1"
    assert any(arg.endswith(f":{agent_port}") for arg in pod_spec["containers"][0]["args"])
    assert await curl(url) == "local\n"
    code, _, err = await run(kenv, "down", "--session", "job")
    assert code == 0, err
    await asyncio.to_thread(fake.agents[0].wait, 10)
    assert env.chains() == ""
    assert await curl(url) == "pod\n"
    # down deleted the job it created.
    async with fake.http.get(
        f"{fake.kmock_url}/apis/batch/v1/namespaces/{NS}/jobs/{job['metadata']['name']}"
    ) as response:
        assert response.status == 404


async def test_tunnel_cut_reconnects_and_resets_what_it_cut(
    env: Env, cluster: tuple[FakeCluster, dict[str, str]]
) -> None:
    fake, kenv = cluster
    env.server("http", POD_PORT, in_pod=True, text="pod\n")  # never echoes
    local = free_port()
    env.server("echo", local, in_pod=False)
    code, _, err = await steal_web(kenv, local, "cut")
    assert code == 0, err
    reader, writer = await asyncio.open_connection(env.sandbox.pod_ip, POD_PORT)
    writer.write(b"before the cut")
    assert await reader.readexactly(14) == b"before the cut"
    # The API server drops every port-forward (an API server restart, a flaky VPN).
    await fake.portforward.close()
    cut = asyncio.get_running_loop().time()
    # The connection that was in the tunnel is reset, not left hanging or half-fed.
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        writer.write(b"after")
        await asyncio.wait_for(reader.readexactly(5), 5)
    writer.close()
    # New connections are stolen again within 2 s of the cut.
    while True:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(env.sandbox.pod_ip, POD_PORT), 1)
            w.write(b"hello")
            # The pod's own server (which answers while no tunnel is up) never
            # echoes: a short wait tells the two apart.
            got = await asyncio.wait_for(r.readexactly(5), 0.2)
            w.close()
            if got == b"hello":
                print(f"stolen again {asyncio.get_running_loop().time() - cut:.2f} s after the cut")
                break
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        assert asyncio.get_running_loop().time() - cut < 2, "not stolen again within 2 s"
        await asyncio.sleep(0.05)
    code, out, _ = await run(kenv, "status", "--json")
    session = json.loads(out)["sessions"][0]
    assert session["reconnects"] == 1 and session["state"] == "ready"
    code, _, err = await run(kenv, "down", "--session", "cut")
    assert code == 0, err


async def test_exec_runs_a_command_as_if_in_the_pod(
    env: Env, cluster: tuple[FakeCluster, dict[str, str]]
) -> None:
    fake, kenv = cluster
    # The pod's main process (its lowest pid), whose environment the command gets.
    app = env.sandbox.popen("env", "-i", "PATH=/usr/bin:/bin", "APP_COLOR=blue", "sleep", "600")
    env.procs.append(app)
    # A name only the pod's hosts file knows (kubelet writes /etc/hosts in a pod).
    etc = Path("/etc/netns") / env.sandbox.netns
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n{env.sandbox.pod_ip} web-internal\n")
    try:
        env.server("http", POD_PORT, in_pod=True, text="pod\n")
        script = f"echo color=$APP_COLOR; curl -sS -m 5 http://web-internal:{POD_PORT}/"
        code, out, err = await run(
            kenv, "exec", "--target", "deployment/web", "--session", "kx", "--", "sh", "-c", script
        )
        assert code == 0, err
        assert out.splitlines() == ["color=blue", "pod"]
        (patch,) = fake.patches
        (container,) = patch["body"]["spec"]["ephemeralContainers"]
        assert "SYS_PTRACE" in container["securityContext"]["capabilities"]["add"]
        # The session ended with the command: the agent was asked to leave.
        (agent,) = fake.agents
        await asyncio.to_thread(agent.wait, 10)
        assert env.chains() == ""
    finally:
        shutil.rmtree(etc, ignore_errors=True)
