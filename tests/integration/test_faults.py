"""Faults, bad input and load, in real namespaces: nothing lost, nothing left, nobody in."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from netmirror.wire import Connection, Role
from netmirror.wire.frames import HEADER, FrameType
from tests.integration.conftest import Env, free_port
from tests.support.clients import sha_exchange
from tests.support.processes import Proc, in_netns, only_pid, pid_running
from tests.support.waiting import eventually, read_line

pytestmark = pytest.mark.integration

POD_PORT = 8080


def status(env: Env) -> dict[str, Any]:
    return json.loads(env.netmirror("status", "--json", check=True).stdout)  # type: ignore[no-any-return]


def curl(url: str, timeout: float = 5) -> str:
    return subprocess.run(
        ["curl", "-sS", "-m", str(timeout), url], capture_output=True, text=True, check=False
    ).stdout


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def guard_pid(env: Env, session: str) -> int:
    """The steal guard of ``session`` in this test's sandbox (no other run's)."""

    def is_guard(proc: Proc) -> bool:
        return proc.has_args("-m", "netmirror.netfilter.guard") and proc.has_args(
            "--session", session
        )

    return only_pid(in_netns(env.sandbox.netns, is_guard), f"guard of session {session}")


def unread_bytes(port: int) -> int:
    """Bytes received but not yet read by the sockets bound to 127.0.0.1:``port``."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if local == f"0100007F:{port:04X}" and state == "01":  # established
            total += int(queues.split(":")[1], 16)
    return total


def test_killed_daemon_agent_removes_its_rules_by_itself(env: Env) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    env.up("--steal", f"{POD_PORT}:{local}")
    st = status(env)["sessions"][0]
    os.kill(st["daemon_pid"], signal.SIGKILL)
    killed = time.monotonic()
    log = env.state_dir / "t1" / "daemon.log"  # the agent's output goes there too
    eventually(
        lambda: "daemon disconnected" in log.read_text(errors="replace"),
        5,
        "the agent did not notice that the daemon died",
    )
    # The rules are still in place (the agent waits for a reconnect)...
    assert "NETMIRROR-t1" in env.chains()
    # ...yet clients are not reset: the agent passes them to the pod's own server.
    for _ in range(3):
        assert curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/") == "pod\n"
    # No netmirror command runs meanwhile: the agent notices on its own.
    eventually(
        lambda: env.chains() == "",
        max(0.0, killed + 10 - time.monotonic()),
        "rules still there 10 s after the daemon died",
        interval=0.1,
    )
    recovered = time.monotonic() - killed
    print(f"rules removed {recovered:.1f} s after the daemon was killed")
    assert curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/") == "pod\n"
    eventually(
        lambda: env.our_processes() == [],
        5,
        lambda: f"netmirror processes still running: {env.our_processes()}",
        interval=0.1,
    )
    # status reports the stale session and cleans it; up works again right away.
    after = status(env)
    assert after["sessions"] == [] and after["cleaned_stale"] == ["t1"]
    env.up("--steal", f"{POD_PORT}:{local}")
    assert curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/") == "local\n"


def test_stale_rules_of_a_crash_are_cleared_at_the_next_up(env: Env) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    env.up("--steal", f"{POD_PORT}:{local}", session="crashed")
    st = status(env)["sessions"][0]
    # The worst crash: guard, agent and daemon all killed at once.
    pids = (guard_pid(env, "crashed"), st["agent"]["pid"], st["daemon_pid"])
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    eventually(
        lambda: not any(pid_running(pid) for pid in pids),
        5,
        "the guard, agent or daemon survived SIGKILL",
    )
    assert "NETMIRROR-crashed" in env.chains()  # nobody was left to remove them
    up = env.up("--steal", f"{POD_PORT}:{local}", session="fresh")
    assert "is up" in up.stdout
    assert "NETMIRROR-crashed" not in env.chains()
    assert "NETMIRROR-fresh" in env.chains()
    assert curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/") == "local\n"
    logs = env.netmirror("logs", "--session", "fresh", check=True).stdout
    assert "cleared stale rules of dead sessions: crashed" in logs


def test_local_app_dying_mid_stream_resets_only_that_stream(env: Env) -> None:
    env.server("echo", POD_PORT, in_pod=True)
    local = free_port()
    echo = env.server("echo", local, in_pod=False)
    env.up("--steal", f"{POD_PORT}:{local}")
    healthy = socket.create_connection((env.sandbox.pod_ip, POD_PORT), timeout=10)
    victim = socket.create_connection((env.sandbox.pod_ip, POD_PORT), timeout=10)
    try:
        for sock in (healthy, victim):
            sock.sendall(b"ping")
            assert sock.recv(16) == b"ping"
        # The local app hangs with bytes unread, then dies: its kernel resets the
        # connections (a clean exit would close them with FIN, passed on as such).
        echo.send_signal(signal.SIGSTOP)
        victim.sendall(b"unread" * 1000)
        eventually(
            lambda: unread_bytes(local) > 0,
            5,
            "the bytes sent did not reach the stopped local app's socket",
        )
        echo.send_signal(signal.SIGKILL)
        echo.wait()
        env.server("echo", local, in_pod=False)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            victim.sendall(b"more")
            while victim.recv(16):
                pass
        # Connections that came after are served by the new local app.
        fresh = socket.create_connection((env.sandbox.pod_ip, POD_PORT), timeout=10)
        fresh.sendall(b"again")
        assert fresh.recv(16) == b"again"
        fresh.close()
    finally:
        healthy.close()
        victim.close()
    (port,) = status(env)["sessions"][0]["ports"]
    assert port["errors"] >= 1  # the reset stream is counted
    assert "local socket closed" in port["last_error"]


def test_slow_local_reader_keeps_memory_bounded_and_others_moving(env: Env, tmp_path: Path) -> None:
    env.server("sha", POD_PORT, in_pod=True, tag="pod")
    local = free_port()
    slow = subprocess.Popen([sys.executable, "-c", SLOW_READER, str(local)], stdout=subprocess.PIPE)
    env.procs.append(slow)
    assert slow.stdout is not None
    assert read_line(slow.stdout, 10, "the slow reader did not start") == "ready"
    env.up("--steal", f"{POD_PORT}:{local}")
    st = status(env)["sessions"][0]
    pids = {"agent": st["agent"]["pid"], "daemon": st["daemon_pid"]}
    base = {name: rss_kib(pid) for name, pid in pids.items()}
    peak = dict(base)
    total = 1 << 30
    done = threading.Event()
    sent = [0]

    def upload() -> None:
        with socket.create_connection((env.sandbox.pod_ip, POD_PORT), timeout=120) as sock:
            block = os.urandom(1 << 20)
            while sent[0] < total:
                sock.sendall(block)
                sent[0] += len(block)
        done.set()

    uploader = threading.Thread(target=upload, name="upload-1GiB")
    uploader.start()
    eventually(
        lambda: sent[0] >= 64 << 20 or not uploader.is_alive(),
        60,
        "64 MiB of the slow stream were not sent within 60 s",
    )
    assert uploader.is_alive() or done.is_set(), "the upload failed"
    # Another stream on the same tunnel is not held up by the slow one.
    fast = os.urandom(64 << 20)
    with socket.create_connection((env.sandbox.pod_ip, POD_PORT), timeout=60) as sock:
        sock.sendall(fast)
        sock.shutdown(socket.SHUT_WR)
        assert int(sock.makefile().readline()) == len(fast)
    assert not done.is_set(), "the slow stream finished first: the test proves nothing"
    while not done.wait(0.2):
        for name, pid in pids.items():
            peak[name] = max(peak[name], rss_kib(pid))
    uploader.join()
    growth = {name: (peak[name] - base[name]) // 1024 for name in pids}
    print(f"RSS growth while 1 GiB went to a slow reader (MiB): {growth}")
    # One stream holds at most its window (4 MiB) plus socket buffers on each side.
    assert growth["agent"] < 64 and growth["daemon"] < 64, growth
    assert int(read_line(slow.stdout, 60, "the slow reader did not report")) == total


# The first connection reads 64 KiB per ms (about 60 MB/s, far slower than the
# tunnel); later ones read at full speed and answer with the byte count.
SLOW_READER = """
import socket, sys, threading, time
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)

def serve(conn, slow):
    n = 0
    while chunk := conn.recv(65536):
        n += len(chunk)
        if slow:
            time.sleep(0.001)  # slowness is the point: this reader falls behind
    if slow:
        print(n, flush=True)
    else:
        conn.sendall(b"%d\\n" % n)
    conn.close()

first = True
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn, first), daemon=True).start()
    first = False
"""


def test_thousand_concurrent_stolen_connections_lose_nothing(env: Env) -> None:
    env.server("sha", POD_PORT, in_pod=True, tag="pod")
    local = free_port()
    env.server("sha", local, in_pod=False, tag="local")
    env.up("--steal", f"{POD_PORT}:{local}")
    rng = random.Random(1000)
    sizes = [(rng.randrange(0, 1 << 20), rng.randrange(0, 1 << 20)) for _ in range(1000)]

    async def run_all() -> list[Any]:
        sem = asyncio.Semaphore(1000)

        async def one(up: int, down: int) -> Any:
            async with sem:
                return await sha_exchange(
                    env.sandbox.pod_ip, POD_PORT, up=up, down=down, timeout=300
                )

        return await asyncio.gather(*(one(u, d) for u, d in sizes))

    results = asyncio.run(run_all())
    assert [r.tag for r in results] == ["local"] * 1000
    assert all(r.upload_intact and r.download_intact for r in results)
    (port,) = status(env)["sessions"][0]["ports"]
    assert port["connections_total"] == 1000 and port["errors"] == 0
    assert port["bytes_in"] == sum(up + 8 for up, _ in sizes)


def test_agent_refuses_bad_tokens_and_garbage_without_disturbing_the_session(env: Env) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    env.up("--steal", f"{POD_PORT}:{local}")
    sock_path = env.state_dir / "t1" / "agent.sock"
    assert oct(sock_path.stat().st_mode & 0o777) == "0o600"

    async def attempt(payload: bytes) -> list[Any]:
        conn = aiohttp.UnixConnector(path=str(sock_path))
        async with (
            aiohttp.ClientSession(connector=conn) as http,
            http.ws_connect("http://agent/tunnel") as ws,
        ):
            await ws.send_bytes(payload)
            replies = []
            async for msg in ws:
                replies.append(msg.data)
            return replies

    def error_of(replies: list[Any]) -> dict[str, Any]:
        data = b"".join(r for r in replies if isinstance(r, bytes))
        ftype, _sid, length = HEADER.unpack_from(data)
        assert ftype == FrameType.ERROR
        return json.loads(data[HEADER.size : HEADER.size + length])  # type: ignore[no-any-return]

    wrong = Connection(Role.DAEMON, token="not-the-token", session="t1").data_to_send()
    missing = wrong.replace(b'"token":"not-the-token"', b'"tokn":"x"')
    missing = HEADER.pack(FrameType.HELLO, 0, len(missing) - HEADER.size) + missing[HEADER.size :]
    for payload, code in ((wrong, "auth"), (missing, "auth"), (os.urandom(64), "protocol")):
        error = error_of(asyncio.run(attempt(payload)))
        assert error["code"] == code, error
    # Subscribing without a hello is refused too.
    sub = HEADER.pack(FrameType.SUBSCRIBE, 0, 2) + b"{}"
    assert error_of(asyncio.run(attempt(sub)))["code"] == "protocol"
    # The real session never noticed.
    assert curl(f"http://{env.sandbox.pod_ip}:{POD_PORT}/") == "local\n"
    st = status(env)["sessions"][0]
    assert st["agent"]["state"] == "connected" and st["reconnects"] == 0
    logs = env.netmirror("logs", check=True).stdout
    assert "refused a tunnel: authentication failed" in logs
    assert "not-the-token" not in logs


def test_the_token_appears_nowhere_a_user_can_read(env: Env) -> None:
    """An agent given a known token, driven through a whole steal with debug logs."""
    env.server("http", POD_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    token = "tok-" + os.urandom(16).hex()
    sock_path = env.state_dir / "manual-agent.sock"
    env.state_dir.mkdir(parents=True, exist_ok=True)
    log = env.state_dir.parent / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "netmirror",
                "--debug",
                "agent",
                "--session",
                "manual",
                "--netns",
                f"/run/netns/{env.sandbox.netns}",
                "--listen",
                f"unix:{sock_path}",
                "--token-stdin",
                "--ttl",
                "5",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=out,
            env=env.env,
        )
    try:
        assert agent.stdin is not None and agent.stdout is not None
        agent.stdin.write(token.encode() + b"\n")
        agent.stdin.close()
        assert json.loads(read_line(agent.stdout, 15, "the agent did not start"))["ready"]

        async def session() -> str:
            conn = Connection(Role.DAEMON, token=token, session="manual")
            connector = aiohttp.UnixConnector(path=str(sock_path))
            async with (
                aiohttp.ClientSession(connector=connector) as http,
                http.ws_connect("http://agent/tunnel") as ws,
            ):
                await ws.send_bytes(conn.data_to_send())
                conn.receive_data((await ws.receive()).data)
                conn.subscribe(POD_PORT, "steal")
                await ws.send_bytes(conn.data_to_send())
                conn.receive_data((await ws.receive()).data)
                answers = [e for e in conn.events_received() if hasattr(e, "ok")]
                assert answers and answers[0].ok
                # A client connects; the stream opens towards us.
                url = f"http://{env.sandbox.pod_ip}:{POD_PORT}/"
                opened = asyncio.create_task(asyncio.to_thread(curl, url, 1), name="client")
                msg = await ws.receive()
                conn.receive_data(msg.data)
                await opened
                return str(conn.events_received()[0])

        assert "StreamOpened" in asyncio.run(session())
        cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{agent.pid}/environ").read_bytes()
    finally:
        agent.terminate()
        agent.wait(10)
    text = log.read_bytes()
    assert b"stealing port 8080" in text  # the log is the real, verbose one
    for where, content in (("log", text), ("command line", cmdline), ("environment", environ)):
        assert token.encode() not in content, f"the token shows in the agent's {where}"
    # And what netmirror itself keeps about a session holds no token either.
    env.up("--steal", f"{POD_PORT}:{local}")
    record = json.loads((env.state_dir / "t1" / "session.json").read_text())
    st = env.netmirror("status", "--json", check=True).stdout
    # No key names a token (the test's own paths, in the status, may hold the word).
    assert '"token"' not in json.dumps(record) and '"token"' not in st


@pytest.mark.parametrize("method", ["capture", "passthrough"])
def test_thousand_concurrent_mirrored_connections_copied_exactly(
    env: Env, tmp_path: Path, method: str
) -> None:
    from collections import Counter

    from tests.integration.test_mirror import read_sink

    env.server("sha", POD_PORT, in_pod=True, tag="pod")
    local = free_port()
    sink = tmp_path / "sink.log"
    env.server("sink", local, in_pod=False, log=str(sink))
    env.up("--mirror", f"{POD_PORT}:{local}", "--mirror-method", method)
    rng = random.Random(2000)
    sizes = [(rng.randrange(1, 256 << 10), rng.randrange(0, 256 << 10)) for _ in range(1000)]

    async def run_all() -> list[Any]:
        return await asyncio.gather(
            *(
                sha_exchange(env.sandbox.pod_ip, POD_PORT, up=u, down=d, timeout=300)
                for u, d in sizes
            )
        )

    results = asyncio.run(run_all())
    assert all(r.tag == "pod" and r.upload_intact and r.download_intact for r in results)
    copies = read_sink(sink, len(sizes), timeout=60)
    assert Counter((d, n) for d, n, _ in copies) == Counter(
        (r.sent_sha256, r.sent_bytes) for r in results
    )
