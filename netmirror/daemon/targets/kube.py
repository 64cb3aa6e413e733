"""Kubernetes targets: ``pod/NAME``, ``deployment/NAME``, ``statefulset/NAME``,
each optionally ``.../container/C``; and ``targetless``.

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
import functools
import logging
import math
import re
import secrets
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

import aiohttp

from netmirror.config.model import DEFAULT_AGENT_IMAGE
from netmirror.daemon.targets.base import AgentHandle, AgentSettings, Target
from netmirror.errors import AgentError, TargetError
from netmirror.kube.cluster import KubeCluster, Progress, RefusedError, api_error, parse_spec
from netmirror.kube.podsecurity import Policy, summary, violations
from netmirror.kube.portforward import LocalForwarder, open_stream
from netmirror.wire.connection import token_sha256

if TYPE_CHECKING:
    from netmirror.tunnel import Tunnel

log = logging.getLogger(__name__)

LABELS = {"app.kubernetes.io/part-of": "netmirror"}
SESSION_LABEL = "netmirror.dev/session"
PULL_ERRORS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
JOB_DEADLINE = 12 * 3600
JOB_TTL_AFTER_FINISHED = 60
#: Seconds to wait before watching again after a watch that ended sooner than that.
WATCH_MIN_LIFETIME = 1.0
#: Seconds between looks at a starting job's events (a pod admission refused).
JOB_EVENTS_INTERVAL = 1.0
#: The agent namespace of manifests/agent-namespace.yaml, named in hints.
SUGGESTED_AGENT_NAMESPACE = "netmirror"
AGENT_NAMESPACE_MANIFEST = "manifests/agent-namespace.yaml"
AGENT_NAMESPACE_ROLE = f"the Role netmirror-agent in {AGENT_NAMESPACE_MANIFEST}"


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
        "--in-container",
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
    return _job(
        name=name,
        namespace=namespace,
        labels={**LABELS, SESSION_LABEL: settings.session},
        pod={
            "nodeName": node,
            "hostPID": True,  # to find the target container's process
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
    )


#: The user a targetless agent runs as: it needs no privilege at all.
TARGETLESS_USER = 65532


def targetless_job(
    settings: AgentSettings, *, name: str, namespace: str, image: str, port: int
) -> dict[str, Any]:
    """A job whose pod runs only the agent: no target, so no capability and no root.

    It passes the ``restricted`` Pod Security Standard: non-root, no privilege
    escalation, every capability dropped, the runtime's default seccomp profile.
    """
    return _job(
        name=name,
        namespace=namespace,
        labels={**LABELS, SESSION_LABEL: settings.session, "netmirror.dev/targetless": "true"},
        pod={
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": TARGETLESS_USER,
                "runAsGroup": TARGETLESS_USER,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "agent",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "args": [*agent_args(settings, port), "--targetless"],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    )


def _job(
    *, name: str, namespace: str, labels: dict[str, str], pod: dict[str, Any]
) -> dict[str, Any]:
    """A Job of one agent pod that runs once, is bounded in time and collected after."""
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
                "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False, **pod},
            },
        },
    }


def volume_paths(pod: Any, container: str) -> list[str]:
    """Where the target container mounts its volumes (ConfigMaps, Secrets, the
    service-account token, emptyDirs, claims), from the pod's spec."""
    for spec in pod.spec.containers or []:
        if spec.name == container:
            return [m.mount_path for m in spec.volume_mounts or [] if m.mount_path]
    return []


def probes(pod: Any, container: str) -> dict[int, list[str]]:
    """The kubelet's probes of the target container, by port: ``{8080: ["readiness
    httpGet /healthz"]}``. Named ports are looked up in the container's ports; exec
    probes have no port and are not listed."""
    found: dict[int, list[str]] = {}
    for spec in pod.spec.containers or []:
        if spec.name != container:
            continue
        named = {p.name: p.container_port for p in spec.ports or [] if p.name}
        for kind in ("liveness", "readiness", "startup"):
            probe = getattr(spec, f"{kind}_probe", None)
            if probe is None:
                continue
            for how, action in (
                ("httpGet", probe.http_get),
                ("tcpSocket", probe.tcp_socket),
                ("grpc", probe.grpc),
            ):
                if action is None:
                    continue
                port = action.port
                if isinstance(port, str):
                    port = int(port) if port.isdigit() else named.get(port)
                if isinstance(port, int):
                    path = f" {action.path or '/'}" if how == "httpGet" else ""
                    found.setdefault(port, []).append(f"{kind} {how}{path}")
    return found


def mesh_hint(pod: Any) -> str | None:
    """The mesh a pod's containers and annotations say it is in, in words, if any."""
    annotations = (pod.metadata.annotations if pod.metadata is not None else None) or {}
    labels = (pod.metadata.labels if pod.metadata is not None else None) or {}
    names = {c.name for c in [*(pod.spec.containers or []), *(pod.spec.init_containers or [])]}
    if (
        annotations.get("ambient.istio.io/redirection") == "enabled"
        or labels.get("istio.io/dataplane-mode") == "ambient"
    ):
        return "Istio ambient mode"
    if "istio-proxy" in names or "sidecar.istio.io/status" in annotations:
        return "Istio sidecar"
    if "linkerd-proxy" in names or "linkerd.io/proxy-version" in annotations:
        return "Linkerd proxy"
    if "kuma-sidecar" in names or "kuma.io/sidecar-injected" in annotations:
        return "Kuma sidecar"
    return None


def node_addresses(pod: Any) -> list[str]:
    """Where the kubelet's probes come from: the addresses of the pod's node."""
    status = pod.status
    if status is None:
        return []
    addresses = [ip.ip for ip in getattr(status, "host_ips", None) or [] if ip.ip]
    if status.host_ip and status.host_ip not in addresses:
        addresses.insert(0, status.host_ip)
    return addresses


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
        job_namespace: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.forwarder = forwarder
        self.http = http
        self.info = info
        self.job = job
        self.job_namespace = job_namespace or cluster.namespace

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
                    self.job, self.job_namespace, propagation_policy="Background"
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
        agent_namespace: str | None = None,
    ) -> None:
        self.spec = spec
        self.agent_namespace = agent_namespace
        """Where job-mode agents run (a namespace labelled privileged), if not the target's."""
        self.targetless = spec == "targetless"
        self.kube = None if self.targetless else parse_spec(spec)
        self.namespace = namespace
        self.context = context
        self.image = image
        self.mode = mode
        self.port = port

    def describe(self) -> str:
        where = f" in namespace {self.namespace}" if self.namespace else ""
        if self.targetless:
            return f"a pod of its own (targetless){where}"
        return f"{self.kube}{where}"

    async def start_agent(
        self,
        settings: AgentSettings,
        *,
        log_file: IO[bytes],
        progress: Progress | None = None,
        warn: Progress | None = None,
    ) -> AgentHandle:
        say = progress or (lambda _text: None)
        cluster = await KubeCluster.connect(context=self.context, namespace=self.namespace)
        if self.targetless:
            return await self._start_targetless(cluster, settings, say)
        assert self.kube is not None
        try:
            pod, container = await cluster.resolve(self.kube, say)
            self.volume_paths = volume_paths(pod, container)
            self.probes = probes(pod, container)
            self.probe_sources = node_addresses(pod)
            self.mesh_hint = mesh_hint(pod)
            name = f"netmirror-{settings.session}-{secrets.token_hex(3)}"
            warned = warn or say
            mode, job_ns = await self._admission(
                cluster, settings, pod, container, name, say, warned
            )
            job: str | None = None
            if mode == "ephemeral":
                try:
                    agent_pod = await self._start_ephemeral(
                        cluster, settings, pod, container, name, say
                    )
                except RefusedError as refused:
                    # Refused before anything was made (labels that could not be read,
                    # a cluster-wide default level, a webhook, a role without the
                    # patch): the agent namespace is the way through.
                    if self.agent_namespace is None:
                        raise
                    mode, job_ns = "job", self.agent_namespace
                    warned(f"{refused}: running the agent as a job in namespace {job_ns!r} instead")
                    await self._job_admission(cluster, settings, pod, name, job_ns, None, warned)
            if mode == "job":
                agent_pod = await self._start_job(
                    cluster, settings, pod, container, name, say, namespace=job_ns
                )
                job = name
        except BaseException:
            await cluster.close()
            raise
        http = aiohttp.ClientSession()
        endpoint = cluster.endpoint
        namespace = cluster.namespace
        agent_ns = job_ns if job else namespace

        async def opener() -> Any:
            return await open_stream(
                http, endpoint, namespace=agent_ns, pod=agent_pod, port=self.port
            )

        forwarder = LocalForwarder(opener, path=settings.workdir / "agent.sock")
        try:
            await forwarder.start()
        except BaseException:
            if job is not None:
                with contextlib.suppress(Exception):
                    await cluster.batch.delete_namespaced_job(
                        job, agent_ns, propagation_policy="Background"
                    )
            await http.close()
            await cluster.close()
            raise
        say(f"port-forwarding to {agent_ns}/{agent_pod}:{self.port}")
        info = {
            "pod": pod.metadata.name,
            "namespace": namespace,
            "container": container,
            "agent": name,
            "mode": mode,
            "node": pod.spec.node_name,
        }
        if job and agent_ns != namespace:
            info["agent_namespace"] = agent_ns
        return KubeAgent(cluster, forwarder, http, info=info, job=job, job_namespace=agent_ns)

    async def _admission(
        self,
        cluster: KubeCluster,
        settings: AgentSettings,
        pod: Any,
        container: str,
        name: str,
        say: Progress,
        warn: Progress,
    ) -> tuple[str, str]:
        """The agent mode and the job's namespace that Pod Security admission lets in.

        Reads the Pod Security labels of the namespaces involved (when allowed to)
        and checks the agent's spec against them before anything is created: a level
        that would reject it is a one-line error with the way through, or, with an
        agent namespace configured, the reason to run the agent there instead; a
        ``warn`` or ``audit`` level it violates is a warning.
        """
        target_ns = cluster.namespace
        policy = await cluster.pod_security(target_ns)
        mode = self.mode
        if mode == "ephemeral":
            spec = {
                "securityContext": _pod_security_context(cluster, pod),
                "ephemeralContainers": [
                    ephemeral_container(
                        settings, name=name, image=self.image, port=self.port, target=container
                    )
                ],
            }
            found = violations(spec, policy.enforce) if policy is not None else []
            if policy is not None and found:
                reason = (
                    f'namespace {target_ns!r} enforces Pod Security "{policy.enforce}", '
                    f"which rejects the agent's {summary(found)}"
                )
                if self.agent_namespace is None:
                    if await self._admitted_anyway(cluster, pod, spec):
                        # Exempt (the admission configuration names the user, the
                        # namespace or the runtime class): the labels do not say so.
                        warn(f"{reason}, but admits it for you (an exemption)")
                        return mode, target_ns
                    raise TargetError(
                        f"{reason}; use --agent-mode job --agent-namespace "
                        f"{SUGGESTED_AGENT_NAMESPACE} (see {AGENT_NAMESPACE_MANIFEST})"
                    )
                warn(
                    f"{reason}: running the agent as a job in namespace "
                    f"{self.agent_namespace!r} instead"
                )
                mode = "job"
            elif policy is not None:
                _warn_levels(policy, spec, "the agent's ephemeral container", warn)
        job_ns = self.agent_namespace or target_ns
        if mode == "job":
            await self._job_admission(cluster, settings, pod, name, job_ns, policy, warn)
        return mode, job_ns

    async def _admitted_anyway(self, cluster: KubeCluster, pod: Any, spec: dict[str, Any]) -> bool:
        """Whether the API server admits the ephemeral agent its labels say it rejects.

        Asked with a dry run, which passes admission and changes nothing. Any
        failure (a webhook without dry-run support, no right to patch) is a no.
        """
        try:
            await _add_ephemeral(cluster, pod, spec["ephemeralContainers"][0], dry_run=True)
        except Exception as exc:
            log.debug("the dry run of the ephemeral agent was refused: %s", exc)
            return False
        return True

    async def _job_admission(
        self,
        cluster: KubeCluster,
        settings: AgentSettings,
        pod: Any,
        name: str,
        job_ns: str,
        target_policy: Policy | None,
        warn: Progress,
    ) -> None:
        """Refuses (one line, with the fix) an agent job the namespace would reject."""
        target_ns = cluster.namespace
        job_policy = target_policy
        if job_ns != target_ns:
            job_policy = await cluster.pod_security(
                job_ns, missing=f"create it with `kubectl apply -f {AGENT_NAMESPACE_MANIFEST}`"
            )
        body = agent_job(
            settings,
            name=name,
            namespace=job_ns,
            image=self.image,
            port=self.port,
            node=pod.spec.node_name or "",
            container_id="",
        )
        pod_spec = body["spec"]["template"]["spec"]
        found = violations(pod_spec, job_policy.enforce) if job_policy is not None else []
        if job_policy is not None and found:
            rejects = (
                f'enforces Pod Security "{job_policy.enforce}", which rejects the agent '
                f"job's {summary(found)}"
            )
            if job_ns == target_ns:
                raise TargetError(
                    f"namespace {job_ns!r} {rejects}; use --agent-namespace "
                    f"{SUGGESTED_AGENT_NAMESPACE}, a namespace labelled privileged "
                    f"(see {AGENT_NAMESPACE_MANIFEST})"
                )
            raise TargetError(
                f"the agent namespace {job_ns!r} {rejects}; label it "
                f"pod-security.kubernetes.io/enforce=privileged (see {AGENT_NAMESPACE_MANIFEST})"
            )
        if job_policy is not None:
            _warn_levels(job_policy, pod_spec, "the agent job", warn)

    async def _start_targetless(
        self, cluster: KubeCluster, settings: AgentSettings, say: Progress
    ) -> AgentHandle:
        """A job of the agent alone, in the namespace; deleted when the session ends."""
        name = f"netmirror-{settings.session}-{secrets.token_hex(3)}"
        ns = cluster.namespace
        body = targetless_job(settings, name=name, namespace=ns, image=self.image, port=self.port)
        http: aiohttp.ClientSession | None = None
        created = False
        try:
            say(f"starting agent job {name} in namespace {ns} (targetless)")
            try:
                await cluster.batch.create_namespaced_job(ns, body)
            except Exception as exc:
                raise api_error(exc, verb="create", resource="jobs", namespace=ns) from None
            created = True
            agent_pod = await self._wait_job_pod(cluster, name, settings, namespace=ns)
            http = aiohttp.ClientSession()
            session = http
            endpoint = cluster.endpoint

            async def opener() -> Any:
                return await open_stream(
                    session, endpoint, namespace=ns, pod=agent_pod, port=self.port
                )

            forwarder = LocalForwarder(opener, path=settings.workdir / "agent.sock")
            await forwarder.start()
        except BaseException:
            if created:
                with contextlib.suppress(Exception):
                    await cluster.batch.delete_namespaced_job(
                        name, ns, propagation_policy="Background"
                    )
            if http is not None:
                await http.close()
            await cluster.close()
            raise
        say(f"port-forwarding to {ns}/{agent_pod}:{self.port}")
        info = {"pod": agent_pod, "namespace": ns, "agent": name, "mode": "targetless"}
        return KubeAgent(cluster, forwarder, http, info=info, job=name)

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
            await _add_ephemeral(cluster, pod, spec)
        except Exception as exc:
            raise api_error(
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
        *,
        namespace: str | None = None,
    ) -> str:
        ns = namespace or cluster.namespace
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
        where = f" in namespace {ns}" if ns != cluster.namespace else ""
        say(f"starting agent job {name}{where} on node {pod.spec.node_name}")
        role = AGENT_NAMESPACE_ROLE if ns != cluster.namespace else "the Role netmirror-job-mode"
        try:
            await cluster.batch.create_namespaced_job(ns, body)
        except Exception as exc:
            raise api_error(exc, verb="create", resource="jobs", namespace=ns, role=role) from None
        try:
            return await self._wait_job_pod(cluster, name, settings, namespace=ns)
        except BaseException:
            with contextlib.suppress(Exception):
                await cluster.batch.delete_namespaced_job(name, ns, propagation_policy="Background")
            raise

    async def _wait_job_pod(
        self,
        cluster: KubeCluster,
        name: str,
        settings: AgentSettings,
        *,
        namespace: str | None = None,
    ) -> str:
        """The name of the job's pod, once its agent runs.

        A pod the job controller could not create (admission refused it: Pod
        Security, a policy webhook) shows only in the job's events: they are read
        meanwhile, and the refusal is the error, in the server's words.
        """
        ns = namespace or cluster.namespace
        deadline = asyncio.get_running_loop().time() + settings.ready_timeout
        found: list[str] = []  # the job's pod, once seen
        last = ["not started"]

        def done(pod: Any) -> bool:
            # Filtered here too: a selector the server ignored must not pick another pod.
            if (pod.metadata.labels or {}).get("job-name") != name:
                return False
            if not found:
                found.append(str(pod.metadata.name))
            elif pod.metadata.name != found[0]:
                return False
            return self._agent_running(pod, "agent", ephemeral=False, last=last)

        watch = asyncio.ensure_future(
            _watch_pods(
                cluster, done, deadline=deadline, label_selector=f"job-name={name}", namespace=ns
            )
        )
        failures: list[str] = []  # the job controller's failures to create it, if any
        refusal = asyncio.ensure_future(_job_refusal(cluster, ns, name, found, failures))
        try:
            await asyncio.wait({watch, refusal}, return_when=asyncio.FIRST_COMPLETED)
            if refusal.done() and not refusal.cancelled() and refusal.result() and not watch.done():
                raise AgentError(
                    f"the agent job {name} in namespace {ns!r} cannot create its pod: "
                    f"{refusal.result()}"
                )
            await watch
        except TimeoutError:
            if not found:
                why = f": {failures[-1]}" if failures else ""
                raise AgentError(
                    f"the agent job {name} made no pod in {settings.ready_timeout:.0f}s{why}"
                ) from None
            raise AgentError(
                f"the agent was not running within {settings.ready_timeout:.0f}s ({last[0]})"
            ) from None
        finally:
            for task in (watch, refusal):
                task.cancel()
            await asyncio.gather(watch, refusal, return_exceptions=True)
        return found[0]

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
        last = ["not started"]

        def done(pod: Any) -> bool:
            if pod.metadata.name != pod_name:  # a field selector the server ignored
                return False
            return self._agent_running(pod, container, ephemeral=ephemeral, last=last)

        try:
            await _watch_pods(
                cluster, done, deadline=deadline, field_selector=f"metadata.name={pod_name}"
            )
        except TimeoutError:
            raise AgentError(
                f"the agent was not running within {settings.ready_timeout:.0f}s ({last[0]})"
            ) from None

    def _agent_running(self, pod: Any, container: str, *, ephemeral: bool, last: list[str]) -> bool:
        """Whether the agent container of ``pod`` runs; raises if it never will.

        ``last[0]`` is set to the state it is waiting in, for the timeout's message.
        """
        if pod.status is None:
            return False
        statuses = (
            pod.status.ephemeral_container_statuses if ephemeral else pod.status.container_statuses
        ) or []
        status = next((s for s in statuses if s.name == container), None)
        state = status.state if status is not None else None
        if state is None:
            return False
        if state.running is not None:
            return True
        if state.waiting is not None:
            last[0] = f"waiting: {state.waiting.reason}"
            if state.waiting.reason in PULL_ERRORS:
                why = f"{state.waiting.reason}: {state.waiting.message or 'no details'}"
                if self.image == DEFAULT_AGENT_IMAGE:
                    # No registry holds the default: say how to make one that exists.
                    raise AgentError(
                        f"no agent image is configured and the default {self.image} cannot "
                        f"be pulled ({why}); build it with `make agent-image`, push it to a "
                        "registry your nodes can pull from, and set agent.image or "
                        "--agent-image (README: The agent image)"
                    )
                raise AgentError(
                    f"the agent image {self.image} cannot be pulled ({why}); "
                    "set agent.image or --agent-image"
                )
        if state.terminated is not None:
            t = state.terminated
            why = str(t.message or t.reason or t.exit_code)
            if "cannot listen" in why:
                why += f" (something else in the pod uses port {self.port}: set agent.port)"
            raise AgentError(f"the agent exited: {why}")
        return False


def _lowercase_watch(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` sending ``watch=true`` as client-go does, not Python's ``True``.

    API servers accept both; the emulator used in the tests only the former. The
    docstring is kept: Watch reads the type of the events from it.
    """

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("watch") is True:
            kwargs["watch"] = "true"
        return func(*args, **kwargs)

    return call


async def _watch_pods(
    cluster: KubeCluster,
    done: Callable[[Any], bool],
    *,
    deadline: float,
    field_selector: str | None = None,
    label_selector: str | None = None,
    namespace: str | None = None,
) -> None:
    """Return once ``done(pod)`` is true for a pod of the namespace; it may raise.

    The pods are listed first (one already in its final state is not missed), then
    watched from the listing's version; a watch the server ends is resumed with a new
    listing. Raises :class:`TimeoutError` at ``deadline`` (event loop time) and a
    one-line error when the API server refuses. ``done`` sees every pod the server
    sends: it must check the name or labels itself.
    """
    from kubernetes_asyncio import watch
    from kubernetes_asyncio.client.exceptions import ApiException

    ns = namespace or cluster.namespace
    role = AGENT_NAMESPACE_ROLE if ns != cluster.namespace else "the Role in manifests/rbac.yaml"

    def refused(exc: Exception, verb: str) -> Exception:
        return api_error(exc, verb=verb, resource="pods", namespace=ns, role=role)

    selectors: dict[str, str] = {}
    if field_selector is not None:
        selectors["field_selector"] = field_selector
    if label_selector is not None:
        selectors["label_selector"] = label_selector
    loop = asyncio.get_running_loop()
    async with asyncio.timeout_at(deadline):
        while True:
            try:
                listing = await cluster.core.list_namespaced_pod(ns, **selectors)
            except Exception as exc:
                raise refused(exc, "list") from None
            if any(done(pod) for pod in listing.items or []):
                return
            version = listing.metadata.resource_version if listing.metadata else None
            started = loop.time()
            remaining = max(1, math.ceil(deadline - started))
            async with watch.Watch() as pods:
                stream = pods.stream(
                    _lowercase_watch(cluster.core.list_namespaced_pod),
                    ns,
                    resource_version=version,
                    timeout_seconds=remaining,
                    **selectors,
                )
                try:
                    async for event in stream:
                        if event["type"] in ("ADDED", "MODIFIED") and done(event["object"]):
                            return
                except ApiException as exc:
                    if exc.status != 410:  # 410 Gone: the version is too old; list again
                        raise refused(exc, "watch") from None
                except (aiohttp.ClientError, OSError) as exc:
                    raise refused(exc, "watch") from None
            log.debug("the watch of pods in %s ended; listing again", ns)
            if loop.time() - started < WATCH_MIN_LIFETIME:
                # A server that ends every watch at once must not be hammered.
                await asyncio.sleep(WATCH_MIN_LIFETIME)


#: How a ``FailedCreate`` event words a refusal that stays (admission, quota), as
#: opposed to a failure the job controller retries (a webhook that timed out).
JOB_REFUSED = re.compile(r"\bis forbidden\b|\bdenied the request\b|violates PodSecurity")


async def _job_refusal(
    cluster: KubeCluster, ns: str, job: str, found: list[str], failures: list[str]
) -> str | None:
    """The message of the job's first ``FailedCreate`` event that is a refusal.

    Other failures to create the pod, which the job controller retries, are put
    in ``failures`` (for the timeout's message). Returns None at once when the
    events may not be read (the watch alone decides then); a failure to read
    them is retried. Waits forever once the job's pod exists.
    """
    while not found:
        try:
            events = await cluster.core.list_namespaced_event(
                ns, field_selector=f"involvedObject.name={job}"
            )
        except Exception as exc:
            log.debug("cannot read the events of job %s: %s", job, exc)
            if getattr(exc, "status", None) in (401, 403):
                return None
            await asyncio.sleep(JOB_EVENTS_INTERVAL)
            continue
        for event in events.items or []:
            involved = event.involved_object
            if event.reason == "FailedCreate" and involved is not None and involved.name == job:
                message = " ".join(str(event.message or "no message").split())
                if JOB_REFUSED.search(message):
                    return message
                if message not in failures:
                    failures.append(message)
        await asyncio.sleep(JOB_EVENTS_INTERVAL)
    await asyncio.Event().wait()
    return None


async def _add_ephemeral(
    cluster: KubeCluster, pod: Any, container: dict[str, Any], *, dry_run: bool = False
) -> None:
    """Add ``container`` to ``pod`` as an ephemeral container (a dry run: only judged)."""
    options = {"dry_run": "All"} if dry_run else {}
    await cluster.core.patch_namespaced_pod_ephemeralcontainers(
        pod.metadata.name,
        cluster.namespace,
        {"spec": {"ephemeralContainers": [container]}},
        _content_type="application/strategic-merge-patch+json",
        **options,
    )


def _pod_security_context(cluster: KubeCluster, pod: Any) -> dict[str, Any]:
    """The target pod's own securityContext as a dict (it applies to an ephemeral container)."""
    context = pod.spec.security_context if pod.spec is not None else None
    if context is None:
        return {}
    data = cluster.api.sanitize_for_serialization(context)
    return data if isinstance(data, dict) else {}


def _warn_levels(policy: Policy, spec: dict[str, Any], what: str, warn: Progress) -> None:
    """A warning for each ``warn``/``audit`` level of ``policy`` that ``spec`` violates."""
    for mode, verb in (("warn", "warns"), ("audit", "audits")):
        level = policy.levels.get(mode)
        if level is None:
            continue
        found = violations(spec, level)
        if found:
            warn(
                f'namespace {policy.namespace!r} {verb} on Pod Security "{level}" '
                f"(pod-security.kubernetes.io/{mode}): {what} violates it with "
                f"{summary(found)}; it is admitted, going on"
            )
