"""Fixtures for tests in real network namespaces with real servers and clients.

Each test gets its own sandbox namespace, its own netmirror state directory and
servers started as processes; everything is torn down and checked for leaks
(namespaces, iptables chains, processes) even when the test fails.

Several test runs may share the machine: sandbox indexes and server ports are
reserved with lock files (see :meth:`sandbox.Sandbox.allocate` and
:mod:`tests.support.ports`), and every check looks only at this test's namespace,
state directory and sessions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sandbox import Sandbox
from tests.support.images import agent_podman  # noqa: F401 - a fixture for the whole run
from tests.support.ports import free_port
from tests.support.waiting import eventually, read_line

__all__ = ["REPO", "SERVERS", "Env", "free_port", "wait_ready"]

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


#: Sandbox indexes of the tests (the demo uses 77, the benchmarks 201 to 203).
SANDBOX_INDEXES = (100, 199)


def wait_ready(proc: subprocess.Popen[bytes], what: str, timeout: float = 10) -> None:
    """Wait for a server's ``ready`` line; kill it and fail if none comes in ``timeout``."""
    assert proc.stdout is not None
    try:
        line = read_line(proc.stdout, timeout, f"{what} did not start")
        if line.strip() != "ready":
            raise AssertionError(f"{what} did not start: it said {line!r}, not 'ready'")
    except AssertionError:
        proc.kill()
        proc.wait()
        raise


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

    def _our_pids(self) -> dict[int, str]:
        """pid -> command line of the netmirror processes with this test's state dir."""
        found = {}
        marker = b"NETMIRROR_STATE_DIR=" + str(self.state_dir).encode()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"netmirror" in cmdline and marker in environ:
                found[int(pid)] = cmdline.decode(errors="replace")
        return found

    def our_processes(self) -> list[str]:
        """netmirror agents, daemons and guards started with this test's state dir."""
        return list(self._our_pids().values())

    def teardown(self) -> list[str]:
        """Stop everything of this test; what had to be cleaned up by force, as problems.

        Every step runs even when one before it failed.
        """
        problems = []
        try:
            down = self.netmirror("down", "--all", timeout=60)
            if down.returncode != 0:
                problems.append(f"netmirror down --all failed: {down.stderr.strip()}")
        except subprocess.TimeoutExpired:
            problems.append("netmirror down --all did not finish in 60 s")
        # The agent removes its rules and exits on its own after down; give it time.
        with contextlib.suppress(AssertionError):
            eventually(lambda: not self.our_processes() and not self.chains(), 5, "")
        if chains := self.chains():
            problems.append(f"rules left behind: {chains}")
        if leaked := self._our_pids():
            problems.append(f"processes left behind: {list(leaked.values())}")
            for pid in leaked:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.state_dir.exists() and any(self.state_dir.iterdir()):
            problems.append(f"state left behind: {list(self.state_dir.iterdir())}")
        for proc in self.procs:
            proc.kill()
            proc.wait()
        return problems


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    box = Sandbox.allocate("t", first=SANDBOX_INDEXES[0], last=SANDBOX_INDEXES[1])
    problems: list[str] = []
    try:
        box.create()
        world = Env(box, tmp_path / "state")
        try:
            yield world
        finally:
            problems += world.teardown()
    finally:
        box.destroy()  # also lets the index go
        if box.exists():
            problems.append(f"namespace {box.netns} left behind")
    assert not problems, "; ".join(problems)
