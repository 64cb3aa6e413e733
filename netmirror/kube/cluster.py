"""The Kubernetes API as netmirror uses it: kubeconfig, target lookup, listing.

Both the CLI (``netmirror ls``) and the daemon (starting an agent for a
``pod/``, ``deployment/`` or ``statefulset/`` target) talk to the API server
through :class:`KubeCluster`, built on kubernetes_asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import difflib
import functools
import json
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netmirror.errors import TargetError
from netmirror.kube.podsecurity import Policy, policy_from_labels
from netmirror.kube.portforward import ApiEndpoint

KINDS = ("pod", "deployment", "statefulset")

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


#: How the API server words a refusal by RBAC (as opposed to one by admission):
#: ``User "alice" cannot patch resource "pods/ephemeralcontainers" in API group ""``.
RBAC_DENIAL = re.compile(r"\bcannot [a-z]+ resource\b")


def status_message(exc: Exception) -> str | None:
    """The ``message`` of the Status the API server answered with, on one line."""
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    if not isinstance(body, str) or not body.strip():
        return None
    try:
        status = json.loads(body)
    except ValueError:
        return _one_line(body)[:500]
    message = status.get("message") if isinstance(status, dict) else None
    return _one_line(message) if message else None


class RefusedError(TargetError):
    """The API server refused the request, by RBAC or by admission; nothing was made."""

    def __init__(self, message: str, *, admission: bool) -> None:
        super().__init__(message)
        self.admission = admission
        """Refused by an admission controller (Pod Security, a webhook), not by RBAC."""


def api_error(
    exc: Exception,
    *,
    verb: str,
    resource: str,
    namespace: str,
    role: str = "the Role in manifests/rbac.yaml",
) -> Exception:
    """Turn an API exception into a one-line netmirror error.

    A refusal by RBAC says which role is missing (``role``). A refusal by an
    admission controller (Pod Security, a Kyverno or Gatekeeper webhook) is shown
    in the server's own words.
    """
    status = getattr(exc, "status", None)
    message = status_message(exc)
    if status == 401:
        return TargetError("the API server rejected your credentials (401): check your kubeconfig")
    if status == 403 and (message is None or RBAC_DENIAL.search(message)):
        return RefusedError(
            f"forbidden: you cannot {verb} {resource} in namespace {namespace!r} "
            f"(netmirror needs {role})",
            admission=False,
        )
    if message and status is not None and status >= 400:
        hint = ""
        if "violates PodSecurity" in message:
            hint = " (see docs/kubernetes.md, Locked-down clusters)"
        text = (
            f"the API server refused to {verb} {resource} in namespace {namespace!r}: "
            f"{message}{hint}"
        )
        # 400, 403 and 422 are the codes of admission's refusals; others are failures.
        if status in (400, 403, 422):
            return RefusedError(text, admission=True)
        return TargetError(text)
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


#: A token read from a file (``user.tokenFile``, the in-cluster service account token)
#: is used this many seconds before the file is read again; a 401 re-reads it at once.
TOKEN_FILE_TTL = 60.0
#: A token from an exec plugin is renewed this many seconds before it expires, at most
#: (at least a quarter of its lifetime before).
EXPIRY_MARGIN = 60.0
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class Credentials:
    """The bearer token of a kubeconfig user (or the service account), kept fresh.

    A token from an exec plugin (EKS, GKE, ...) is renewed before it expires, a token
    file (``user.tokenFile``, a rotating projected service-account token) is read again
    every :data:`TOKEN_FILE_TTL` seconds; both are renewed at once with ``force`` (after
    the API server answered 401). A static token, client certificates or no
    credentials at all never change: then :attr:`refreshable` is false.
    """

    def __init__(
        self,
        cfg: Any,
        *,
        loader: Any = None,
        token_file: str | None = None,
    ) -> None:
        """``cfg`` is the kubernetes_asyncio Configuration the token is kept in; ``loader``
        the KubeConfigLoader that filled it (from ``load_kube_config``); ``token_file``
        a file to read the token from (the in-cluster service account's)."""
        self.cfg = cfg
        self._loader = loader
        self._token_file = token_file
        user = getattr(loader, "_user", None) if loader is not None else None
        self._exec = user is not None and "exec" in user
        # The loader prefers an inline token over tokenFile, as client-go does.
        self._user_token_file = (
            user is not None and not self._exec and "tokenFile" in user and "token" not in user
        )
        self._token: str | None = self._configured_token()
        if self._token:
            cfg.api_key["BearerToken"] = self._token
        self._fetched = time.time()
        self._expires: float | None = None
        if self._exec:
            expiry = getattr(loader, "exec_plugin_expiry", None)
            if isinstance(expiry, datetime.datetime):
                self._expires = expiry.timestamp()
        self._lock = asyncio.Lock()
        self._generation = 0

    @property
    def refreshable(self) -> bool:
        """Whether the token can change (exec plugin or token file)."""
        return self._exec or self._user_token_file or self._token_file is not None

    def _configured_token(self) -> str | None:
        token = self.cfg.api_key.get("BearerToken") or self.cfg.api_key.get("authorization")
        if not token:
            return None
        # kubernetes_asyncio keeps the newline a token file ends with; client-go trims it.
        token = str(token).strip()
        return token if " " in token else f"Bearer {token}"

    def _stale(self) -> bool:
        now = time.time()
        if self._exec:
            if self._expires is None:
                # No expiry given: the token is used until the server rejects it.
                return self._token is None
            margin = min(EXPIRY_MARGIN, max(self._expires - self._fetched, 0.0) / 4)
            return now >= self._expires - margin
        return now - self._fetched >= TOKEN_FILE_TTL

    async def _refresh(self) -> None:
        loader = self._loader
        try:
            if self._exec:
                # Bypass the loader's own cache: it considers a token expired 5 minutes
                # early (so a short-lived one always), and a forced refresh must run.
                with contextlib.suppress(AttributeError):
                    del loader.exec_plugin_expiry
                await loader.load_from_exec_plugin()
                token = getattr(loader, "token", None)
                expiry = getattr(loader, "exec_plugin_expiry", None)
                self._expires = (
                    expiry.timestamp() if isinstance(expiry, datetime.datetime) else None
                )
            elif self._user_token_file:
                loader._load_user_token()
                token = str(getattr(loader, "token", "") or "").strip()
            else:
                assert self._token_file is not None
                content = (await asyncio.to_thread(Path(self._token_file).read_text)).strip()
                token = f"Bearer {content}" if content else None
        except Exception as exc:
            source = "the exec plugin" if self._exec else "the token file"
            raise TargetError(
                f"cannot refresh the Kubernetes credentials from {source}: {_one_line(exc)}"
            ) from None
        self._fetched = time.time()
        self._generation += 1
        if token:
            self._token = str(token)
            self.cfg.api_key["BearerToken"] = self._token

    async def token(self, *, force: bool = False) -> str | None:
        """The ``Authorization`` value to send (``Bearer ...``), or None.

        ``force`` renews a refreshable token even if it looks valid, unless another
        caller renewed it while this one waited.
        """
        if not self.refreshable:
            return self._token
        generation = self._generation
        async with self._lock:
            if force and generation != self._generation:
                pass  # renewed by another caller in the meantime
            elif force or self._stale():
                await self._refresh()
            return self._token

    async def headers(self, *, force: bool = False) -> dict[str, str]:
        """HTTP headers carrying the credentials; see :meth:`token`."""
        token = await self.token(force=force)
        return {"Authorization": token} if token else {}

    async def refresh_hook(self, cfg: Any) -> None:
        """``Configuration.refresh_api_key_hook``: awaited before every REST request."""
        token = await self.token()
        if token:
            cfg.api_key["BearerToken"] = token


@functools.cache
def _retrying_client_class() -> type[Any]:
    """An ApiClient that renews the credentials and retries once after a 401."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    class RetryingApiClient(client.ApiClient):
        credentials: Credentials | None = None

        def call_api(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("async_req") or self.credentials is None:
                return super().call_api(*args, **kwargs)
            return self._call_retrying(self.credentials, args, kwargs)

        async def _call_retrying(
            self, credentials: Credentials, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            try:
                result = await super().call_api(*args, **kwargs)
            except ApiException as exc:
                if exc.status != 401:
                    raise
            else:
                # Unread responses (watches) carry their status instead of raising.
                if getattr(result, "status", None) != 401 or kwargs.get("_preload_content", True):
                    return result
                result.release()
            await credentials.headers(force=True)
            return await super().call_api(*args, **kwargs)

    return RetryingApiClient


class KubeCluster:
    """An API client for one kubeconfig context (or the in-cluster service account)."""

    def __init__(
        self,
        api: Any,
        endpoint: ApiEndpoint,
        namespace: str,
        credentials: Credentials | None = None,
    ) -> None:
        self.api = api
        self.endpoint = endpoint
        self.namespace = namespace
        self.credentials = credentials

    @classmethod
    async def connect(cls, *, context: str | None, namespace: str | None) -> KubeCluster:
        from kubernetes_asyncio import client, config

        cfg = client.Configuration()
        kubeconfig, in_cluster_ns = _config_source()
        default_ns = in_cluster_ns or "default"
        loader: Any = None
        token_file: str | None = None
        try:
            if kubeconfig is not None:
                loader = await config.load_kube_config(
                    config_file=kubeconfig, context=context, client_configuration=cfg
                )
                contexts, current = config.list_kube_config_contexts(kubeconfig)
                chosen = next((c for c in contexts if c["name"] == context), current)
                default_ns = (chosen or {}).get("context", {}).get("namespace") or "default"
            elif in_cluster_ns is not None:
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
                token_file = SERVICE_ACCOUNT_TOKEN  # projected: the kubelet rotates it
            else:
                raise TargetError(
                    "no Kubernetes configuration: set KUBECONFIG or create ~/.kube/config"
                )
        except (config.ConfigException, OSError, ValueError) as exc:
            raise TargetError(f"cannot load the kubeconfig {kubeconfig}: {exc}") from None
        credentials = Credentials(cfg, loader=loader, token_file=token_file)
        headers: dict[str, str] = {}
        if credentials.refreshable:
            cfg.refresh_api_key_hook = credentials.refresh_hook
        else:
            headers = await credentials.headers()
        ssl_ctx: ssl.SSLContext | bool | None = None
        host = str(cfg.host or "")
        if host.startswith("https"):
            if not cfg.verify_ssl:
                ssl_ctx = False
            else:
                ssl_ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
                if cfg.cert_file:
                    ssl_ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        endpoint = ApiEndpoint(
            base_url=host.rstrip("/"),
            headers=headers,
            ssl=ssl_ctx,
            auth=credentials.headers if credentials.refreshable else None,
        )
        api = _retrying_client_class()(cfg)
        api.credentials = credentials if credentials.refreshable else None
        return cls(api, endpoint, namespace or default_ns, credentials)

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

    async def pod_security(self, namespace: str, *, missing: str | None = None) -> Policy | None:
        """The Pod Security labels of ``namespace``; None when they cannot be read.

        Reading a namespace is a cluster-scoped permission many users lack: then
        the API server alone decides. With ``missing``, a namespace that does not
        exist is an error saying that.
        """
        try:
            found = await self.core.read_namespace(namespace)
        except Exception as exc:
            if missing is not None and getattr(exc, "status", None) == 404:
                raise TargetError(f"namespace {namespace!r} does not exist: {missing}") from None
            return None
        labels = found.metadata.labels if found.metadata is not None else None
        return policy_from_labels(namespace, labels)

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
                raise api_error(exc, verb="get", resource="pods", namespace=ns) from None
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
                raise api_error(exc, verb="get", resource=f"{spec.kind}s", namespace=ns) from None
            labels = (owner.spec.selector.match_labels or {}) if owner.spec.selector else {}
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            try:
                pods = (await self.core.list_namespaced_pod(ns, label_selector=selector)).items
            except Exception as exc:
                raise api_error(exc, verb="list", resource="pods", namespace=ns) from None
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


async def list_targets(*, namespace: str | None, context: str | None) -> dict[str, Any]:
    """What ``netmirror ls`` shows: pods, deployments and statefulsets with ports."""
    cluster = await KubeCluster.connect(context=context, namespace=namespace)
    ns = cluster.namespace
    try:
        try:
            pods = (await cluster.core.list_namespaced_pod(ns)).items
        except Exception as exc:
            raise api_error(exc, verb="list", resource="pods", namespace=ns) from None
        out: dict[str, Any] = {"namespace": ns, "targets": []}
        for kind, lister in (
            ("deployment", cluster.apps.list_namespaced_deployment),
            ("statefulset", cluster.apps.list_namespaced_stateful_set),
        ):
            try:
                items = (await lister(ns)).items
            except Exception as exc:
                raise api_error(exc, verb="list", resource=f"{kind}s", namespace=ns) from None
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
