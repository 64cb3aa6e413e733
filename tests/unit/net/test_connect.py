"""Connecting without a loop turn when the kernel finished the handshake in connect()."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from netmirror.net.sockets import connect_marked, numeric_family, open_local

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop_name: str, coro_fn):  # type: ignore[no-untyped-def]
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        loop.close()


@pytest.fixture
def listener():  # type: ignore[no-untyped-def]
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv
    srv.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("loop_name", LOOPS)
def test_connect_marked_is_connected_and_marked(loop_name: str, listener: socket.socket) -> None:
    async def go() -> tuple[tuple[str, int], int]:
        sock = await connect_marked(listener.getsockname(), mark=0x1234)
        try:
            return sock.getpeername(), sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
        finally:
            sock.close()

    peer, mark = run(loop_name, go)
    assert peer == listener.getsockname()
    assert mark == 0x1234
    conn, _ = listener.accept()
    conn.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_refused_raises_and_closes(loop_name: str) -> None:
    async def go() -> None:
        await connect_marked(("127.0.0.1", closed_port()), mark=0)

    with pytest.raises(ConnectionRefusedError):
        run(loop_name, go)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_open_local_delivers_bytes_both_ways(loop_name: str, listener: socket.socket) -> None:
    got: list[bytes] = []

    class Client(asyncio.Protocol):
        def __init__(self, done: asyncio.Future[None]) -> None:
            self.done = done

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(b"ping")  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            got.append(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.done.set_result(None)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        host, port = listener.getsockname()
        await open_local(loop, lambda: Client(done), host, port)
        listener.setblocking(False)
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
        assert await asyncio.wait_for(loop.sock_recv(conn, 10), 5) == b"ping"
        await loop.sock_sendall(conn, b"pong")
        conn.close()
        await asyncio.wait_for(done, 5)

    run(loop_name, go)
    assert b"".join(got) == b"pong"


@pytest.mark.parametrize("loop_name", LOOPS)
def test_open_local_refused(loop_name: str) -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        await open_local(loop, asyncio.Protocol, "127.0.0.1", closed_port())

    with pytest.raises(ConnectionRefusedError):
        run(loop_name, go)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_open_local_by_name(loop_name: str, listener: socket.socket) -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        await open_local(loop, asyncio.Protocol, "localhost", listener.getsockname()[1])

    run(loop_name, go)
    conn, _ = listener.accept()
    conn.close()


def test_numeric_family() -> None:
    assert numeric_family("127.0.0.1") == socket.AF_INET
    assert numeric_family("::1") == socket.AF_INET6
    assert numeric_family("localhost") is None
    assert numeric_family("fe80::1%lo") is None  # scoped: left to the loop's resolver
