"""A sandbox "pod" on this machine: a network namespace joined to the host by veth.

Used by ``make demo``, the integration tests and the benchmarks, and handy to try
netmirror without a cluster (``python -m sandbox create demo``). Links,
addresses and namespaces are made with pyroute2; everything made is removed by
:meth:`Sandbox.destroy`, which is safe to call twice and after a partial create.

Addresses come from 198.18.0.0/15 (set aside for network benchmarks, RFC 2544)
and a private IPv6 prefix: sandbox ``index`` N is 198.18.N.2 (pod) and 198.18.N.1
(host), and fd6e:6d:0:N::2 / ::1.

Two sandboxes with the same index would share addresses, so an index is held
while a sandbox uses it: :meth:`Sandbox.create` takes an exclusive ``flock`` on
``/run/lock/netmirror-sandbox/<N>`` (released by :meth:`Sandbox.destroy` or when
the process ends) and refuses an index whose addresses are already on this host
or in another ``nm-*`` namespace. :meth:`Sandbox.allocate` picks a free index that
way, for callers that run at the same time as others (the integration tests).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from netmirror.errors import TargetError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
LOCK_DIR = Path("/run/lock/netmirror-sandbox")

_SANDBOX_ADDRESS = re.compile(r"\binet 198\.18\.(\d+)\.\d+/")


def hold_lock(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path`` (created), held by the returned descriptor
    until it is closed or this process ends; None if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
    return fd


class IndexLock:
    """An exclusive ``flock`` on ``LOCK_DIR/<index>``: this process uses that index."""

    def __init__(self, index: int, fd: int) -> None:
        self.index = index
        self._fd: int | None = fd

    @classmethod
    def take(cls, index: int) -> IndexLock | None:
        """Hold ``index``'s lock; None if another process holds it."""
        fd = hold_lock(LOCK_DIR / str(index))
        return None if fd is None else cls(index, fd)

    def release(self) -> None:
        """Let the index go (safe to call twice)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the flock


def indexes_in_use() -> set[int]:
    """Sandbox indexes whose 198.18.N.x addresses are on this host or in an ``nm-*`` netns.

    That covers sandboxes made without the lock (another version, a crashed run
    that left its namespace behind).
    """
    outputs = [
        subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=False
        ).stdout
    ]
    if NETNS_DIR.is_dir():
        for entry in NETNS_DIR.iterdir():
            if entry.name.startswith("nm-"):
                outputs.append(
                    subprocess.run(
                        ["ip", "-n", entry.name, "-o", "-4", "addr", "show"],
                        capture_output=True,
                        text=True,
                        check=False,
                    ).stdout
                )
    return {int(m.group(1)) for text in outputs for m in _SANDBOX_ADDRESS.finditer(text)}


class Sandbox:
    """One namespace ``nm-<name>`` with a veth pair to the host."""

    def __init__(self, name: str, *, index: int = 1) -> None:
        if not 1 <= index <= 254:
            raise ValueError("index must be within 1..254")
        if not name or len(name) > 10 or not name.replace("-", "").isalnum():
            raise ValueError("sandbox names are 1-10 letters, digits or '-'")
        self.name = name
        self.index = index
        self.netns = f"nm-{name}"
        self.host_if = f"nmh-{name}"
        self.pod_if = "eth0"
        self.host_ip = f"198.18.{index}.1"
        self.pod_ip = f"198.18.{index}.2"
        self.host_ip6 = f"fd6e:6d:0:{index:x}::1"
        self.pod_ip6 = f"fd6e:6d:0:{index:x}::2"
        self._lock: IndexLock | None = None

    @classmethod
    def allocate(cls, prefix: str = "t", *, first: int = 20, last: int = 199) -> Sandbox:
        """A sandbox (not created yet) on an index in ``first..last`` that nobody uses.

        The index is held from now on, as :meth:`create` would hold it; the name is
        ``prefix``, the index and random letters. :meth:`destroy` lets it go.
        """
        in_use = indexes_in_use()
        for index in range(first, last + 1):
            if index in in_use:
                continue
            lock = IndexLock.take(index)
            if lock is None:
                continue
            if index in indexes_in_use():  # made between the scan and the lock
                lock.release()
                continue
            suffix = secrets.token_hex(5)[: max(0, 10 - len(prefix) - 3)]
            box = cls(f"{prefix}{index:03d}{suffix}", index=index)
            box._lock = lock
            return box
        raise TargetError(f"every sandbox index in {first}..{last} is in use")

    @property
    def target(self) -> str:
        """The netmirror target naming this sandbox."""
        return f"netns/{self.netns}"

    def exists(self) -> bool:
        return (NETNS_DIR / self.netns).exists()

    def create(self) -> Sandbox:
        """Make the namespace, the veth pair and the addresses (IPv4 and IPv6)."""
        from pyroute2 import IPRoute, NetNS, netns

        if self.exists():
            raise TargetError(f"network namespace {self.netns} already exists")
        if self._lock is None:
            self._lock = IndexLock.take(self.index)
            if self._lock is None:
                raise TargetError(f"sandbox index {self.index} is held by another process")
            if self.index in indexes_in_use():
                self._release()
                raise TargetError(
                    f"sandbox index {self.index} is in use: 198.18.{self.index}.x is taken"
                )
        try:
            netns.create(self.netns)
            with IPRoute() as ipr:
                ipr.link(
                    "add",
                    ifname=self.host_if,
                    kind="veth",
                    peer={"ifname": f"nmp-{self.name}", "net_ns_fd": self.netns},
                )
                (host,) = ipr.link_lookup(ifname=self.host_if)
                ipr.addr("add", index=host, address=self.host_ip, prefixlen=24)
                ipr.addr("add", index=host, address=self.host_ip6, prefixlen=64, flags=0x80)
                ipr.link("set", index=host, state="up")
            with NetNS(self.netns) as ns:
                (lo,) = ns.link_lookup(ifname="lo")
                ns.link("set", index=lo, state="up")
                (pod,) = ns.link_lookup(ifname=f"nmp-{self.name}")
                ns.link("set", index=pod, ifname=self.pod_if)
                ns.addr("add", index=pod, address=self.pod_ip, prefixlen=24)
                # IFA_F_NODAD (0x80): usable at once, no duplicate detection wait.
                ns.addr("add", index=pod, address=self.pod_ip6, prefixlen=64, flags=0x80)
                ns.link("set", index=pod, state="up")
                ns.route("add", dst="default", gateway=self.host_ip)
            self._wait_ipv6()
        except Exception:
            self.destroy()
            raise
        return self

    def _wait_ipv6(self, timeout: float = 5.0) -> None:
        """Wait until no address is tentative: link-local DAD delays the first packets."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            host = subprocess.run(
                ["ip", "-6", "addr", "show", "dev", self.host_if, "tentative"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            pod = self.run("ip", "-6", "addr", "show", "tentative").stdout
            if not host.strip() and not pod.strip():
                return
            time.sleep(0.05)

    def destroy(self) -> None:
        """Remove what :meth:`create` made, and kill processes left in the namespace."""
        from pyroute2 import IPRoute, netns

        if self.exists():
            pids = subprocess.run(
                ["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
        with IPRoute() as ipr, contextlib.suppress(Exception):
            for index in ipr.link_lookup(ifname=self.host_if):
                ipr.link("del", index=index)
        if self.exists():
            with contextlib.suppress(OSError):
                netns.remove(self.netns)
        if not self.exists():
            self._release()

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def cmd(self, *argv: str) -> list[str]:
        """A command line that runs ``argv`` inside the namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("check", False)
        return subprocess.run(self.cmd(*argv), **kwargs)

    def popen(self, *argv: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a command inside the namespace."""
        return subprocess.Popen(self.cmd(*argv), **kwargs)

    def __enter__(self) -> Sandbox:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()
