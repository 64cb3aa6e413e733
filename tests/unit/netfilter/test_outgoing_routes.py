"""Pure parts of the exec command's own routing: the plan, the rules, the BPF program."""

from __future__ import annotations

import socket
import struct

import pytest

from netmirror.netfilter.outgoing import OutgoingRules, render_outgoing, render_replies, render_udp
from netmirror.netfilter.routing import MARK_BASE, Route, Rule, plan_routes, session_mark
from netmirror.netfilter.sockmark import mark_program


def test_marks_are_per_session_and_avoid_kube_proxy_bits() -> None:
    marks = {session_mark(f"s{n}") for n in range(200)}
    assert len(marks) > 150  # spread
    for mark in marks:
        assert mark & 0xFFFF0000 == MARK_BASE
        assert not mark & 0xC000  # 0x4000 masquerade, 0x8000 drop
    assert session_mark("web") == session_mark("web")


def test_included_networks_get_local_routes_excluded_ones_throw() -> None:
    plan = plan_routes(
        "web",
        include=["0.0.0.0/0", "::/0", "10.1.0.0/16"],
        exclude=["10.0.0.0/8", "fd00::/64"],
        udp=True,
        dns=True,
    )
    assert plan.routes == (
        Route(4, "local", "0.0.0.0/0"),
        Route(6, "local", "::/0"),
        # 10.1.0.0/16 is inside an excluded network: the exclusion wins, no route.
        Route(4, "throw", "10.0.0.0/8"),
        Route(6, "throw", "fd00::/64"),
        # Multicast and broadcast stay this machine's.
        Route(4, "throw", "224.0.0.0/4"),
        Route(4, "throw", "255.255.255.255/32"),
        Route(6, "throw", "ff00::/8"),
    )
    assert set(plan.rules) == {
        Rule(4, socket.IPPROTO_TCP),
        Rule(4, socket.IPPROTO_UDP),
        Rule(6, socket.IPPROTO_TCP),
        Rule(6, socket.IPPROTO_UDP),
    }


def test_without_udp_only_dns_datagrams_are_routed() -> None:
    plan = plan_routes("web", include=["10.0.0.0/8"], exclude=[], udp=False, dns=True)
    assert Rule(4, socket.IPPROTO_UDP, 53) in plan.rules
    assert Rule(4, socket.IPPROTO_UDP) not in plan.rules
    plan = plan_routes("web", include=["10.0.0.0/8"], exclude=[], udp=False, dns=False)
    assert {r.ip_proto for r in plan.rules} == {socket.IPPROTO_TCP}
    assert plan.routes[0] == Route(4, "local", "10.0.0.0/8")
    assert {r.kind for r in plan.routes[1:]} == {"throw"}


def test_the_bpf_program_sets_the_mark_and_allows() -> None:
    program = mark_program(0x6E6D0ABC)
    insns = [struct.unpack("<BBhi", program[i : i + 8]) for i in range(0, len(program), 8)]
    assert insns == [
        (0xB7, 0x02, 0, 0x6E6D0ABC),  # r2 = mark
        (0x63, 0x21, 16, 0),  # *(u32 *)(r1 + offsetof(struct bpf_sock, mark)) = r2
        (0xB7, 0x00, 0, 1),  # r0 = 1
        (0x95, 0x00, 0, 0),  # exit
    ]
    # A mark with the top bit set is passed as the signed immediate the kernel expects.
    assert struct.unpack_from("<i", mark_program(0x80000001), 4)[0] == -(2**31) + 1
    with pytest.raises(ValueError):
        mark_program(0)


def test_udp_is_tproxied_except_loopback_and_excluded() -> None:
    rules = OutgoingRules(
        cgroup="/netmirror-web",
        tcp_port=4000,
        dns_port=4001,
        dns_tcp_port=4002,
        udp_port=4003,
        mark=session_mark("web"),
        include=("0.0.0.0/0", "::/0"),
        exclude=("192.168.0.0/16",),
    )
    text = render_udp("web", rules, 4)
    lines = text.splitlines()
    assert lines[:2] == ["*mangle", ":NMUDP-web - [0:0]"]
    assert lines[2:4] == [
        "-A NMUDP-web -d 127.0.0.0/8 -j RETURN",
        "-A NMUDP-web -d 192.168.0.0/16 -j RETURN",
    ]
    assert (
        "-p udp -d 0.0.0.0/0" in lines[4] and "TPROXY --on-ip 127.0.0.1 --on-port 4003" in lines[4]
    )
    assert "--on-ip ::1 --on-port 4003" in render_udp("web", rules, 6)
    nat = render_outgoing("web", rules, 4)
    # DNS over TCP goes to the daemon whatever the nameserver, before loopback returns.
    dns_tcp = nat.index("-p tcp -m tcp --dport 53")
    assert dns_tcp < nat.index("-p tcp -d 127.0.0.0/8 -j RETURN")
    assert "--to-ports 4002" in nat
    assert "--ctdir REPLY -j MARK --set-mark 0" in render_replies("web", 4)


def test_without_udp_the_udp_chain_is_empty() -> None:
    rules = OutgoingRules(cgroup="/netmirror-web", tcp_port=4000, mark=session_mark("web"))
    assert render_udp("web", rules, 4).splitlines() == ["*mangle", ":NMUDP-web - [0:0]", "COMMIT"]
    with pytest.raises(ValueError):
        OutgoingRules(cgroup="/netmirror-web", tcp_port=4000, udp_port=70000)
