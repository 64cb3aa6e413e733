"""Port-forward I/O over loopback: open_stream and LocalForwarder against the fake API server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from netmirror.errors import AgentError
from netmirror.kube.portforward import (
    ApiEndpoint,
    LocalForwarder,
    PortForwardStream,
    open_stream,
)
from tests.support.fake_portforward import FakePortForward

NS = "ns"
POD = "agent"
PORT = 7777
MB = 1024 * 1024


class TcpServer:
    """A real TCP server on 127.0.0.1 whose connections are all closed on exit."""

    def __init__(
        self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ):
        self.handler = handler
        self.writers: set[asyncio.StreamWriter] = set()
        self.accepted = 0
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.add(writer)
        try:
            await self.handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[TcpServer]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for writer in list(self.writers):
                writer.close()
            await server.wait_closed()
            await asyncio.sleep(0)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(256 * 1024):
        writer.write(data)
        await writer.drain()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def echo_server() -> AsyncIterator[TcpServer]:
    async with TcpServer(echo).running() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 108-byte limit of Unix socket paths.
    with tempfile.TemporaryDirectory(prefix="nm-pf-", dir="/tmp") as tmp:
        yield Path(tmp) / "pf.sock"


@contextlib.asynccontextmanager
async def fake_api(
    target: tuple[str, int] | None, *, token: str | None = None
) -> AsyncIterator[tuple[FakePortForward, str]]:
    """The fake API server, forwarding ns/agent:7777 to ``target``."""

    def resolve(ns: str, pod: str, port: int) -> tuple[str, int] | None:
        return target if (ns, pod, port) == (NS, POD, PORT) else None

    fake = FakePortForward(resolve, require_token=token)
    async with fake.running() as url:
        yield fake, url


def opener_for(
    session: aiohttp.ClientSession, url: str, *, pod: str = POD, token: str | None = None
) -> Callable[[], Awaitable[PortForwardStream]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    endpoint = ApiEndpoint(base_url=url, headers=headers, ssl=None)
    return functools.partial(
        open_stream, session, endpoint, namespace=NS, pod=pod, port=PORT, timeout=5
    )


async def eventually(check: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def our_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("netmirror.kube")]


def exists(path: Path) -> bool:
    return path.exists()


def write_file(path: Path, text: str) -> None:
    path.write_text(text)


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


async def round_trip(path: Path, size: int) -> tuple[bytes, bytes]:
    """Send ``size`` random bytes through the Unix socket; digests of sent and echoed."""
    reader, writer = await asyncio.open_unix_connection(os.fspath(path))
    sent, got = hashlib.sha256(), hashlib.sha256()

    async def send() -> None:
        remaining = size
        while remaining:
            block = os.urandom(min(remaining, 200_000))
            sent.update(block)
            writer.write(block)
            await writer.drain()
            remaining -= len(block)

    async def receive() -> None:
        remaining = size
        while remaining:
            block = await reader.read(min(remaining, 256 * 1024))
            assert block, "stream ended early"
            got.update(block)
            remaining -= len(block)

    try:
        await asyncio.gather(send(), receive())
    finally:
        writer.close()
        await writer.wait_closed()
    return sent.digest(), got.digest()


# --- open_stream ---------------------------------------------------------------------


async def test_stream_round_trip(echo_server: TcpServer, session: aiohttp.ClientSession) -> None:
    async with fake_api(("127.0.0.1", echo_server.port)) as (fake, url):
        stream = await opener_for(session, url)()
        assert stream.label == "ns/agent:7777"
        await stream.write(b"hello through the API server")
        assert await stream.read() == b"hello through the API server"
        big = os.urandom(300_000)  # more than one websocket message
        await stream.write(big)
        got = b""
        while len(got) < len(big):
            got += await stream.read()
        assert got == big
        await stream.close()
        assert stream.closed
        assert await stream.read() == b""
        with pytest.raises(AgentError, match="is closed"):
            await stream.write(b"late")
        await stream.close()  # idempotent
        assert [(r.namespace, r.pod, r.port, r.status) for r in fake.requests] == [
            (NS, POD, PORT, 101)
        ]
        await eventually(lambda: fake.open_websockets == 0)


async def test_stream_ends_when_pod_side_closes(session: aiohttp.ClientSession) -> None:
    async def say_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()

    async with (
        TcpServer(say_bye).running() as pod_server,
        fake_api(("127.0.0.1", pod_server.port)) as (_, url),
    ):
        stream = await opener_for(session, url)()
        assert await stream.read() == b"bye"
        assert await stream.read() == b""
        assert await stream.read() == b""
        await stream.close()


async def test_refused_inside_pod_surfaces_on_read(session: aiohttp.ClientSession) -> None:
    async with fake_api(("127.0.0.1", closed_port())) as (_, url):
        stream = await opener_for(session, url)()
        with pytest.raises(AgentError) as info:
            await stream.read()
        message = str(info.value)
        assert message.startswith("port-forward to pod ns/agent:7777: an error occurred")
        assert "Connect call failed" in message
        assert "\n" not in message
        assert stream.remote_error in message
        assert await stream.read() == b""
        await stream.close()


async def test_forbidden(session: aiohttp.ClientSession) -> None:
    async with fake_api(("127.0.0.1", 1), token="good") as (fake, url):
        with pytest.raises(AgentError) as info:
            await opener_for(session, url, token="bad")()
        assert str(info.value) == (
            "forbidden: cannot create pods/portforward for pod ns/agent (check your RBAC)"
        )
        assert fake.requests[-1].status == 403


async def test_unauthorized(session: aiohttp.ClientSession) -> None:
    async with fake_api(("127.0.0.1", 1), token="good") as (_, url):
        with pytest.raises(AgentError, match=r"unauthorized: .* pod ns/agent \(HTTP 401\)$"):
            await opener_for(session, url)()


async def test_good_token_is_accepted(
    echo_server: TcpServer, session: aiohttp.ClientSession
) -> None:
    async with fake_api(("127.0.0.1", echo_server.port), token="good") as (_, url):
        stream = await opener_for(session, url, token="good")()
        await stream.write(b"x")
        assert await stream.read() == b"x"
        await stream.close()


async def test_pod_not_found(session: aiohttp.ClientSession) -> None:
    async with fake_api(("127.0.0.1", 1)) as (fake, url):
        with pytest.raises(AgentError) as info:
            await opener_for(session, url, pod="missing")()
        assert str(info.value) == "pod ns/missing not found"
        assert fake.requests[-1].status == 404


@contextlib.asynccontextmanager
async def custom_api(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """An API server whose port-forward route runs ``handler``."""
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/{ns}/pods/{pod}/portforward", handler)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_other_http_error(session: aiohttp.ClientSession) -> None:
    async def unavailable(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="try later")

    async with custom_api(unavailable) as url:
        with pytest.raises(AgentError, match=r"^port-forward to pod ns/agent failed: HTTP 503"):
            await opener_for(session, url)()


async def test_api_server_unreachable(session: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(AgentError, match=f"^cannot reach the API server at {url}: "):
        await opener_for(session, url)()


async def test_timeout_waiting_for_announcement(session: aiohttp.ClientSession) -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    async with custom_api(silent) as url:
        endpoint = ApiEndpoint(base_url=url, headers={}, ssl=None)
        started = time.monotonic()
        with pytest.raises(AgentError) as info:
            await open_stream(session, endpoint, namespace=NS, pod=POD, port=PORT, timeout=0.3)
        assert str(info.value) == "port-forward to pod ns/agent port 7777 timed out after 0.3 s"
        assert time.monotonic() - started < 3


async def test_remote_error_before_announcement(session: aiohttp.ClientSession) -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await ws.prepare(request)
        await ws.send_bytes(b"\x01" + struct.pack("<H", PORT))
        await ws.send_bytes(b"\x01pod is not running\n(details)")
        await ws.close()
        return ws

    async with custom_api(failing) as url:
        with pytest.raises(AgentError) as info:
            await opener_for(session, url)()
        assert str(info.value) == "port-forward to pod ns/agent:7777: pod is not running (details)"


async def test_closed_before_announcement(session: aiohttp.ClientSession) -> None:
    async def closing(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await ws.prepare(request)
        await ws.close()
        return ws

    async with custom_api(closing) as url:
        with pytest.raises(AgentError, match="closed before the port was announced"):
            await opener_for(session, url)()


# --- LocalForwarder ------------------------------------------------------------------


async def test_forwarder_5mb_on_10_connections(
    echo_server: TcpServer, session: aiohttp.ClientSession, sock_path: Path
) -> None:
    async with (
        fake_api(("127.0.0.1", echo_server.port)) as (fake, url),
        LocalForwarder(opener_for(session, url), path=sock_path) as forwarder,
    ):
        results = await asyncio.gather(*(round_trip(sock_path, 5 * MB) for _ in range(10)))
        for sent, got in results:
            assert sent == got
        assert forwarder.connections == 10
        assert forwarder.failures == 0
        assert fake.bytes_to_pod == fake.bytes_from_pod == 50 * MB
        assert echo_server.accepted == 10
        await eventually(lambda: forwarder.active == 0 and fake.open_websockets == 0)


async def test_socket_mode_and_cleanup(session: aiohttp.ClientSession, sock_path: Path) -> None:
    sock_path.parent.chmod(0o755)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(sock_path))
    stale.close()  # a leftover socket file from a crashed daemon
    forwarder = LocalForwarder(opener_for(session, "http://127.0.0.1:1"), path=sock_path)
    await forwarder.start()
    try:
        mode = os.stat(sock_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
    finally:
        await forwarder.close()
    assert not exists(sock_path)


async def test_refuses_to_replace_a_regular_file(
    session: aiohttp.ClientSession, sock_path: Path
) -> None:
    write_file(sock_path, "not a socket")
    forwarder = LocalForwarder(opener_for(session, "http://127.0.0.1:1"), path=sock_path)
    with pytest.raises(AgentError, match="exists and is not a socket"):
        await forwarder.start()
    assert stat.S_ISREG(os.stat(sock_path).st_mode)


async def test_refused_inside_pod_closes_local_connection(
    session: aiohttp.ClientSession, sock_path: Path
) -> None:
    async with (
        fake_api(("127.0.0.1", closed_port())) as (fake, url),
        LocalForwarder(opener_for(session, url), path=sock_path) as forwarder,
    ):
        reader, writer = await asyncio.open_unix_connection(os.fspath(sock_path))
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await eventually(lambda: forwarder.active == 0)
        assert forwarder.connections == 1
        assert forwarder.failures == 1
        assert "Connect call failed" in forwarder.last_error
        assert fake.open_websockets == 0


async def test_open_is_retried_with_backoff(
    echo_server: TcpServer, session: aiohttp.ClientSession, sock_path: Path
) -> None:
    async with fake_api(("127.0.0.1", echo_server.port)) as (_, url):
        real_opener = opener_for(session, url)
        calls: list[float] = []

        async def flaky() -> PortForwardStream:
            calls.append(time.monotonic())
            if len(calls) < 3:
                raise AgentError("API server not ready")
            return await real_opener()

        async with LocalForwarder(flaky, path=sock_path, backoff=0.05) as forwarder:
            sent, got = await round_trip(sock_path, 100_000)
        assert sent == got
        assert len(calls) == 3
        assert calls[1] - calls[0] >= 0.05
        assert calls[2] - calls[1] >= 0.1
        assert forwarder.failures == 0


async def test_open_gives_up_after_attempts(sock_path: Path) -> None:
    calls: list[float] = []

    async def broken() -> PortForwardStream:
        calls.append(time.monotonic())
        raise AgentError("pod ns/agent not found")

    async with LocalForwarder(broken, path=sock_path, backoff=0.02, max_backoff=0.05) as fwd:
        reader, writer = await asyncio.open_unix_connection(os.fspath(sock_path))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await eventually(lambda: fwd.active == 0)
    assert len(calls) == 5
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    for gap, expected in zip(gaps, [0.02, 0.04, 0.05, 0.05], strict=True):
        assert gap >= expected * 0.9
    assert gaps[-1] < 0.5  # capped by max_backoff
    assert (fwd.connections, fwd.failures) == (1, 1)
    assert fwd.last_error == "pod ns/agent not found"


async def test_default_backoff_is_0_1_doubling_to_2(sock_path: Path) -> None:
    forwarder = LocalForwarder(_never_called, path=sock_path)
    assert (forwarder.attempts, forwarder.backoff, forwarder.max_backoff) == (5, 0.1, 2.0)


async def _never_called() -> PortForwardStream:
    raise AssertionError("not called")


async def test_pod_close_closes_local_connection(
    session: aiohttp.ClientSession, sock_path: Path
) -> None:
    async def say_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()

    async with (
        TcpServer(say_bye).running() as pod_server,
        fake_api(("127.0.0.1", pod_server.port)) as (_, url),
        LocalForwarder(opener_for(session, url), path=sock_path) as forwarder,
    ):
        reader, writer = await asyncio.open_unix_connection(os.fspath(sock_path))
        assert await asyncio.wait_for(reader.read(), 5) == b"bye"
        writer.close()
        await eventually(lambda: forwarder.active == 0)
        assert forwarder.failures == 0


async def test_local_eof_closes_websocket_and_pod_connection(
    session: aiohttp.ClientSession, sock_path: Path
) -> None:
    received = bytearray()
    pod_saw_eof = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.extend(data)
        pod_saw_eof.set()

    async with (
        TcpServer(sink).running() as pod_server,
        fake_api(("127.0.0.1", pod_server.port)) as (fake, url),
        LocalForwarder(opener_for(session, url), path=sock_path) as forwarder,
    ):
        reader, writer = await asyncio.open_unix_connection(os.fspath(sock_path))
        writer.write(b"last words")
        await writer.drain()
        await eventually(lambda: bytes(received) == b"last words")
        writer.write_eof()
        await asyncio.wait_for(pod_saw_eof.wait(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await eventually(lambda: forwarder.active == 0 and fake.open_websockets == 0)
        assert forwarder.failures == 0


async def test_backpressure_when_pod_does_not_read(
    session: aiohttp.ClientSession, sock_path: Path
) -> None:
    release = asyncio.Event()

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()

    async with (
        TcpServer(stalled).running() as pod_server,
        fake_api(("127.0.0.1", pod_server.port)) as (fake, url),
        LocalForwarder(opener_for(session, url), path=sock_path),
    ):
        _, writer = await asyncio.open_unix_connection(os.fspath(sock_path))
        writer.write(bytes(96 * MB))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(writer.drain(), 1.5)
        # The forwarder took only what the buffers on the way hold, not all 96 MB.
        left_client = 96 * MB - writer.transport.get_write_buffer_size()
        assert left_client < 32 * MB
        assert fake.bytes_to_pod < 32 * MB
        release.set()
        writer.close()


async def test_close_leaves_no_tasks_or_sockets(
    echo_server: TcpServer, session: aiohttp.ClientSession, sock_path: Path
) -> None:
    async with fake_api(("127.0.0.1", echo_server.port)) as (fake, url):
        baseline = open_sockets()
        forwarder = LocalForwarder(opener_for(session, url), path=sock_path)
        await forwarder.start()
        clients = [await asyncio.open_unix_connection(os.fspath(sock_path)) for _ in range(3)]
        for reader, writer in clients:
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        assert forwarder.active == 3 and fake.open_websockets == 3
        assert len(our_tasks()) == 9  # per connection: serve, up, down

        await forwarder.close()

        assert our_tasks() == []
        assert forwarder.active == 0
        assert not exists(sock_path)
        for reader, writer in clients:
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await writer.wait_closed()
        await eventually(lambda: fake.open_websockets == 0 and not echo_server.writers)
        with pytest.raises(OSError):
            await asyncio.open_unix_connection(os.fspath(sock_path))
        await eventually(lambda: open_sockets() <= baseline)
        await forwarder.close()  # idempotent
