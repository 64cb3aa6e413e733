"""Steal mode end to end: real namespace, real iptables, real servers and clients."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Env, free_port
from tests.support.clients import sha_exchange
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

POD_PORT = 8080


def curl(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "-m", "5", *extra, url], capture_output=True, text=True, check=False
    )


def status(env: Env) -> dict:  # type: ignore[type-arg]
    result = env.netmirror("status", "--json", check=True)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_steal_http_from_outside_and_back(env: Env) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod v1\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local v2\n")
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
    assert curl(url).stdout == "pod v1\n"

    up = env.up("--steal", f"{POD_PORT}:{local}")
    assert "is up" in up.stdout
    for _ in range(3):
        assert curl(url).stdout == "local v2\n"
    # IPv6 clients are stolen too.
    assert curl(f"http://[{env.sandbox.pod_ip6}]:{POD_PORT}/", "-g").stdout == "local v2\n"

    st = status(env)["sessions"][0]
    assert st["state"] == "ready" and st["agent"]["state"] == "connected"
    (port,) = st["ports"]
    assert port["remote"] == POD_PORT and port["local"] == f"127.0.0.1:{local}"
    assert port["connections_total"] == 4 and port["errors"] == 0
    assert port["bytes_in"] > 0 and port["bytes_out"] >= 4 * len("local v2\n")
    assert "NETMIRROR-t1" in env.chains()
    logs = env.netmirror("logs", "--session", "t1", check=True).stdout
    assert "[t1 agent]" in logs and f"stealing port {POD_PORT}" in logs
    assert "[t1 daemon]" in logs

    down = env.netmirror("down", "--session", "t1", check=True)
    assert "is down" in down.stdout
    assert curl(url).stdout == "pod v1\n"
    assert env.chains() == ""
    assert env.our_processes() == []
    # Safe to run twice.
    assert env.netmirror("down", "--session", "t1").returncode == 0


def test_target_own_localhost_traffic_is_stolen(env: Env) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    env.up("--steal", f"{POD_PORT}:{local}")
    inside = env.sandbox.run("curl", "-sS", "-m", "5", f"http://127.0.0.1:{POD_PORT}/")
    assert inside.stdout == "local\n", inside.stderr
    inside6 = env.sandbox.run("curl", "-sS", "-m", "5", "-g", f"http://[::1]:{POD_PORT}/")
    assert inside6.stdout == "local\n", inside6.stderr


def test_large_payloads_both_ways_many_connections(env: Env) -> None:
    env.server("sha", POD_PORT, in_pod=True, tag="pod")
    local = free_port()
    env.server("sha", local, in_pod=False, tag="local")
    env.up("--steal", f"{POD_PORT}:{local}")
    rng = random.Random(7)
    sizes = [(rng.randrange(0, 4 << 20), rng.randrange(0, 4 << 20)) for _ in range(40)]

    async def run_all() -> list:  # type: ignore[type-arg]
        return await asyncio.gather(
            *(
                sha_exchange(env.sandbox.pod_ip, POD_PORT, up=up, down=down, timeout=120)
                for up, down in sizes
            )
        )

    results = asyncio.run(run_all())
    assert [r.tag for r in results] == ["local"] * len(sizes)
    assert all(r.upload_intact for r in results)
    assert all(r.download_intact for r in results)
    (port,) = status(env)["sessions"][0]["ports"]
    assert port["connections_total"] == len(sizes)
    assert port["errors"] == 0
    # Every byte crossed the tunnel: uploads plus the 8-byte header each way in.
    assert port["bytes_in"] == sum(up + 8 for up, _ in sizes)
    assert port["bytes_out"] == sum(8 + 32 + down + 32 for _, down in sizes)


def test_half_close_client_shuts_write_then_reads(env: Env) -> None:
    env.server("echo", POD_PORT, in_pod=True)
    local = free_port()
    env.server("echo", local, in_pod=False)
    env.up("--steal", f"{POD_PORT}:{local}")
    payload = os.urandom(300_000)
    with socket.create_connection((env.sandbox.pod_ip, POD_PORT), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    assert bytes(received) == payload


def test_local_port_refusing_resets_the_client(env: Env) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod\n")
    closed_port = free_port()  # nothing listens there
    env.up("--steal", f"{POD_PORT}:{closed_port}")
    with socket.create_connection((env.sandbox.pod_ip, POD_PORT), timeout=10) as sock:
        # The RST may arrive before or after the request is written.
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while sock.recv(1024):
                pass

    def port_status() -> dict:  # type: ignore[type-arg]
        (port,) = status(env)["sessions"][0]["ports"]
        return port  # type: ignore[no-any-return]

    eventually(
        lambda: port_status()["errors"], 5, "the refused connection was not counted", interval=0.1
    )
    port = port_status()
    assert port["errors"] == 1
    assert "refused" in port["last_error"]
    # The session is still healthy: start the app and it answers.
    env.server("http", closed_port, in_pod=False, text="late\n")
    assert curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/").stdout == "late\n"


def test_same_port_twice_is_refused(env: Env) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    env.up("--steal", f"{POD_PORT}:{local}", session="first")
    again = env.netmirror(
        "up",
        "--target",
        env.sandbox.target,
        "--session",
        "second",
        "--steal",
        f"{POD_PORT}:{local}",
    )
    assert again.returncode != 0
    assert "already taken by session 'first'" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    # A second user with its own state directory is refused by the agent itself,
    # which sees the live session's rules in the namespace.
    other = env.env | {"NETMIRROR_STATE_DIR": str(env.state_dir) + "-other"}
    foreign = env.netmirror(
        "up",
        "--target",
        env.sandbox.target,
        "--session",
        "second",
        "--steal",
        f"{POD_PORT}:{local}",
        env=other,
    )
    assert foreign.returncode != 0
    assert "already taken by session 'first'" in foreign.stderr
    assert not os.path.exists(str(env.state_dir) + "-other/second")
    # The first session is untouched and a different port works alongside it.
    assert curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/").stdout == "local\n"
    env.server("http", 9090, in_pod=True, text="pod 9090\n")
    env.up("--steal", f"9090:{local}", session="second")
    assert curl(f"http://{env.sandbox.pod_ip}:9090/").stdout == "local\n"
    assert len(status(env)["sessions"]) == 2


def test_pid_target(env: Env) -> None:
    pod = env.server("http", POD_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    # The server's own pid (ip netns exec execs it, so the pid is the server's).
    result = env.netmirror(
        "up",
        "--target",
        f"pid/{pod.pid}",
        "--session",
        "bypid",
        "--steal",
        f"{POD_PORT}:{local}",
        check=True,
    )
    assert "pid/" in result.stdout
    assert curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/").stdout == "local\n"


def test_failures_are_one_line_and_leave_nothing(env: Env) -> None:
    cases = [
        (
            ["--target", "netns/does-not-exist", "--steal", "80"],
            "network namespace 'does-not-exist' not found",
        ),
        (
            ["--target", env.sandbox.target, "--steal", "80", "--mirror", "80"],
            "--mirror: 80 is also given to --steal",
        ),
        (
            ["--target", env.sandbox.target, "--mirror", "80", "--mirror-method", "copy"],
            "argument --mirror-method: invalid choice: 'copy'",
        ),
        (
            ["--target", env.sandbox.target, "--steal", "eighty"],
            "--steal: 'eighty' is not REMOTE[:LOCAL]",
        ),
        (["--target", env.sandbox.target], "no ports to take"),
        (["--target", "pod/web", "--steal", "80"], "no Kubernetes configuration"),
    ]
    no_cluster = env.env | {"KUBECONFIG": str(env.state_dir.parent / "missing-kubeconfig")}
    no_cluster.pop("KUBERNETES_SERVICE_HOST", None)
    for args, message in cases:
        result = env.netmirror("up", *args, env=no_cluster)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert message in lines[-1], (args, result.stderr)
        assert lines[-1].startswith("netmirror: ")
        assert env.chains() == ""
        assert env.our_processes() == []
        assert not env.state_dir.exists() or not any(env.state_dir.iterdir())


def test_killed_daemon_is_reported_and_cleaned(env: Env) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    env.up("--steal", f"{POD_PORT}:{local}")
    daemon_pid = status(env)["sessions"][0]["daemon_pid"]
    os.kill(daemon_pid, signal.SIGKILL)
    st = status(env)
    assert st["sessions"] == [] and st["cleaned_stale"] == ["t1"]
    # The orphaned agent was stopped, so its rules are gone and the pod answers.
    eventually(lambda: env.chains() == "", 5, lambda: f"rules left: {env.chains()}")
    assert curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/").stdout == "pod\n"


def test_killed_agent_rules_removed_by_guard(env: Env) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    env.up("--steal", f"{POD_PORT}:{local}")
    agent_pid = status(env)["sessions"][0]["agent"]["pid"]
    os.kill(agent_pid, signal.SIGKILL)
    started = time.monotonic()
    eventually(
        lambda: curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/", "-m", "1").stdout == "pod\n",
        2,
        "the pod did not answer again within 2 s of kill -9 of the agent",
    )
    assert curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/").stdout == "pod\n"
    print(f"the pod answered again {time.monotonic() - started:.2f} s after kill -9 of the agent")
    assert time.monotonic() - started < 2.5
    eventually(
        lambda: env.chains() == "",
        max(0.0, started + 2 - time.monotonic()),
        lambda: f"the guard did not remove the rules within 2 s: {env.chains()}",
    )


def test_a_mirrord_config_file_is_taken_as_it_is(env: Env, tmp_path: Path) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod v1\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local v2\n")
    config = tmp_path / "mirrord.json"
    config.write_text(
        json.dumps(
            {
                "target": env.sandbox.target,
                "feature": {
                    "network": {
                        "incoming": {
                            "mode": "steal",
                            "ports": [POD_PORT],
                            "port_mapping": [[local, POD_PORT]],
                        }
                    }
                },
                "telemetry": False,
            }
        )
    )
    up = env.netmirror("up", "-f", str(config), "--session", "t1", check=True)
    assert up.stderr.splitlines()[0] == (
        "netmirror: warning: mirrord key 'telemetry' ignored: netmirror has no equivalent"
    )
    assert curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/").stdout == "local v2\n"


def test_down_lets_live_connections_finish_and_sends_new_ones_to_the_target(env: Env) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod v1\n")
    local = free_port()
    env.server("echo", local, in_pod=False)
    env.up("--steal", f"{POD_PORT}:{local}")
    url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
    with socket.create_connection((env.sandbox.pod_ip, POD_PORT), timeout=5) as live:
        live.sendall(b"first")
        assert live.recv(100) == b"first"  # the local echo server: stolen
        started = time.monotonic()
        down = subprocess.Popen(
            [sys.executable, "-m", "netmirror", "down", "--session", "t1", "--drain", "20"],
            env=env.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        env.procs.append(down)
        # New connections reach the target at once...
        eventually(lambda: curl(url).stdout == "pod v1\n", 5, "new connections went on stolen")
        # ...while the live one still goes on, stolen.
        live.sendall(b"second")
        assert live.recv(100) == b"second"
    # Closed: down finishes without waiting for the rest of the drain.
    assert down.wait(15) == 0
    assert time.monotonic() - started < 15
    assert curl(url).stdout == "pod v1\n"


def test_down_now_resets_live_connections_at_once(env: Env) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod v1\n")
    local = free_port()
    env.server("echo", local, in_pod=False)
    env.up("--steal", f"{POD_PORT}:{local}")
    with socket.create_connection((env.sandbox.pod_ip, POD_PORT), timeout=5) as live:
        live.sendall(b"first")
        assert live.recv(100) == b"first"
        started = time.monotonic()
        env.netmirror("down", "--session", "t1", "--now", check=True)
        assert time.monotonic() - started < 10
        # The connection is over: reset, or closed, but never answered by the echo.
        try:
            live.sendall(b"again")
            assert live.recv(100) == b""
        except OSError:
            pass
