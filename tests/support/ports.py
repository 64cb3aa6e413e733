"""TCP ports for test servers, reserved so that no other process can take them.

A port is handed out only while this process holds an exclusive ``flock`` on
``/run/lock/netmirror-test-ports/<port>``; the lock stays held until the process
ends (the test session), so two test runs at the same time never get the same
port. The ports come from below the kernel's ephemeral range, where the kernel
never picks a port by itself (``bind(0)``, the source port of a ``connect()``),
and each one is checked free by binding it on every address before it is given.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from sandbox import hold_lock

LOCK_DIR = Path("/run/lock/netmirror-test-ports")
#: Where test ports come from (what lies in the ephemeral range is left out).
FIRST, LAST = 20000, 32767

_held: dict[int, int] = {}
"""Reserved port -> file descriptor of its lock, kept open for the whole session."""


def _ephemeral() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def _candidates() -> list[int]:
    ephemeral = _ephemeral()
    ports = [p for p in range(FIRST, LAST + 1) if p not in ephemeral]
    if not ports:
        raise RuntimeError(f"ports {FIRST}..{LAST} are all in the ephemeral range {ephemeral}")
    # Start at a place of our own, so runs at the same time rarely try the same ports.
    start = (os.getpid() * 7919) % len(ports)
    return ports[start:] + ports[:start]


def _lock(port: int) -> int | None:
    """The descriptor of ``port``'s lock, now held; None if another process holds it."""
    return hold_lock(LOCK_DIR / str(port))


def _bindable(port: int) -> bool:
    """Whether nothing uses ``port`` (TCP) on any address, IPv4 or IPv6."""
    attempts: list[tuple[socket.AddressFamily, str]] = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        attempts.append((socket.AF_INET6, "::"))
    for family, host in attempts:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        with sock:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((host, port))  # no SO_REUSEADDR: a TIME_WAIT counts as used
            except OSError:
                return False
    return True


def free_port() -> int:
    """A TCP port nobody uses, reserved for this process until it ends."""
    for port in _candidates():
        if port in _held:
            continue
        fd = _lock(port)
        if fd is None:
            continue
        if _bindable(port):
            _held[port] = fd
            return port
        with contextlib.suppress(OSError):
            os.close(fd)
    raise RuntimeError(f"no free TCP port left in {FIRST}..{LAST}")
