"""Running the ``netmirror exec`` command: in its cgroup, with its signals forwarded."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from netmirror.cli.render import port_line, status_of
from netmirror.errors import CommandError
from netmirror.mounts.namespace import enter
from netmirror.mounts.plan import Plan

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def say_exec(session: str, outcome: dict[str, Any], command: list[str], env_pid: Any) -> None:
    """One line on stderr: what the command runs as, and what the session took."""
    status = status_of(outcome.get("status", {}))
    parts = [port_line(p) for p in status.ports]
    if outcome.get("exec", {}).get("cgroup"):
        parts.append("outgoing TCP, UDP and DNS through the target")
    elif outcome.get("exec", {}).get("proxy_env"):
        parts.append("outgoing through the target for programs that use ALL_PROXY/HTTP_PROXY")
    if env_pid:
        parts.append(f"environment of its process {env_pid}")
    files = outcome.get("exec", {}).get("files") or {}
    if files.get("root"):
        parts.append(f"its files (root at $NETMIRROR_ROOT={files['root']})")
    where = status.target
    sys.stderr.write(
        f"netmirror: running {shlex.join(command)} as if in {where} "
        f"(session {session}: {'; '.join(parts) or 'nothing to take'})\n"
    )
    sys.stderr.flush()


def run_command(
    command: list[str],
    env: dict[str, str],
    cgroup: Path | None,
    *,
    mounts: tuple[Plan, Path, str] | None = None,
) -> int:
    """Run the command in ``cgroup`` (and in a mount namespace made from ``mounts``:
    a plan, an empty directory for it, and the FUSE mount its sources are in); its
    exit status (128+N for signal N) is ours.
    """
    procs_file = str(cgroup / "cgroup.procs") if cgroup is not None else None
    parent = os.getpid()
    # What the child says of its mounts before it runs the command (then the pipe
    # closes on exec).
    report_r, report_w = os.pipe2(os.O_CLOEXEC)

    def prepare() -> None:
        # If netmirror exec is killed outright, its command goes with it (and with the
        # command, its mount namespace and its hold on the target's files).
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)  # exec died before the line above took effect
        if procs_file is not None:
            with open(procs_file, "w") as procs:
                procs.write(str(os.getpid()))
        if mounts is not None:
            try:
                warnings = enter(mounts[0], workspace=str(mounts[1]), fuse_root=mounts[2])
            except OSError as exc:
                os.write(report_w, f"error: {exc}\n".encode())
                raise
            for warning in warnings:
                os.write(report_w, f"warning: {warning}\n".encode())

    try:
        try:
            proc = subprocess.Popen(command, env=env, preexec_fn=prepare)
        except FileNotFoundError:
            raise CommandError(f"command not found: {command[0]}", 127) from None
        except PermissionError:
            raise CommandError(f"cannot run {command[0]}: permission denied", 126) from None
        except subprocess.SubprocessError:
            os.close(report_w)
            report_w = -1
            said = _read_all(report_r).strip().splitlines()
            reason = said[-1].removeprefix("error: ") if said else "it could not be prepared"
            raise CommandError(f"cannot give the command the target's files: {reason}", 1) from None
    finally:
        if report_w >= 0:
            os.close(report_w)
    for line in _read_all(report_r).splitlines():
        sys.stderr.write(f"netmirror: {line}\n")
    os.close(report_r)

    def forward(signum: int, frame: Any) -> None:
        # Ctrl-C on a terminal reaches the command directly (same process group).
        if signum == signal.SIGINT and sys.stdin.isatty():
            return
        # Like a terminal's Ctrl-C, the signal goes to the whole tree: every process
        # of the command's cgroup (a shell waits for its child before it reacts).
        pids = [proc.pid]
        if procs_file is not None:
            with contextlib.suppress(OSError, ValueError):
                pids = [int(pid) for pid in Path(procs_file).read_text().split()] or pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in signals}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
