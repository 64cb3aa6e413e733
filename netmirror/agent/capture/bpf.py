"""The kernel filter of the capture socket, compiled once per set of ports."""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Iterable

from netmirror.errors import AgentError

SO_ATTACH_FILTER = 26
DLT_RAW = 12
#: Bytes of each packet the filter lets through; GSO super-packets exceed 64 KiB.
ACCEPT_BYTES = 0x40000
_BPF_RET = 0x06
_INSN = struct.Struct("HBBI")
#: ``ret #0``: accept nothing.
REJECT_ALL = _INSN.pack(_BPF_RET, 0, 0, 0)


def filter_expression(ports: Iterable[int]) -> str:
    """A pcap filter for TCP segments sent to any of ``ports`` (IPv4 and IPv6)."""
    ports = sorted(set(ports))
    if not ports:
        return "less 0"  # matches nothing
    return "tcp and (" + " or ".join(f"dst port {p}" for p in ports) + ")"


def compile_ports(ports: Iterable[int]) -> bytes:
    """Classic BPF bytecode for :func:`filter_expression`, for packets that start at
    the IP header, accepting whole packets (not libpcap's 64 KiB snap length).

    Compiled with libpcap through scapy, once per change of the port set.
    """
    try:
        from scapy.arch.common import compile_filter
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise AgentError(f"cannot compile a packet filter: {exc} (install libpcap)") from None
    program = compile_filter(filter_expression(ports), linktype=DLT_RAW)
    out = bytearray()
    for i in range(program.bf_len):
        insn = program.bf_insns[i]
        k = insn.k
        if insn.code == _BPF_RET and k:
            k = ACCEPT_BYTES
        out += _INSN.pack(insn.code, insn.jt, insn.jf, k)
    return bytes(out)


def attach(sock: socket.socket, bytecode: bytes) -> None:
    """Replace the socket's kernel filter (SO_ATTACH_FILTER) with ``bytecode``."""
    count = len(bytecode) // _INSN.size
    buf = ctypes.create_string_buffer(bytecode)
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HP", count, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
