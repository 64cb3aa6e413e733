"""manifests/: every field is one the Kubernetes API knows, kubectl accepts the files, and the
RBAC rules are exactly the minimal ones netmirror needs.

Field names and types are checked against the kubernetes_asyncio models (``openapi_types`` and
``attribute_map``), recursively. kubectl's client dry run still needs an API server for
discovery (it maps each kind to its resource); it gets the kmock emulator serving the
discovery documents of a real cluster that kmock bundles, so it runs offline.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.client import ApiClient, models

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
PART_OF = ("app.kubernetes.io/part-of", "netmirror")

# (apiVersion, kind) of each document the manifests may hold -> its kubernetes_asyncio model.
# A kind missing here fails the test: add it, with the apiVersion the cluster serves it under.
MODELS: dict[tuple[str, str], str] = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
}

# The RBAC netmirror needs, per role name: (apiGroup, resource) -> verbs. Identical for the
# Role and the ClusterRole of each name. Widening any of this is a deliberate change here and
# in the comments of manifests/rbac.yaml that say why.
EXPECTED_RULES: dict[str, dict[tuple[str, str], frozenset[str]]] = {
    "netmirror": {
        ("", "pods"): frozenset({"get", "list", "watch"}),
        ("apps", "deployments"): frozenset({"get", "list"}),
        ("apps", "statefulsets"): frozenset({"get", "list"}),
        ("", "pods/ephemeralcontainers"): frozenset({"patch"}),
        # WebSocket port-forward is a GET (authorized as `get` before Kubernetes 1.35);
        # 1.35+ also requires `create`.
        ("", "pods/portforward"): frozenset({"create", "get"}),
        # Its own namespace's Pod Security labels (a Role grants get on that one only).
        ("", "namespaces"): frozenset({"get"}),
    },
    "netmirror-job-mode": {
        ("batch", "jobs"): frozenset({"create", "delete"}),
        ("", "events"): frozenset({"list"}),
    },
    # An application namespace whose agent runs in the agent namespace (rbac-target.yaml):
    # read only.
    "netmirror-target": {
        ("", "pods"): frozenset({"get", "list"}),
        ("apps", "deployments"): frozenset({"get", "list"}),
        ("apps", "statefulsets"): frozenset({"get", "list"}),
        ("", "namespaces"): frozenset({"get"}),
    },
    # The agent namespace (agent-namespace.yaml): a Role only, no cluster-wide variant.
    "netmirror-agent": {
        ("batch", "jobs"): frozenset({"create", "delete"}),
        ("", "pods"): frozenset({"list", "watch"}),
        ("", "pods/portforward"): frozenset({"create", "get"}),
        ("", "events"): frozenset({"list"}),
        ("", "namespaces"): frozenset({"get"}),
    },
}
#: Roles with no ClusterRole of the same rules.
NAMESPACE_ONLY_ROLES = {"netmirror-agent"}
#: The namespace of the agent namespace's Role and RoleBinding.
AGENT_NAMESPACE = "netmirror"

_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
    # Timestamps are strings on the wire.
    "datetime": (str,),
    "date": (str,),
}


@dataclass(frozen=True)
class Document:
    """One YAML document of a manifest file."""

    file: str
    index: int
    body: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}#{self.index} ({self.body.get('kind')} {self.name})"

    @property
    def kind(self) -> str:
        return str(self.body.get("kind"))

    @property
    def name(self) -> str:
        return str(self.body.get("metadata", {}).get("name"))

    @property
    def namespace(self) -> str | None:
        namespace = self.body.get("metadata", {}).get("namespace")
        return None if namespace is None else str(namespace)


def load_documents() -> list[Document]:
    documents: list[Document] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        with path.open(encoding="utf-8") as stream:
            for index, body in enumerate(yaml.safe_load_all(stream)):
                if body is None:  # an empty document, e.g. after a trailing '---'
                    continue
                assert isinstance(body, dict), f"{path.name}#{index}: not a mapping"
                documents.append(Document(file=path.name, index=index, body=body))
    return documents


DOCUMENTS = load_documents()


def of_kind(kind: str) -> list[Document]:
    return [doc for doc in DOCUMENTS if doc.kind == kind]


def field_problems(value: Any, type_name: str, path: str) -> list[str]:
    """What in ``value`` does not fit the kubernetes_asyncio type ``type_name``.

    Every mapping key must be a field of its model (by its JSON name), every value of the
    declared type. ``object`` (IntOrString, raw JSON) takes anything.
    """
    if value is None:
        return [f"{path}: null (leave the field out instead)"]
    if match := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [
            problem
            for index, item in enumerate(value)
            for problem in field_problems(item, match.group(1), f"{path}[{index}]")
        ]
    if match := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {type(value).__name__}"]
        problems = [f"{path}: key {key!r} is not a string" for key in value if type(key) is not str]
        for key, item in value.items():
            problems += field_problems(item, match.group(1), f"{path}.{key}")
        return problems
    if type_name == "object":
        return []
    if type_name in _PRIMITIVES:
        expected = _PRIMITIVES[type_name]
        # bool is an int in Python, never in Kubernetes.
        if isinstance(value, bool) and bool not in expected:
            return [f"{path}: expected {type_name}, got bool {value!r}"]
        if not isinstance(value, expected):
            return [f"{path}: expected {type_name}, got {type(value).__name__} {value!r}"]
        return []
    model = getattr(models, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a mapping ({type_name}), got {type(value).__name__}"]
    attribute_of = {json_name: attr for attr, json_name in model.attribute_map.items()}
    problems = []
    for key, item in value.items():
        if key not in attribute_of:
            known = ", ".join(sorted(attribute_of))
            problems.append(f"{path}.{key}: unknown field of {type_name} (known: {known})")
            continue
        problems += field_problems(item, model.openapi_types[attribute_of[key]], f"{path}.{key}")
    return problems


@dataclass
class _Response:
    """What ``ApiClient.deserialize`` reads a response body from."""

    data: str


def test_manifests_exist() -> None:
    assert {"rbac.yaml", "rbac-target.yaml", "agent-namespace.yaml", "sample-app.yaml"} <= {
        doc.file for doc in DOCUMENTS
    }


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda doc: doc.where)
def test_every_field_is_known_to_the_model(doc: Document) -> None:
    key = (doc.body.get("apiVersion"), doc.body.get("kind"))
    assert key in MODELS, f"{doc.where}: no model known for apiVersion/kind {key}"
    problems = field_problems(doc.body, MODELS[key], doc.kind)
    assert not problems, f"{doc.where}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda doc: doc.where)
async def test_deserializes_into_the_model_and_back(doc: Document) -> None:
    """The client's own deserializer enforces required fields; the round trip loses nothing."""
    model_name = MODELS[(doc.body["apiVersion"], doc.body["kind"])]
    async with ApiClient() as api:
        obj = api.deserialize(_Response(json.dumps(doc.body)), model_name)
        assert type(obj).__name__ == model_name
        assert api.sanitize_for_serialization(obj) == doc.body


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            {
                "spec": {
                    "template": {"spec": {"containers": [{"name": "c", "imagePullpolicy": "x"}]}}
                }
            },
            "Deployment.spec.template.spec.containers[0].imagePullpolicy: unknown field of "
            "V1Container",
        ),
        ({"sepc": {}}, "Deployment.sepc: unknown field of V1Deployment"),
        (
            {
                "spec": {
                    "template": {"spec": {"containers": [{"name": "c", "ports": [{"port": 1}]}]}}
                }
            },
            "Deployment.spec.template.spec.containers[0].ports[0].port: unknown field of "
            "V1ContainerPort",
        ),
        ({"spec": {"replicas": "2"}}, "Deployment.spec.replicas: expected int, got str '2'"),
        ({"spec": {"paused": 1}}, "Deployment.spec.paused: expected bool, got int 1"),
        ({"spec": {"replicas": True}}, "Deployment.spec.replicas: expected int, got bool True"),
        ({"metadata": {"labels": ["a"]}}, "Deployment.metadata.labels: expected a mapping"),
        ({"metadata": {"finalizers": "a"}}, "Deployment.metadata.finalizers: expected a list"),
        ({"metadata": {"name": None}}, "Deployment.metadata.name: null"),
    ],
)
def test_field_check_reports_bad_fields(body: dict[str, Any], problem: str) -> None:
    problems = field_problems(body, "V1Deployment", "Deployment")
    assert len(problems) == 1
    assert problems[0].startswith(problem)


def test_field_check_accepts_int_or_string() -> None:
    for port in (8080, "http"):
        body = {"spec": {"ports": [{"port": 80, "targetPort": port}]}}
        assert field_problems(body, "V1Service", "Service") == []


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda doc: doc.where)
def test_everything_is_labelled_part_of_netmirror(doc: Document) -> None:
    labels = doc.body.get("metadata", {}).get("labels", {})
    assert labels.get(PART_OF[0]) == PART_OF[1], f"{doc.where}: label {PART_OF[0]} missing"


# RBAC


def verbs_by_resource(doc: Document) -> dict[tuple[str, str], frozenset[str]]:
    """A role's rules flattened to (apiGroup, resource) -> verbs."""
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in doc.body.get("rules", []):
        assert set(rule) == {"apiGroups", "resources", "verbs"}, (
            f"{doc.where}: a rule with {sorted(rule)}; resourceNames and nonResourceURLs "
            "are not expected"
        )
        assert len(rule["verbs"]) == len(set(rule["verbs"])), f"{doc.where}: duplicate verbs"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return {key: frozenset(verbs) for key, verbs in granted.items()}


@pytest.mark.parametrize("kind", ["Role", "ClusterRole"])
def test_rbac_grants_exactly_the_minimal_verbs(kind: str) -> None:
    roles = {doc.name: doc for doc in of_kind(kind)}
    wanted = {
        name: rules
        for name, rules in EXPECTED_RULES.items()
        if kind == "Role" or name not in NAMESPACE_ONLY_ROLES
    }
    assert set(roles) == set(wanted)
    for name, expected in wanted.items():
        granted = verbs_by_resource(roles[name])
        differences = []
        for group, resource in sorted(granted.keys() | expected.keys()):
            have = granted.get((group, resource), frozenset())
            want = expected.get((group, resource), frozenset())
            if have != want:
                differences.append(
                    f"{group or 'core'}/{resource}: extra {sorted(have - want)}, "
                    f"missing {sorted(want - have)}"
                )
        assert not differences, f"{kind} {name}: " + "; ".join(differences)


def test_role_bindings_bind_each_role_to_a_placeholder_subject() -> None:
    roles = {(doc.namespace, doc.name) for doc in of_kind("Role")}
    bindings = of_kind("RoleBinding")
    bound: set[tuple[str | None, str]] = set()
    for binding in bindings:
        ref = binding.body["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        assert ref["kind"] == "Role"
        assert (binding.namespace, ref["name"]) in roles, f"{binding.where}: no such Role"
        bound.add((binding.namespace, ref["name"]))
        assert binding.body["subjects"], f"{binding.where}: no subject"
    assert bound == roles
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(MANIFESTS.glob("*.yaml")))
    assert text.count("EDIT ME") >= len(bindings)


def test_no_cluster_wide_grant_is_applied_by_default() -> None:
    """A ClusterRoleBinding is the admin's explicit choice, never part of `kubectl apply -f`."""
    assert of_kind("ClusterRoleBinding") == []
    assert all(doc.namespace is None for doc in of_kind("ClusterRole"))
    for doc in of_kind("Role") + of_kind("RoleBinding"):
        # rbac-target.yaml is applied with `kubectl apply -n NS`: it names no namespace.
        expected = {"agent-namespace.yaml": AGENT_NAMESPACE, "rbac-target.yaml": None}.get(
            doc.file, "default"
        )
        assert doc.namespace == expected, doc.where


def test_the_agent_namespace_admits_the_agent_job() -> None:
    """Labelled privileged on all three modes, so neither enforce nor warnings get in the way."""
    (namespace,) = of_kind("Namespace")
    assert namespace.name == AGENT_NAMESPACE
    labels = namespace.body["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "privileged"


# The sample app


def test_sample_app_is_a_ready_probed_deployment_behind_a_service() -> None:
    (deployment,) = of_kind("Deployment")
    (service,) = of_kind("Service")
    assert (deployment.name, deployment.namespace) == ("echo", "default")
    spec = deployment.body["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # A pod-wide security context would also apply to the ephemeral agent container.
    assert "securityContext" not in pod["spec"]
    (container,) = pod["spec"]["containers"]
    assert "-text=hello from the cluster" in container["args"]
    assert container["readinessProbe"]
    assert container["resources"]["requests"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 5678}

    assert service.body["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (service_port,) = service.body["spec"]["ports"]
    assert service_port["targetPort"] in ports


# kubectl


KUBECTL = shutil.which("kubectl")


def write_kubeconfig(path: Path, server: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "kmock", "user": {"token": "unused"}}],
        "contexts": [
            {"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}},
        ],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


async def kubectl_dry_run(tmp_path: Path, target: Path) -> tuple[int, str, str, list[str]]:
    """`kubectl apply --dry-run=client` of ``target`` against the kmock API emulator.

    Returns kubectl's exit code, stdout, stderr, and the HTTP methods it sent.
    """
    assert KUBECTL is not None
    kmock = pytest.importorskip("kmock", reason="the kmock API emulator is not installed")
    async with kmock.KubernetesEmulator() as api, kmock.Server(api) as server:
        with warnings.catch_warnings():  # kmock 0.8 uses importlib.resources.read_binary
            warnings.simplefilter("ignore", DeprecationWarning)
            api.resources.load_bundled()  # the discovery documents of a real cluster
        # kmock 0.8 answers /api/v1 with groupVersion "/v1", so kubectl finds no core kind
        # (Service, ...) there. Serve kmock's own document with the group version fixed.
        async with api.get("/api/v1") as response:
            core = await response.json()
        if core.get("groupVersion") != "v1":
            core["groupVersion"] = "v1"
            api["get /api/v1"] << core
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, str(server.url).rstrip("/"))
        env = {
            "PATH": os.environ.get("PATH", ""),
            "KUBECONFIG": str(kubeconfig),
            "HOME": str(tmp_path),  # kubectl's discovery cache goes to ~/.kube/cache
        }
        proc = await asyncio.create_subprocess_exec(
            KUBECTL, "apply", "--dry-run=client", "--validate=false", "--request-timeout=30s",
            "-f", str(target), "-o", "name",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        finally:
            if proc.returncode is None:  # timed out or cancelled: leave no kubectl behind
                proc.kill()
                await proc.wait()
        methods = [str(request.method.value).upper() for request in api]
        assert not api.objects, "a client dry run stored something"
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), methods


def expected_name(doc: Document) -> str:
    """What `kubectl apply -o name` prints for a document: kind.group/name."""
    api_version = str(doc.body["apiVersion"])
    group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
    return f"{doc.kind.lower()}{'.' + group if group else ''}/{doc.name}"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
async def test_kubectl_client_dry_run_accepts_the_manifests(tmp_path: Path) -> None:
    code, out, err, methods = await kubectl_dry_run(tmp_path, MANIFESTS)
    assert code == 0, err
    assert sorted(out.split()) == sorted(expected_name(doc) for doc in DOCUMENTS)
    assert set(methods) == {"GET"}, "kubectl only reads in a client dry run"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
async def test_kubectl_client_dry_run_rejects_an_unknown_kind(tmp_path: Path) -> None:
    """The emulated discovery has teeth: a misspelt kind fails as on a real cluster."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: apps/v1\nkind: Deploymnet\nmetadata: {name: x, namespace: default}\n",
        encoding="utf-8",
    )
    code, _, err, _ = await kubectl_dry_run(tmp_path, bad)
    assert code != 0
    assert 'no matches for kind "Deploymnet"' in err
