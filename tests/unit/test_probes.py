"""The kubelet's health probes: read from the pod spec, kept out of steals. No I/O."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes_asyncio.client import (
    V1Container,
    V1ContainerPort,
    V1ExecAction,
    V1GRPCAction,
    V1HostIP,
    V1HTTPGetAction,
    V1ObjectMeta,
    V1Pod,
    V1PodSpec,
    V1PodStatus,
    V1Probe,
    V1TCPSocketAction,
)

from netmirror.daemon.targets.kube import node_addresses, probes
from netmirror.netfilter import Backend
from netmirror.netfilter.iptables import Redirect, render_chain
from netmirror.router.router import Registration, Router, is_probe
from netmirror.wire.httpfilter import HttpFilter, RequestHead


def pod() -> V1Pod:
    web = V1Container(
        name="web",
        ports=[V1ContainerPort(container_port=8080, name="http")],
        readiness_probe=V1Probe(http_get=V1HTTPGetAction(port="http", path="/ready")),
        liveness_probe=V1Probe(tcp_socket=V1TCPSocketAction(port=8080)),
        startup_probe=V1Probe(_exec=V1ExecAction(command=["true"])),
    )
    side = V1Container(name="side", liveness_probe=V1Probe(grpc=V1GRPCAction(port=9000)))
    return V1Pod(
        metadata=V1ObjectMeta(name="web-1"),
        spec=V1PodSpec(containers=[web, side]),
        status=V1PodStatus(
            host_ip="10.0.0.5", host_ips=[V1HostIP(ip="10.0.0.5"), V1HostIP(ip="fd00::5")]
        ),
    )


def test_probes_of_the_target_container_by_port() -> None:
    assert probes(pod(), "web") == {8080: ["liveness tcpSocket", "readiness httpGet /ready"]}
    assert probes(pod(), "side") == {9000: ["liveness grpc"]}
    assert probes(pod(), "absent") == {}


def test_probes_come_from_the_nodes_addresses() -> None:
    assert node_addresses(pod()) == ["10.0.0.5", "fd00::5"]
    assert node_addresses(V1Pod(status=None)) == []


def test_kept_sources_return_before_the_redirect_in_their_family() -> None:
    text = render_chain("alice", [Redirect(8080, 40000, 4, ("10.0.0.5",))])
    lines = text.splitlines()
    kept = next(i for i, line in enumerate(lines) if "-s 10.0.0.5" in line)
    redirect = next(i for i, line in enumerate(lines) if "REDIRECT" in line)
    assert kept < redirect and lines[kept].endswith("-j RETURN")
    with pytest.raises(ValueError, match="not an IPv4 address"):
        Redirect(8080, 40000, 4, ("fd00::5",))
    with pytest.raises(ValueError):
        Redirect(8080, 40000, 4, ("not-an-address",))


def head(user_agent: str) -> RequestHead:
    return RequestHead("GET", "/ready", (("Host", "pod"), ("User-Agent", user_agent)))


def test_probe_requests_skip_the_sessions_that_keep_them() -> None:
    assert is_probe(head("kube-probe/1.29"))
    assert not is_probe(head("curl/8.0"))

    async def routes() -> list[str]:
        router = Router(8080, Backend.NFT)
        everything = HttpFilter.parse({"path": "^/"})
        router.registrations["keeps"] = Registration(
            "keeps",
            everything,
            "",
            None,
            keep_probes=True,  # type: ignore[arg-type]
        )
        router.registrations["steals"] = Registration(
            "steals",
            everything,
            "",
            None,  # type: ignore[arg-type]
        )
        first = [router.route(head("kube-probe/1.29")), router.route(head("curl/8.0"))]
        del router.registrations["steals"]
        return [*first, router.route(head("kube-probe/1.29"))]

    # A probe passes the session that keeps probes by; other requests do not.
    assert asyncio.run(routes()) == ["steals", "keeps", ""]


def test_the_mesh_a_pod_says_it_is_in() -> None:
    from netmirror.daemon.targets.kube import mesh_hint

    def with_(*, containers: tuple[str, ...] = ("web",), **meta: dict[str, str]) -> V1Pod:
        return V1Pod(
            metadata=V1ObjectMeta(name="p", **meta),
            spec=V1PodSpec(containers=[V1Container(name=name) for name in containers]),
        )

    assert mesh_hint(with_()) is None
    assert mesh_hint(with_(containers=("web", "istio-proxy"))) == "Istio sidecar"
    assert mesh_hint(with_(annotations={"linkerd.io/proxy-version": "v2"})) == "Linkerd proxy"
    assert mesh_hint(with_(labels={"istio.io/dataplane-mode": "ambient"})) == "Istio ambient mode"
    assert mesh_hint(with_(containers=("web", "kuma-sidecar"))) == "Kuma sidecar"
