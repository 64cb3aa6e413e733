"""A sandbox "pod" on this machine: a network namespace joined to the host by veth.

Used by ``make demo``, the integration tests and the benchmarks, and handy to try
netmirror without a cluster (``python -m netmirror.sandbox create demo``). Links,
addresses and namespaces are made with pyroute2; everything made is removed by
:meth:`Sandbox.destroy`, which is safe to call twice and after a partial create.

Addresses come from 198.18.0.0/15 (set aside for network benchmarks, RFC 2544)
and a private IPv6 prefix: sandbox ``index`` N is 198.18.N.2 (pod) and 198.18.N.1
(host), and fd6e:6d:0:N::2 / ::1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from netmirror.errors import TargetError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")


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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m netmirror.sandbox create|delete NAME [--index N]``."""
    parser = argparse.ArgumentParser(prog="python -m netmirror.sandbox")
    parser.add_argument("action", choices=["create", "delete"])
    parser.add_argument("name")
    parser.add_argument("--index", type=int, default=1)
    args = parser.parse_args(argv)
    box = Sandbox(args.name, index=args.index)
    try:
        if args.action == "create":
            box.create()
            print(f"created {box.target}: pod {box.pod_ip} / {box.pod_ip6}, host {box.host_ip}")
        else:
            box.destroy()
            print(f"deleted {box.netns}")
    except (TargetError, OSError, ValueError) as exc:
        print(f"netmirror sandbox: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
