"""The capture socket's kernel filter: its text, its bytecode, and what it lets through.

The bytecode is checked twice: by a small classic-BPF interpreter over packets built
with scapy, and by the kernel itself, attached to an AF_PACKET socket in a fresh
network namespace (root only).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.arch.common import compile_filter
from scapy.layers.inet import IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.packet import Raw

from netmirror.agent.capture import bpf

REPO = Path(__file__).resolve().parents[3]
_INSN = struct.Struct("HBBI")
_RET_K = 0x06
_RET_A = 0x16

Insn = tuple[int, int, int, int]


def _decode(bytecode: bytes) -> list[Insn]:
    assert len(bytecode) % _INSN.size == 0
    return [_INSN.unpack_from(bytecode, i) for i in range(0, len(bytecode), _INSN.size)]


def _alu(op: int, a: int, operand: int) -> int:
    if op == 0x00:
        return a + operand
    if op == 0x10:
        return a - operand
    if op == 0x20:
        return a * operand
    if op == 0x30:
        return a // operand
    if op == 0x40:
        return a | operand
    if op == 0x50:
        return a & operand
    if op == 0x60:
        return a << operand
    if op == 0x70:
        return a >> operand
    if op == 0x80:
        return -a
    if op == 0x90:
        return a % operand
    if op == 0xA0:
        return a ^ operand
    raise AssertionError(f"unknown ALU operation {op:#x}")


def _run(program: list[Insn], packet: bytes) -> int:
    """Classic BPF (as the kernel runs it): the number of bytes accepted."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    n = len(packet)

    def load(offset: int, size: int) -> int | None:
        if offset < 0 or offset + size > n:
            return None
        return int.from_bytes(packet[offset : offset + size], "big")

    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls in (0x00, 0x01):  # LD, LDX
            size = {0x00: 4, 0x08: 2, 0x10: 1}[code & 0x18]
            mode = code & 0xE0
            value: int | None
            if mode == 0x00:
                value = k
            elif mode == 0x20:
                value = load(k, size)
            elif mode == 0x40:
                value = load(x + k, size)
            elif mode == 0x60:
                value = mem[k]
            elif mode == 0x80:
                value = n
            elif mode == 0xA0 and cls == 0x01:  # ldxb 4*([k]&0xf)
                byte = load(k, 1)
                value = None if byte is None else (byte & 0x0F) * 4
            else:
                raise AssertionError(f"unknown load {code:#x}")
            if value is None:
                return 0  # out of bounds: the kernel rejects the packet
            if cls == 0x00:
                a = value
            else:
                x = value
        elif cls == 0x02:
            mem[k] = a
        elif cls == 0x03:
            mem[k] = x
        elif cls == 0x04:  # ALU
            operand = x if code & 0x08 else k
            op = code & 0xF0
            if op in (0x30, 0x90) and operand == 0:
                return 0  # division by zero rejects
            a = _alu(code & 0xF0, a, operand) & 0xFFFFFFFF
        elif cls == 0x05:  # JMP
            operand = x if code & 0x08 else k
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            taken = {
                0x10: a == operand,
                0x20: a > operand,
                0x30: a >= operand,
                0x40: bool(a & operand),
            }[op]
            pc += jt if taken else jf
        elif cls == 0x06:  # RET
            return a if code & 0x18 == 0x10 else k
        else:  # MISC: tax / txa
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x


def _accepts(ports: list[int], packet: Any) -> int:
    return _run(_decode(bpf.compile_ports(ports)), bytes(packet))


def _v4(dport: int, sport: int = 40000, **ip: Any) -> Any:
    return IP(src="10.0.0.1", dst="10.0.0.2", **ip) / TCP(sport=sport, dport=dport) / Raw(b"x")


def _v6(dport: int, sport: int = 40000) -> Any:
    return IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=sport, dport=dport) / Raw(b"x")


# --- the expression --------------------------------------------------------------------


def test_filter_expression_one_port() -> None:
    assert bpf.filter_expression([8080]) == "tcp and (dst port 8080)"


def test_filter_expression_sorted_without_duplicates() -> None:
    expr = bpf.filter_expression(p for p in (9090, 80, 8080, 80))
    assert expr == "tcp and (dst port 80 or dst port 8080 or dst port 9090)"


def test_filter_expression_no_ports_matches_nothing() -> None:
    assert bpf.filter_expression([]) == "less 0"


# --- the bytecode ----------------------------------------------------------------------


@pytest.mark.parametrize("ports", [[8080], [80, 443, 8080], []])
def test_accept_instructions_accept_whole_packets(ports: list[int]) -> None:
    program = _decode(bpf.compile_ports(ports))
    assert program, "empty program"
    returns = [k for code, _, _, k in program if code & 0x07 == 0x06]
    assert all(code != _RET_A for code, _, _, _ in program)
    assert bpf.ACCEPT_BYTES in returns
    assert set(returns) <= {0, bpf.ACCEPT_BYTES}
    assert bpf.ACCEPT_BYTES > 0xFFFF  # larger than libpcap's snap length


def test_only_the_accept_length_differs_from_libpcap() -> None:
    prog = compile_filter(bpf.filter_expression([8080, 9090]), linktype=bpf.DLT_RAW)
    libpcap = [
        (prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf, prog.bf_insns[i].k)
        for i in range(prog.bf_len)
    ]
    ours = _decode(bpf.compile_ports([8080, 9090]))
    assert len(ours) == len(libpcap)
    for (code, jt, jf, k), (lcode, ljt, ljf, lk) in zip(ours, libpcap, strict=True):
        assert (code, jt, jf) == (lcode, ljt, ljf)
        assert k == (bpf.ACCEPT_BYTES if code == _RET_K and lk else lk)


@pytest.mark.parametrize(
    ("packet", "accepted"),
    [
        (_v4(8080), True),
        (_v6(8080), True),
        (_v4(9090), False),
        (_v6(9090), False),
        (_v4(5555, sport=8080), False),  # the server's replies
        (_v6(5555, sport=8080), False),
        (_v4(8080, options=[IPOption_Router_Alert()]), True),
        (IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=8080) / Raw(b"x"), False),
        (IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=8080), False),
        (_v4(8080, frag=10), False),  # a later fragment has no TCP header
    ],
    ids=[
        "v4-8080",
        "v6-8080",
        "v4-9090",
        "v6-9090",
        "v4-reply",
        "v6-reply",
        "v4-options",
        "udp4",
        "udp6",
        "v4-fragment",
    ],
)
def test_filter_semantics(packet: Any, accepted: bool) -> None:
    assert _accepts([8080], packet) == (bpf.ACCEPT_BYTES if accepted else 0)


def test_ipv6_extension_header_is_not_matched() -> None:
    # libpcap's "tcp" only looks at the IPv6 next header; documented here, not required.
    packet = IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / TCP(dport=8080)
    assert _accepts([8080], packet) == 0


def test_several_ports() -> None:
    for port in (80, 443, 8080):
        assert _accepts([80, 443, 8080], _v4(port)) == bpf.ACCEPT_BYTES
        assert _accepts([80, 443, 8080], _v6(port)) == bpf.ACCEPT_BYTES
    for port in (81, 442, 8081):
        assert _accepts([80, 443, 8080], _v4(port)) == 0


def test_no_ports_accepts_nothing() -> None:
    assert _accepts([], _v4(8080)) == 0
    assert _accepts([], _v6(8080)) == 0


def test_attach_is_validated_by_the_kernel() -> None:
    # SO_ATTACH_FILTER needs no privilege on one's own socket; no packet is sent.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        bpf.attach(sock, bpf.compile_ports([8080]))
        bpf.attach(sock, bpf.compile_ports([]))  # replaces the previous one
        good = bpf.compile_ports([8080])
        for bad in (b"", bytes(8), good[:-8]):
            with pytest.raises(OSError):
                bpf.attach(sock, bad)


# --- the kernel, for real ----------------------------------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import json, os, socket, sys, threading, time
    from netmirror.agent.capture import bpf
    from netmirror.agent.capture.packets import parse
    from netmirror.agent.capture.reassembly import FlowData, Reassembler

    ETH_P_ALL = 0x0003
    SO_RCVBUFFORCE = 33
    families = [(socket.AF_INET, "127.0.0.1")]
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        families.append((socket.AF_INET6, "::1"))
    except OSError:
        pass

    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sniffer.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    bpf.attach(sniffer, bpf.compile_ports([8080]))
    sniffer.setblocking(False)
    try:  # anything queued before the filter was attached
        while True:
            sniffer.recv(65536)
    except BlockingIOError:
        pass

    received = {}
    def serve(listener, name):
        conn, _ = listener.accept()
        chunks = []
        while chunk := conn.recv(1 << 16):
            chunks.append(chunk)
        received[name] = b"".join(chunks)
        conn.close()

    sent = {}
    threads = []
    for family, host in families:
        for port in (8080, 9090):
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen()
            name = f"{host}:{port}"
            thread = threading.Thread(target=serve, args=(listener, name))
            thread.start()
            threads.append(thread)
            payload = os.urandom(100_000) + name.encode()
            with socket.create_connection((host, port)) as client:
                client.sendall(payload)
            sent[name] = payload
    for thread in threads:
        thread.join(10)

    reassembler = Reassembler()
    seen = []
    sniffer.settimeout(0.5)
    try:
        while True:
            packet = sniffer.recv(bpf.ACCEPT_BYTES)
            seg = parse(memoryview(packet))
            if seg is None:
                seen.append(None)
                continue
            seen.append([seg.src, seg.sport, seg.dst, seg.dport, len(seg.payload)])
            reassembler.feed(seg, 0.0)
    except TimeoutError:
        pass
    mirrored = {}
    for event in reassembler.events():
        if isinstance(event, FlowData):
            name = f"{event.key[2]}:{event.key[3]}"
            mirrored[name] = mirrored.get(name, b"") + event.data
    print(json.dumps({
        "families": [host for _, host in families],
        "seen": seen,
        "sent_equals_received": {k: sent[k] == received.get(k) for k in sent},
        "mirrored_equals_sent": {k: v == sent.get(k) for k, v in mirrored.items()},
    }))
    """
)


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux AF_PACKET sockets"
    if os.geteuid() != 0:
        return "needs root for a network namespace and an AF_PACKET socket"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    return None


@pytest.fixture
def netns() -> Iterator[str]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    name = f"nmtest-bpf-{secrets.token_hex(4)}"
    added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if added.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {added.stderr.strip()}")
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_kernel_lets_only_the_filtered_port_through(netns: str, tmp_path: Path) -> None:
    script = tmp_path / "sniff.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    hosts: list[str] = result["families"]
    assert "127.0.0.1" in hosts
    # The traffic really went to both ports.
    assert result["sent_equals_received"] == {f"{h}:{p}": True for h in hosts for p in (8080, 9090)}
    seen: list[list[Any] | None] = result["seen"]
    assert seen, "no packet went through the filter"
    assert None not in seen, "a packet that is not TCP went through"
    assert {s[3] for s in seen if s} == {8080}
    assert {s[2] for s in seen if s} == set(hosts)
    # The capture is complete enough to rebuild each 8080 stream exactly.
    assert result["mirrored_equals_sent"] == {f"{h}:8080": True for h in hosts}
    assert max(s[4] for s in seen if s) > 0
