"""Mark every socket a cgroup's processes create, so policy routing can tell them apart.

``connect()`` looks a route up before any netfilter hook sees a packet: with no
route, a blackhole or an unreachable route to a destination, it fails with
ENETUNREACH or EINVAL, and the outgoing REDIRECT never gets its chance. A route
lookup only knows the socket's mark, and a mark set by iptables comes too late
(after the first lookup). So the mark is put on the socket itself, when it is
created: a ``BPF_PROG_TYPE_CGROUP_SOCK`` program attached to the command's cgroup
(``BPF_CGROUP_INET_SOCK_CREATE``) sets ``sk->sk_mark``, as ``ip vrf exec`` does to
bind sockets to a VRF. Policy-routing rules for that mark then find a route
(:mod:`netmirror.netfilter.routing`).

The program is four instructions, written here by hand: no BPF compiler or
library is needed on the developer's machine, only the ``bpf()`` system call.
It stays attached for the cgroup's life; removing the cgroup frees it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

from netmirror.errors import NetmirrorError

__all__ = ["attach_socket_mark", "mark_program"]

# bpf(2) commands, program and attach types (include/uapi/linux/bpf.h).
_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_TYPE_CGROUP_SOCK = 9
_BPF_CGROUP_INET_SOCK_CREATE = 2
_BPF_F_ALLOW_MULTI = 2
_OFFSET_OF_MARK = 16  # struct bpf_sock: bound_dev_if, family, type, protocol, mark

_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}


def _insn(code: int, dst: int, src: int, off: int, imm: int) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def mark_program(mark: int) -> bytes:
    """The program's instructions: ``sk->mark = mark; return 1`` (allow). Pure."""
    if not 0 < mark < 1 << 32:
        raise ValueError(f"mark {mark:#x} is not a non-zero 32-bit value")
    # imm is signed: a mark above 2**31 is passed as its two's complement.
    imm = mark - (1 << 32) if mark >= 1 << 31 else mark
    return b"".join(
        (
            _insn(0xB7, 2, 0, 0, imm),  # r2 = mark            (ALU64 | MOV | K)
            _insn(0x63, 1, 2, _OFFSET_OF_MARK, 0),  # *(u32 *)(r1 + 16) = r2  (STX | MEM | W)
            _insn(0xB7, 0, 0, 0, 1),  # r0 = 1: let the socket be created
            _insn(0x95, 0, 0, 0, 0),  # exit
        )
    )


def _bpf(cmd: int, attr: bytes) -> int:
    number = _SYSCALL_BPF.get(platform.machine())
    if number is None:
        raise OSError(0, f"bpf() is not known on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, len(attr))
    result = int(libc.syscall(number, cmd, buf, len(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def attach_socket_mark(cgroup: str, mark: int) -> None:
    """Make every socket created in the cgroup directory ``cgroup`` carry ``mark``.

    Raises NetmirrorError with the reason (no BPF in this kernel, not root, not a
    cgroup v2 directory).
    """
    program = mark_program(mark)
    insns = ctypes.create_string_buffer(program, len(program))
    license_ = ctypes.create_string_buffer(b"GPL")
    log_buf = ctypes.create_string_buffer(4096)
    attr = struct.pack(
        "<IIQQIIQII16sII",
        _BPF_PROG_TYPE_CGROUP_SOCK,
        len(program) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
        1,  # log level: the verifier says why, should it refuse
        len(log_buf),
        ctypes.addressof(log_buf),
        0,  # kern_version
        0,  # prog_flags
        b"netmirror_mark",
        0,  # prog_ifindex
        _BPF_CGROUP_INET_SOCK_CREATE,
    )
    try:
        prog_fd = _bpf(_BPF_PROG_LOAD, attr)
    except OSError as exc:
        detail = log_buf.value.decode(errors="replace").strip().splitlines()
        why = f" ({detail[-1]})" if detail else ""
        raise NetmirrorError(
            f"cannot load the socket-marking BPF program: {exc.strerror or exc}{why}"
        ) from None
    try:
        try:
            cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise NetmirrorError(f"cannot open the cgroup {cgroup}: {exc.strerror}") from None
        try:
            attach = struct.pack(
                "<IIII", cgroup_fd, prog_fd, _BPF_CGROUP_INET_SOCK_CREATE, _BPF_F_ALLOW_MULTI
            )
            _bpf(_BPF_PROG_ATTACH, attach)
        except OSError as exc:
            raise NetmirrorError(
                f"cannot attach the socket-marking BPF program to {cgroup}: {exc.strerror or exc}"
            ) from None
        finally:
            os.close(cgroup_fd)
    finally:
        os.close(prog_fd)  # the attachment holds the program now
