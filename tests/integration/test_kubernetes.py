"""Kubernetes targets end to end: real containers from the real agent image, no cluster.

The API server is the kmock emulator (REST and watches: deployments, pods, jobs,
patches), fronted by a small aiohttp app for what an emulator cannot do: the pod
port-forward websocket (relayed into the pod's network namespace) and the kubelet.
The kubelet here is podman with runc:

- the target pod is a real container (its own mount and PID namespaces) in the
  sandbox's network namespace, running the pod's server;
- an ephemeral agent container runs the agent image with the security context of
  the spec netmirror sent and nothing more (capabilities dropped and added as
  asked, no privilege escalation), joined to the target container's network and
  PID namespaces as ``targetContainerName`` does;
- a job's pod is a container in a network namespace of its own with the host's PID
  namespace, as its spec asks, and enters the target container itself.

Images other than the agent image's test references are "not in the registry":
the default reference fails to pull, as it would in a real cluster.
`netmirror up --target deployment/web` then runs for real.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sandbox import Sandbox
from sandbox.containers import Podman
from tests.integration.conftest import REPO, Env, free_port
from tests.support import admission, token_plugin
from tests.support.fake_portforward import FakePortForward
from tests.support.kubeconfig import write_kubeconfig
from tests.support.waiting import eventually_async
from tests.unit.test_manifests import field_problems

kmock = pytest.importorskip("kmock", reason="the kmock API emulator is not installed")
pytestmark = pytest.mark.integration

NS = "shop"
POD = "web-7c9d8f6b5-x2k4q"
POD_PORT = 8080
#: The agent image as the tests' "registry" knows it; any other reference fails to pull.
IMAGE = "registry.example/netmirror/agent:test"
PULLABLE = (IMAGE, "registry.example/netmirror-agent:test")
PYTHON = "/opt/netmirror/bin/python"
SUPPORT = REPO / "tests" / "support"


def security_options(container: dict[str, Any]) -> list[str]:
    """podman options for exactly the securityContext a container spec asks for."""
    context = container.get("securityContext") or {}
    options: list[str] = []
    if context.get("privileged"):
        options.append("--privileged")
    capabilities = context.get("capabilities") or {}
    for cap in capabilities.get("drop") or []:
        options += ["--cap-drop", cap.lower()]
    for cap in capabilities.get("add") or []:
        options += ["--cap-add", cap]
    if context.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    if "runAsUser" in context:
        options += ["--user", str(context["runAsUser"])]
    return options


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

    def __init__(
        self,
        sandbox: Sandbox,
        env: dict[str, str],
        log: Path,
        podman: Podman,
        image: str,
        *,
        token_secret: bytes | None = None,
        probes: bool = False,
        namespaces: dict[str, dict[str, str]] | None = None,
        rbac: dict[str, list[tuple[str, list[dict[str, Any]]]]] | None = None,
        webhook: Callable[[str, dict[str, Any]], str | None] | None = None,
        hide_namespaces: bool = False,
        exempt: bool = False,
    ) -> None:
        self.namespaces = namespaces if namespaces is not None else {NS: {}}
        """Namespaces and their labels (Pod Security admission reads them)."""
        self.hide_namespaces = hide_namespaces
        """Reading a namespace is forbidden to everyone (labels are then unknown)."""
        self.rbac = rbac
        """With grants, RBAC is enforced: bearer token -> [(namespace, the rules of a Role)]."""
        self.webhook = webhook
        """A validating admission webhook: (what, object) -> the reason it denies, or None."""
        self.exempt = exempt
        """Pod Security admission exempts the user (its configuration, not the labels)."""
        self.denied: list[str] = []
        """The requests RBAC or admission refused, in words."""
        self.dry_runs: list[str] = []
        """The dry runs (``dryRun=All``) admission judged: what, and admitted or refused."""
        self.allowed: set[tuple[str, str, str, str]] = set()
        """(verb, namespace, API group, resource) of every request RBAC let through."""
        self.events: list[dict[str, Any]] = []
        self.probes = probes
        """The pod's container has an httpGet readiness and a tcpSocket liveness probe on
        the stolen port, and its node's address is :attr:`node_ip`."""
        self.node_ip = f"198.18.{sandbox.index}.7"
        self.token_secret = token_secret
        """With a secret, every request needs an unexpired token of token_plugin.py."""
        self.rejected = 0
        self.sandbox = sandbox
        self.env = env
        self.log = log
        self.podman = podman
        self.image = image
        self.target = f"nm-pod-{sandbox.name}"
        self.target_id = ""
        self.containers: list[str] = []
        self.job_netns: list[str] = []
        self._job_netns_names: dict[str, str] = {}
        self.agents: list[subprocess.Popen[bytes]] = []
        self.patches: list[dict[str, Any]] = []
        self.jobs: list[dict[str, Any]] = []
        self.job_pods: set[tuple[str, str]] = set()
        """(namespace, name) of the job pods running."""
        self.spec_problems: list[str] = []
        self.portforward = FakePortForward(self._resolve, connect=self._connect)
        self.job_hosts: dict[str, str] = {}
        """Names the job pods' /etc/hosts knows (the cluster's DNS, for these tests)."""
        self.on_job_netns: Callable[[str], Awaitable[None]] | None = None
        """Called with a job pod's network namespace before its container starts."""

    def _resolve(self, ns: str, pod: str, port: int) -> tuple[str, int] | None:
        if (ns, pod) == (NS, POD):
            return ("127.0.0.1", port)  # the target pod's loopback
        if (ns, pod) in self.job_pods:
            return (f"job:{pod}", port)  # a job pod: its own network namespace
        return None

    async def _connect(
        self, target: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if target[0].startswith("job:"):
            netns = self.job_netns_of(target[0][4:])
            sock = await asyncio.to_thread(connect_in_netns, netns, ("127.0.0.1", target[1]))
            return await asyncio.open_connection(sock=sock)
        sock = await asyncio.to_thread(connect_in_netns, self.sandbox.netns, target)
        return await asyncio.open_connection(sock=sock)

    async def _create_job(self, request: web.Request) -> web.StreamResponse:
        """The job controller and kubelet: a pod on the host (hostPID) runs the agent.

        As in a cluster, admission judges the pod, not the Job: a pod the namespace's
        Pod Security level rejects is never created, and the Job's events say why.
        """
        body = await request.json()
        ns = request.match_info["ns"]
        if ns not in self.namespaces:
            return _status_response(404, "NotFound", f'namespaces "{ns}" not found')
        if self.webhook is not None and (reason := self.webhook("jobs", body)):
            self.denied.append(f"webhook: {reason}")
            return _status_response(
                403,
                "Forbidden",
                f'admission webhook "validate.policy.example" denied the request: {reason}',
            )
        self.jobs.append(body)
        self.spec_problems += field_problems(body, "V1Job", "job")
        name = body["metadata"]["name"]
        pod_name = f"{name}-abcde"
        spec = body["spec"]["template"]["spec"]
        container = spec["containers"][0]
        labels = self.namespaces[ns]
        headers = self._warnings(spec, labels)
        level = admission.level_of(labels, "enforce")
        failures = admission.check(spec, level)
        if failures:
            self.denied.append(f"pod security: {failures}")
            refusal = admission.forbidden(pod_name, level, failures)["message"]
            event = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{name}.{len(self.events)}", "namespace": ns},
                "involvedObject": {"kind": "Job", "name": name, "namespace": ns},
                "reason": "FailedCreate",
                "message": f"Error creating: {refusal}",
                "type": "Warning",
            }
            self.events.append(event)
            async with self.http.post(
                f"{self.kmock_url}/api/v1/namespaces/{ns}/events", json=event
            ) as response:
                assert response.status < 300, await response.text()
            async with self.http.post(self.kmock_url + request.path_qs, json=body) as response:
                return web.json_response(
                    await response.json(), status=response.status, headers=headers
                )
        # The job's pod: a network namespace of its own; the host's PID namespace if
        # the spec asks for it (it does: the agent looks for the target's process).
        netns = self.job_netns_of(pod_name)
        await asyncio.to_thread(_make_netns, netns)
        self.job_netns.append(netns)
        if self.on_job_netns is not None:
            await self.on_job_netns(netns)
        # The pod's securityContext applies to its containers, which may override it.
        context = {
            **(spec.get("securityContext") or {}),
            **(container.get("securityContext") or {}),
        }
        options = [
            "--network",
            f"ns:/run/netns/{netns}",
            *security_options({"securityContext": context}),
        ]
        options += [f"--add-host={name}:{ip}" for name, ip in self.job_hosts.items()]
        if spec.get("hostPID"):
            options += ["--pid", "host"]
        self.agents.append(await self._run_container(f"nm-job-{name}"[:60], options, container))
        self.job_pods.add((ns, pod_name))
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": ns, "labels": {"job-name": name}},
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
            f"{self.kmock_url}/api/v1/namespaces/{ns}/pods", json=pod
        ) as response:
            assert response.status < 300, await response.text()
        async with self.http.post(self.kmock_url + request.path_qs, json=body) as response:
            return web.json_response(await response.json(), status=response.status, headers=headers)

    def _warnings(self, spec: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
        """The Warning header of a pod spec the namespace's warn level would reject."""
        level = admission.level_of(labels, "warn")
        failures = admission.check(spec, level)
        return {"Warning": admission.warning(level, failures)} if failures else {}

    async def _read_namespace(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if self.hide_namespaces:
            return _status_response(
                403,
                "Forbidden",
                f'namespaces "{name}" is forbidden: User "dev" cannot get resource '
                f'"namespaces" in API group "" in the namespace "{name}"',
            )
        if name not in self.namespaces:
            return _status_response(404, "NotFound", f'namespaces "{name}" not found')
        return web.json_response(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": self.namespaces[name]},
                "status": {"phase": "Active"},
            }
        )

    async def _patch_ephemeral(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        dry_run = request.query.get("dryRun") == "All"
        if not dry_run:
            self.patches.append({"content_type": request.content_type, "body": body})
        self.spec_problems += field_problems(body, "V1Pod", "patch")
        (container,) = body["spec"]["ephemeralContainers"]
        if "--session" in container["args"] and "denied" in container["args"]:
            return _status_response(
                403,
                "Forbidden",
                f'pods "{POD}" is forbidden: User "dev" cannot patch resource '
                f'"pods/ephemeralcontainers" in API group "" in the namespace "{NS}"',
            )
        if self.webhook is not None and (reason := self.webhook("ephemeralcontainers", body)):
            self.denied.append(f"webhook: {reason}")
            return _status_response(
                403,
                "Forbidden",
                f'admission webhook "validate.policy.example" denied the request: {reason}',
            )
        # Pod Security admission judges the whole pod with its new ephemeral container.
        pod_url = f"{self.kmock_url}/api/v1/namespaces/{NS}/pods/{POD}"
        async with self.http.get(pod_url) as got:
            current = await got.json()
        pod_spec = {**current["spec"], "ephemeralContainers": [container]}
        labels = self.namespaces.get(NS, {})
        level = admission.level_of(labels, "enforce")
        failures = [] if self.exempt else admission.check(pod_spec, level)
        if dry_run:
            self.dry_runs.append(f"ephemeralcontainers: {'refused' if failures else 'admitted'}")
        if failures:
            if not dry_run:
                self.denied.append(f"pod security: {failures}")
            return web.json_response(admission.forbidden(POD, level, failures), status=403)
        headers = self._warnings(pod_spec, labels)
        if dry_run:  # admitted, and nothing is changed
            return web.json_response(current, headers=headers)
        state: dict[str, Any] = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        if container["image"].startswith("missing/"):
            state = {
                "waiting": {
                    "reason": "ErrImagePull",
                    "message": f"pull access denied for {container['image']}",
                }
            }
        if container["image"] not in PULLABLE:
            state = {
                "waiting": {
                    "reason": "ErrImagePull",
                    "message": f"{container['image']}: manifest unknown",
                }
            }
        # The kubelet's part: run the container from the image, in the target
        # container's network (and, with targetContainerName, PID) namespace.
        if "running" in state:
            options = ["--network", f"container:{self.target}", *security_options(container)]
            if container.get("targetContainerName"):
                options += ["--pid", f"container:{self.target}"]
            name = f"nm-eph-{container['name']}"[:60]
            self.agents.append(await self._run_container(name, options, container))
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
            return web.json_response(await response.json(), status=response.status, headers=headers)

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The API server's authentication: expired or unknown tokens get 401."""
        if self.token_secret is not None and not token_plugin.valid(
            self.token_secret, request.headers.get("Authorization", "")
        ):
            self.rejected += 1
            return web.json_response(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": "Unauthorized",
                    "reason": "Unauthorized",
                    "code": 401,
                },
                status=401,
            )
        return await handler(request)

    @web.middleware
    async def _authorize(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """RBAC: a request is allowed when a Role granted to its token in its namespace
        has a rule for its API group, resource and verb (discovery is open to all)."""
        if self.rbac is None:
            return await handler(request)
        attrs = request_attributes(request)
        if attrs is None:
            return await handler(request)
        verb, ns, group, resource = attrs
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        for grant_ns, rules in self.rbac.get(token, []):
            if grant_ns == ns and any(
                group in rule["apiGroups"]
                and resource in rule["resources"]
                and verb in rule["verbs"]
                for rule in rules
            ):
                self.allowed.add((verb, ns, group, resource))
                return await handler(request)
        self.denied.append(f"rbac: {verb} {resource} in {ns}")
        kind = resource.partition("/")[0]
        return _status_response(
            403,
            "Forbidden",
            f'{kind} is forbidden: User "{token}" cannot {verb} resource "{resource}" in API '
            f'group "{group}" in the namespace "{ns}"',
        )

    def job_netns_of(self, pod: str) -> str:
        """The network namespace of a job's pod: one of its own per pod."""
        if pod not in self._job_netns_names:
            self._job_netns_names[pod] = f"nm-job-{self.sandbox.name}"[:26] + (
                f"-{len(self._job_netns_names)}"
            )
        return self._job_netns_names[pod]

    async def _run_container(
        self, name: str, options: list[str], container: dict[str, Any]
    ) -> subprocess.Popen[bytes]:
        """Run a container of a pod spec from the agent image; its output goes to the log."""
        self.containers.append(name)
        with open(self.log, "ab") as log:  # noqa: ASYNC230 - a test log, opened once
            return self.podman.popen(
                name, self.image, *container["args"], options=options, stdout=log, stderr=log
            )

    async def start_target(self) -> None:
        """The target pod's container: its server on POD_PORT, APP_COLOR in its environment,
        and its volumes (VOLUMES: a "ConfigMap" and a service-account token)."""
        self.containers.append(self.target)
        volumes: list[str] = []
        for mount_path, files in VOLUMES.items():
            source = self.log.parent / "volumes" / mount_path.strip("/").replace("/", "-")
            source.mkdir(parents=True)
            for name, text in files.items():
                (source / name).write_text(text)
            volumes += ["--volume", f"{source}:{mount_path}:ro"]
        self.target_id = await asyncio.to_thread(
            self.podman.start,
            self.target,
            self.image,
            "/support/servers.py",
            "http",
            "--port",
            str(POD_PORT),
            "--text",
            "pod\n",
            entrypoint=PYTHON,
            options=[
                "--network",
                f"ns:/run/netns/{self.sandbox.netns}",
                "--volume",
                f"{SUPPORT}:/support:ro",
                "--env",
                "APP_COLOR=blue",
                # The pod's /etc/hosts (the kubelet writes it): a name only the pod knows.
                "--add-host",
                f"web-internal:{self.sandbox.pod_ip}",
                "--cap-drop",
                "all",
                *volumes,
            ],
        )
        url = f"http://{self.sandbox.pod_ip}:{POD_PORT}/"

        async def serving() -> bool:
            return await curl(url) == "pod\n"

        await eventually_async(serving, 30, "the target pod's server did not start")

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
            "volumeMounts": [
                {"name": f"v{i}", "mountPath": path, "readOnly": True}
                for i, path in enumerate(VOLUMES)
            ],
        }
        if self.probes:
            container["readinessProbe"] = {"httpGet": {"port": "http", "path": "/ready"}}
            container["livenessProbe"] = {"tcpSocket": {"port": POD_PORT}}
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
                "hostIP": self.node_ip,
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    {
                        "name": "web",
                        "ready": True,
                        "restartCount": 0,
                        "image": "web:1",
                        "imageID": "",
                        "containerID": "containerd://" + self.target_id,
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
        app = web.Application(middlewares=[self._authenticate, self._authorize])
        self.portforward.add_routes(app)
        app.router.add_get("/api/v1/namespaces/{name}", self._read_namespace)
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
        try:
            await self.start_target()
            await self.seed()
        except BaseException:
            await self.__aexit__(None, None, None)  # what was started goes again
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.log.exists():
            # Shown by pytest only when the test failed: what the agents said.
            print(f"--- agents' output ({self.log}) ---")
            print(self.log.read_text(errors="replace")[-20000:])
        for name in self.containers:  # agents first: they hold the target's namespaces
            await asyncio.to_thread(self.podman.remove, name)
        for agent in self.agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait()
        for netns in self.job_netns:
            await asyncio.to_thread(_delete_netns, netns)
        await self.portforward.close()
        await self.runner.cleanup()
        await self.http.close()
        await self.kserver.__aexit__(None, None, None)
        await self.emulator.__aexit__(None, None, None)


def _make_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)


def _delete_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _status_response(code: int, reason: str, message: str) -> web.Response:
    """A refusal as the API server sends it: a Status object."""
    return web.json_response(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        },
        status=code,
    )


#: HTTP method -> RBAC verb, for requests naming one object.
VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def request_attributes(request: web.Request) -> tuple[str, str, str, str] | None:
    """(verb, namespace, API group, resource[/subresource]) of a namespaced API request;
    None for discovery and other non-resource URLs."""
    parts = request.path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if len(rest) < 2 or rest[0] != "namespaces":
        return None
    if len(rest) == 2:  # the namespace object itself: its own namespace
        return VERBS.get(request.method, "get"), rest[1], group, "namespaces"
    ns, resource, named = rest[1], rest[2], rest[3:]
    if len(named) >= 2:
        resource = f"{resource}/{named[1]}"
    if request.method == "GET" and not named:
        watching = request.query.get("watch") in ("true", "1")
        return ("watch" if watching else "list"), ns, group, resource
    return VERBS.get(request.method, "get"), ns, group, resource


@pytest.fixture
async def probed_cluster(
    env: Env, tmp_path: Path, agent_podman: tuple[Podman, str]
) -> AsyncIterator[tuple[FakeCluster, dict[str, str]]]:
    """A cluster whose pod has probes on the stolen port; its node's address is on this
    host's side of the pod's link, for the test to play the kubelet from."""
    kenv = env.env | {"NETMIRROR_AGENT_IMAGE": IMAGE}
    podman, image = agent_podman
    async with FakeCluster(
        env.sandbox, kenv, tmp_path / "kubelet.log", podman, image, probes=True
    ) as fake:
        await asyncio.to_thread(
            subprocess.run,
            ["ip", "addr", "add", f"{fake.node_ip}/24", "dev", env.sandbox.host_if],
            check=True,
            capture_output=True,
        )
        kubeconfig = write_kubeconfig(
            tmp_path / "kubeconfig", fake.url, {"token": "dev-token"}, namespace=NS
        )
        yield fake, kenv | {"KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(REPO)}


@pytest.fixture
async def cluster(
    env: Env, tmp_path: Path, agent_podman: tuple[Podman, str]
) -> AsyncIterator[tuple[FakeCluster, dict[str, str]]]:
    kenv = env.env | {"NETMIRROR_AGENT_IMAGE": IMAGE}
    podman, image = agent_podman
    async with FakeCluster(env.sandbox, kenv, tmp_path / "kubelet.log", podman, image) as fake:
        kubeconfig = write_kubeconfig(
            tmp_path / "kubeconfig", fake.url, {"token": "dev-token"}, namespace=NS
        )
        kenv = kenv | {"KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(REPO)}
        yield fake, kenv


#: The target container's volumes: mount path -> files (the pod spec's volumeMounts).
TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount"
HOST_HOSTS = Path("/etc/hosts").read_bytes()
VOLUMES = {
    "/etc/app/config": {"app.yaml": "color: blue\n"},
    TOKEN: {"token": "pod-token\n", "namespace": "shop\n"},
}

#: Lifetime of the tokens of the expiring-credentials cluster, in seconds.
TOKEN_LIFETIME = 3


@pytest.fixture
async def expiring_cluster(
    env: Env, tmp_path: Path, agent_podman: tuple[Podman, str]
) -> AsyncIterator[tuple[FakeCluster, dict[str, str], Path]]:
    """A cluster whose exec plugin hands out tokens valid for TOKEN_LIFETIME seconds."""
    kenv = env.env | {"NETMIRROR_AGENT_IMAGE": IMAGE}
    podman, image = agent_podman
    secret = os.urandom(16)
    (tmp_path / "secret").write_bytes(secret)
    runs = tmp_path / "plugin-runs"
    async with FakeCluster(
        env.sandbox, kenv, tmp_path / "kubelet.log", podman, image, token_secret=secret
    ) as fake:
        plugin = {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1",
                "command": sys.executable,
                "args": [
                    str(SUPPORT / "token_plugin.py"),
                    str(tmp_path / "secret"),
                    str(TOKEN_LIFETIME),
                    str(runs),
                ],
                "interactiveMode": "Never",
            }
        }
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url, plugin, namespace=NS)
        kenv = kenv | {"KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(REPO)}
        yield fake, kenv, runs


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
    # No image configured: the default reference is in no registry, and the error says
    # what to do about it.
    unset = {k: v for k, v in kenv.items() if k != "NETMIRROR_AGENT_IMAGE"}
    code, _, err = await run(
        unset, "up", "--target", "deployment/web", "--steal", "80", "--session", "dflt"
    )
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "netmirror: no agent image is configured and the default "
        "ghcr.io/netmirror/agent:0.1.0 cannot be pulled (ErrImagePull"
    )
    assert "make agent-image" in last and "--agent-image" in last


async def test_job_mode_enters_the_container_namespace(
    env: Env,
    cluster: tuple[FakeCluster, dict[str, str]],
    tmp_path: Path,
) -> None:
    fake, kenv = cluster
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
    # A job's agent listens in its own pod's namespace, on the port of the config.
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
    fake, kenv = cluster  # the pod's server answers HTTP: it never echoes
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

    async def stolen_again() -> bool:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(env.sandbox.pod_ip, POD_PORT), 1)
        except (OSError, TimeoutError):
            return False
        try:
            w.write(b"hello")
            # The pod's own server (which answers while no tunnel is up) never
            # echoes: a short wait tells the two apart.
            return await asyncio.wait_for(r.readexactly(5), 0.2) == b"hello"
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            return False
        finally:
            w.close()

    # New connections are stolen again within 2 s of the cut.
    loop = asyncio.get_running_loop()
    await eventually_async(
        stolen_again, max(0.0, cut + 2 - loop.time()), "not stolen again within 2 s of the cut"
    )
    print(f"stolen again {loop.time() - cut:.2f} s after the cut")
    code, out, _ = await run(kenv, "status", "--json")
    session = json.loads(out)["sessions"][0]
    assert session["reconnects"] == 1 and session["state"] == "ready"
    code, _, err = await run(kenv, "down", "--session", "cut")
    assert code == 0, err


async def test_exec_runs_a_command_as_if_in_the_pod(
    env: Env, cluster: tuple[FakeCluster, dict[str, str]]
) -> None:
    fake, kenv = cluster
    # The pod's main process (pid 1 of its container) has APP_COLOR=blue in its
    # environment, and its /etc/hosts knows web-internal (start_target); the volumeMounts
    # of its spec are at their paths, which this machine does not have.
    script = (
        f"echo color=$APP_COLOR; curl -sS -m 5 http://web-internal:{POD_PORT}/;"
        f"cat /etc/app/config/app.yaml {TOKEN}/token;"
        # The pod's /etc/hosts (podman's, here), not this machine's.
        'cmp -s /etc/hosts "$NETMIRROR_ROOT/etc/hosts" && echo pod-hosts;'
        "md5sum < /etc/hosts | cut -c1-32;"
        'test -f "$NETMIRROR_ROOT/support/servers.py" && echo image-root'
    )
    code, out, err = await run(
        kenv, "exec", "--target", "deployment/web", "--session", "kx", "--", "sh", "-c", script
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:5] + lines[6:] == [
        "color=blue",
        "pod",
        "color: blue",
        "pod-token",
        "pod-hosts",
        "image-root",
    ], err
    assert lines[5] != hashlib.md5(HOST_HOSTS).hexdigest()
    local = await asyncio.to_thread(lambda: [os.path.exists(p) for p in ("/etc/app", TOKEN)])
    assert local == [False, False]
    (patch,) = fake.patches
    (container,) = patch["body"]["spec"]["ephemeralContainers"]
    assert "SYS_PTRACE" in container["securityContext"]["capabilities"]["add"]
    # The session ended with the command: the agent was asked to leave.
    (agent,) = fake.agents
    await asyncio.to_thread(agent.wait, 10)
    assert env.chains() == ""


async def test_mirror_by_capture_and_by_passthrough(
    env: Env, cluster: tuple[FakeCluster, dict[str, str]], tmp_path: Path
) -> None:
    """Both mirror methods with the agent in its container: the pod answers, a copy comes here."""
    fake, kenv = cluster
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
    for n, method in enumerate(("capture", "passthrough")):
        local = free_port()
        sink = tmp_path / f"sink-{method}.log"
        env.server("sink", local, in_pod=False, log=str(sink))
        session = f"m-{method[:4]}"
        code, _, err = await run(
            kenv,
            "up",
            "--target",
            "deployment/web",
            "--mirror",
            f"{POD_PORT}:{local}",
            "--mirror-method",
            method,
            "--session",
            session,
        )
        assert code == 0, err
        # The pod keeps answering every client itself.
        for _ in range(3):
            assert await curl(url) == "pod\n"

        def copied(path: Path = sink) -> list[str]:
            return path.read_text().splitlines() if path.exists() else []

        async def three_copies(path: Path = sink) -> list[str]:
            lines = copied(path)
            return lines if len(lines) >= 3 else []

        lines = await eventually_async(
            three_copies, 30, f"{method}: the local copy did not get 3 connections"
        )
        assert len(lines) == 3

        async def counted() -> dict[str, Any]:
            # The agent reports its counters once a second.
            _, out, _ = await run(kenv, "status", "--json")
            (port,) = json.loads(out)["sessions"][0]["ports"]
            return port if port["mirror"]["flows"] >= 3 else {}

        port = await eventually_async(counted, 10, f"{method}: status never counted 3 flows")
        assert port["method"] == method
        code, _, err = await run(kenv, "down", "--session", session)
        assert code == 0, err
        await asyncio.to_thread(fake.agents[n].wait, 10)
        assert env.chains() == ""


async def test_http_filter_two_sessions_share_the_pods_port(
    env: Env, cluster: tuple[FakeCluster, dict[str, str]]
) -> None:
    """Two developers, one port: each gets the requests with their header, the pod the rest."""
    fake, kenv = cluster
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
    for who in ("alice", "bob"):
        local = free_port()
        env.server("http", local, in_pod=False, text=f"{who}\n")
        code, _, err = await run(
            kenv,
            "up",
            "--target",
            "deployment/web",
            "--steal",
            f"{POD_PORT}:{local}",
            "--http-header",
            f"^x-dev: {who}$",
            "--session",
            who,
        )
        assert code == 0, err

    async def answer(*headers: str) -> str:
        args = [arg for header in headers for arg in ("-H", header)]
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-m", "5", *args, url, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        return out.decode()

    assert await answer("x-dev: alice") == "alice\n"
    assert await answer("x-dev: bob") == "bob\n"
    assert await answer() == "pod\n"
    assert await answer("x-dev: carol") == "pod\n"
    # Alice leaves first. Her agent's container held the port's router: it hands the
    # port over, and bob's agent starts another; bob's requests keep coming to him,
    # and nobody else's are refused meanwhile.
    code, _, err = await run(kenv, "down", "--session", "alice")
    assert code == 0, err
    assert await answer() == "pod\n"

    async def bob_again() -> bool:
        return await answer("x-dev: bob") == "bob\n"

    await eventually_async(bob_again, 10, "bob's requests did not come back to him")
    assert await answer("x-dev: alice") == "pod\n"
    code, _, err = await run(kenv, "down", "--session", "bob")
    assert code == 0, err
    for agent in fake.agents:
        await asyncio.to_thread(agent.wait, 10)
    assert env.chains() == ""
    assert await answer("x-dev: alice") == "pod\n"


async def test_a_session_outlives_its_tokens_across_a_tunnel_cut(
    env: Env, expiring_cluster: tuple[FakeCluster, dict[str, str], Path]
) -> None:
    """Tokens of an exec plugin that expire every few seconds: the session keeps stealing."""
    fake, kenv, runs = expiring_cluster
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
    code, _, err = await steal_web(kenv, local, "tok")
    assert code == 0, err
    assert await curl(url) == "local\n"
    started = runs.read_text().count("\n")
    # Past two expiries, the API server drops every port-forward; the daemon reconnects,
    # which needs a token that is valid now.
    await asyncio.sleep(2 * TOKEN_LIFETIME + 1)
    assert await curl(url) == "local\n"
    await fake.portforward.close()

    async def stolen() -> bool:
        return await curl(url) == "local\n"

    await eventually_async(stolen, 10, "not stolen again after the cut with an expired token")
    code, out, err = await run(kenv, "status", "--json")
    assert code == 0, err
    session = json.loads(out)["sessions"][0]
    assert session["reconnects"] >= 1 and session["state"] == "ready"
    assert runs.read_text().count("\n") > started, "the exec plugin was never run again"
    code, _, err = await run(kenv, "down", "--session", "tok")
    assert code == 0, err
    (agent,) = fake.agents
    await asyncio.to_thread(agent.wait, 10)
    assert env.chains() == ""


async def probe(url: str, *, source: str | None = None, kubelet: bool = False) -> str:
    """What a client (or the kubelet, from the node's address) gets from ``url``."""
    argv = ["curl", "-sS", "-m", "5", url]
    if source is not None:
        argv += ["--interface", source]
    if kubelet:
        argv += ["-A", "kube-probe/1.29"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return out.decode() or err.decode()


async def test_the_kubelets_probes_stay_with_the_target(
    env: Env, probed_cluster: tuple[FakeCluster, dict[str, str]]
) -> None:
    fake, kenv = probed_cluster
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/ready"

    # A whole-port steal: the kubelet's connections (from the node) go to the pod.
    code, _, err = await steal_web(kenv, local, "probes")
    assert code == 0, err
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert f"port {POD_PORT}: the kubelet's probes" in warning
    assert fake.node_ip in warning and "--steal-probes" in warning
    assert await probe(url, source=fake.node_ip, kubelet=True) == "pod\n"
    assert await probe(url) == "local\n"
    code, out, _ = await run(kenv, "status", "--json")
    (port,) = json.loads(out)["sessions"][0]["ports"]
    assert port["probes"] == (
        "liveness tcpSocket; readiness httpGet /ready: go to the target"
        f" (connections from {fake.node_ip})"
    )
    code, _, err = await run(kenv, "down", "--session", "probes")
    assert code == 0, err

    # --steal-probes: they are stolen like the rest.
    code, _, err = await steal_web(kenv, local, "probes", "--steal-probes")
    assert code == 0, err
    assert "warning:" not in err
    assert await probe(url, source=fake.node_ip, kubelet=True) == "local\n"
    code, _, err = await run(kenv, "down", "--session", "probes")
    assert code == 0, err

    # A filtered steal that matches everything: probes are told apart by their
    # User-Agent, wherever they come from.
    code, _, err = await steal_web(kenv, local, "probes", "--http-path", "^/")
    assert code == 0, err
    assert await probe(url, kubelet=True) == "pod\n"
    assert await probe(url, source=fake.node_ip) == "local\n"
    code, _, err = await run(kenv, "down", "--session", "probes")
    assert code == 0, err
    assert env.chains() == ""


async def test_targetless_an_agent_pod_of_its_own_for_outgoing_dns_and_forwards(
    env: Env, cluster: tuple[FakeCluster, dict[str, str]], tmp_path: Path
) -> None:
    fake, kenv = cluster
    # A service only the agent's own pod reaches, by a name only its resolver knows.
    service_ip = f"10.250.{env.sandbox.index}.1"
    fake.job_hosts = {"orders.shop.svc": service_ip}
    servers: list[subprocess.Popen[bytes]] = []

    async def serve_in(netns: str) -> None:
        def start() -> None:
            subprocess.run(
                ["ip", "-n", netns, "addr", "add", f"{service_ip}/32", "dev", "lo"], check=True
            )
            for kind, port in (("http", 8000), ("udp-echo", 7007)):
                argv = [sys.executable, str(SUPPORT / "servers.py"), kind, "--port", str(port)]
                proc = subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        netns,
                        *argv,
                        "--host",
                        service_ip,
                        "--text",
                        "orders\n",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
                servers.append(proc)
                assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"

        await asyncio.to_thread(start)

    fake.on_job_netns = serve_in
    udp = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); "
        "s.connect(('orders.shop.svc', 7007)); s.send(b'ping'); print(s.recv(200).decode())"
    )
    script = (
        "curl -sS -m 5 http://orders.shop.svc:8000/; "
        f'{sys.executable} -c "{udp}"; '
        'echo "color=${APP_COLOR:-unset}"'
    )
    try:
        code, out, err = await run(
            kenv,
            "exec",
            "--target",
            "targetless",
            "--session",
            "tl",
            "--",
            "sh",
            "-c",
            script,
            timeout=120,
        )
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == "orders", err
        assert lines[1].startswith("from ") and lines[1].endswith(": ping"), lines
        # No target, so no environment of one: the local environment only.
        assert lines[2] == "color=unset"
        # The agent ran as a job of its own, with no capability and not as root.
        (job,) = fake.jobs
        spec = job["spec"]["template"]["spec"]
        assert "hostPID" not in spec and "nodeName" not in spec
        assert spec["securityContext"]["runAsNonRoot"] is True
        (agent_container,) = spec["containers"]
        assert agent_container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert "--targetless" in agent_container["args"]
        assert fake.patches == []  # nobody's pod was touched
        assert fake.spec_problems == []
        # Gone when the command ended: the job is deleted, its agent has exited.
        (agent,) = fake.agents
        await asyncio.to_thread(agent.wait, 15)
        name = job["metadata"]["name"]
        async with fake.http.get(
            f"{fake.kmock_url}/apis/batch/v1/namespaces/{NS}/jobs/{name}"
        ) as response:
            assert response.status == 404

        # port-forward through a targetless agent, in the foreground until Ctrl-C.
        local = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "netmirror",
            "port-forward",
            "--target",
            "targetless",
            "--session",
            "tl2",
            "-L",
            f"{local}:orders.shop.svc:8000",
            env=kenv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert first.decode().startswith(f"forwarding 127.0.0.1:{local} -> orders.shop.svc:8000")
        assert await curl(f"http://127.0.0.1:{local}/") == "orders\n"
        proc.send_signal(2)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert len(fake.jobs) == 2
        second = fake.agents[1]
        await asyncio.to_thread(second.wait, 15)
    finally:
        for server in servers:
            server.kill()
            server.wait()


async def test_targetless_refuses_incoming_traffic_before_starting_anything(
    env: Env, cluster: tuple[FakeCluster, dict[str, str]]
) -> None:
    fake, kenv = cluster
    code, _out, err = await run(
        kenv, "up", "--target", "targetless", "--steal", "8080:9", "--session", "tl3"
    )
    assert code != 0
    assert "a targetless session takes no incoming traffic (ports 8080)" in err
    assert len(err.strip().splitlines()) <= 3, err
    assert fake.jobs == []


# --- Locked-down clusters: Pod Security admission, an agent namespace, least RBAC ---------

AGENT_NS = "netmirror"
BASELINE = {"pod-security.kubernetes.io/enforce": "baseline"}
PRIVILEGED = {"pod-security.kubernetes.io/enforce": "privileged"}
#: The application namespace enforces baseline; the agent namespace of the manifests.
LOCKED = {NS: BASELINE, AGENT_NS: PRIVILEGED}


def role_rules(file: str, name: str) -> list[dict[str, Any]]:
    """The rules of Role ``name`` in manifests/``file``: what the tests' RBAC grants."""
    import yaml

    with (REPO / "manifests" / file).open() as stream:
        for doc in yaml.safe_load_all(stream):
            if doc and doc.get("kind") == "Role" and doc["metadata"]["name"] == name:
                rules: list[dict[str, Any]] = doc["rules"]
                return rules
    raise AssertionError(f"no Role {name} in manifests/{file}")


@pytest.fixture
async def make_cluster(
    env: Env, tmp_path: Path, agent_podman: tuple[Podman, str]
) -> AsyncIterator[Callable[..., Awaitable[tuple[FakeCluster, dict[str, str]]]]]:
    """``await make_cluster(token=..., **FakeCluster options)``: one cluster per test."""
    import contextlib

    async with contextlib.AsyncExitStack() as stack:

        async def make(
            token: str = "dev-token", **options: Any
        ) -> tuple[FakeCluster, dict[str, str]]:
            kenv = env.env | {"NETMIRROR_AGENT_IMAGE": IMAGE}
            podman, image = agent_podman
            fake = await stack.enter_async_context(
                FakeCluster(env.sandbox, kenv, tmp_path / "kubelet.log", podman, image, **options)
            )
            kubeconfig = write_kubeconfig(
                tmp_path / "kubeconfig", fake.url, {"token": token}, namespace=NS
            )
            return fake, kenv | {"KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(REPO)}

        yield make


async def job_status(fake: FakeCluster, ns: str, name: str) -> int:
    async with fake.http.get(
        f"{fake.kmock_url}/apis/batch/v1/namespaces/{ns}/jobs/{name}"
    ) as response:
        return response.status


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


async def test_a_baseline_namespace_is_refused_before_anything_is_created(
    env: Env, make_cluster: Callable[..., Awaitable[tuple[FakeCluster, dict[str, str]]]]
) -> None:
    fake, kenv = await make_cluster(namespaces={NS: BASELINE})
    local = free_port()
    code, _, err = await steal_web(kenv, local, "psa")
    assert code == 1
    assert last_line(err) == (
        "netmirror: namespace 'shop' enforces Pod Security \"baseline\", which rejects the "
        "agent's NET_ADMIN, NET_RAW, SYS_PTRACE; use --agent-mode job --agent-namespace netmirror "
        "(see manifests/agent-namespace.yaml)"
    )
    # Job mode in the same namespace: its hostPID pod is refused too, said before creating.
    code, _, err = await steal_web(kenv, local, "psa-job", "--agent-mode", "job")
    assert code == 1
    assert last_line(err) == (
        "netmirror: namespace 'shop' enforces Pod Security \"baseline\", which rejects the "
        "agent job's hostPID, NET_ADMIN, NET_RAW, SYS_ADMIN, SYS_PTRACE; use --agent-namespace "
        "netmirror, a namespace labelled privileged (see manifests/agent-namespace.yaml)"
    )
    assert fake.patches == [] and fake.jobs == [] and fake.agents == []
    # The server was asked only for a dry run of the ephemeral agent (no exemption),
    # and not even that for the job.
    assert fake.dry_runs == ["ephemeralcontainers: refused"] and fake.denied == []
    assert env.chains() == ""
    assert not os.listdir(env.state_dir) if env.state_dir.exists() else True


async def test_admission_refusals_arriving_anyway_are_one_line_in_the_servers_words(
    env: Env, make_cluster: Callable[..., Awaitable[tuple[FakeCluster, dict[str, str]]]]
) -> None:
    """Namespace labels unreadable (no permission): the API server's refusal is the error,
    for the ephemeral container (403) and for a job whose pod is never created (an event)."""
    fake, kenv = await make_cluster(namespaces={NS: BASELINE}, hide_namespaces=True)
    local = free_port()
    code, _, err = await steal_web(kenv, local, "psa")
    assert code == 1
    line = last_line(err)
    assert line.startswith(
        "netmirror: the API server refused to patch pods/ephemeralcontainers in namespace "
        f'\'shop\': pods "{POD}" is forbidden: violates PodSecurity "baseline:latest": '
        'non-default capabilities (container "netmirror-psa-'
    ), line
    assert 'must not include "NET_ADMIN", "NET_RAW", "SYS_PTRACE" in securityContext' in line
    assert "Traceback" not in err
    code, _, err = await steal_web(kenv, local, "psa-job", "--agent-mode", "job", "--timeout", "20")
    assert code == 1
    line = last_line(err)
    assert line.startswith("netmirror: the agent job netmirror-psa-job-") and (
        "in namespace 'shop' cannot create its pod: Error creating: pods" in line
    ), line
    assert 'violates PodSecurity "baseline:latest": host namespaces (hostPID=true)' in line
    (job,) = fake.jobs
    # Nothing left behind: the job that could not make its pod is deleted.
    assert await job_status(fake, NS, job["metadata"]["name"]) == 404
    assert fake.agents == []


async def test_a_webhooks_refusal_is_shown_verbatim(
    env: Env, make_cluster: Callable[..., Awaitable[tuple[FakeCluster, dict[str, str]]]]
) -> None:
    reason = (
        "[no-debug-containers] ephemeral containers are not allowed in namespace shop "
        "(ask #platform)"
    )

    def gatekeeper(what: str, obj: dict[str, Any]) -> str | None:
        return reason if what == "ephemeralcontainers" else None

    _, kenv = await make_cluster(webhook=gatekeeper)
    code, _, err = await steal_web(kenv, free_port(), "hook")
    assert code == 1
    assert last_line(err) == (
        "netmirror: the API server refused to patch pods/ephemeralcontainers in namespace "
        "'shop': admission webhook \"validate.policy.example\" denied the request: " + reason
    )


async def test_a_warn_level_namespace_warns_and_works(
    env: Env, make_cluster: Callable[..., Awaitable[tuple[FakeCluster, dict[str, str]]]]
) -> None:
    _, kenv = await make_cluster(
        namespaces={
            NS: {
                "pod-security.kubernetes.io/warn": "baseline",
                "pod-security.kubernetes.io/audit": "restricted",
            }
        }
    )
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    code, _, err = await steal_web(kenv, local, "warned")
    assert code == 0, err
    warnings_ = [line for line in err.splitlines() if "Pod Security" in line]
    assert warnings_ == [
        "warning: namespace 'shop' warns on Pod Security \"baseline\" "
        "(pod-security.kubernetes.io/warn): the agent's ephemeral container violates it with "
        "NET_ADMIN, NET_RAW, SYS_PTRACE; it is admitted, going on",
        "warning: namespace 'shop' audits on Pod Security \"restricted\" "
        "(pod-security.kubernetes.io/audit): the agent's ephemeral container violates it with "
        "NET_ADMIN, NET_RAW, SYS_PTRACE, runAsNonRoot != true, runAsUser=0, seccompProfile; it is "
        "admitted, going on",
    ], err
    assert await curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/") == "local\n"
    code, _, err = await run(kenv, "down", "--session", "warned")
    assert code == 0, err
    assert env.chains() == ""


async def test_with_an_agent_namespace_steal_mirror_and_exec_work(
    env: Env,
    make_cluster: Callable[..., Awaitable[tuple[FakeCluster, dict[str, str]]]],
    tmp_path: Path,
) -> None:
    fake, kenv = await make_cluster(namespaces=LOCKED)
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    # Configured, not asked for: the ephemeral agent would be refused, so the job runs
    # in the agent namespace, and up says so.
    config = tmp_path / "netmirror.yaml"
    config.write_text(f"agent:\n  namespace: {AGENT_NS}\n")
    code, _, err = await steal_web(kenv, local, "ans", "--config", str(config))
    assert code == 0, err
    assert (
        "warning: namespace 'shop' enforces Pod Security \"baseline\", which rejects the "
        "agent's NET_ADMIN, NET_RAW, SYS_PTRACE: running the agent as a job in namespace "
        "'netmirror' instead"
    ) in err.splitlines()
    (job,) = fake.jobs
    assert job["metadata"]["namespace"] == AGENT_NS
    assert fake.patches == [] and fake.denied == [] and fake.spec_problems == []
    assert await curl(url) == "local\n"
    _, out, _ = await run(kenv, "status", "--json")
    (session,) = json.loads(out)["sessions"]
    where = session["agent"]["where"]
    assert where.startswith("job netmirror-ans-") and where.endswith(
        f" in namespace {AGENT_NS}, on node node-1"
    ), where
    code, _, err = await run(kenv, "down", "--session", "ans")
    assert code == 0, err
    await asyncio.to_thread(fake.agents[0].wait, 10)
    assert env.chains() == ""
    assert await curl(url) == "pod\n"
    assert await job_status(fake, AGENT_NS, job["metadata"]["name"]) == 404

    # Mirror by passthrough, with the flag this time.
    sink = tmp_path / "sink.log"
    mirror_local = free_port()
    env.server("sink", mirror_local, in_pod=False, log=str(sink))
    code, _, err = await run(
        kenv,
        "up",
        "--target",
        "deployment/web",
        "--mirror",
        f"{POD_PORT}:{mirror_local}",
        "--mirror-method",
        "passthrough",
        "--agent-namespace",
        AGENT_NS,
        "--session",
        "anm",
    )
    assert code == 0, err
    for _ in range(2):
        assert await curl(url) == "pod\n"

    async def two_copies() -> list[str]:
        lines = sink.read_text().splitlines() if sink.exists() else []
        return lines if len(lines) >= 2 else []

    await eventually_async(two_copies, 30, "the local copy did not get 2 connections")
    code, _, err = await run(kenv, "down", "--session", "anm")
    assert code == 0, err

    # exec: the pod's environment, its names, its files.
    script = (
        f"echo color=$APP_COLOR; curl -sS -m 5 http://web-internal:{POD_PORT}/;"
        "cat /etc/app/config/app.yaml"
    )
    code, out, err = await run(
        kenv,
        "exec",
        "--target",
        "deployment/web",
        "--agent-namespace",
        AGENT_NS,
        "--session",
        "anx",
        "--",
        "sh",
        "-c",
        script,
    )
    assert code == 0, err
    assert out.splitlines() == ["color=blue", "pod", "color: blue"], err
    assert all(j["metadata"]["namespace"] == AGENT_NS for j in fake.jobs)
    assert len(fake.jobs) == 3 and fake.patches == []
    for agent in fake.agents:
        await asyncio.to_thread(agent.wait, 10)
    assert env.chains() == ""


async def test_the_narrow_roles_of_the_manifests_are_enough(
    env: Env, make_cluster: Callable[..., Awaitable[tuple[FakeCluster, dict[str, str]]]]
) -> None:
    """RBAC enforced: Role netmirror-target in the application namespace and Role
    netmirror-agent in the agent namespace, nothing else, run a session."""
    target_rules = role_rules("rbac-target.yaml", "netmirror-target")
    agent_rules = role_rules("agent-namespace.yaml", "netmirror-agent")
    fake, kenv = await make_cluster(
        token="narrow",
        namespaces=LOCKED,
        rbac={
            "narrow": [(NS, target_rules), (AGENT_NS, agent_rules)],
            "no-agent-role": [(NS, target_rules)],
        },
    )
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    code, _, err = await steal_web(kenv, local, "narrow", "--agent-namespace", AGENT_NS)
    assert code == 0, err
    assert fake.denied == [], fake.denied
    assert await curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/") == "local\n"
    code, _, err = await run(kenv, "down", "--session", "narrow")
    assert code == 0, err
    code, out, err = await run(kenv, "ls")
    assert code == 0 and "deployment/web" in out, err
    assert fake.denied == [], fake.denied
    # ... and no wider than needed: every right granted was used, but for these.
    granted = {
        (verb, ns, group, resource)
        for ns, rules in ((NS, target_rules), (AGENT_NS, agent_rules))
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted - fake.allowed <= {
        ("get", NS, "", "pods"),  # a target given as pod/NAME
        ("get", NS, "apps", "statefulsets"),  # ... or as statefulset/NAME
        ("watch", AGENT_NS, "", "pods"),  # the job's pod, when not running at the first list
        ("create", AGENT_NS, "", "pods/portforward"),  # WebSocket port-forward from 1.35 on
        ("list", AGENT_NS, "", "events"),  # read only while the job has no pod yet
    }, sorted(granted - fake.allowed)
    (job,) = fake.jobs
    assert await job_status(fake, AGENT_NS, job["metadata"]["name"]) == 404
    await asyncio.to_thread(fake.agents[0].wait, 10)
    assert env.chains() == ""

    # Without the agent namespace's Role: one line naming it, and nothing created.
    other = write_kubeconfig(
        Path(kenv["KUBECONFIG"]).with_name("kubeconfig-other"),
        fake.url,
        {"token": "no-agent-role"},
        namespace=NS,
    )
    kenv = kenv | {"KUBECONFIG": str(other)}
    code, _, err = await steal_web(kenv, local, "noagent", "--agent-namespace", AGENT_NS)
    assert code == 1
    assert last_line(err) == (
        "netmirror: forbidden: you cannot create jobs in namespace 'netmirror' (netmirror "
        "needs the Role netmirror-agent in manifests/agent-namespace.yaml)"
    )
    assert len(fake.jobs) == 1


async def test_a_refusal_the_labels_did_not_foretell_runs_the_agent_in_the_agent_namespace(
    env: Env, make_cluster: Callable[..., Awaitable[tuple[FakeCluster, dict[str, str]]]]
) -> None:
    """The labels cannot be read (as with a cluster-wide default level): the ephemeral
    agent is refused by the server, nothing is made, and the agent namespace is used."""
    fake, kenv = await make_cluster(namespaces=LOCKED, hide_namespaces=True)
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    code, _, err = await steal_web(kenv, local, "fallback", "--agent-namespace", AGENT_NS)
    assert code == 0, err
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warning.startswith(
        "warning: the API server refused to patch pods/ephemeralcontainers in namespace "
        f'\'shop\': pods "{POD}" is forbidden: violates PodSecurity "baseline:latest"'
    ), warning
    assert warning.endswith(": running the agent as a job in namespace 'netmirror' instead")
    (job,) = fake.jobs
    assert job["metadata"]["namespace"] == AGENT_NS and fake.patches[0]
    assert await curl(url) == "local\n"
    code, _, err = await run(kenv, "down", "--session", "fallback")
    assert code == 0, err
    assert await job_status(fake, AGENT_NS, job["metadata"]["name"]) == 404
    await asyncio.to_thread(fake.agents[0].wait, 10)
    assert env.chains() == ""
    assert await curl(url) == "pod\n"


async def test_an_exempt_user_gets_the_ephemeral_agent_the_labels_would_refuse(
    env: Env, make_cluster: Callable[..., Awaitable[tuple[FakeCluster, dict[str, str]]]]
) -> None:
    """Exemptions live in the admission configuration, not in the labels: a dry run asks."""
    fake, kenv = await make_cluster(namespaces={NS: BASELINE}, exempt=True)
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    code, _, err = await steal_web(kenv, local, "exempt")
    assert code == 0, err
    assert (
        "warning: namespace 'shop' enforces Pod Security \"baseline\", which rejects the "
        "agent's NET_ADMIN, NET_RAW, SYS_PTRACE, but admits it for you (an exemption)"
    ) in err.splitlines(), err
    assert fake.dry_runs == ["ephemeralcontainers: admitted"]
    assert len(fake.patches) == 1 and fake.jobs == []
    assert await curl(url) == "local\n"
    code, _, err = await run(kenv, "down", "--session", "exempt")
    assert code == 0, err
    await asyncio.to_thread(fake.agents[0].wait, 10)
    assert env.chains() == ""


async def test_restricted_and_unusable_agent_namespaces_are_refused_before_creating(
    env: Env, make_cluster: Callable[..., Awaitable[tuple[FakeCluster, dict[str, str]]]]
) -> None:
    fake, kenv = await make_cluster(
        namespaces={NS: {"pod-security.kubernetes.io/enforce": "restricted"}, "plain": BASELINE}
    )
    local = free_port()
    code, _, err = await steal_web(kenv, local, "strict")
    assert code == 1
    assert last_line(err) == (
        "netmirror: namespace 'shop' enforces Pod Security \"restricted\", which rejects the "
        "agent's NET_ADMIN, NET_RAW, SYS_PTRACE, runAsNonRoot != true, runAsUser=0, "
        "seccompProfile; use --agent-mode job --agent-namespace netmirror "
        "(see manifests/agent-namespace.yaml)"
    )
    code, _, err = await steal_web(kenv, local, "nons", "--agent-namespace", "nope")
    assert code == 1
    assert last_line(err) == (
        "netmirror: namespace 'nope' does not exist: create it with "
        "`kubectl apply -f manifests/agent-namespace.yaml`"
    )
    code, _, err = await steal_web(kenv, local, "plain", "--agent-namespace", "plain")
    assert code == 1
    assert last_line(err) == (
        "netmirror: the agent namespace 'plain' enforces Pod Security \"baseline\", which "
        "rejects the agent job's hostPID, NET_ADMIN, NET_RAW, SYS_ADMIN, SYS_PTRACE; label it "
        "pod-security.kubernetes.io/enforce=privileged (see manifests/agent-namespace.yaml)"
    )
    assert fake.patches == [] and fake.jobs == [] and fake.agents == [] and fake.denied == []
    assert env.chains() == ""
