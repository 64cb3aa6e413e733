"""Fixtures for tests in real network namespaces with real servers and clients.

Each test gets its own sandbox namespace, its own netmirror state directory and
servers started as processes; everything is torn down and checked for leaks
(namespaces, iptables chains, processes) even when the test fails.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netmirror.sandbox import Sandbox

SERVERS = Path(__file__).resolve().parents[1] / "support" / "servers.py"
REPO = Path(__file__).resolve().parents[2]


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root for network namespaces and iptables"
    for tool in ("ip", "iptables", "curl"):
        if shutil.which(tool) is None:
            return f"needs {tool} (make deps installs it)"
    return None


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(proc: subprocess.Popen[bytes], what: str, timeout: float = 10) -> None:
    """Wait for a server's ``ready`` line."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    if line.strip() != b"ready" or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"{what} did not start: {line!r}")


@dataclass
class Env:
    """One test's world: a sandbox pod, its own state dir, and the processes started."""

    sandbox: Sandbox
    state_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NETMIRROR_STATE_DIR"] = str(self.state_dir)
        env["PYTHONPATH"] = str(REPO)
        return env

    def netmirror(
        self,
        *args: str,
        timeout: float = 60,
        check: bool = False,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real CLI as a user would."""
        result = subprocess.run(
            [sys.executable, "-m", "netmirror", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.env,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"netmirror {' '.join(args)} failed: {result.stderr}")
        return result

    def up(self, *args: str, session: str = "t1") -> subprocess.CompletedProcess[str]:
        return self.netmirror(
            "up", "--target", self.sandbox.target, "--session", session, *args, check=True
        )

    def server(
        self,
        kind: str,
        port: int,
        *,
        in_pod: bool,
        tag: str = "",
        host: str | None = None,
        text: str = "",
        log: str = "",
    ) -> subprocess.Popen[bytes]:
        """Start a test server in the pod or on the host (loopback)."""
        argv = [sys.executable, str(SERVERS), kind, "--port", str(port)]
        argv += ["--host", host or ("::" if in_pod else "127.0.0.1")]
        if tag:
            argv += ["--tag", tag]
        if text:
            argv += ["--text", text]
        if log:
            argv += ["--log", log]
        cmd = self.sandbox.cmd(*argv) if in_pod else argv
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        wait_ready(proc, f"{kind} server on {port}")
        return proc

    def chains(self) -> str:
        """netmirror's iptables rules in the pod (both backends, both families)."""
        out = []
        for tool in (
            "iptables-nft-save",
            "ip6tables-nft-save",
            "iptables-legacy-save",
            "ip6tables-legacy-save",
        ):
            if shutil.which(tool):
                res = self.sandbox.run(tool)
                out += [line for line in res.stdout.splitlines() if "NETMIRROR" in line]
        return "\n".join(out)

    def our_processes(self) -> list[str]:
        """netmirror agents, daemons and guards started with this test's state dir."""
        found = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"netmirror" in cmdline and str(self.state_dir).encode() in environ:
                found.append(cmdline.decode(errors="replace"))
        return found


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    name = f"t{random.randrange(16**6):06x}"
    box = Sandbox(name, index=random.randrange(20, 250))
    box.create()
    world = Env(box, tmp_path / "state")
    try:
        yield world
    finally:
        down = world.netmirror("down", "--all", timeout=60)
        leaks = []
        deadline = time.monotonic() + 5
        while (world.our_processes() or world.chains()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if world.chains():
            leaks.append(f"rules: {world.chains()}")
        if world.our_processes():
            leaks.append(f"processes: {world.our_processes()}")
        if world.state_dir.exists() and any(world.state_dir.iterdir()):
            leaks.append(f"state: {list(world.state_dir.iterdir())}")
        for proc in world.procs:
            proc.kill()
            proc.wait()
        box.destroy()
        if box.exists():
            leaks.append(f"namespace {box.netns}")
        assert down.returncode == 0, down.stderr
        assert not leaks, "left behind: " + "; ".join(leaks)
