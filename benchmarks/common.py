"""Helpers shared by the benchmarks: the netmirror CLI, iperf3, processes, ports, memory."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def netmirror(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60, check: bool = True
) -> str:
    """Run ``python -m netmirror ARGS``; its stdout. Raises with its stderr on failure."""
    out = subprocess.run(
        [sys.executable, "-m", "netmirror", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=dict(env) if env is not None else None,
    )
    if check and out.returncode != 0:
        raise RuntimeError(
            f"netmirror {' '.join(args)} failed ({out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[-500:]}"
        )
    return out.stdout


def iperf_json(
    host: str,
    port: int,
    *,
    seconds: float,
    reverse: bool = False,
    streams: int = 1,
    omit: int = 0,
    rate: str | None = None,
    busy_wait: float = 0.0,
) -> dict[str, Any]:
    """One iperf3 client run (upload unless ``reverse``); its JSON report.

    An iperf3 server runs one test at a time and refuses a client while it is still
    finishing the previous one ("the server is busy"): with ``busy_wait`` the run is
    tried again for that many seconds, and the report gets ``busy_waited_s``.
    """
    started = time.monotonic()
    refused = 0
    while True:
        attempt = time.monotonic()
        try:
            data = _iperf_once(host, port, seconds, reverse, streams, omit, rate)
        except RuntimeError as exc:
            if "busy" not in str(exc) or attempt - started > busy_wait:
                raise
            refused += 1
            time.sleep(0.1)
            continue
        if refused:
            data["busy_waited_s"] = round(attempt - started, 2)
        return data


def _iperf_once(
    host: str,
    port: int,
    seconds: float,
    reverse: bool,
    streams: int,
    omit: int,
    rate: str | None,
) -> dict[str, Any]:
    cmd = ["iperf3", "-J", "-c", host, "-p", str(port), "-t", str(seconds)]
    if omit:
        cmd += ["-O", str(omit)]
    if streams > 1:
        cmd += ["-P", str(streams)]
    if reverse:
        cmd.append("-R")
    if rate is not None:
        cmd += ["-b", rate]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=False, timeout=seconds + omit + 30
    )
    try:
        data: dict[str, Any] = json.loads(out.stdout or "{}")
    except ValueError:
        data = {"error": f"unparsable output: {out.stdout[-300:]!r}"}
    if "error" in data or out.returncode != 0:
        raise RuntimeError(f"iperf3 failed: {data.get('error', out.stderr.strip())}")
    return data


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, *, timeout: float = 10.0, proc: Any = None) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"{proc.args[0] if proc.args else 'process'} exited with code "
                    f"{proc.returncode} before listening on {host}:{port}"
                ) from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port}: {exc}") from None
            time.sleep(0.05)


def proc_status(pid: int) -> dict[str, str]:
    """The fields of ``/proc/PID/status``; empty if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process, None if it is gone."""
    value = proc_status(pid).get("VmRSS")
    if not value:
        return None
    number, _, unit = value.partition(" ")
    return int(number) * (1024 if unit.strip().lower() == "kb" else 1)


def open_fds(pid: int) -> int | None:
    """How many file descriptors a process holds."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def nofile_limit(pid: int) -> str | None:
    """The process's ``Max open files`` line of /proc/PID/limits (soft, hard)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft}/{hard}"
    except OSError:
        return None
    return None


class Processes:
    """Processes a benchmark started, each in a session of its own, all stopped at the end.

    Stopping signals each process group the benchmark started (its leader's pid is
    the group id), so the children a ``socat ... fork`` made go with it.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], *, grace: float = 3.0) -> None:
        """SIGTERM the process's group, SIGKILL it if still there after ``grace``."""
        if proc.poll() is not None:  # exited on its own: its group id may be reused
            if proc in self.procs:
                self.procs.remove(proc)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        # Children of a leader that exited first (socat forks) still hold the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def nginx_http_conf(root: Path, http: str) -> Path:
    """``root/nginx.conf``: one worker in the foreground, its files under ``root``, keep-alive
    without limits, and ``http`` inside the ``http`` block."""
    temp = "\n".join(
        f"  {kind}_temp_path {root}/tmp-{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = root / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
{temp}
  keepalive_requests 100000000;
  keepalive_timeout 120s;
{http}
}}
"""
    )
    return conf


def nginx_conf(root: Path, listen: str) -> Path:
    """An nginx config serving a 1 KiB page from ``root/www`` on ``listen``, keep-alive."""
    (root / "www").mkdir(parents=True, exist_ok=True)
    (root / "www" / "index.html").write_text("netmirror benchmark " * 51 + "\n")  # 1 KiB
    for path in (root.parent, root, root / "www"):
        path.chmod(0o755)
    (root / "www" / "index.html").chmod(0o644)
    return nginx_http_conf(
        root,
        f"""  default_type text/html;
  server {{
    listen {listen} backlog=4096;
    root {root}/www;
    location / {{ }}
  }}""",
    )
