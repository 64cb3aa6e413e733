"""A session's life as the CLI sees it: its directory, its daemon, its end.

The CLI never imports the daemon: it starts ``netmirror daemon`` as a process,
reads its progress on a pipe until it is ready, and later talks to it on the
session's control socket (:mod:`netmirror.wire.session` is the directory both
sides know).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from netmirror.errors import SessionError
from netmirror.mounts.namespace import detach_below
from netmirror.wire.ports import Claim, port_conflict
from netmirror.wire.session import (
    SessionDir,
    SessionRecord,
    list_session_dirs,
    pid_alive,
)

if TYPE_CHECKING:
    from netmirror.config import Config

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
CONTROL_TIMEOUT = 3.0


def control(
    sdir: SessionDir, command: str, *, timeout: float = CONTROL_TIMEOUT, **extra: Any
) -> dict[str, Any]:
    """One request on a session's control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(sdir.control_socket))
            sock.sendall(json.dumps({"command": command, **extra}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise SessionError(f"session {sdir.name!r} is not answering ({exc})") from None
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError:
        raise SessionError(f"session {sdir.name!r} gave a garbled answer") from None
    return answer


def kill(pid: int, start: int = 0, *, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; returns once the pid is gone.

    ``start`` (recorded start time) makes sure a reused pid is left alone.
    """
    if not pid_alive(pid, start):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while pid_alive(pid) and time.monotonic() < deadline + 2:
            time.sleep(0.05)


def clean_stale(sdir: SessionDir) -> bool:
    """Remove a session whose daemon is gone; True if it was stale."""
    try:
        record = sdir.read()
    except SessionError:
        if sdir.control_socket.exists() or sdir.record_path.exists():
            return False
        sdir.remove()
        return True
    if pid_alive(record.daemon_pid, record.daemon_start) or (
        record.daemon_pid == 0 and time.time() - record.created < 60
    ):
        return False
    # The agent removes its rules when it exits; its guard does if it is killed.
    kill(record.agent_pid, record.agent_start)
    sdir.remove()
    return True


def live_sessions() -> list[tuple[SessionDir, SessionRecord]]:
    live = []
    for sdir in list_session_dirs():
        if clean_stale(sdir):
            continue
        with contextlib.suppress(SessionError):
            live.append((sdir, sdir.read()))
    return live


def default_session_name(target: str, taken: set[str]) -> str:
    raw = target.rsplit("/", 1)[-1].lower()
    base = "".join(c if c.isalnum() else "-" for c in raw).strip("-")[:15].strip("-") or "session"
    name, n = base, 2
    while name in taken:
        name = f"{base}-{n}"
        n += 1
    return name


def new_session(config: Config, extra: dict[str, Any] | None = None) -> SessionDir:
    """Check the ports are free and create the session's directory."""
    assert config.target is not None
    live = live_sessions()
    held: dict[int, list[Claim]] = {}
    for sdir, record in live:
        if record.target != config.target:
            continue
        for p in record.config.get("ports", []):
            if p.get("mode") != "off":
                filtered = bool(p.get("http_filter")) and p.get("mode") == "steal"
                held.setdefault(p["remote"], []).append(Claim(sdir.name, filtered=filtered))
    for port in config.active_ports():
        new = Claim(config.session or "", filtered=port.http_filter is not None)
        conflict = port_conflict(port.remote, new, held.get(port.remote, []))
        if conflict is not None:
            raise SessionError(
                f"{conflict.reason} on {config.target} "
                f"(netmirror down --session {conflict.holder.session})"
            )
    taken = {sdir.name for sdir, _ in live}
    name = config.session or default_session_name(config.target, taken)
    if name in taken:
        raise SessionError(f"session {name!r} is already running (netmirror down --session {name})")
    sdir = SessionDir(name)
    if sdir.path.exists():
        sdir.remove()  # an empty or damaged left-over, not live (checked above)
    sdir.create(
        SessionRecord(
            name=name,
            target=config.target,
            config=config.model_dump(mode="json"),
            created=time.time(),
            extra=extra or {},
        )
    )
    return sdir


def start_daemon(
    sdir: SessionDir, config: Config, *, debug: bool, timeout: float | None
) -> dict[str, Any]:
    """Start the session's daemon and wait until it is ready; returns its ready message."""
    read_fd, write_fd = os.pipe()
    cmd = [
        sys.executable,
        "-m",
        "netmirror",
        "daemon",
        "--session",
        sdir.name,
        "--ready-fd",
        str(write_fd),
    ]
    if debug:
        cmd.insert(3, "--debug")  # a global option: before the subcommand
    with open(sdir.log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    limit = timeout or (config.agent.ready_timeout + 30)
    tty = sys.stderr.isatty()
    text = "starting the daemon"
    buffer = b""
    outcome: dict[str, Any] | None = None
    started = time.monotonic()
    frame = 0
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while outcome is None:
                elapsed = time.monotonic() - started
                if elapsed > limit:
                    outcome = {"error": f"not ready after {limit:.0f}s (last step: {text})"}
                    break
                if tty:
                    sys.stderr.write(
                        f"\r\x1b[K{SPINNER[frame % len(SPINNER)]} {text} ({elapsed:.1f}s)"
                    )
                    sys.stderr.flush()
                    frame += 1
                ready, _, _ = select.select([pipe], [], [], 0.1)
                if not ready:
                    continue
                chunk = pipe.read(65536)
                if not chunk:
                    code = proc.wait()
                    outcome = {
                        "error": f"the daemon exited with code {code} before it was ready"
                        f" (log: {sdir.log_path})"
                    }
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    with contextlib.suppress(ValueError):
                        message = json.loads(line)
                        if "progress" in message:
                            text = str(message["progress"])
                            if not tty:
                                sys.stderr.write(f"... {text}\n")
                        elif "warning" in message:
                            clear = "\r\x1b[K" if tty else ""
                            sys.stderr.write(f"{clear}warning: {message['warning']}\n")
                        elif "error" in message or "ready" in message:
                            outcome = message
    except KeyboardInterrupt:
        outcome = {"error": "interrupted"}
    finally:
        if tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
    if "error" in outcome:
        kill(proc.pid)
        with contextlib.suppress(SessionError):
            record = sdir.read()
            kill(record.agent_pid, record.agent_start)
        sdir.remove()
        raise SessionError(str(outcome["error"]))
    return outcome


def select_sessions(args: argparse.Namespace, *, allow_all: bool) -> list[SessionDir]:
    live = [sdir for sdir, _ in live_sessions()]
    if getattr(args, "all", False) and allow_all:
        return live
    if args.session:
        sdir = SessionDir(args.session)
        if not sdir.path.exists():
            raise SessionError(f"no session named {args.session!r}")
        return [sdir]
    if len(live) > 1:
        names = ", ".join(s.name for s in live)
        raise SessionError(
            f"several sessions are running ({names}): name one with --session"
            + (" or use --all" if allow_all else "")
        )
    return live


def stop_session(sdir: SessionDir, *, drain: float = 0.0) -> None:
    """Ask the daemon to end the session, wait for it, kill what is left.

    ``drain``: seconds the stolen connections still open may go on (new ones go to
    the target at once) before they are reset."""
    try:
        record = sdir.read()
    except SessionError:
        sdir.remove()
        return
    try:
        control(sdir, "down", drain=drain)
        deadline = time.monotonic() + 15 + drain
        while pid_alive(record.daemon_pid, record.daemon_start) and time.monotonic() < deadline:
            time.sleep(0.05)
    except SessionError:
        pass
    kill(record.daemon_pid, record.daemon_start)
    kill(record.agent_pid, record.agent_start)
    # A daemon killed before it could unmount the target's files (the kernel's
    # auto-unmount helper usually has): never remove the directory through them.
    detach_below(str(sdir.path))
    sdir.remove()
