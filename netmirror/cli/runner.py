"""Running the ``netmirror exec`` command: in its cgroup, with its signals forwarded."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from netmirror.cli.render import port_line, status_of
from netmirror.errors import CommandError


def say_exec(session: str, outcome: dict[str, Any], command: list[str], env_pid: Any) -> None:
    """One line on stderr: what the command runs as, and what the session took."""
    status = status_of(outcome.get("status", {}))
    parts = [port_line(p) for p in status.ports]
    if outcome.get("exec", {}).get("cgroup"):
        parts.append("outgoing TCP and DNS through the target")
    elif outcome.get("exec", {}).get("proxy_env"):
        parts.append("outgoing through the target for programs that use ALL_PROXY/HTTP_PROXY")
    if env_pid:
        parts.append(f"environment of its process {env_pid}")
    where = status.target
    sys.stderr.write(
        f"netmirror: running {shlex.join(command)} as if in {where} "
        f"(session {session}: {'; '.join(parts) or 'nothing to take'})\n"
    )
    sys.stderr.flush()


def run_command(command: list[str], env: dict[str, str], cgroup: Path | None) -> int:
    """Run the command in ``cgroup``; its exit status (128+N for signal N) is ours."""
    procs_file = str(cgroup / "cgroup.procs") if cgroup is not None else None

    def join_cgroup() -> None:
        if procs_file is not None:
            with open(procs_file, "w") as procs:
                procs.write(str(os.getpid()))

    try:
        proc = subprocess.Popen(command, env=env, preexec_fn=join_cgroup)
    except FileNotFoundError:
        raise CommandError(f"command not found: {command[0]}", 127) from None
    except PermissionError:
        raise CommandError(f"cannot run {command[0]}: permission denied", 126) from None

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
