"""The benchmark suite: netmirror steal against a direct path and a socat relay.

Run with ``make bench`` (root), or ``python -m benchmarks.suite``. One sandbox
"pod" (a network namespace joined by veth), real local apps on 127.0.0.1 (iperf3,
nginx, redis, a small reply server) and real clients (iperf3, wrk,
redis-benchmark, asyncio). Every scenario runs in the same run, interleaved round
by round, over three paths to the same local app:

- **direct**: the client talks to the local app on 127.0.0.1, no netmirror: the
  ceiling;
- **relay**: client -> pod address -> ``socat`` in the pod -> ``socat`` on the
  host (198.18.N.1) -> the local app: what a tuned C relay does with the same hops;
- **netmirror**: client -> pod address, stolen by ``netmirror up --steal`` into
  the local app.

Scenarios: bulk throughput (iperf3, 1 and 8 streams), HTTP keep-alive (wrk against
nginx), redis GET/SET (redis-benchmark, 1 and 50 clients), a new connection per
request, 10,000 concurrent stolen connections (memory of agent and daemon), and
the time from ``netmirror up`` to the first stolen connection answered.

A scenario that fails records its error and the suite goes on. Results:
``benchmarks/results/suite.json``, ``summary.md`` (also printed) and PNG plots.
Everything started is stopped at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks.common import (
    RESULTS,
    Processes,
    free_port,
    iperf_json,
    machine,
    netmirror,
    nginx_conf,
    nofile_limit,
    open_fds,
    rss_bytes,
)
from netmirror.agent.target_process import children
from sandbox import Sandbox

PATHS = ("direct", "relay", "netmirror")
SESSION = "suite"
UP_SESSION = "suiteup"
SANDBOX_NAME = "suite"
#: Outside the range the integration tests draw from (20-249) and the other benchmarks'.
SANDBOX_INDEX = 251
SOCAT_BUFFER = "262144"
HERE = Path(__file__).resolve().parent
REQUIRED = ("ip", "iptables", "iperf3", "wrk", "redis-server", "redis-benchmark", "socat", "ss")
MB = 1e6


@dataclass
class Service:
    """One local app and the pod ports that reach it."""

    name: str
    local: int
    """Its port on 127.0.0.1."""
    steal: int
    """The pod port netmirror steals into it."""
    relay: int | None = None
    """The pod port of the socat relay to it (none: no relay path)."""
    relay_host: int | None = None
    """The port of the host-side socat, on the host's sandbox address."""


def rotated(items: tuple[str, ...], by: int) -> list[str]:
    """``items`` starting at ``by``: each round starts with another path."""
    by %= len(items)
    return list(items[by:] + items[:by])


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def usage(pid: int) -> dict[str, int] | None:
    """CPU time (clock ticks, user and system) and read/write syscalls of a process so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        io_text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    counters = dict(line.split(": ") for line in io_text.splitlines() if ": " in line)
    return {
        "utime": int(fields[11]),
        "stime": int(fields[12]),
        "syscr": int(counters.get("syscr", 0)),
        "syscw": int(counters.get("syscw", 0)),
    }


def machine_ticks() -> tuple[int, int]:
    """Busy and total CPU time of the whole machine so far (clock ticks, all CPUs)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - fields[3] - fields[4], total


def usage_between(
    before: dict[str, dict[str, int] | None],
    after: dict[str, dict[str, int] | None],
    seconds: float,
) -> dict[str, dict[str, float]]:
    """Per process: percent of one core (total, user, system) and syscalls made."""
    hz = os.sysconf("SC_CLK_TCK")
    result = {}
    for name, start in before.items():
        end = after.get(name)
        if start is None or end is None or seconds <= 0:
            continue
        user = 100.0 * (end["utime"] - start["utime"]) / hz / seconds
        system = 100.0 * (end["stime"] - start["stime"]) / hz / seconds
        result[name] = {
            "cpu_pct": round(user + system, 1),
            "user_pct": round(user, 1),
            "sys_pct": round(system, 1),
            "read_syscalls": end["syscr"] - start["syscr"],
            "write_syscalls": end["syscw"] - start["syscw"],
            "cpu_s": round((user + system) / 100.0 * seconds, 4),
        }
    return result


def usage_text(sample: dict[str, Any]) -> str:
    """`` cpu agent 48% (sys 30%), daemon ...`` for a progress line; empty if not measured."""
    used = sample.get("usage") or {}
    parts = [
        f"{name} {u['cpu_pct']:.0f}% (sys {u['sys_pct']:.0f}%)"
        for name, u in used.items()
        if name != "guard"
    ]
    return "  cpu " + ", ".join(parts) if parts else ""


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.box = Sandbox(SANDBOX_NAME, index=SANDBOX_INDEX)
        self.procs = Processes()
        self.workdir = Path(tempfile.mkdtemp(prefix="netmirror-suite-"))
        self.state_dir = self.workdir / "state"
        self.state_dir.mkdir()
        self.env = {**os.environ, "NETMIRROR_STATE_DIR": str(self.state_dir)}
        self.services: dict[str, Service] = {}
        self.session_up = False
        self._pids: dict[str, int] = {}
        self.unavailable: dict[str, str] = {}
        self.pg_dir: Path | None = None
        """Parts of the setup that failed (a service name, "relay", "netmirror"), and why."""
        self.results: dict[str, Any] = {
            "machine": machine(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "paths": {
                "direct": "client -> 127.0.0.1:LOCAL (no netmirror)",
                "relay": (
                    f"client -> pod:PORT -> socat (pod, -b {SOCAT_BUFFER}, nodelay) -> "
                    "host 198.18.N.1 -> socat (host) -> 127.0.0.1:LOCAL"
                ),
                "netmirror": "client -> pod:PORT, stolen by netmirror up --steal PORT:LOCAL",
            },
            "settings": {k: v for k, v in vars(args).items() if k != "only"},
            "scenarios": {},
        }

    # --- helpers -------------------------------------------------------------------------

    def log(self, text: str) -> None:
        print(text, flush=True)

    def addr(self, path: str, service: str) -> tuple[str, int]:
        for part in (service, "local apps", path):
            if part in self.unavailable:
                raise RuntimeError(f"{part} is unavailable: {self.unavailable[part]}")
        svc = self.services[service]
        if path == "direct":
            return "127.0.0.1", svc.local
        if path == "relay":
            if svc.relay is None:
                raise RuntimeError(f"no relay for {service}")
            return self.box.pod_ip, svc.relay
        return self.box.pod_ip, svc.steal

    def wait_listening(self, port: int, *, in_pod: bool = False, timeout: float = 10) -> None:
        """Wait for a TCP listener on ``port`` (seen by ``ss``: no test connection made)."""
        argv = ["ss", "-Hltn", f"sport = :{port}"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = (
                self.box.run(*argv).stdout
                if in_pod
                else subprocess.run(argv, capture_output=True, text=True, check=False).stdout
            )
            if out.strip():
                return
            time.sleep(0.05)
        raise RuntimeError(f"nothing listens on port {port}{' in the pod' if in_pod else ''}")

    def status(self, session: str = SESSION) -> dict[str, Any]:
        out = netmirror("status", "--json", "--session", session, env=self.env, timeout=20)
        sessions: list[dict[str, Any]] = json.loads(out)["sessions"]
        if not sessions:
            raise RuntimeError(f"session {session} is not running")
        return sessions[0]

    def port_status(self, remote: int) -> dict[str, Any]:
        """``netmirror status`` of one stolen port of the main session."""
        for port in self.status()["ports"]:
            if port["remote"] == remote:
                return dict(port)
        raise RuntimeError(f"port {remote} is not in the session's status")

    def netmirror_pids(self) -> dict[str, int]:
        """daemon, agent and guard pids of the main session."""
        st = self.status()
        pids = {"daemon": int(st["daemon_pid"]), "agent": int(st["agent"]["pid"])}
        kids = children(pids["agent"])
        if kids:
            pids["guard"] = kids[0]
        return pids

    def measured(
        self, path: str, run: Callable[[], dict[str, Any]], errors: list[str], label: str
    ) -> dict[str, Any] | None:
        """Run one measurement; on the netmirror path also what agent and daemon used."""
        pids: dict[str, int] = {}
        if path == "netmirror":
            pids = self.pids()
        before = {name: usage(pid) for name, pid in pids.items()}
        machine_before = machine_ticks()
        started = time.monotonic()
        try:
            sample = run()
        except Exception as exc:
            errors.append(f"{label} {path}: {type(exc).__name__}: {exc}")
            self.log(f"   {path:9} FAILED: {exc}")
            return None
        elapsed = time.monotonic() - started
        busy, total = (b - a for a, b in zip(machine_before, machine_ticks(), strict=True))
        hz = os.sysconf("SC_CLK_TCK")
        # Everything the machine did meanwhile: clients, app, relay or netmirror, kernel.
        sample["machine_cpu_s"] = round(busy / hz, 3)
        sample["machine_busy_pct"] = round(100.0 * busy / total, 1) if total else None
        if pids:
            after = {name: usage(pid) for name, pid in pids.items()}
            sample["usage"] = usage_between(before, after, elapsed)
        return sample

    def pids(self) -> dict[str, int]:
        """The main session's pids, asked once (again if one of them is gone)."""
        if not self._pids or not all(Path(f"/proc/{p}").exists() for p in self._pids.values()):
            try:
                self._pids = self.netmirror_pids()
            except Exception:
                self._pids = {}
        return self._pids

    def save(self) -> None:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "suite.json").write_text(json.dumps(self.results, indent=2, default=str))

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        missing = [c for c in REQUIRED if shutil.which(c) is None]
        if missing:
            raise RuntimeError(f"missing commands: {', '.join(missing)} (make bench installs them)")
        if self.box.exists():
            self.box.destroy()
        self.box.create()
        self.log(f"sandbox pod {self.box.target}: {self.box.pod_ip}")
        steal = {
            "iperf": 5201,
            "http": 8080,
            "redis": 6379,
            "pg": 5432,
            "reply": 7000,
            "hold": 7001,
        }
        relayed = {"iperf": 15201, "http": 18080, "redis": 16379, "pg": 15432, "reply": 17000}
        for name, pod_port in steal.items():
            svc = Service(name, local=free_port(), steal=pod_port)
            if name in relayed:
                svc.relay = relayed[name]
                svc.relay_host = free_port(self.box.host_ip)
            self.services[name] = svc
        # The reply server serves "reply" and "hold" and the up-time scenario's port.
        self.up_local = free_port()
        # A part that fails is recorded; the scenarios needing it record errors, the
        # others run.
        for what, step in (
            ("local apps", self.start_apps),
            ("relay", self.start_relays),
            ("netmirror", self.up),
        ):
            try:
                step()
            except Exception as exc:
                self.unavailable[what] = f"{type(exc).__name__}: {exc}"
                self.log(f"setup of {what} FAILED: {exc}")
        if self.unavailable:
            self.results["setup_errors"] = self.unavailable

    def start_apps(self) -> None:
        svc = self.services
        self.procs.start(["iperf3", "-s", "-p", str(svc["iperf"].local), "-B", "127.0.0.1"])
        self.wait_listening(svc["iperf"].local)
        self.procs.start(
            [
                sys.executable,
                "-m",
                "benchmarks.apps",
                "server",
                "--port",
                str(svc["reply"].local),
                "--port",
                str(svc["hold"].local),
                "--port",
                str(self.up_local),
            ],
            cwd=HERE.parent,
        )
        for port in (svc["reply"].local, svc["hold"].local, self.up_local):
            self.wait_listening(port)
        redis_conf = self.workdir / "redis.conf"
        redis_conf.write_text(
            f'port {svc["redis"].local}\nbind 127.0.0.1\nsave ""\nappendonly no\n'
            f'daemonize no\ndir {self.workdir}\nlogfile ""\nmaxclients 10000\n'
        )
        self.procs.start(["redis-server", str(redis_conf)])
        self.wait_listening(svc["redis"].local)
        try:
            self.start_postgres(svc["pg"].local)
        except Exception as exc:
            self.unavailable["pg"] = f"PostgreSQL: {exc}"
            self.log(f"PostgreSQL FAILED: {exc}")
        if shutil.which("nginx") is None:
            self.unavailable["http"] = "nginx is not installed (make bench installs nginx-light)"
        else:
            try:
                self.start_nginx(svc["http"].local)
            except Exception as exc:
                self.unavailable["http"] = f"nginx: {exc}"
                self.log(f"nginx FAILED: {exc}")
        self.log("local apps: " + ", ".join(f"{s.name} 127.0.0.1:{s.local}" for s in svc.values()))

    def start_postgres(self, port: int) -> None:
        """A scratch PostgreSQL cluster on 127.0.0.1 (Debian's server, run as postgres),
        with pgbench's tables at scale 1."""
        bindir = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
        if bindir is None or shutil.which("pgbench") is None:
            raise RuntimeError("not installed (make bench installs postgresql)")
        data = Path(tempfile.mkdtemp(prefix="nm-bench-pg-"))
        self.pg_dir = data
        shutil.chown(data, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [*as_pg, str(bindir / "initdb"), "-D", str(data / "db"), "--auth=trust", "-U", "bench"],
            check=True,
            capture_output=True,
        )
        self.procs.start(
            [
                *as_pg,
                str(bindir / "postgres"),
                "-D",
                str(data / "db"),
                "-p",
                str(port),
                "-k",
                str(data),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ]
        )
        self.wait_listening(port)
        subprocess.run(
            [
                "pgbench",
                "-i",
                "-q",
                "-s",
                "1",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "bench",
                "postgres",
            ],
            check=True,
            capture_output=True,
        )

    def pgbench(self) -> dict[str, Any]:
        samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
        errors: list[str] = []
        if "pg" in self.unavailable:
            return {"error": self.unavailable["pg"]}
        for rnd in range(self.args.rounds):
            for path in rotated(PATHS, rnd):
                host, port = self.addr(path, "pg")
                sample = self.measured(
                    path,
                    functools.partial(run_pgbench, host, port, seconds=self.args.seconds),
                    errors,
                    "pgbench",
                )
                if sample is None:
                    continue
                samples[path].append(sample)
                self.log(f"   round {rnd + 1} {path:9} {sample['tps']:9,.0f} tps")
        return {
            "samples": samples,
            "median_tps": {p: median([s["tps"] for s in samples[p]]) for p in PATHS},
            "errors": errors,
        }

    def start_nginx(self, port: int) -> None:
        root = self.workdir / "nginx"
        conf = nginx_conf(root, f"127.0.0.1:{port}")
        self.procs.start(["nginx", "-p", str(root), "-e", str(root / "error.log"), "-c", str(conf)])
        self.wait_listening(port)

    def start_relays(self) -> None:
        host_ip = self.box.host_ip
        for svc in self.services.values():
            if svc.relay is None or svc.relay_host is None:
                continue
            self.procs.start(
                [
                    "socat",
                    "-b",
                    SOCAT_BUFFER,
                    f"TCP-LISTEN:{svc.relay_host},bind={host_ip},fork,reuseaddr,nodelay,"
                    "backlog=4096",
                    f"TCP:127.0.0.1:{svc.local},nodelay",
                ]
            )
            self.procs.start(
                self.box.cmd(
                    "socat",
                    "-b",
                    SOCAT_BUFFER,
                    f"TCP-LISTEN:{svc.relay},fork,reuseaddr,nodelay,backlog=4096",
                    f"TCP:{host_ip}:{svc.relay_host},nodelay",
                )
            )
            self.wait_listening(svc.relay_host)
            self.wait_listening(svc.relay, in_pod=True)

    def up(self) -> None:
        steals: list[str] = []
        for svc in self.services.values():
            if svc.name in self.unavailable:
                continue
            steals += ["--steal", f"{svc.steal}:{svc.local}"]
        started = time.monotonic()
        netmirror("up", "--target", self.box.target, *steals, "--session", SESSION, env=self.env)
        self.session_up = True
        pids = self.netmirror_pids()
        self.results["netmirror"] = {
            "up_seconds": round(time.monotonic() - started, 3),
            "pids": pids,
            "nofile_limits": {name: nofile_limit(pid) for name, pid in pids.items()},
            "rss_idle_bytes": {name: rss_bytes(pid) for name, pid in pids.items()},
        }
        self.log(f"netmirror session {SESSION!r} up: " + " ".join(steals[1::2]))

    def cleanup(self) -> None:
        """Stop everything: sessions, processes, namespace, temp files. Never raises."""
        for what, step in (
            ("netmirror down", self._down_all),
            ("processes", self.procs.stop_all),
            ("sandbox", self.box.destroy),
            ("temp dir", lambda: shutil.rmtree(self.workdir, ignore_errors=True)),
            (
                "PostgreSQL's dir",
                lambda: shutil.rmtree(self.pg_dir, ignore_errors=True) if self.pg_dir else None,
            ),
        ):
            try:
                step()
            except Exception as exc:
                print(f"cleanup of {what} failed: {exc}", file=sys.stderr)

    def _down_all(self) -> None:
        netmirror("down", "--all", env=self.env, timeout=60, check=False)

    # --- scenarios -----------------------------------------------------------------------

    def scenario(self, key: str, title: str, run: Callable[[], dict[str, Any]]) -> None:
        if self.args.only and key not in self.args.only:
            return
        self.log(f"\n== {title}")
        started = time.monotonic()
        try:
            data = run()
        except Exception as exc:
            self.log(f"   FAILED: {type(exc).__name__}: {exc}")
            data = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        data["title"] = title
        data["wall_seconds"] = round(time.monotonic() - started, 1)
        self.results["scenarios"][key] = data
        self.save()

    def bulk(self) -> dict[str, Any]:
        seconds = self.args.seconds
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {
            f"{n}": {p: [] for p in PATHS} for n in (1, 8)
        }
        errors: list[str] = []
        for rnd in range(self.args.rounds):
            for streams in (1, 8):
                for path in rotated(PATHS, rnd):
                    host, port = self.addr(path, "iperf")

                    def run(host: str = host, port: int = port, n: int = streams) -> dict[str, Any]:
                        data = iperf_json(host, port, seconds=seconds, streams=n, busy_wait=5)
                        end = data["end"]
                        return {
                            "bytes_per_s": float(end["sum_received"]["bits_per_second"]) / 8,
                            "retransmits": end.get("sum_sent", {}).get("retransmits"),
                            "bytes": int(end["sum_received"]["bytes"]),
                            "server_busy_waited_s": data.get("busy_waited_s"),
                        }

                    sample = self.measured(path, run, errors, f"iperf3 -P {streams}")
                    if sample is not None:
                        samples[str(streams)][path].append(sample)
                        self.log(
                            f"   round {rnd + 1} {streams} stream(s) {path:9} "
                            f"{sample['bytes_per_s'] / MB:8,.0f} MB/s"
                            + usage_text(sample)
                            + (
                                f"  (waited {sample['server_busy_waited_s']} s for the iperf3"
                                " server to finish the previous test)"
                                if sample["server_busy_waited_s"]
                                else ""
                            )
                        )
        medians = {
            n: {p: median([s["bytes_per_s"] for s in by_path[p]]) for p in PATHS}
            for n, by_path in samples.items()
        }
        return {
            "seconds": seconds,
            "samples": samples,
            "median_bytes_per_s": medians,
            "errors": errors,
        }

    def wrk(self, host: str, port: int, seconds: float) -> dict[str, Any]:
        cmd = [
            "wrk",
            "-t",
            "2",
            "-c",
            "50",
            "-d",
            f"{seconds}s",
            "-s",
            str(HERE / "wrk_report.lua"),
            f"http://{host}:{port}/index.html",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
        if out.returncode != 0 or line is None:
            raise RuntimeError(
                f"wrk failed ({out.returncode}): {(out.stderr or out.stdout)[-300:]}"
            )
        data: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
        data["requests_per_s"] = data["requests"] / (data["duration_us"] / 1e6)
        data["errors"] = sum(v for k, v in data.items() if k.startswith("err_"))
        if data["requests"] == 0:
            raise RuntimeError("wrk completed no request")
        return data

    def http(self) -> dict[str, Any]:
        if "http" in self.unavailable:
            raise RuntimeError(self.unavailable["http"])
        seconds = self.args.seconds
        samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
        errors: list[str] = []
        for rnd in range(self.args.rounds):
            for path in rotated(PATHS, rnd):
                host, port = self.addr(path, "http")
                sample = self.measured(
                    path, functools.partial(self.wrk, host, port, seconds), errors, "wrk"
                )
                if sample is not None:
                    samples[path].append(sample)
                    self.log(
                        f"   round {rnd + 1} {path:9} {sample['requests_per_s']:9,.0f} req/s  "
                        f"p50 {sample['p50_us']:7,.0f} us  p99 {sample['p99_us']:7,.0f} us"
                        f"  errors {sample['errors']}" + usage_text(sample)
                    )
        medians = {
            p: {
                key: median([s[key] for s in samples[p]])
                for key in ("requests_per_s", "p50_us", "p99_us")
            }
            for p in PATHS
        }
        result: dict[str, Any] = {
            "seconds": seconds,
            "connections": 50,
            "threads": 2,
            "samples": samples,
            "median": medians,
            "errors": errors,
        }
        if self.args.profile:
            result["profile"] = self.profile(seconds)
        return result

    def profile(self, seconds: float) -> dict[str, Any]:
        """One more wrk run on the netmirror path with py-spy on agent and daemon."""
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(pyspy).exists():
            return {"error": "py-spy not found (.venv/bin/pip install py-spy)"}
        pids = self.netmirror_pids()
        rate = 250
        spies = {}
        for name in ("agent", "daemon"):
            out = Path(f"/tmp/netmirror-pyspy-{name}.txt")
            spies[name] = (
                out,
                subprocess.Popen(
                    [
                        pyspy,
                        "record",
                        "--pid",
                        str(pids[name]),
                        "--duration",
                        str(int(seconds)),
                        "--rate",
                        str(rate),
                        "--format",
                        "raw",
                        "--output",
                        str(out),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        self.log("   profiling agent and daemon with py-spy during one more wrk run")
        host, port = self.addr("netmirror", "http")
        try:
            run = self.wrk(host, port, seconds)
        finally:
            for _, proc in spies.values():
                try:
                    proc.wait(timeout=seconds + 20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        report: dict[str, Any] = {
            "requests_per_s_while_profiled": run["requests_per_s"],
            "rate_hz": rate,
            "seconds": seconds,
        }
        for name, (out, proc) in spies.items():
            if not out.exists():
                stderr = proc.stderr.read() if proc.stderr else ""
                report[name] = {"error": f"py-spy wrote nothing: {stderr.strip()[-300:]}"}
                continue
            report[name] = summarize_profile(out, rate * seconds)
            report[name]["raw"] = str(out)
            top = ", ".join(f"{f} {p}%" for f, p in report[name]["self"][:6])
            self.log(f"   {name}: busy {report[name]['busy_pct']}% of a core; top: {top}")
        return report

    def redis(self) -> dict[str, Any]:
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
        errors: list[str] = []
        for rnd in range(self.args.rounds):
            for clients in (1, 8, 50):
                requests = self.args.redis_requests * (5 if clients > 1 else 1)
                for path in rotated(PATHS, rnd):
                    host, port = self.addr(path, "redis")

                    def run(
                        host: str = host, port: int = port, c: int = clients, n: int = requests
                    ) -> dict[str, Any]:
                        return {"tests": redis_benchmark(host, port, clients=c, requests=n)}

                    sample = self.measured(path, run, errors, f"redis-benchmark -c {clients}")
                    if sample is None:
                        continue
                    for test, row in sample["tests"].items():
                        row = {
                            **row,
                            "usage": sample.get("usage"),
                            "machine_cpu_s": sample.get("machine_cpu_s"),
                            "machine_busy_pct": sample.get("machine_busy_pct"),
                            "ops_in_run": requests * len(sample["tests"]),
                        }
                        key = f"{test}/c{clients}"
                        samples.setdefault(key, {p: [] for p in PATHS})[path].append(row)
                        p50, p99 = row["p50_ms"] * 1e3, row["p99_ms"] * 1e3
                        self.log(
                            f"   round {rnd + 1} {key:7} {path:9} {row['rps']:9,.0f} req/s  "
                            f"p50 {p50:6,.0f} us  p99 {p99:6,.0f} us"
                        )
        medians = {
            key: {
                p: {
                    field: median([s[field] for s in by_path[p]])
                    for field in ("rps", "p50_ms", "p99_ms")
                }
                for p in PATHS
            }
            for key, by_path in samples.items()
        }
        return {"samples": samples, "median": medians, "errors": errors}

    def connrate(self) -> dict[str, Any]:
        samples: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
        errors: list[str] = []
        for rnd in range(self.args.rounds):
            for path in rotated(PATHS, rnd):
                host, port = self.addr(path, "reply")
                sample = self.measured(
                    path,
                    functools.partial(
                        run_app,
                        "connrate",
                        "--host",
                        host,
                        "--port",
                        str(port),
                        "-n",
                        str(self.args.connections),
                        "-c",
                        "50",
                    ),
                    errors,
                    "connrate",
                )
                if sample is not None:
                    samples[path].append(sample)
                    self.log(
                        f"   round {rnd + 1} {path:9} {sample['connections_per_s']:8,.0f} conn/s"
                        f"  ok {sample['ok']}/{sample['connections']}  p50 {sample['p50_ms']:.2f}"
                        f" ms  p99 {sample['p99_ms']:.2f} ms"
                        + (f"  errors {sample['errors']}" if sample["failed"] else "")
                        + usage_text(sample)
                    )
        medians = {p: median([s["connections_per_s"] for s in samples[p]]) for p in PATHS}
        return {
            "connections": self.args.connections,
            "concurrency": 50,
            "samples": samples,
            "median_connections_per_s": medians,
            "errors": errors,
        }

    def hold(self) -> dict[str, Any]:
        count = self.args.hold
        result: dict[str, Any] = {"connections": count, "errors": []}
        pids = self.netmirror_pids()
        result["rss_before_bytes"] = {name: rss_bytes(pid) for name, pid in pids.items()}
        result["nofile_limits"] = {name: nofile_limit(pid) for name, pid in pids.items()}
        for path in ("direct", "netmirror"):
            host, port = self.addr(path, "hold")
            entry: dict[str, Any] = {}
            result[path] = entry
            client = self.procs.start(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.apps",
                    "hold",
                    "--host",
                    host,
                    "--port",
                    str(port),
                    "-n",
                    str(count),
                ],
                cwd=HERE.parent,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                entry["opened"] = read_json_line(client, timeout=180)
                self.log(
                    f"   {path:9} opened {entry['opened']['ok']:,}/{count:,} in "
                    f"{entry['opened']['seconds']:.1f} s"
                    + (f"  errors {entry['opened']['errors']}" if entry["opened"]["failed"] else "")
                )
                if path == "netmirror":
                    time.sleep(0.5)
                    entry["rss_bytes"] = {name: rss_bytes(pid) for name, pid in pids.items()}
                    entry["fds"] = {name: open_fds(pid) for name, pid in pids.items()}
                    port_status = self.port_status(self.services["hold"].steal)
                    entry["status_port"] = port_status
                    rss = entry["rss_bytes"]
                    self.log(
                        "   netmirror RSS with them open: "
                        + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in rss.items() if v)
                        + f"; open in status: {port_status['connections_open']:,}"
                        + f"; fds {entry['fds']}"
                    )
                assert client.stdin is not None
                client.stdin.write("check\n")
                client.stdin.flush()
                entry["checked"] = read_json_line(client, timeout=180)
                self.log(
                    f"   {path:9} checked {entry['checked']['ok']:,}/"
                    f"{entry['checked']['held']:,} still answer, in "
                    f"{entry['checked']['seconds']:.1f} s"
                )
                client.stdin.write("close\n")
                client.stdin.flush()
                entry["closed"] = read_json_line(client, timeout=60)
                entry["all_work"] = (
                    entry["opened"]["ok"] == count and entry["checked"]["ok"] == count
                )
            except Exception as exc:
                result["errors"].append(f"{path}: {type(exc).__name__}: {exc}")
                self.log(f"   {path:9} FAILED: {exc}")
            finally:
                self.procs.stop(client, grace=10)
        # Memory once they are closed, and errors netmirror saw (EMFILE and the like).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            port_status = self.port_status(self.services["hold"].steal)
            if port_status["connections_open"] == 0:
                break
            time.sleep(0.5)
        result["status_after"] = port_status
        result["rss_after_bytes"] = {name: rss_bytes(pid) for name, pid in pids.items()}
        logs = netmirror("logs", "--session", SESSION, env=self.env, check=False)
        emfile = [x for x in logs.splitlines() if "Too many open files" in x or "EMFILE" in x]
        result["emfile_lines"] = emfile[:5]
        # uvloop drops a connection it cannot accept without logging: compare the
        # descriptors held with the limit as well.
        full = []
        for name, fds in ((result.get("netmirror") or {}).get("fds") or {}).items():
            soft = (result["nofile_limits"].get(name) or "").split("/")[0]
            if fds is not None and soft.isdigit() and fds >= int(soft) - 8:
                full.append(f"{name} holds {fds} descriptors, its limit is {soft}")
        result["at_fd_limit"] = full
        result["emfile"] = bool(emfile or full)
        if emfile or full:
            self.log(f"   netmirror ran out of file descriptors: {(emfile + full)[0]}")
        return result

    def up_time(self) -> dict[str, Any]:
        host, port = self.box.pod_ip, 7002
        samples: list[dict[str, Any]] = []
        errors: list[str] = []
        for attempt in range(self.args.up_runs):
            if answers(host, port):
                raise RuntimeError(f"{host}:{port} answers before up")
            stop = threading.Event()
            found: list[float] = []
            started = time.monotonic()
            poller = threading.Thread(
                target=poll_first_answer, args=(host, port, started, stop, found), daemon=True
            )
            poller.start()
            up = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "netmirror",
                    "up",
                    "--target",
                    self.box.target,
                    "--steal",
                    f"{port}:{self.up_local}",
                    "--session",
                    UP_SESSION,
                ],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                _, stderr = up.communicate(timeout=60)
                up_done = time.monotonic() - started
                poller.join(timeout=10)
                if up.returncode != 0:
                    errors.append(f"up #{attempt + 1} failed: {stderr.strip()[-300:]}")
                    continue
                if not found:
                    errors.append(f"up #{attempt + 1}: no stolen answer within 10 s of up's return")
                    continue
                samples.append({"first_answer_s": found[0], "up_returned_s": up_done})
                self.log(
                    f"   run {attempt + 1}: first stolen connection answered after "
                    f"{found[0] * 1e3:,.0f} ms (up returned after {up_done * 1e3:,.0f} ms)"
                )
            finally:
                stop.set()
                if up.poll() is None:
                    up.kill()
                    up.wait()
                netmirror("down", "--session", UP_SESSION, env=self.env, check=False)
        return {
            "runs": self.args.up_runs,
            "samples": samples,
            "median_first_answer_s": median([s["first_answer_s"] for s in samples]),
            "median_up_returned_s": median([s["up_returned_s"] for s in samples]),
            "errors": errors,
        }

    def run(self) -> None:
        self.setup()
        self.save()
        self.scenario("bulk", "1. iperf3 bulk upload, 1 and 8 streams", self.bulk)
        self.scenario("http", "2. wrk HTTP keep-alive against nginx, 50 connections", self.http)
        self.scenario("redis", "3. redis-benchmark GET/SET, 1, 8 and 50 clients", self.redis)
        self.scenario("pgbench", "3b. pgbench -S (select only), 8 clients", self.pgbench)
        self.scenario("connrate", "4. a new connection per request", self.connrate)
        self.scenario(
            "hold", f"5. {self.args.hold:,} concurrent stolen connections held open", self.hold
        )
        self.scenario("up", "6. netmirror up -> first stolen connection answered", self.up_time)


# --- clients -------------------------------------------------------------------------------


def run_pgbench(host: str, port: int, *, seconds: int, clients: int = 8) -> dict[str, Any]:
    """``pgbench -S`` (read-only, one SELECT per transaction); its tps."""
    out = subprocess.run(
        [
            "pgbench",
            "-S",
            "-n",
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(seconds),
            "-h",
            host,
            "-p",
            str(port),
            "-U",
            "bench",
            "postgres",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("tps = "):
            return {"tps": float(line.split()[2])}
    raise RuntimeError(f"pgbench failed: {(out.stderr or out.stdout).strip()[-300:]}")


def redis_benchmark(host: str, port: int, *, clients: int, requests: int) -> dict[str, Any]:
    """GET and SET: requests/s and latency percentiles (ms), from ``--csv``."""
    cmd = [
        "redis-benchmark",
        "-h",
        host,
        "-p",
        str(port),
        "-t",
        "set,get",
        "-c",
        str(clients),
        "-n",
        str(requests),
        "--csv",
        "--precision",
        "3",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {(out.stderr or out.stdout).strip()[-300:]}")
    return parse_redis_csv(out.stdout)


def parse_redis_csv(text: str) -> dict[str, dict[str, float]]:
    """Rows of redis-benchmark ``--csv`` by test name.

    redis-benchmark 6.2+ prints a header (test, rps, avg/min/p50/p95/p99/max
    latency in ms); older ones print ``"TEST","RPS"`` rows without latencies.
    """
    lines = [x for x in text.splitlines() if x.startswith('"')]
    if not lines:
        raise RuntimeError(f"no CSV in redis-benchmark's output: {text[-300:]!r}")
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    header = [h.strip().lower() for h in rows[0]]
    if "rps" not in header:
        raise RuntimeError(
            "this redis-benchmark prints no latency percentiles with --csv "
            f"(header {rows[0]!r}); redis-tools 6.2 or newer is needed"
        )
    parsed: dict[str, dict[str, float]] = {}
    for row in rows[1:]:
        fields = dict(zip(header, row, strict=False))
        name = fields["test"].split()[0].upper()
        try:
            parsed[name] = {
                "rps": float(fields["rps"]),
                "p50_ms": float(fields["p50_latency_ms"]),
                "p99_ms": float(fields["p99_latency_ms"]),
                "avg_ms": float(fields["avg_latency_ms"]),
            }
        except (KeyError, ValueError) as exc:
            raise RuntimeError(f"unexpected redis-benchmark CSV row {row!r}: {exc}") from None
    if not parsed:
        raise RuntimeError(f"no result rows in redis-benchmark's output: {text[-300:]!r}")
    return parsed


def run_app(*argv: str, timeout: float = 120) -> dict[str, Any]:
    """Run a ``benchmarks.apps`` client; its JSON line."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.apps", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=HERE.parent,
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmarks.apps {argv[0]} failed: {out.stderr.strip()[-300:]}")
    data: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if data.get("ok") == 0:
        raise RuntimeError(f"no connection worked: {data.get('errors')}")
    return data


def read_json_line(proc: subprocess.Popen[str], *, timeout: float) -> dict[str, Any]:
    """The next JSON line a child prints, or an error if it exits or takes too long."""
    stdout = proc.stdout
    assert stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box:
        raise RuntimeError(f"no answer from the client within {timeout:.0f} s")
    if not box[0]:
        raise RuntimeError(f"the client exited with code {proc.wait()}")
    data: dict[str, Any] = json.loads(box[0])
    return data


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if ``host:port`` answers ``pong`` to ``ping``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"ping\n")
            return sock.recv(16).startswith(b"pong")
    except OSError:
        return False


def poll_first_answer(
    host: str, port: int, started: float, stop: threading.Event, found: list[float]
) -> None:
    """Try ``host:port`` every 10 ms; record when it first answers."""
    while not stop.is_set():
        if answers(host, port):
            found.append(time.monotonic() - started)
            return
        time.sleep(0.01)


def summarize_profile(path: Path, expected_samples: float) -> dict[str, Any]:
    """Self time per function and busy share from py-spy's raw (collapsed) output.

    py-spy leaves out idle samples (waiting in epoll), so samples / expected is the
    share of a core the process was busy. Self time in ``Runner.run`` is time in
    uvloop's C code below Python (the loop, socket reads); in a function calling
    ``transport.write`` it is mostly the write system call.
    """
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        if stack.rsplit(";", 1)[-1].startswith(IDLE_FRAMES):
            continue  # a thread blocked on a lock or queue: py-spy cannot tell it is idle
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] + f" ({short_file(f)})" for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def top(table: dict[str, int], n: int) -> list[tuple[str, float]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:n]
        return [(name, round(100.0 * count / total, 1)) for name, count in ranked]

    return {
        "samples": total,
        "busy_pct": round(100.0 * total / expected_samples, 1) if expected_samples else None,
        "self": top(own, 15) if total else [],
        "inclusive": top(inclusive, 25) if total else [],
    }


#: Leaf frames of threads that wait (executor workers on their queue).
IDLE_FRAMES = ("_worker (concurrent/futures/thread.py", "Condition.wait (", "Event.wait (")


def short_file(frame: str) -> str:
    """``module.py`` of a py-spy frame ``func (path/module.py:line)``: per function."""
    _, _, where = frame.partition(" (")
    where = where.rstrip(")")
    return where.rsplit("/", 1)[-1].rsplit(":", 1)[0]


# --- report --------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    values: dict[str, float | None]
    unit: str
    fmt: str = ",.0f"
    scale: float = 1.0
    target: str = ""
    met: bool | None = None
    note: str = ""


def fmt_value(value: float | None, row: Row) -> str:
    if value is None:
        return "—"
    return f"{value * row.scale:{row.fmt}} {row.unit}".strip()


def ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "—"
    return f"{a / b:.2f}"


def build_rows(results: dict[str, Any]) -> list[Row]:
    sc = results["scenarios"]
    rows: list[Row] = []

    def get(*keys: str) -> Any:
        node: Any = sc
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    for n in ("1", "8"):
        values = get("bulk", "median_bytes_per_s", n) or {}
        row = Row(
            f"bulk upload, {n} stream{'s' if n != '1' else ''} (iperf3)",
            values,
            "MB/s",
            scale=1 / MB,
        )
        if n == "1":
            row.target = ">= 1.0x relay"
            nm, relay = values.get("netmirror"), values.get("relay")
            row.met = nm >= relay if nm is not None and relay is not None else None
        rows.append(row)
    http = get("http", "median") or {}
    rps = {p: (http.get(p) or {}).get("requests_per_s") for p in PATHS}
    row = Row("HTTP keep-alive (wrk, nginx, 50 conns)", rps, "req/s", target=">= 0.5x direct")
    if rps.get("netmirror") is not None and rps.get("direct"):
        row.met = rps["netmirror"] >= 0.5 * rps["direct"]  # type: ignore[operator]
    rows.append(row)
    for pct in ("p50", "p99"):
        values = {p: (http.get(p) or {}).get(f"{pct}_us") for p in PATHS}
        rows.append(Row(f"HTTP latency {pct}", values, "us"))
    redis = get("redis", "median") or {}
    for key in ("GET/c1", "SET/c1", "GET/c8", "SET/c8", "GET/c50", "SET/c50"):
        by_path = redis.get(key) or {}
        test, clients = key.split("/c")
        label = f"redis {test}, -c {clients}"
        rows.append(
            Row(
                f"{label} requests/s",
                {p: (by_path.get(p) or {}).get("rps") for p in PATHS},
                "req/s",
            )
        )
        p50 = {p: (by_path.get(p) or {}).get("p50_ms") for p in PATHS}
        row = Row(f"{label} p50", p50, "us", scale=1e3)
        if clients == "1":
            row.target = "<= direct + 150 us"
            nm, direct = p50.get("netmirror"), p50.get("direct")
            if nm is not None and direct is not None:
                added = (nm - direct) * 1e3
                row.met = added <= 150
                row.note = f"+{added:,.0f} us"
        rows.append(row)
        rows.append(
            Row(
                f"{label} p99",
                {p: (by_path.get(p) or {}).get("p99_ms") for p in PATHS},
                "us",
                scale=1e3,
            )
        )
    tps = get("pgbench", "median_tps") or {}
    row = Row("pgbench -S, 8 clients", tps, "tps", target=">= 1.0x relay")
    if tps.get("netmirror") is not None and tps.get("relay"):
        row.met = tps["netmirror"] >= tps["relay"]
    rows.append(row)
    conn = get("connrate", "median_connections_per_s") or {}
    row = Row("new connection per request (50 in flight)", conn, "conn/s", target=">= 3,000/s")
    if conn.get("netmirror") is not None:
        row.met = conn["netmirror"] >= 3000
    rows.append(row)
    hold = sc.get("hold") or {}
    count = hold.get("connections", 0)
    working: dict[str, float | None] = {}
    for path in ("direct", "netmirror"):
        entry = hold.get(path) or {}
        checked = (entry.get("checked") or {}).get("ok")
        opened = (entry.get("opened") or {}).get("ok")
        working[path] = min(checked, opened) if checked is not None and opened is not None else None
    row = Row(f"{count:,} concurrent connections that work", working, "", target=f"all {count:,}")
    if working.get("netmirror") is not None:
        row.met = working["netmirror"] == count
    rows.append(row)
    rss = (hold.get("netmirror") or {}).get("rss_bytes") or {}
    total = (rss.get("agent") or 0) + (rss.get("daemon") or 0) if rss else None
    row = Row(
        f"agent + daemon RSS at {count:,} connections",
        {"direct": None, "relay": None, "netmirror": total},
        "MB",
        scale=1 / MB,
        target="<= 250 MB",
    )
    if total:
        row.met = total <= 250 * MB
        row.note = (
            f"agent {(rss.get('agent') or 0) / MB:.0f} + daemon {(rss.get('daemon') or 0) / MB:.0f}"
            f"; guard {(rss.get('guard') or 0) / MB:.0f} MB"
        )
    rows.append(row)
    up = get("up", "median_first_answer_s")
    row = Row(
        "netmirror up -> first stolen connection answered (median)",
        {"direct": None, "relay": None, "netmirror": up},
        "s",
        fmt=".2f",
        target="<= 1 s",
    )
    if up is not None:
        row.met = up <= 1.0
        returned = get("up", "median_up_returned_s")
        if returned is not None:
            row.note = f"up returned after {returned:.2f} s"
    rows.append(row)
    return rows


def summary_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        "# netmirror benchmark suite",
        "",
        f"{results['started']}: {m['cpus']} CPUs, kernel {m['kernel']}, Python {m['python']}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}. "
        f"{results['settings']['rounds']} interleaved round(s) per scenario, medians; "
        f"{results['settings']['seconds']} s per iperf3/wrk run.",
        "",
        "| metric | direct | relay (socat) | netmirror | netmirror / direct "
        "| netmirror / relay | target | met? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in build_rows(results):
        values = row.values
        met = "—" if row.met is None else ("yes" if row.met else "**no**")
        if row.note:
            met += f" ({row.note})"
        out.append(
            f"| {row.metric} | {fmt_value(values.get('direct'), row)} "
            f"| {fmt_value(values.get('relay'), row)} | {fmt_value(values.get('netmirror'), row)} "
            f"| {ratio(values.get('netmirror'), values.get('direct'))} "
            f"| {ratio(values.get('netmirror'), values.get('relay'))} "
            f"| {row.target or '—'} | {met} |"
        )
    failures = [f"- setup of {k}: {v}" for k, v in (results.get("setup_errors") or {}).items()]
    for key, data in results["scenarios"].items():
        if data.get("error"):
            failures.append(f"- {key}: {data['error']}")
        failures += [f"- {key}: {e}" for e in data.get("errors", [])]
    hold = results["scenarios"].get("hold") or {}
    notes = []
    if hold.get("nofile_limits"):
        notes.append(
            f"- open-file limits (soft/hard) of netmirror's processes: {hold['nofile_limits']}; "
            f"EMFILE seen: {'yes' if hold.get('emfile') else 'no'}"
            + "".join(f"; {x}" for x in hold.get("at_fd_limit") or [])
        )
    if hold.get("rss_before_bytes") and (hold.get("netmirror") or {}).get("rss_bytes"):
        before, during = hold["rss_before_bytes"], hold["netmirror"]["rss_bytes"]
        after = hold.get("rss_after_bytes") or {}
        notes.append(
            "- RSS (MB) before / with the connections open / after they closed: "
            + "; ".join(
                f"{name} {(before.get(name) or 0) / MB:.0f} / {(during.get(name) or 0) / MB:.0f}"
                f" / {(after.get(name) or 0) / MB:.0f}"
                for name in before
            )
        )
    cpu = cpu_notes(results)
    if cpu:
        notes.append(
            "- CPU, medians: of the whole machine (clients, app, relay or netmirror, kernel; "
            f"{m['cpus']} CPUs = {m['cpus'] * 100}%) per unit of work, and of netmirror's agent "
            "and daemon during the netmirror runs:"
        )
        notes += [f"  - {line}" for line in cpu]
    profile = (results["scenarios"].get("http") or {}).get("profile")
    if profile:
        for name in ("agent", "daemon"):
            data = profile.get(name) or {}
            if data.get("self"):
                notes.append(
                    f"- py-spy, {name} during wrk (busy {data['busy_pct']}% of a core), self time: "
                    + ", ".join(f"`{f}` {p}%" for f, p in data["self"][:8])
                )
    if notes:
        out += ["", "Notes:", "", *notes]
    if results.get("interrupted"):
        failures.append("- the suite was interrupted: the scenarios after it did not run")
    if results.get("error"):
        failures.append(f"- the suite stopped: {results['error']}")
    out += ["", "Failures: none" if not failures else "Failures:", "", *failures]
    return "\n".join(out).rstrip() + "\n"


def cpu_notes(results: dict[str, Any]) -> list[str]:
    """Median CPU, CPU per unit of work and syscalls of agent and daemon, by scenario."""
    sc = results["scenarios"]
    # (label, netmirror samples, key of the work count in a sample, unit, scale of the unit)
    found: list[tuple[str, list[dict[str, Any]], str, str, float]] = []
    bulk = sc.get("bulk") or {}
    for n in ("1", "8"):
        samples = (bulk.get("samples") or {}).get(n, {}).get("netmirror", [])
        found.append((f"iperf3 -P {n}", samples, "bytes", "GB", 1e9))
    http = ((sc.get("http") or {}).get("samples") or {}).get("netmirror", [])
    found.append(("wrk", http, "requests", "request", 1))
    for key, by_path in ((sc.get("redis") or {}).get("samples") or {}).items():
        if key.startswith("GET"):  # one run does SET and GET: its usage covers both
            label = f"redis SET+GET -c {key.split('/c')[1]}"
            found.append((label, by_path.get("netmirror", []), "ops_in_run", "request", 1))
    conn = ((sc.get("connrate") or {}).get("samples") or {}).get("netmirror", [])
    found.append(("connrate", conn, "ok", "connection", 1))
    notes = []
    for label, samples, count_key, unit, scale in found:
        costs = []
        for path in PATHS:
            runs = machine_samples(sc, label, path)
            per = [
                s["machine_cpu_s"] * 1e6 / (s[count_key] / scale)
                for s in runs
                if s.get(count_key) and s.get("machine_cpu_s") is not None
            ]
            busy = [s["machine_busy_pct"] for s in runs if s.get("machine_busy_pct") is not None]
            if per:
                cost = statistics.median(per)
                text = f"{cost / 1e6:.2f} s/GB" if unit == "GB" else f"{cost:.0f} us"
                costs.append(f"{path} {text} (machine {statistics.median(busy):.0f}% busy)")
        if costs:
            notes.append(f"{label}, CPU of the whole machine per {unit}: {', '.join(costs)}")
        parts = []
        for name in ("agent", "daemon"):
            runs = [s for s in samples if name in (s.get("usage") or {}) and s.get(count_key)]
            if not runs:
                continue
            used = [s["usage"][name] for s in runs]
            units = [s[count_key] / scale for s in runs]
            cpu_us = statistics.median(
                u["cpu_s"] * 1e6 / n for u, n in zip(used, units, strict=True)
            )
            calls = statistics.median(
                (u["read_syscalls"] + u["write_syscalls"]) / n
                for u, n in zip(used, units, strict=True)
            )
            text = (
                f"{name} {statistics.median(u['cpu_pct'] for u in used):.0f}% of a core "
                f"(sys {statistics.median(u['sys_pct'] for u in used):.0f}%), "
            )
            if unit == "GB":
                text += f"{cpu_us / 1e6:.2f} CPU s per GB"
            else:
                text += f"{cpu_us:.0f} CPU us and {calls:.1f} read/write syscalls per {unit}"
            parts.append(text)
        if parts:
            notes.append(f"{label}: {'; '.join(parts)}")
    return notes


def machine_samples(sc: dict[str, Any], label: str, path: str) -> list[dict[str, Any]]:
    """The samples of one path for a :func:`cpu_notes` label."""
    if label.startswith("iperf3 -P "):
        n = label.removeprefix("iperf3 -P ")
        return list(((sc.get("bulk") or {}).get("samples") or {}).get(n, {}).get(path, []))
    if label == "wrk":
        return list(((sc.get("http") or {}).get("samples") or {}).get(path, []))
    if label.startswith("redis"):
        key = f"GET/c{label.rsplit(' ', 1)[1]}"
        return list(((sc.get("redis") or {}).get("samples") or {}).get(key, {}).get(path, []))
    return list(((sc.get("connrate") or {}).get("samples") or {}).get(path, []))


def plots(results: dict[str, Any]) -> list[Path]:
    """One PNG per scenario with data, next to the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = results["scenarios"]
    colors = {"direct": "#4c72b0", "relay": "#dd8452", "netmirror": "#55a868"}
    made: list[Path] = []

    def grouped(
        ax: Any, groups: list[str], values: dict[str, list[float | None]], ylabel: str, title: str
    ) -> None:
        width = 0.8 / len(values)
        for i, (path, series) in enumerate(values.items()):
            xs = [g + i * width for g in range(len(groups))]
            ys = [v if v is not None else 0 for v in series]
            bars = ax.bar(xs, ys, width, label=path, color=colors.get(path))
            for bar, v in zip(bars, series, strict=False):
                if v is not None:
                    ax.annotate(
                        f"{v:,.0f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
        ax.set_xticks([g + width * (len(values) - 1) / 2 for g in range(len(groups))], groups)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)

    def save(fig: Any, name: str) -> None:
        path = RESULTS / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

    bulk = (sc.get("bulk") or {}).get("median_bytes_per_s")
    if bulk:
        fig, ax = plt.subplots(figsize=(7, 4))
        grouped(
            ax,
            ["1 stream", "8 streams"],
            {p: [(bulk[n].get(p) or 0) / MB or None for n in ("1", "8")] for p in PATHS},
            "MB/s",
            "iperf3 upload (median)",
        )
        save(fig, "bulk.png")
    http = (sc.get("http") or {}).get("median")
    if http:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        grouped(
            a1,
            ["req/s"],
            {p: [http[p]["requests_per_s"]] for p in PATHS},
            "requests/s",
            "wrk keep-alive, 50 connections",
        )
        grouped(
            a2,
            ["p50", "p99"],
            {p: [http[p]["p50_us"], http[p]["p99_us"]] for p in PATHS},
            "microseconds",
            "wrk latency",
        )
        save(fig, "http.png")
    redis = (sc.get("redis") or {}).get("median")
    if redis:
        keys = [
            k for k in ("GET/c1", "SET/c1", "GET/c8", "SET/c8", "GET/c50", "SET/c50") if k in redis
        ]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        grouped(
            a1,
            keys,
            {p: [redis[k][p]["rps"] for k in keys] for p in PATHS},
            "requests/s",
            "redis-benchmark requests/s",
        )
        grouped(
            a2,
            keys,
            {p: [(redis[k][p]["p50_ms"] or 0) * 1e3 or None for k in keys] for p in PATHS},
            "microseconds",
            "redis-benchmark p50 latency",
        )
        save(fig, "redis.png")
    conn = (sc.get("connrate") or {}).get("median_connections_per_s")
    if conn:
        fig, ax = plt.subplots(figsize=(6, 4))
        grouped(
            ax,
            ["connections/s"],
            {p: [conn.get(p)] for p in PATHS},
            "connections/s",
            "a new connection per request (50 in flight)",
        )
        ax.axhline(3000, color="red", linestyle="--", linewidth=1, label="target")
        save(fig, "connrate.png")
    hold = sc.get("hold") or {}
    if (hold.get("netmirror") or {}).get("rss_bytes"):
        phases = {
            "idle": (results.get("netmirror") or {}).get("rss_idle_bytes") or {},
            "before": hold.get("rss_before_bytes") or {},
            f"{hold['connections']:,} open": hold["netmirror"]["rss_bytes"],
            "after close": hold.get("rss_after_bytes") or {},
        }
        fig, ax = plt.subplots(figsize=(7, 4))
        names = ["agent", "daemon", "guard"]
        grouped(
            ax,
            list(phases),
            {n: [(phases[ph].get(n) or 0) / MB or None for ph in phases] for n in names},
            "RSS (MB)",
            "netmirror memory",
        )
        save(fig, "memory.png")
    up = (sc.get("up") or {}).get("samples")
    if up:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = list(range(1, len(up) + 1))
        ax.plot(xs, [s["first_answer_s"] for s in up], "o-", label="first stolen answer")
        ax.plot(xs, [s["up_returned_s"] for s in up], "s--", label="up returned")
        ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel("run")
        ax.set_ylabel("seconds since up was launched")
        ax.set_ylim(bottom=0)
        ax.set_title("netmirror up -> first stolen connection")
        ax.legend(fontsize=8)
        save(fig, "up.png")
    return made


# --- main ----------------------------------------------------------------------------------


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt (even if SIGINT came in ignored)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per scenario")
    parser.add_argument("--seconds", type=int, default=5, help="seconds per iperf3 and wrk run")
    parser.add_argument(
        "--redis-requests",
        type=int,
        default=10_000,
        help="requests per redis-benchmark test at -c 1 (5x at -c 50)",
    )
    parser.add_argument(
        "--connections", type=int, default=3000, help="short connections per connection-rate run"
    )
    parser.add_argument("--hold", type=int, default=10_000, help="connections held open")
    parser.add_argument("--up-runs", type=int, default=5, help="netmirror up timings")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy agent and daemon during one extra wrk run (raw to /tmp)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=["bulk", "http", "redis", "pgbench", "connrate", "hold", "up"],
        help="run only these scenarios (repeatable)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, iptables): sudo make bench", file=sys.stderr)
        return 1
    suite = Suite(args)
    started = time.monotonic()
    code = 0
    with interruptible():
        try:
            suite.run()
        except KeyboardInterrupt:
            print("\ninterrupted: cleaning up", file=sys.stderr)
            suite.results["interrupted"] = True
            code = 130
        except Exception as exc:
            print(f"\nthe suite failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            traceback.print_exc()
            suite.results["error"] = f"{type(exc).__name__}: {exc}"
            code = 1
        finally:
            # A second Ctrl-C must not cut the cleanup short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("\ncleaning up", flush=True)
            suite.cleanup()
    suite.results["wall_seconds"] = round(time.monotonic() - started, 1)
    suite.save()
    summary = summary_markdown(suite.results)
    (RESULTS / "summary.md").write_text(summary)
    try:
        made = plots(suite.results)
    except Exception as exc:  # e.g. matplotlib missing: the numbers still stand
        print(f"no plots: {type(exc).__name__}: {exc}", file=sys.stderr)
        made = []
    print("\n" + summary)
    print(
        f"results: {RESULTS / 'suite.json'}, {RESULTS / 'summary.md'}"
        + "".join(f", {p.name}" for p in made)
    )
    print(f"suite took {suite.results['wall_seconds']:.0f} s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
