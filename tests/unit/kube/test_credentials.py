"""Credentials that expire: exec plugins and token files, for REST calls and port-forwards.

A fake API server on 127.0.0.1 answers 401 to a token it does not accept (expired,
unknown or revoked) and serves one pod and the pod port-forward endpoint (the
``v4.channel.k8s.io`` fake of tests.support, relaying to an echo server).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from netmirror.errors import AgentError, NetmirrorError
from netmirror.kube.cluster import KubeCluster, api_error
from netmirror.kube.portforward import open_stream
from tests.support.fake_portforward import FakePortForward
from tests.support.kubeconfig import write_kubeconfig

NS = "x"
POD = "p"
PORT = 7777
LIFETIME = 2.0

# An exec credential plugin: a token valid LIFETIME seconds, its expiry in its name, so
# that the fake server can tell an expired one; every run is counted in a file.
PLUGIN = """\
import datetime, json, pathlib, sys, time
count = pathlib.Path(sys.argv[1])
runs = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(runs))
if len(sys.argv) > 3 and runs >= int(sys.argv[3]):
    sys.stderr.write("plugin: the identity provider\\nis unreachable\\n")
    sys.exit(3)
expires = time.time() + float(sys.argv[2])
stamp = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc)
print(json.dumps({
    "apiVersion": "client.authentication.k8s.io/v1beta1",
    "kind": "ExecCredential",
    "status": {
        "token": f"exec-{runs}-{expires:.6f}",
        "expirationTimestamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    },
}))
"""


def exec_token_valid(token: str) -> bool:
    """An exec plugin's token is valid until the expiry it carries."""
    parts = token.split("-")
    return len(parts) == 3 and parts[0] == "exec" and float(parts[2]) > time.time()


class FakeApi:
    """The API server: ``accept(token)`` decides; every answer is logged."""

    def __init__(self, accept: Callable[[str], bool]) -> None:
        self.accept = accept
        self.log: list[tuple[str, int]] = []
        """(kind, status) of every request: kind is "rest" or "portforward"."""

    @web.middleware
    async def authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        kind = "portforward" if request.path.endswith("/portforward") else "rest"
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not self.accept(auth.removeprefix("Bearer ")):
            self.log.append((kind, 401))
            body = {"kind": "Status", "status": "Failure", "reason": "Unauthorized", "code": 401}
            return web.json_response(body, status=401)
        self.log.append((kind, 200))
        return await handler(request)

    def count(self, kind: str, status: int) -> int:
        return sum(1 for entry in self.log if entry == (kind, status))

    async def pod(self, request: web.Request) -> web.Response:
        name = request.match_info["pod"]
        return web.json_response(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": request.match_info["ns"]},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]},
            }
        )


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def api_server(accept: Callable[[str], bool]) -> AsyncIterator[tuple[FakeApi, str]]:
    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    echo_port = echo_server.sockets[0].getsockname()[1]

    def resolve(ns: str, pod: str, port: int) -> tuple[str, int] | None:
        return ("127.0.0.1", echo_port) if (ns, pod, port) == (NS, POD, PORT) else None

    fake = FakeApi(accept)
    forward = FakePortForward(resolve)
    app = web.Application(middlewares=[fake.authenticate])
    app.router.add_get("/api/v1/namespaces/{ns}/pods/{pod}", fake.pod)
    forward.add_routes(app)
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield fake, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        echo_server.close()
        await echo_server.wait_closed()


def exec_user(tmp_path: Path, *, fail_from: int | None = None) -> tuple[dict[str, Any], Path]:
    script = tmp_path / "plugin.py"
    script.write_text(PLUGIN)
    runs = tmp_path / "runs"
    args = [str(script), str(runs), str(LIFETIME)]
    if fail_from is not None:
        args.append(str(fail_from))
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable,
            "args": args,
            "interactiveMode": "Never",
        }
    }
    return user, runs


@contextlib.asynccontextmanager
async def connected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: str, user: dict[str, Any]
) -> AsyncIterator[KubeCluster]:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server, user, namespace=NS)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    cluster = await KubeCluster.connect(context=None, namespace=None)
    try:
        yield cluster
    finally:
        await cluster.close()


async def read_pod(cluster: KubeCluster) -> str:
    pod = await cluster.core.read_namespaced_pod(POD, cluster.namespace)
    return str(pod.metadata.name)


async def forward_roundtrip(
    cluster: KubeCluster, http: aiohttp.ClientSession, data: bytes
) -> bytes:
    stream = await open_stream(
        http, cluster.endpoint, namespace=cluster.namespace, pod=POD, port=PORT, timeout=5
    )
    try:
        await stream.write(data)
        return await asyncio.wait_for(stream.read(), 5)
    finally:
        await stream.close()


def runs_of(path: Path) -> int:
    return int(path.read_text()) if path.exists() else 0


async def test_exec_plugin_tokens_are_renewed_across_expiries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    user, runs = exec_user(tmp_path)
    async with (
        api_server(exec_token_valid) as (fake, url),
        connected(monkeypatch, tmp_path, url, user) as cluster,
        aiohttp.ClientSession() as http,
    ):
        assert cluster.namespace == NS
        assert runs_of(runs) == 1
        first = time.monotonic()
        calls = 0
        # Several lifetimes of a token, with calls spread over them.
        while time.monotonic() - first < 3.5 * LIFETIME:
            assert await read_pod(cluster) == POD
            payload = f"hello {calls}".encode()
            assert await forward_roundtrip(cluster, http, payload) == payload
            calls += 1
            await asyncio.sleep(0.25)
        assert runs_of(runs) >= 3, "the plugin was not run again when its tokens expired"
        assert fake.count("rest", 200) == calls
        assert fake.count("portforward", 200) == calls


async def test_exec_plugin_is_run_again_after_a_401(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    user, runs = exec_user(tmp_path)
    revoked: set[str] = set()

    def accept(token: str) -> bool:
        return exec_token_valid(token) and token not in revoked

    async with (
        api_server(accept) as (fake, url),
        connected(monkeypatch, tmp_path, url, user) as cluster,
        aiohttp.ClientSession() as http,
    ):
        token = await cluster.endpoint.request_headers()
        assert await read_pod(cluster) == POD
        # The server revokes the token well before it expires: the next call meets a 401,
        # the plugin runs again and the call is retried once with the new token.
        revoked.add(token["Authorization"].removeprefix("Bearer "))
        before = runs_of(runs)
        assert await read_pod(cluster) == POD
        assert runs_of(runs) > before
        assert fake.count("rest", 401) == 1

        revoked.add((await cluster.endpoint.request_headers())["Authorization"].split()[1])
        before = runs_of(runs)
        assert await forward_roundtrip(cluster, http, b"again") == b"again"
        assert runs_of(runs) > before
        assert fake.count("portforward", 401) == 1


async def test_a_failing_exec_plugin_is_one_line_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    user, _ = exec_user(tmp_path, fail_from=2)  # the first run (at connect) succeeds
    async with (
        api_server(exec_token_valid) as (_, url),
        connected(monkeypatch, tmp_path, url, user) as cluster,
        aiohttp.ClientSession() as http,
    ):
        await asyncio.sleep(LIFETIME)  # the token expired
        with pytest.raises(NetmirrorError) as rest:
            await read_pod(cluster)
        with pytest.raises(NetmirrorError) as forward:
            await forward_roundtrip(cluster, http, b"x")
        for err in (rest.value, forward.value):
            message = str(err)
            assert "\n" not in message
            assert "exec plugin" in message
            assert "identity provider is unreachable" in message
        error = api_error(rest.value, verb="get", resource="pods", namespace=NS)
        assert "\n" not in str(error)


async def test_a_rewritten_token_file_is_read_after_a_401(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-1\n")
    current = ["file-1"]
    async with (
        api_server(lambda token: token == current[0]) as (fake, url),
        connected(monkeypatch, tmp_path, url, {"tokenFile": str(token_file)}) as cluster,
        aiohttp.ClientSession() as http,
    ):
        assert await read_pod(cluster) == POD
        assert await forward_roundtrip(cluster, http, b"one") == b"one"

        # The token rotates: the file gets the new one, the server drops the old one.
        token_file.write_text("file-2\n")
        current[0] = "file-2"
        assert await read_pod(cluster) == POD
        assert fake.count("rest", 401) == 1
        assert await forward_roundtrip(cluster, http, b"two") == b"two"
        assert fake.count("portforward", 401) == 0  # the REST call's refresh was shared

        token_file.write_text("file-3\n")
        current[0] = "file-3"
        assert await forward_roundtrip(cluster, http, b"three") == b"three"
        assert fake.count("portforward", 401) == 1
        assert await read_pod(cluster) == POD
        assert fake.count("rest", 401) == 1


async def test_a_static_token_still_works(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    accepted = ["static-token"]
    async with (
        api_server(lambda token: token in accepted) as (fake, url),
        connected(monkeypatch, tmp_path, url, {"token": "static-token"}) as cluster,
        aiohttp.ClientSession() as http,
    ):
        assert await read_pod(cluster) == POD
        assert await forward_roundtrip(cluster, http, b"static") == b"static"
        assert cluster.endpoint.headers == {"Authorization": "Bearer static-token"}

        # Rejected: reported once, in one line; there is nothing to renew, so no retry.
        accepted.clear()
        with pytest.raises(Exception) as rest:
            await read_pod(cluster)
        error = api_error(rest.value, verb="get", resource="pods", namespace=NS)
        assert "401" in str(error)
        assert "\n" not in str(error)
        assert fake.count("rest", 401) == 1
        with pytest.raises(AgentError, match="HTTP 401"):
            await forward_roundtrip(cluster, http, b"x")
        assert fake.count("portforward", 401) == 1
