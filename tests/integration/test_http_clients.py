"""Real HTTP clients through a filtered port get what they get from the server directly.

The pod runs the same aiohttp server twice: on PORT, which a session filters (every
request passes through netmirror's router), and on DIRECT, which nobody touches.
Each test sends the same bytes both ways and compares what comes back (the Date
header aside): HTTP/1.0 with and without keep-alive, no Host, unknown methods,
obs-fold, long headers, 100-continue, ``Connection: close`` mid-stream; and real
clients (curl ``--http1.0``, Python's http.client, ab in keep-alive mode).
"""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration.conftest import Env, free_port

PORT = 8080
DIRECT = 8081


@dataclass
class Pod:
    host: str
    local: int


@pytest.fixture
def pod(env: Env) -> Iterator[Pod]:
    env.server("web", PORT, in_pod=True, host="0.0.0.0", tag="pod")
    env.server("web", DIRECT, in_pod=True, host="0.0.0.0", tag="pod")
    local = free_port()
    env.server("web", local, in_pod=False, tag="local")
    res = env.netmirror(
        "up",
        "--target",
        env.sandbox.target,
        "--session",
        "h",
        "--steal",
        f"{PORT}:{local}",
        "--http-header",
        "^x-dev: me$",
    )
    assert res.returncode == 0, res.stderr
    yield Pod(env.sandbox.pod_ip, local)


def exchange(host: str, port: int, requests: list[bytes], *, read_all: bool = False) -> bytes:
    """Send each request on one connection, reading its answer before the next."""
    out = b""
    with socket.create_connection((host, port), timeout=10) as sock:
        for request in requests:
            sock.sendall(request)
            out += _read_answer(sock) if not read_all else b""
        if read_all:
            # The last request says close: the server ends the conversation.
            while chunk := sock.recv(65536):
                out += chunk
        else:
            # Whether the server kept the connection: EOF now, or still open.
            sock.settimeout(0.3)
            try:
                out += b"[closed]" if sock.recv(1) == b"" else b"[data]"
            except TimeoutError:
                out += b"[open]"
            except ConnectionResetError:
                out += b"[reset]"
    return out


def _read_answer(sock: socket.socket, buf: bytes = b"") -> bytes:
    """One response (any 1xx before it included), framed by Content-Length or EOF."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return buf + b"[eof]"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if re.match(rb"HTTP/1\.[01] 1\d\d", head):
        return head + b"\r\n\r\n" + _read_answer(sock, rest)
    return _finish(sock, head, rest)


def _finish(sock: socket.socket, head: bytes, rest: bytes) -> bytes:
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if match is None:
        while chunk := sock.recv(65536):
            rest += chunk
        return head + b"\r\n\r\n" + rest + b"[eof]"
    length = int(match.group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest[:length]


def same(data: bytes) -> bytes:
    """What must be equal both ways: everything but the Date header."""
    return re.sub(rb"(?im)^date:[^\r\n]*\r\n", b"", data)


def both_ways(pod: Pod, requests: list[bytes], **kw: bool) -> tuple[bytes, bytes]:
    through = exchange(pod.host, PORT, requests, **kw)
    direct = exchange(pod.host, DIRECT, requests, **kw)
    return same(through), same(direct)


KEEP10 = b"GET /%d HTTP/1.0\r\nHost: pod\r\nConnection: keep-alive\r\n\r\n"


def test_http_1_0_keep_alive_is_kept_through_the_router(pod: Pod) -> None:
    requests = [KEEP10 % i for i in range(3)]
    through, direct = both_ways(pod, requests)
    assert through == direct
    assert through.count(b"pod GET /") == 3 and through.endswith(b"[open]")


def test_http_1_0_without_keep_alive_is_closed_as_the_server_closes(pod: Pod) -> None:
    through, direct = both_ways(pod, [b"GET /one HTTP/1.0\r\nHost: pod\r\n\r\n"])
    assert through == direct
    assert b"pod GET /one" in through and through.endswith(b"[closed]")


def test_http_1_0_without_host_is_filtered(pod: Pod) -> None:
    mine = b"GET /x HTTP/1.0\r\nx-dev: me\r\nConnection: keep-alive\r\n\r\n"
    other = b"GET /y HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    out = exchange(pod.host, PORT, [mine, other])
    assert b"local GET /x 0" in out and b"pod GET /y 0" in out


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"PURGE /cache HTTP/1.1\r\nHost: pod\r\n\r\n", id="unknown-method"),
        pytest.param(
            b"GET /fold HTTP/1.1\r\nHost: pod\r\nX-Long: first\r\n  second\r\n\r\n", id="obs-fold"
        ),
        pytest.param(
            b"GET /big HTTP/1.1\r\nHost: pod\r\nX-Big: " + b"b" * 7000 + b"\r\n\r\n",
            id="long-header",
        ),
        pytest.param(
            b"POST /continue HTTP/1.1\r\nHost: pod\r\nExpect: 100-continue\r\n"
            b"Content-Length: 4\r\n\r\nbody",
            id="100-continue",
        ),
        pytest.param(b"GET /close HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n", id="close"),
        pytest.param(b"GET /spaces  HTTP/1.1\r\nHost: pod\r\n\r\n", id="malformed-line"),
    ],
)
def test_unusual_requests_get_what_the_server_answers(pod: Pod, request_bytes: bytes) -> None:
    # The whole conversation, up to the server's close. (Nothing follows a request
    # that says close: what a server does with such bytes differs from one to another.)
    request = request_bytes
    if b"Connection: close" not in request_bytes:
        request += b"GET /after HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n"
    through, direct = both_ways(pod, [request], read_all=True)
    assert through == direct


def test_curl_http_1_0_reuses_its_connection(pod: Pod) -> None:
    def run(port: int) -> list[str]:
        url = f"http://{pod.host}:{port}/c"
        res = subprocess.run(
            [
                "curl",
                "-sS",
                "-m",
                "10",
                "--http1.0",
                "-H",
                "Connection: keep-alive",
                "-w",
                " connects=%{num_connects}\n",
                url,
                url,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        return res.stdout.splitlines()

    assert (
        run(PORT) == run(DIRECT) == ["pod GET /c 0", " connects=1", "pod GET /c 0", " connects=0"]
    )


def test_python_http_client_speaking_http_1_0_keeps_its_connection(pod: Pod) -> None:
    class HTTP10(http.client.HTTPConnection):
        _http_vsn = 10
        _http_vsn_str = "HTTP/1.0"

    def run(port: int) -> list[tuple[int, bytes, str | None]]:
        conn = HTTP10(pod.host, port, timeout=10)
        seen = []
        sockets = set()
        try:
            for path in ("/p1", "/p2", "/p3"):
                conn.request("GET", path, headers={"Connection": "keep-alive"})
                answer = conn.getresponse()
                seen.append((answer.status, answer.read(), answer.getheader("Connection")))
                sockets.add(id(conn.sock))
        finally:
            conn.close()
        assert len(sockets) == 1, "the client had to connect again"
        return seen

    assert run(PORT) == run(DIRECT)


@pytest.mark.skipif(shutil.which("ab") is None, reason="ab (apache2-utils) is not installed")
def test_ab_in_keep_alive_mode_has_no_failures(pod: Pod) -> None:
    res = subprocess.run(
        ["ab", "-k", "-n", "400", "-c", "4", f"http://{pod.host}:{PORT}/ab"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    fields = dict(line.split(":", 1) for line in res.stdout.splitlines() if ":" in line)
    assert fields["Complete requests"].strip() == "400"
    assert fields["Failed requests"].strip() == "0"
    assert fields["Keep-Alive requests"].strip() == "400"
