"""The router gives a request to the original server when its session goes away unanswered.

The replay lives in :class:`netmirror.router.router.ClientConnection` (the relay in
``http1`` only says where each request goes), so these tests run the router's own
classes on fake transports: the client's socket is a fake, and ``connect_upstream``
is replaced by a fake that either fails or hands the :class:`Upstream` a fake
transport, as the event loop would. No socket is opened.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from netmirror.netfilter import Backend
from netmirror.router import router as router_module
from netmirror.router.http1 import BAD_GATEWAY, ORIGINAL
from netmirror.router.router import (
    MAX_KEPT_REQUEST,
    ClientConnection,
    Registration,
    Router,
    Upstream,
)
from netmirror.wire.httpfilter import HttpFilter
from tests.support.fake_transport import FakeTransport

PORT = 8080
SESSION = "alice"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FakeSock:
    """What the router asks of a client socket: options, and conntrack (not redirected)."""

    family = socket.AF_INET

    def setsockopt(self, *args: Any) -> None:
        pass

    def getsockopt(self, *args: Any) -> bytes:
        raise OSError("not redirected")

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 40000)


class Network:
    """Stands in for connect_upstream: every upstream the router connects, by target."""

    def __init__(self) -> None:
        self.upstreams: list[tuple[Upstream, FakeTransport | None]] = []
        self.refuse: set[str] = set()  # targets whose connect fails
        self.hold: set[str] = set()  # targets whose connect waits until released
        self._release = asyncio.Event()

    async def connect(self, router: Router, dst: tuple[str, int], up: Upstream) -> None:
        if up.target in self.hold:
            await self._release.wait()
        if up.target in self.refuse:
            self.upstreams.append((up, None))
            raise ConnectionRefusedError(f"session {up.target} left")
        transport = FakeTransport(sock=FakeSock())
        self.upstreams.append((up, transport))
        up.connection_made(transport)  # type: ignore[arg-type]

    def release(self) -> None:
        self._release.set()

    def to(self, target: str) -> list[tuple[Upstream, FakeTransport | None]]:
        return [(up, t) for up, t in self.upstreams if up.target == target]

    def transport(self, target: str) -> FakeTransport:
        ((_, transport),) = self.to(target)
        assert transport is not None
        return transport

    def upstream(self, target: str) -> Upstream:
        ((up, _),) = self.to(target)
        return up


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Network:
    net = Network()
    monkeypatch.setattr(router_module, "connect_upstream", net.connect)
    return net


async def settle() -> None:
    """Let the connect tasks run."""
    for _ in range(5):
        await asyncio.sleep(0)


class Client:
    """A client connection of the router's port, on a fake transport."""

    def __init__(self, router: Router) -> None:
        self.conn = ClientConnection(router)
        self.transport = FakeTransport(sock=FakeSock())
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    def send(self, data: bytes) -> None:
        self.conn.data_received(data)


def new_router() -> Router:
    router = Router(PORT, Backend.NFT)
    router.registrations[SESSION] = Registration(
        SESSION,
        HttpFilter.parse({"header": "^x-dev: alice$"}),
        "\0unused",
        writer=None,  # type: ignore[arg-type]
    )
    return router


def request(body: bytes = b"", *, to_session: bool = True, path: str = "/api") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: svc\r\nContent-Length: {len(body)}\r\n"
    if to_session:
        head += "X-Dev: alice\r\n"
    return head.encode() + b"\r\n" + body


def head_size(body_size: int) -> int:
    return len(request(b"x" * body_size)) - body_size


# --- the replay ------------------------------------------------------------------------


async def test_a_request_to_a_session_that_cannot_be_reached_goes_to_the_original(
    network: Network,
) -> None:
    router = new_router()
    network.refuse.add(SESSION)
    client = Client(router)
    req = request(b'{"name": "x"}')
    client.send(req)
    await settle()
    assert len(network.to(SESSION)) == 1  # it was tried first
    assert network.transport(ORIGINAL).written == req  # byte for byte
    network.upstream(ORIGINAL).data_received(RESPONSE)
    assert client.transport.written == RESPONSE  # not a 502
    assert not client.transport.closing  # keep-alive
    assert router.registrations[SESSION].matched == 1
    assert router.counters.passed == 0  # routed to the session, replayed on failure


async def test_a_session_connection_lost_before_answering_is_replayed(network: Network) -> None:
    router = new_router()
    client = Client(router)
    req = request(b"payload" * 100)
    client.send(req)
    await settle()
    session = network.transport(SESSION)
    assert session.written == req
    network.upstream(SESSION).connection_lost(ConnectionResetError("agent died"))
    await settle()
    assert network.transport(ORIGINAL).written == req
    network.upstream(ORIGINAL).data_received(RESPONSE)
    assert client.transport.written == RESPONSE


async def test_a_session_closing_before_answering_is_replayed(network: Network) -> None:
    router = new_router()
    client = Client(router)
    req = request(b"abc")
    client.send(req)
    await settle()
    up = network.upstream(SESSION)
    assert up.eof_received() is False  # the transport closes itself
    up.connection_lost(None)
    await settle()
    assert network.transport(ORIGINAL).written == req
    network.upstream(ORIGINAL).data_received(RESPONSE)
    assert client.transport.written == RESPONSE


async def test_a_request_sent_in_pieces_is_replayed_whole(network: Network) -> None:
    router = new_router()
    network.hold.add(SESSION)
    client = Client(router)
    req = request(bytes(range(256)) * 40)
    for start in range(0, len(req), 777):
        client.send(req[start : start + 777])
    network.refuse.add(SESSION)
    network.release()
    await settle()
    assert network.transport(ORIGINAL).written == req


async def test_the_rest_of_a_body_follows_the_replay(network: Network) -> None:
    router = new_router()
    client = Client(router)
    body = b"0123456789" * 500
    req = request(body)
    split = len(req) - 3000
    client.send(req[:split])
    await settle()
    network.upstream(SESSION).connection_lost(ConnectionResetError("gone"))
    await settle()
    client.send(req[split:])  # the client is still sending its body
    assert network.transport(ORIGINAL).written == req
    assert network.transport(SESSION).written == req[:split]
    network.upstream(ORIGINAL).data_received(RESPONSE)
    assert client.transport.written == RESPONSE


async def test_a_session_that_answered_is_not_replayed(network: Network) -> None:
    router = new_router()
    client = Client(router)
    client.send(request(b"abc"))
    await settle()
    up = network.upstream(SESSION)
    up.data_received(b"HTTP/1.1 200 OK\r\n")  # an answer has begun
    up.connection_lost(ConnectionResetError("agent died"))
    await settle()
    assert network.to(ORIGINAL) == []  # the original server never sees it
    assert client.transport.written == BAD_GATEWAY
    assert client.transport.closed


async def test_the_original_server_failing_the_replay_gives_a_502(network: Network) -> None:
    router = new_router()
    network.refuse.update({SESSION, ORIGINAL})
    client = Client(router)
    client.send(request(b"abc"))
    await settle()
    assert len(network.to(ORIGINAL)) == 1  # tried once, not again and again
    assert client.transport.written == BAD_GATEWAY
    assert client.transport.closed


async def test_the_next_request_goes_to_the_session_again(network: Network) -> None:
    router = new_router()
    network.refuse.add(SESSION)
    client = Client(router)
    first = request(b"one")
    client.send(first)
    await settle()
    network.upstream(ORIGINAL).data_received(RESPONSE)
    network.refuse.clear()
    second = request(b"two")
    client.send(second)
    await settle()
    ((_, session),) = [(u, t) for u, t in network.to(SESSION) if t is not None]
    assert session is not None and session.written == second
    assert network.transport(ORIGINAL).written == first
    assert router.registrations[SESSION].matched == 2


async def test_a_request_for_the_original_is_not_replayed(network: Network) -> None:
    router = new_router()
    client = Client(router)
    req = request(b"abc", to_session=False)
    client.send(req)
    await settle()
    assert network.to(SESSION) == []
    assert network.transport(ORIGINAL).written == req
    network.upstream(ORIGINAL).connection_lost(ConnectionResetError("down"))
    await settle()
    assert len(network.to(ORIGINAL)) == 1
    assert client.transport.written == BAD_GATEWAY
    assert router.counters.passed == 1


# --- the limit -------------------------------------------------------------------------


async def test_a_request_of_exactly_max_kept_request_bytes_is_replayed(network: Network) -> None:
    router = new_router()
    network.refuse.add(SESSION)
    client = Client(router)
    body_size = MAX_KEPT_REQUEST - head_size(MAX_KEPT_REQUEST)
    req = request(b"k" * body_size)
    assert len(req) == MAX_KEPT_REQUEST
    for start in range(0, len(req), 64 * 1024):
        client.send(req[start : start + 64 * 1024])
    await settle()
    assert network.transport(ORIGINAL).written == req


@pytest.mark.parametrize("pieces", [1, 17])
async def test_a_request_above_max_kept_request_is_not_kept_for_a_replay(
    network: Network, pieces: int
) -> None:
    router = new_router()
    network.hold.add(SESSION)  # the session's connection is still being made
    client = Client(router)
    body_size = MAX_KEPT_REQUEST - head_size(MAX_KEPT_REQUEST) + 1
    req = request(b"k" * body_size)
    assert len(req) == MAX_KEPT_REQUEST + 1
    step = -(-len(req) // pieces)
    for start in range(0, len(req), step):
        client.send(req[start : start + step])
    network.refuse.add(SESSION)
    network.release()
    await settle()
    # Too big to keep: the original server is not asked; the client gets an error.
    assert network.to(ORIGINAL) == []
    assert client.transport.written == BAD_GATEWAY
    assert client.transport.closed and not client.transport.aborted


async def test_the_limit_counts_one_request_not_the_connection(network: Network) -> None:
    router = new_router()
    client = Client(router)
    # A first request nearly at the limit, answered by the session...
    first = request(b"a" * (MAX_KEPT_REQUEST - head_size(MAX_KEPT_REQUEST) - 10))
    client.send(first)
    await settle()
    session_up = network.upstream(SESSION)
    session_up.data_received(RESPONSE)
    assert client.transport.written == RESPONSE
    # ...then a small one on the same connection, whose session connection drops.
    second = request(b"b" * 100)
    client.send(second)
    await settle()
    assert network.transport(SESSION).written == first + second  # reused, kept alive
    session_up.connection_lost(ConnectionResetError("agent died"))
    await settle()
    assert network.transport(ORIGINAL).written == second
    network.upstream(ORIGINAL).data_received(RESPONSE)
    assert client.transport.written == RESPONSE + RESPONSE
