"""Stealing only the HTTP requests that match a filter; several sessions on one port.

A real HTTP server (aiohttp) answers in the pod, and one local server per session;
every answer names who gave it. Two sessions filter the same port by a header.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import REPO, Env, free_port, wait_ready
from tests.support.processes import Proc, in_netns, only_pid
from tests.support.waiting import eventually, eventually_async

PORT = 8080
H2SERVER = REPO / "tests" / "support" / "h2server.py"
CRLF = "\r\n"


@dataclass
class Shared:
    url: str
    local_a: int
    local_b: int


def _up(env: Env, session: str, local: int, *flags: str) -> subprocess.CompletedProcess[str]:
    return env.netmirror(
        "up",
        "--target",
        env.sandbox.target,
        "--session",
        session,
        "--steal",
        f"{PORT}:{local}",
        *flags,
    )


@pytest.fixture
def shared(env: Env) -> Iterator[Shared]:
    env.server("web", PORT, in_pod=True, host="0.0.0.0", tag="pod")
    local_a, local_b = free_port(), free_port()
    env.server("web", local_a, in_pod=False, tag="local-a")
    env.server("web", local_b, in_pod=False, tag="local-b")
    for session, local in (("a", local_a), ("b", local_b)):
        res = _up(env, session, local, "--http-header", f"^x-dev: {session}$")
        assert res.returncode == 0, res.stderr
    yield Shared(f"http://{env.sandbox.pod_ip}:{PORT}", local_a, local_b)


def curl(*args: str) -> str:
    res = subprocess.run(
        ["curl", "-sS", "-m", "10", *args], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def who(answer: str) -> str:
    return answer.split(" ", 1)[0]


def test_each_request_goes_to_the_session_whose_filter_matches(env: Env, shared: Shared) -> None:
    assert who(curl(shared.url + "/x")) == "pod"
    assert who(curl("-H", "x-dev: a", shared.url + "/x")) == "local-a"
    assert who(curl("-H", "X-Dev: b", shared.url + "/x")) == "local-b"
    assert who(curl("-H", "x-dev: c", shared.url + "/x")) == "pod"
    # IPv6 clients too.
    url6 = f"http://[{env.sandbox.pod_ip6}]:{PORT}/x"
    assert who(curl("-H", "x-dev: a", url6)) == "local-a"


def test_keep_alive_and_pipelining_mix_targets_on_one_connection(shared: Shared) -> None:
    host = shared.url.split("//")[1].split(":")[0]
    order = ["", "a", "b", "", "a", "", "b"]
    with socket.create_connection((host, PORT), timeout=10) as sock:
        # All requests at once (pipelined); answers must come back in order.
        requests = b"".join(
            f"GET /{i} HTTP/1.1\r\nHost: x\r\n{f'x-dev: {dev}' + CRLF if dev else ''}\r\n".encode()
            for i, dev in enumerate(order)
        )
        sock.sendall(requests)
        answers = _read_responses(sock, len(order))
    expected = [f"{'local-' + dev if dev else 'pod'} GET /{i} 0" for i, dev in enumerate(order)]
    assert answers == expected


def _read_responses(sock: socket.socket, count: int) -> list[str]:
    """Bodies of ``count`` Content-Length responses read from ``sock``."""
    buf = b""
    bodies: list[str] = []
    while len(bodies) < count:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(bodies)} responses"
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(buf) < length:
            chunk = sock.recv(65536)
            assert chunk
            buf += chunk
        bodies.append(buf[:length].decode().strip())
        buf = buf[length:]
    return bodies


def test_bodies_chunked_and_100_continue(shared: Shared, tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(3_000_000))
    out = curl(
        "-H",
        "x-dev: a",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{payload}",
        shared.url + "/upload",
    )
    assert out == "local-a POST /upload 3000000\n"
    # A chunked request body, and a chunked response.
    out = curl(
        "-H",
        "x-dev: b",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "hello",
        shared.url + "/up2",
    )
    assert out == "local-b POST /up2 5\n"
    assert curl("-H", "x-dev: a", shared.url + "/chunked") == "local-a chunked\n"
    assert curl(shared.url + "/chunked") == "pod chunked\n"


async def test_websocket_upgrade_is_stolen_whole_when_it_matches(shared: Shared) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(shared.url + "/ws", headers={"x-dev": "a"}) as ws:
            for text in ("one", "two"):
                await ws.send_str(text)
                assert (await ws.receive_str()) == f"local-a: {text}"
        async with http.ws_connect(shared.url + "/ws") as ws:
            await ws.send_str("three")
            assert (await ws.receive_str()) == "pod: three"


def test_h2c_upgrade_to_an_http1_server_stays_http1(shared: Shared) -> None:
    # The pod's server speaks only HTTP/1.1: the upgrade is not taken, the request is
    # routed as HTTP/1.1 and answered so, as without netmirror.
    for dev, answer in (("", "pod"), ("a", "local-a")):
        headers = ["-H", f"x-dev: {dev}"] if dev else []
        res = subprocess.run(
            [
                "curl",
                "-sS",
                "-m",
                "10",
                "--http2",
                "-w",
                " %{http_version}",
                *headers,
                shared.url + "/u",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout == f"{answer} GET /u 0\n 1.1"


def test_non_http_bytes_reach_the_target_untouched(shared: Shared) -> None:
    host = shared.url.split("//")[1].split(":")[0]
    with socket.create_connection((host, PORT), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        answer = sock.recv(65536)
    # aiohttp in the pod answered (400): the bytes went to the pod's server.
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]


def test_status_counts_requests_per_filter(env: Env, shared: Shared) -> None:
    for dev in ("a", "a", "b", ""):
        curl(*(["-H", f"x-dev: {dev}"] if dev else []), shared.url + "/")
    seen: list[dict[str, Any]] = []

    def counted() -> bool:  # the router's counters travel once a second
        res = env.netmirror("status", "--json", check=True)
        sessions = {s["session"]: s for s in json.loads(res.stdout)["sessions"]}
        seen[:] = [sessions["a"]["ports"][0]["http"], sessions["b"]["ports"][0]["http"]]
        # A report sent between the third and the fourth request already shows the
        # final matches but not the pass: wait for the one after the last request.
        return bool(seen[0]["matched"] == 2 and seen[1]["matched"] == 1 and seen[0]["passed"] >= 1)

    eventually(counted, 5, lambda: f"the counters never showed 2 and 1 matches, 1 pass: {seen}")
    http_a, http_b = seen
    assert http_a["order"] == 1 and http_b["order"] == 2
    assert "x-dev" in http_a["filter"]
    text = env.netmirror("status", "--session", "a", check=True).stdout
    assert "2 requests matched" in text


def test_whole_port_steal_and_filtered_steal_exclude_each_other(env: Env, shared: Shared) -> None:
    res = _up(env, "whole", free_port())
    assert res.returncode != 0
    assert "HTTP-filtered" in res.stderr.strip().splitlines()[-1]
    # A developer on another machine (another state directory, so this CLI cannot
    # see the sessions): the agent in the target refuses, with the same reason.
    other = env.env | {"NETMIRROR_STATE_DIR": str(env.state_dir) + "-other"}
    try:
        res = env.netmirror(
            "up",
            "--target",
            env.sandbox.target,
            "--session",
            "elsewhere",
            "--steal",
            f"{PORT}:{free_port()}",
            env=other,
        )
        assert res.returncode != 0
        assert "steal only some HTTP requests" in res.stderr.strip().splitlines()[-1]
        res = env.netmirror(
            "up",
            "--target",
            env.sandbox.target,
            "--session",
            "elsewhere2",
            "--steal",
            f"{PORT}:{free_port()}",
            "--http-header",
            "^x-dev: z$",
            env=other,
        )
        assert res.returncode == 0, res.stderr
        # Nothing listens on its local port: the request falls back to the pod.
        assert who(curl("-H", "x-dev: z", shared.url + "/")) == "pod"
    finally:
        env.netmirror("down", "--all", env=other)
    # And the other way round, on another port stolen whole.
    env.server("web", 9090, in_pod=True, host="0.0.0.0", tag="pod9090")
    res = env.netmirror(
        "up",
        "--target",
        env.sandbox.target,
        "--session",
        "w2",
        "--steal",
        f"9090:{free_port()}",
        check=True,
    )
    res = env.netmirror(
        "up",
        "--target",
        env.sandbox.target,
        "--session",
        "f2",
        "--steal",
        f"9090:{free_port()}",
        "--http-header",
        "x",
    )
    assert res.returncode != 0
    assert "9090" in res.stderr.strip().splitlines()[-1]


def test_a_session_leaving_mid_traffic_drops_nobody(env: Env, shared: Shared) -> None:
    host = shared.url.split("//")[1].split(":")[0]
    failures: list[str] = []
    answers: list[tuple[str, str]] = []
    stop = threading.Event()

    def client(dev: str) -> None:
        # One keep-alive connection per client, requests back to back.
        import http.client

        conn = http.client.HTTPConnection(host, PORT, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/", headers={"x-dev": dev} if dev else {})
                answers.append((dev, who(conn.getresponse().read().decode())))
            except Exception as exc:
                failures.append(f"{dev}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection(host, PORT, timeout=10)
        conn.close()

    def answered(dev: str, by: str, since: int = 0, count: int = 20) -> bool:
        return sum(1 for d, w in answers[since:] if d == dev and w == by) >= count

    threads = [threading.Thread(target=client, args=(dev,)) for dev in ("a", "b", "", "b")]
    for thread in threads:
        thread.start()
    try:
        # Traffic of every kind flows before session b leaves...
        eventually(
            lambda: (
                all(answered(d, w) for d, w in (("a", "local-a"), ("b", "local-b"), ("", "pod")))
                or bool(failures)
            ),
            15,
            "the clients' requests did not all get answers",
        )
        res = env.netmirror("down", "--session", "b", check=True)
        assert res.returncode == 0
        left = len(answers)
        # ...and goes on after it left: b's requests now reach the pod.
        eventually(
            lambda: (
                (answered("b", "pod", left) and answered("a", "local-a", left)) or bool(failures)
            ),
            15,
            "after session b left, its requests did not reach the pod",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert failures == []
    after = answers[len(answers) // 2 :]
    # Session b's requests fell back to the pod; a's still reach local-a.
    assert {w for d, w in answers if d == "a"} == {"local-a"}
    assert {w for d, w in after if d == "b"} <= {"local-b", "pod"}
    assert answers[-1][1] != "local-b" or answers[-1][0] != "b"
    assert any(d == "b" and w == "pod" for d, w in answers)
    # The last session leaving gives the port back to the pod whole.
    env.netmirror("down", "--session", "a", check=True)
    eventually(lambda: env.chains() == "", 10, lambda: f"rules left: {env.chains()}")
    assert who(curl("-H", "x-dev: a", shared.url + "/")) == "pod"


def test_a_killed_router_is_replaced_and_sessions_carry_on(env: Env, shared: Shared) -> None:
    assert who(curl("-H", "x-dev: a", shared.url + "/")) == "local-a"
    os.kill(_router_pid(env), 9)
    # The agents notice, start a new router, and register again (in their order).
    seen: list[str] = []

    def b_answered_locally() -> bool:
        res = subprocess.run(
            ["curl", "-sS", "-m", "2", "-H", "x-dev: b", shared.url + "/"],
            capture_output=True,
            text=True,
            check=False,
        )
        seen.append(who(res.stdout) if res.returncode == 0 else "error")
        return seen[-1] == "local-b"

    eventually(b_answered_locally, 15, lambda: f"session b did not come back: {seen}", interval=0.1)
    # Each agent registers on its own: a may come back a moment after b.
    eventually(
        lambda: who(curl("-H", "x-dev: a", shared.url + "/")) == "local-a",
        10,
        "session a did not come back",
        interval=0.1,
    )
    assert who(curl(shared.url + "/")) == "pod"
    # Only in the instant between the kill and the guard's removal of the rule can a
    # connection fail; from then on, until the new router is in place, the pod answers.
    first_answer = next(i for i, w in enumerate(seen) if w != "error")
    assert "error" not in seen[first_answer:], seen
    assert first_answer <= 5, seen


def _h2_server(env: Env, port: int, tag: str, *, in_pod: bool) -> None:
    argv = [sys.executable, str(H2SERVER), "--host", "0.0.0.0" if in_pod else "127.0.0.1"]
    argv += ["--port", str(port), "--tag", tag]
    cmd = env.sandbox.cmd(*argv) if in_pod else argv
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    env.procs.append(proc)
    wait_ready(proc, f"h2 server {tag}")


def test_http2_prior_knowledge_is_routed_stream_by_stream(env: Env) -> None:
    if "HTTP2" not in subprocess.run(["curl", "-V"], capture_output=True, text=True).stdout:
        pytest.skip("this curl has no HTTP/2")
    h2_port = 8081
    _h2_server(env, h2_port, "pod", in_pod=True)
    local = free_port()
    _h2_server(env, local, "local-h2", in_pod=False)
    res = env.netmirror(
        "up",
        "--target",
        env.sandbox.target,
        "--session",
        "h2a",
        "--steal",
        f"{h2_port}:{local}",
        "--http-header",
        "^x-dev: a$",
    )
    assert res.returncode == 0, res.stderr
    url = f"http://{env.sandbox.pod_ip}:{h2_port}"
    h2 = ["--http2-prior-knowledge"]
    assert curl(*h2, url + "/one") == "pod GET /one 0\n"
    assert curl(*h2, "-H", "x-dev: a", url + "/two") == "local-h2 GET /two 0\n"
    # A body larger than HTTP/2's initial window: flow control holds end to end.
    assert curl(*h2, "-H", "x-dev: a", "--data-binary", "x" * 100_000, url + "/up") == (
        "local-h2 POST /up 100000\n"
    )
    # An h2c upgrade (curl --http2 on http://): netmirror answers the upgrade, since
    # the pod's server speaks HTTP/2, and routes the request and those after it.
    assert curl("--http2", url + "/up1") == "pod GET /up1 0\n"
    assert curl("--http2", "-H", "x-dev: a", url + "/up2") == "local-h2 GET /up2 0\n"
    # Several streams on one connection, each routed on its own.
    answers = _h2_requests(env.sandbox.pod_ip, h2_port, ["", "a", "", "a", "a"])
    assert answers == [
        "pod GET /0 0",
        "local-h2 GET /1 0",
        "pod GET /2 0",
        "local-h2 GET /3 0",
        "local-h2 GET /4 0",
    ]


def _h2_requests(host: str, port: int, devs: list[str]) -> list[str]:
    """Send one GET per entry, all at once on one HTTP/2 connection; the bodies in order."""
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    ids = []
    for i, dev in enumerate(devs):
        stream = conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", f"/{i}"), (":scheme", "http")]
        headers += [(":authority", host)] + ([("x-dev", dev)] if dev else [])
        conn.send_headers(stream, headers, end_stream=True)
        ids.append(stream)
    bodies: dict[int, bytes] = {stream: b"" for stream in ids}
    ended: set[int] = set()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        while len(ended) < len(ids):
            data = sock.recv(65536)
            assert data, "connection closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
            sock.sendall(conn.data_to_send())
    return [bodies[stream].decode().strip() for stream in ids]


def _router_pid(env: Env) -> int:
    """The HTTP router of ``PORT`` in this test's sandbox (no other run's)."""

    def is_router(proc: Proc) -> bool:
        return proc.has_args("-m", "netmirror.router") and proc.has_args("--port", str(PORT))

    return only_pid(in_netns(env.sandbox.netns, is_router), f"HTTP router of port {PORT}")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_finished_websockets_and_pipes_leave_no_open_sockets(
    env: Env, shared: Shared
) -> None:
    router = _router_pid(env)
    before = _open_fds(router)
    async with aiohttp.ClientSession() as http:
        for i in range(20):
            headers = {"x-dev": "a"} if i % 2 else {}
            async with http.ws_connect(shared.url + "/ws", headers=headers) as ws:
                await ws.send_str("hi")
                await ws.receive_str()

    # A leak would be one or two descriptors per connection: 20 to 40.
    async def closed() -> bool:
        return _open_fds(router) <= before + 4

    await eventually_async(
        closed,
        5,
        lambda: f"the router holds {_open_fds(router)} descriptors, {before} before",
        interval=0.1,
    )


def test_only_agents_may_register_with_the_router(env: Env, shared: Shared) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to act as another user")
    script = (
        "import json, socket\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect('\\0netmirror-http/{PORT}')\n"
        # The router answers a stranger at once, without reading, and closes: the
        # request may then meet a closed socket, while the answer waits to be read.
        "try:\n"
        "    s.sendall(json.dumps({'session': 'evil', 'filter': {'path': '/'},"
        " 'socket': '/var/run/docker.sock'}).encode() + b'\\n')\n"
        "except BrokenPipeError:\n"
        "    pass\n"
        "print(s.recv(1000).decode())\n"
    )
    res = env.sandbox.run(
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        sys.executable,
        "-c",
        script,
    )
    assert "agents only" in res.stdout, (res.stdout, res.stderr)
    # Requests still go where they went.
    assert who(curl(shared.url + "/")) == "pod"
    assert who(curl("-H", "x-dev: a", shared.url + "/")) == "local-a"
