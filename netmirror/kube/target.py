"""Kubernetes targets: ``pod/NAME``, ``deployment/NAME``, ``statefulset/NAME``,
each optionally ``.../container/C``.

Resolution finds one running, ready pod. The agent is started either as an
ephemeral container in that pod (it shares the pod's network namespace) or as a
job pod on the same node that enters the target container's network namespace.
The daemon reaches the agent's websocket, which listens on the pod's loopback,
through the API server's port-forward, via a local Unix socket
(:class:`~netmirror.kube.portforward.LocalForwarder`).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import os
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import aiohttp

from netmirror.errors import AgentError, TargetError
from netmirror.kube.portforward import ApiEndpoint, LocalForwarder, open_stream
from netmirror.protocol.connection import token_sha256
from netmirror.targets import AgentHandle, AgentSettings, Target

if TYPE_CHECKING:
    from netmirror.tunnel import Tunnel

log = logging.getLogger(__name__)

KINDS = ("pod", "deployment", "statefulset")
LABELS = {"app.kubernetes.io/part-of": "netmirror"}
SESSION_LABEL = "netmirror.dev/session"
PULL_ERRORS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
JOB_DEADLINE = 12 * 3600
JOB_TTL_AFTER_FINISHED = 60
POLL = 0.5

Progress = Callable[[str], None]


@dataclass(frozen=True)
class KubeSpec:
    """A parsed Kubernetes target."""

    kind: str
    name: str
    container: str | None = None

    def __str__(self) -> str:
        tail = f"/container/{self.container}" if self.container else ""
        return f"{self.kind}/{self.name}{tail}"


def parse_spec(spec: str) -> KubeSpec:
    """``KIND/NAME[/container/C]`` for the Kubernetes kinds."""
    parts = spec.split("/")
    if len(parts) == 2 and parts[0] in KINDS and parts[1]:
        return KubeSpec(parts[0], parts[1])
    if len(parts) == 4 and parts[0] in KINDS and parts[1] and parts[2] == "container" and parts[3]:
        return KubeSpec(parts[0], parts[1], parts[3])
    raise TargetError(
        f"target {spec!r} is not KIND/NAME or KIND/NAME/container/C (KIND: {', '.join(KINDS)})"
    )


def _api_error(exc: Exception, *, verb: str, resource: str, namespace: str) -> Exception:
    """Turn an API exception into a one-line netmirror error."""
    status = getattr(exc, "status", None)
    if status == 403:
        return TargetError(
            f"forbidden: you cannot {verb} {resource} in namespace {namespace!r} "
            "(netmirror needs the Role in manifests/rbac.yaml)"
        )
    if status == 401:
        return TargetError("the API server rejected your credentials (401): check your kubeconfig")
    reason = getattr(exc, "reason", None) or exc
    return TargetError(f"cannot {verb} {resource} in namespace {namespace!r}: {reason}")


def _ready(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp is not None or pod.status is None:
        return False
    if pod.status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def _ports(containers: list[Any]) -> list[str]:
    ports = []
    for container in containers or []:
        for port in container.ports or []:
            name = f"/{port.name}" if port.name else ""
            ports.append(f"{port.container_port}{name}")
    return ports


def _config_source() -> tuple[str | None, str | None]:
    """The kubeconfig file to use, or (in a pod) the service account's namespace."""
    first = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    kubeconfig = Path(first) if first else Path("~/.kube/config").expanduser()
    if kubeconfig.exists():
        return str(kubeconfig), None
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return None, sa_ns.read_text().strip() if sa_ns.exists() else "default"
    return None, None


class KubeCluster:
    """An API client for one kubeconfig context (or the in-cluster service account)."""

    def __init__(self, api: Any, endpoint: ApiEndpoint, namespace: str) -> None:
        self.api = api
        self.endpoint = endpoint
        self.namespace = namespace

    @classmethod
    async def connect(cls, *, context: str | None, namespace: str | None) -> KubeCluster:
        from kubernetes_asyncio import client, config

        cfg = client.Configuration()
        kubeconfig, in_cluster_ns = _config_source()
        default_ns = in_cluster_ns or "default"
        try:
            if kubeconfig is not None:
                await config.load_kube_config(
                    config_file=kubeconfig, context=context, client_configuration=cfg
                )
                contexts, current = config.list_kube_config_contexts(kubeconfig)
                chosen = next((c for c in contexts if c["name"] == context), current)
                default_ns = (chosen or {}).get("context", {}).get("namespace") or "default"
            elif in_cluster_ns is not None:
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            else:
                raise TargetError(
                    "no Kubernetes configuration: set KUBECONFIG or create ~/.kube/config"
                )
        except (config.ConfigException, OSError, ValueError) as exc:
            raise TargetError(f"cannot load the kubeconfig {kubeconfig}: {exc}") from None
        headers: dict[str, str] = {}
        token = cfg.api_key.get("BearerToken") or cfg.api_key.get("authorization")
        if token:
            headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
        ssl_ctx: ssl.SSLContext | bool | None = None
        host = str(cfg.host or "")
        if host.startswith("https"):
            if not cfg.verify_ssl:
                ssl_ctx = False
            else:
                ssl_ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
                if cfg.cert_file:
                    ssl_ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        endpoint = ApiEndpoint(base_url=host.rstrip("/"), headers=headers, ssl=ssl_ctx)
        return cls(client.ApiClient(cfg), endpoint, namespace or default_ns)

    async def close(self) -> None:
        await self.api.close()

    @property
    def core(self) -> Any:
        from kubernetes_asyncio import client

        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> Any:
        from kubernetes_asyncio import client

        return client.AppsV1Api(self.api)

    @property
    def batch(self) -> Any:
        from kubernetes_asyncio import client

        return client.BatchV1Api(self.api)

    async def _names(self, kind: str) -> list[str]:
        lister = {
            "pod": self.core.list_namespaced_pod,
            "deployment": self.apps.list_namespaced_deployment,
            "statefulset": self.apps.list_namespaced_stateful_set,
        }[kind]
        with contextlib.suppress(Exception):
            return [item.metadata.name for item in (await lister(self.namespace)).items]
        return []

    async def _not_found(self, kind: str, name: str) -> TargetError:
        close = difflib.get_close_matches(name, await self._names(kind), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return TargetError(f"{kind} {name!r} not found in namespace {self.namespace!r}{hint}")

    async def resolve(self, spec: KubeSpec, progress: Progress) -> tuple[Any, str]:
        """The running ready pod of ``spec`` and the container to target."""
        ns = self.namespace
        if spec.kind == "pod":
            try:
                pod = await self.core.read_namespaced_pod(spec.name, ns)
            except Exception as exc:
                if getattr(exc, "status", None) == 404:
                    raise await self._not_found("pod", spec.name) from None
                raise _api_error(exc, verb="get", resource="pods", namespace=ns) from None
            if not _ready(pod):
                phase = pod.status.phase if pod.status else "unknown"
                raise TargetError(f"pod {spec.name!r} is not running and ready (phase {phase})")
        else:
            reader = (
                self.apps.read_namespaced_deployment
                if spec.kind == "deployment"
                else self.apps.read_namespaced_stateful_set
            )
            try:
                owner = await reader(spec.name, ns)
            except Exception as exc:
                if getattr(exc, "status", None) == 404:
                    raise await self._not_found(spec.kind, spec.name) from None
                raise _api_error(exc, verb="get", resource=f"{spec.kind}s", namespace=ns) from None
            labels = (owner.spec.selector.match_labels or {}) if owner.spec.selector else {}
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            try:
                pods = (await self.core.list_namespaced_pod(ns, label_selector=selector)).items
            except Exception as exc:
                raise _api_error(exc, verb="list", resource="pods", namespace=ns) from None
            ready = sorted((p for p in pods if _ready(p)), key=lambda p: p.metadata.name)
            if not ready:
                states = ", ".join(
                    f"{p.metadata.name} {p.status.phase if p.status else '?'}" for p in pods
                )
                raise TargetError(
                    f"{spec.kind} {spec.name!r} has no running ready pod"
                    + (f" ({states})" if states else " (no pods)")
                )
            pod = ready[0]
            progress(
                f"{spec.kind}/{spec.name}: using pod {pod.metadata.name} "
                f"({len(ready)} of {len(pods)} ready)"
            )
        containers = [c.name for c in pod.spec.containers]
        annotations = pod.metadata.annotations or {}
        container = spec.container or annotations.get(
            "kubectl.kubernetes.io/default-container", containers[0]
        )
        if container not in containers:
            raise TargetError(
                f"pod {pod.metadata.name!r} has no container {container!r} "
                f"(it has {', '.join(containers)})"
            )
        return pod, container


def agent_args(settings: AgentSettings, port: int) -> list[str]:
    """Arguments of ``netmirror agent`` in the cluster: the token only as a digest."""
    return [
        "--session",
        settings.session,
        "--listen",
        f"tcp:127.0.0.1:{port}",
        "--ttl",
        f"{settings.ttl:g}",
        "--token-sha256",
        token_sha256(settings.token).hex(),
    ]


def ephemeral_container(
    settings: AgentSettings, *, name: str, image: str, port: int, target: str | None
) -> dict[str, Any]:
    """The ephemeral container that runs the agent in the target pod."""
    # iptables rules (NET_ADMIN) and the capture socket (NET_RAW); for netmirror exec
    # also SYS_PTRACE, which reading another user's /proc/PID/environ takes.
    capabilities = ["NET_ADMIN", "NET_RAW"]
    if settings.read_environment:
        capabilities.append("SYS_PTRACE")
    spec: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": agent_args(settings, port),
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": capabilities, "drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if target:
        spec["targetContainerName"] = target
    return spec


def agent_job(
    settings: AgentSettings,
    *,
    name: str,
    namespace: str,
    image: str,
    port: int,
    node: str,
    container_id: str,
) -> dict[str, Any]:
    """A job pod on the target's node that enters the target container's namespace."""
    labels = {**LABELS, SESSION_LABEL: settings.session}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": JOB_DEADLINE,
            "ttlSecondsAfterFinished": JOB_TTL_AFTER_FINISHED,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeName": node,
                    "hostPID": True,  # to find the target container's process
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [
                        {
                            "name": "agent",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "args": [*agent_args(settings, port), "--container-id", container_id],
                            "securityContext": {
                                "runAsUser": 0,
                                "capabilities": {
                                    # setns into another namespace needs SYS_ADMIN, and
                                    # opening /proc/PID/ns/net of another process
                                    # SYS_PTRACE; then NET_ADMIN and NET_RAW as above.
                                    "add": ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"],
                                    "drop": ["ALL"],
                                },
                            },
                        }
                    ],
                },
            },
        },
    }


class KubeAgent(AgentHandle):
    """An agent in the cluster, reached through a local port-forwarding socket."""

    def __init__(
        self,
        cluster: KubeCluster,
        forwarder: LocalForwarder,
        http: aiohttp.ClientSession,
        *,
        info: dict[str, Any],
        job: str | None,
    ) -> None:
        self.cluster = cluster
        self.forwarder = forwarder
        self.http = http
        self.info = info
        self.job = job

    def connector(self) -> aiohttp.BaseConnector:
        return aiohttp.UnixConnector(path=str(self.forwarder.path))

    @property
    def url(self) -> str:
        return "http://agent/tunnel"

    @property
    def pid(self) -> int:
        return 0

    def exit_status(self) -> int | None:
        return None

    async def stop(self, tunnel: Tunnel | None, timeout: float = 5.0) -> None:
        if tunnel is not None and not tunnel.ws.closed:
            # An ephemeral container cannot be deleted: ask the agent to remove its
            # rules and exit, and wait until it closes the tunnel.
            tunnel.conn.fail("shutdown", "the session is ending")
            tunnel.kick()
            deadline = asyncio.get_running_loop().time() + timeout
            # aiohttp gives no close event to wait on; poll the state briefly.
            while not tunnel.ws.closed and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        if self.job is not None:
            with contextlib.suppress(Exception):
                await self.cluster.batch.delete_namespaced_job(
                    self.job, self.cluster.namespace, propagation_policy="Background"
                )
        await self.forwarder.close()
        await self.http.close()
        await self.cluster.close()


class KubeTarget(Target):
    """A pod, deployment or statefulset in a cluster."""

    def __init__(
        self,
        spec: str,
        *,
        namespace: str | None,
        context: str | None,
        image: str,
        mode: str,
        port: int,
    ) -> None:
        self.spec = spec
        self.kube = parse_spec(spec)
        self.namespace = namespace
        self.context = context
        self.image = image
        self.mode = mode
        self.port = port

    def describe(self) -> str:
        where = f" in namespace {self.namespace}" if self.namespace else ""
        return f"{self.kube}{where}"

    async def start_agent(
        self, settings: AgentSettings, *, log_file: IO[bytes], progress: Progress | None = None
    ) -> AgentHandle:
        say = progress or (lambda _text: None)
        cluster = await KubeCluster.connect(context=self.context, namespace=self.namespace)
        try:
            pod, container = await cluster.resolve(self.kube, say)
            name = f"netmirror-{settings.session}-{secrets.token_hex(3)}"
            job: str | None = None
            if self.mode == "job":
                agent_pod = await self._start_job(cluster, settings, pod, container, name, say)
                job = name
            else:
                agent_pod = await self._start_ephemeral(
                    cluster, settings, pod, container, name, say
                )
        except BaseException:
            await cluster.close()
            raise
        http = aiohttp.ClientSession()
        endpoint = cluster.endpoint
        namespace = cluster.namespace

        async def opener() -> Any:
            return await open_stream(
                http, endpoint, namespace=namespace, pod=agent_pod, port=self.port
            )

        forwarder = LocalForwarder(opener, path=settings.workdir / "agent.sock")
        await forwarder.start()
        say(f"port-forwarding to {namespace}/{agent_pod}:{self.port}")
        info = {
            "pod": pod.metadata.name,
            "namespace": namespace,
            "container": container,
            "agent": name,
            "mode": self.mode,
            "node": pod.spec.node_name,
        }
        return KubeAgent(cluster, forwarder, http, info=info, job=job)

    async def _start_ephemeral(
        self,
        cluster: KubeCluster,
        settings: AgentSettings,
        pod: Any,
        container: str,
        name: str,
        say: Progress,
    ) -> str:
        ns = cluster.namespace
        spec = ephemeral_container(
            settings, name=name, image=self.image, port=self.port, target=container
        )
        say(f"adding the agent to pod {pod.metadata.name} as ephemeral container {name}")
        try:
            await cluster.core.patch_namespaced_pod_ephemeralcontainers(
                pod.metadata.name,
                ns,
                {"spec": {"ephemeralContainers": [spec]}},
                _content_type="application/strategic-merge-patch+json",
            )
        except Exception as exc:
            raise _api_error(
                exc, verb="patch", resource="pods/ephemeralcontainers", namespace=ns
            ) from None
        await self._wait_running(cluster, pod.metadata.name, name, settings, ephemeral=True)
        return str(pod.metadata.name)

    async def _start_job(
        self,
        cluster: KubeCluster,
        settings: AgentSettings,
        pod: Any,
        container: str,
        name: str,
        say: Progress,
    ) -> str:
        ns = cluster.namespace
        statuses = {s.name: s for s in (pod.status.container_statuses or [])}
        status = statuses.get(container)
        if status is None or not status.container_id:
            raise TargetError(f"container {container!r} of pod {pod.metadata.name} has no id yet")
        body = agent_job(
            settings,
            name=name,
            namespace=ns,
            image=self.image,
            port=self.port,
            node=pod.spec.node_name,
            container_id=status.container_id,
        )
        say(f"starting agent job {name} on node {pod.spec.node_name}")
        try:
            await cluster.batch.create_namespaced_job(ns, body)
        except Exception as exc:
            raise _api_error(exc, verb="create", resource="jobs", namespace=ns) from None
        deadline = asyncio.get_running_loop().time() + settings.ready_timeout
        while True:
            try:
                pods = (
                    await cluster.core.list_namespaced_pod(ns, label_selector=f"job-name={name}")
                ).items
            except Exception as exc:
                raise _api_error(exc, verb="list", resource="pods", namespace=ns) from None
            # Filtered here too: a selector the server ignored must not pick another pod.
            pods = [p for p in pods if (p.metadata.labels or {}).get("job-name") == name]
            if pods:
                agent_pod = str(pods[0].metadata.name)
                await self._wait_running(
                    cluster, agent_pod, "agent", settings, ephemeral=False, deadline=deadline
                )
                return agent_pod
            if asyncio.get_running_loop().time() > deadline:
                raise AgentError(
                    f"the agent job {name} made no pod in {settings.ready_timeout:.0f}s"
                )
            await asyncio.sleep(POLL)

    async def _wait_running(
        self,
        cluster: KubeCluster,
        pod_name: str,
        container: str,
        settings: AgentSettings,
        *,
        ephemeral: bool,
        deadline: float | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = deadline or loop.time() + settings.ready_timeout
        last = "not started"
        while loop.time() < deadline:
            try:
                pod = await cluster.core.read_namespaced_pod(pod_name, cluster.namespace)
            except Exception as exc:
                raise _api_error(
                    exc, verb="get", resource="pods", namespace=cluster.namespace
                ) from None
            statuses = (
                pod.status.ephemeral_container_statuses
                if ephemeral
                else pod.status.container_statuses
            ) or []
            status = next((s for s in statuses if s.name == container), None)
            state = status.state if status is not None else None
            if state is not None and state.running is not None:
                return
            if state is not None and state.waiting is not None:
                last = f"waiting: {state.waiting.reason}"
                if state.waiting.reason in PULL_ERRORS:
                    raise AgentError(
                        f"the agent image {self.image} cannot be pulled "
                        f"({state.waiting.reason}: {state.waiting.message or 'no details'}); "
                        "set agent.image or --agent-image"
                    )
            if state is not None and state.terminated is not None:
                t = state.terminated
                raise AgentError(f"the agent exited: {t.message or t.reason or t.exit_code}")
            await asyncio.sleep(POLL)
        raise AgentError(f"the agent was not running within {settings.ready_timeout:.0f}s ({last})")


async def list_targets(*, namespace: str | None, context: str | None) -> dict[str, Any]:
    """What ``netmirror ls`` shows: pods, deployments and statefulsets with ports."""
    cluster = await KubeCluster.connect(context=context, namespace=namespace)
    ns = cluster.namespace
    try:
        try:
            pods = (await cluster.core.list_namespaced_pod(ns)).items
        except Exception as exc:
            raise _api_error(exc, verb="list", resource="pods", namespace=ns) from None
        out: dict[str, Any] = {"namespace": ns, "targets": []}
        for kind, lister in (
            ("deployment", cluster.apps.list_namespaced_deployment),
            ("statefulset", cluster.apps.list_namespaced_stateful_set),
        ):
            try:
                items = (await lister(ns)).items
            except Exception as exc:
                raise _api_error(exc, verb="list", resource=f"{kind}s", namespace=ns) from None
            for item in items:
                ready = (item.status.ready_replicas or 0) if item.status else 0
                out["targets"].append(
                    {
                        "target": f"{kind}/{item.metadata.name}",
                        "ready": f"{ready}/{item.spec.replicas or 0}",
                        "ports": _ports(item.spec.template.spec.containers),
                    }
                )
        for pod in pods:
            out["targets"].append(
                {
                    "target": f"pod/{pod.metadata.name}",
                    "ready": "yes" if _ready(pod) else (pod.status.phase if pod.status else "?"),
                    "ports": _ports(pod.spec.containers),
                }
            )
        return out
    finally:
        await cluster.close()
