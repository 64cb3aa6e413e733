"""Meshes read from iptables-save output: no iptables run."""

from __future__ import annotations

from netmirror.netfilter.iptables import render_chain
from netmirror.netfilter.mesh import Mesh, detect_mesh
from tests.support.meshes import ISTIO, LINKERD, UNKNOWN


def test_istio_sidecar() -> None:
    mesh = detect_mesh(ISTIO)
    assert mesh == Mesh("istio", inbound_port=15006, outbound_port=15001, proxy_uid=1337)
    assert mesh.known
    assert mesh.describe() == "Istio sidecar (inbound to 15006, outbound to 15001, proxy uid 1337)"


def test_linkerd_proxy() -> None:
    mesh = detect_mesh(LINKERD)
    assert mesh == Mesh("linkerd", inbound_port=4143, outbound_port=4140, proxy_uid=2102)
    assert mesh.describe() == "Linkerd proxy (inbound to 4143, outbound to 4140, proxy uid 2102)"


def test_an_unknown_redirect_is_described_in_one_line() -> None:
    mesh = detect_mesh(UNKNOWN)
    assert mesh is not None and not mesh.known
    assert mesh.describe() == "unknown redirect rules (SOMEPROXY: REDIRECT to port 9999)"


def test_tproxy_in_mangle_counts_as_unknown() -> None:
    text = (
        "*mangle\n:DIVERT - [0:0]\n"
        "-A PREROUTING -p tcp -m tcp --dport 80 -j TPROXY --on-port 15001 --on-ip 0.0.0.0"
        " --tproxy-mark 0x1/0x1\nCOMMIT\n"
    )
    mesh = detect_mesh(text)
    assert mesh is not None and mesh.found == "PREROUTING: TPROXY to port 15001"


def test_many_unknown_rules_are_summed_up() -> None:
    rules = "".join(
        f"-A PREROUTING -p tcp -m tcp --dport {80 + i} -j REDIRECT --to-ports {9000 + i}\n"
        for i in range(5)
    )
    mesh = detect_mesh(f"*nat\n{rules}COMMIT\n")
    assert mesh is not None
    assert mesh.found.endswith("and 3 more") and "9000" in mesh.found and "9002" not in mesh.found


def test_netmirrors_own_rules_are_not_a_mesh() -> None:
    from netmirror.netfilter.iptables import Redirect

    ours = render_chain("alice", [Redirect(8080, 40000, 4)])
    hooks = "*nat\n-A PREROUTING -p tcp -m addrtype --dst-type LOCAL -j NETMIRROR-alice\nCOMMIT\n"
    assert detect_mesh(ours + hooks) is None
    assert detect_mesh("") is None
    # A mesh beside netmirror's rules is still found.
    assert detect_mesh(ours + ISTIO) == detect_mesh(ISTIO)


def test_json_round_trip_and_bad_records() -> None:
    mesh = detect_mesh(ISTIO)
    assert mesh is not None
    assert Mesh.from_json(mesh.to_json()) == mesh
    assert Mesh.from_json(None) is None
    assert Mesh.from_json({"name": 3}) is None
    assert Mesh.from_json(["istio"]) is None
