"""The HTTP/2 relay, driven by real ``h2`` peers in memory, then by curl through sockets.

:class:`World` plays the I/O layer: it carries the relay's actions between the relay,
an ``h2`` client connection (:attr:`World.client`) and one ``h2`` server connection
per upstream connection the relay opens (:attr:`World.servers`), and checks the rules
every action sequence follows (bytes to an upstream only while it is open, nothing
after ``Close``...). Peers honour flow control; they can stop acknowledging data to
show that the relay does not read ahead of the other side.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from netmirror.router.http1 import ORIGINAL
from netmirror.router.http2 import (
    MAX_KEPT_BODY,
    PREFACE,
    Action2,
    Close,
    CloseUpstream,
    H2cUpgrade,
    H2Relay,
    OpenUpstream,
    ToClient,
    ToUpstream,
)
from netmirror.wire.httpfilter import RequestHead

Headers = list[tuple[bytes, bytes]]
WINDOW = 65_535


def route_by_header(head: RequestHead) -> str:
    """Requests go to the session named by their ``x-to`` header, else to the original."""
    for name, value in head.headers:
        if name == "x-to":
            return value
    return ORIGINAL


def request_headers(
    method: str = "GET", path: str = "/", *extra: tuple[str, str], to: str | None = None
) -> Headers:
    headers = [
        (b":method", method.encode()),
        (b":path", path.encode()),
        (b":scheme", b"http"),
        (b":authority", b"shop.example"),
    ]
    headers += [(name.encode(), value.encode()) for name, value in extra]
    if to is not None:
        headers.append((b"x-to", to.encode()))
    return headers


def header(headers: Headers, name: str) -> str:
    for key, value in headers:
        if key == name.encode():
            return value.decode()
    raise KeyError(name)


# --- peers ---------------------------------------------------------------------------------


@dataclass
class StreamLog:
    """What a peer received on one stream."""

    heads: list[Headers] = field(default_factory=list)  # request, or 1xx and final response
    data: bytearray = field(default_factory=bytearray)
    trailers: Headers | None = None
    ended: bool = False
    reset: int | None = None

    @property
    def head(self) -> Headers:
        return self.heads[-1]


@dataclass
class _Out:
    data: bytearray
    end: bool
    trailers: Headers | None


class Peer:
    """An h2 endpoint in memory that honours flow control and logs what it receives."""

    def __init__(self, *, client_side: bool) -> None:
        self.conn = H2Connection(H2Configuration(client_side=client_side, header_encoding=None))
        self.conn.initiate_connection()
        self.streams: dict[int, StreamLog] = {}
        self.pending: dict[int, _Out] = {}
        self.ack = True
        self.unacked: list[tuple[int, int]] = []
        self.goaway: ConnectionTerminated | None = None
        self.raw = bytearray()  # bytes to send past h2

    def go_away(self, last_stream_id: int, code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        """Send a GOAWAY frame but go on (h2 would refuse to send anything after it)."""
        self.raw += GoAwayFrame(0, last_stream_id=last_stream_id, error_code=code).serialize()

    def data_to_send(self) -> bytes:
        data = self.conn.data_to_send()
        raw, self.raw = bytes(self.raw), bytearray()
        return data + raw

    def log(self, stream_id: int) -> StreamLog:
        return self.streams.setdefault(stream_id, StreamLog())

    def receive(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            self.on_event(event)
        self.pump_out()

    def on_event(self, event: Event) -> None:
        if isinstance(event, RequestReceived | ResponseReceived | InformationalResponseReceived):
            self.log(event.stream_id).heads.append(list(event.headers))
        elif isinstance(event, DataReceived):
            self.log(event.stream_id).data += event.data
            if self.ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                self.unacked.append((event.stream_id, event.flow_controlled_length))
        elif isinstance(event, TrailersReceived):
            self.log(event.stream_id).trailers = list(event.headers)
        elif isinstance(event, StreamEnded):
            self.log(event.stream_id).ended = True
            self.on_end(event.stream_id)
        elif isinstance(event, StreamReset):
            self.log(event.stream_id).reset = event.error_code
            self.pending.pop(event.stream_id, None)
        elif isinstance(event, ConnectionTerminated):
            self.goaway = event

    def on_end(self, stream_id: int) -> None:
        """A request or response is complete."""

    def start_acking(self) -> None:
        self.ack = True
        for stream_id, size in self.unacked:
            self.conn.acknowledge_received_data(size, stream_id)
        self.unacked.clear()

    def send(
        self,
        stream_id: int,
        headers: Headers | None = None,
        body: bytes = b"",
        *,
        end: bool = True,
        trailers: Headers | None = None,
    ) -> None:
        """Queue a header block, body, trailers and end, sent as flow control allows."""
        if headers is not None:
            only_headers = end and not body and trailers is None
            self.conn.send_headers(stream_id, headers, end_stream=only_headers)
            if only_headers:
                return
        out = self.pending.setdefault(stream_id, _Out(bytearray(), False, None))
        out.data += body
        out.end, out.trailers = end, trailers
        self.pump_out()

    def pump_out(self) -> None:
        for stream_id, out in list(self.pending.items()):
            ended = False
            while out.data:
                size = min(
                    len(out.data),
                    self.conn.local_flow_control_window(stream_id),
                    self.conn.max_outbound_frame_size,
                )
                if size <= 0:
                    break
                last = size == len(out.data) and out.end and out.trailers is None
                self.conn.send_data(stream_id, bytes(out.data[:size]), end_stream=last)
                del out.data[:size]
                ended = last
            if not out.data:
                del self.pending[stream_id]
                if out.trailers is not None:
                    self.conn.send_headers(stream_id, out.trailers, end_stream=True)
                elif out.end and not ended:
                    self.conn.end_stream(stream_id)

    def unsent(self, stream_id: int) -> int:
        out = self.pending.get(stream_id)
        return len(out.data) if out is not None else 0


class Server(Peer):
    """One upstream connection: answers each complete request, if ``auto``.

    The answer is 200 with ``f"{tag} {method} {path} {body_length}\\n"``.
    """

    def __init__(self, target: str) -> None:
        super().__init__(client_side=False)
        self.target = target
        self.tag = target or "orig"
        self.auto = True
        self.open = True

    def on_end(self, stream_id: int) -> None:
        if self.auto:
            self.answer(stream_id)

    def answer(self, stream_id: int, body: bytes | None = None, **kwargs: object) -> None:
        log = self.streams[stream_id]
        if body is None:
            method, path = header(log.heads[0], ":method"), header(log.heads[0], ":path")
            body = f"{self.tag} {method} {path} {len(log.data)}\n".encode()
        self.send(stream_id, [(b":status", b"200"), (b"content-type", b"text/plain")], body)


class World:
    """The I/O layer around a relay, in memory, checking every action."""

    def __init__(
        self, route: Callable[[RequestHead], str] = route_by_header, *, max_streams: int = 100
    ) -> None:
        self.relay = H2Relay(route, max_streams=max_streams)
        self.client = Peer(client_side=True)
        self.servers: dict[str, Server] = {}  # the current connection of each target
        self.history: list[Server] = []  # every upstream connection opened
        self.log: list[Action2] = []
        self.closed: Close | None = None
        self.down: set[str] = set()  # targets whose connections fail at once
        self.new_server: Callable[[str], Server] = Server
        self.pump()

    # the client

    def request(
        self,
        headers: Headers,
        body: bytes = b"",
        *,
        end: bool = True,
        trailers: Headers | None = None,
    ) -> int:
        stream_id = self.client.conn.get_next_available_stream_id()
        self.client.send(stream_id, headers, body, end=end, trailers=trailers)
        self.pump()
        return stream_id

    def body(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        self.client.send(stream_id, None, data, end=end)
        self.pump()

    def response(self, stream_id: int) -> StreamLog:
        return self.client.log(stream_id)

    def text(self, stream_id: int) -> str:
        log = self.client.streams[stream_id]
        assert log.ended and header(log.head, ":status") == "200"
        return log.data.decode()

    # the I/O layer

    def fail(self, target: str, reason: str = "connection reset") -> None:
        self.relay.upstream_failed(target, reason)
        self.pump()

    def pump(self) -> None:
        for _ in range(10_000):
            moved = self._carry(self.relay.actions())
            data = self.client.data_to_send()
            if data and self.closed is None:
                self.relay.client_data(data)
                moved = True
            for target, server in list(self.servers.items()):
                data = server.data_to_send()
                if data and server.open:
                    self.relay.upstream_data(target, data)
                    moved = True
            if not moved:
                assert self.relay.closed == (self.closed is not None)
                return
        raise AssertionError("the world does not settle")

    def _carry(self, actions: list[Action2]) -> bool:
        for action in actions:
            assert self.closed is None, f"{action} after {self.closed}"
            self.log.append(action)
            if isinstance(action, OpenUpstream):
                old = self.servers.pop(action.target, None)
                assert old is None, "OpenUpstream over a connection not closed"
                server = self.new_server(action.target)
                self.servers[action.target] = server
                self.history.append(server)
                if action.target in self.down:
                    server.open = False
                    self.relay.upstream_failed(action.target, "connection refused")
            elif isinstance(action, ToUpstream):
                assert action.data, "empty ToUpstream"
                server = self.servers[action.target]  # open
                if server.open:
                    server.receive(action.data)
            elif isinstance(action, ToClient):
                assert action.data, "empty ToClient"
                self.client.receive(action.data)
            elif isinstance(action, CloseUpstream):
                server = self.servers.pop(action.target)
                server.open = False
            else:
                assert isinstance(action, Close)
                self.closed = action
                for server in self.servers.values():
                    server.open = False
        return bool(actions)

    def kinds(self) -> list[str]:
        return [
            f"{type(a).__name__}({a.target!r})"
            for a in self.log
            if isinstance(a, OpenUpstream | CloseUpstream)
        ]


# --- requests, streams, targets ------------------------------------------------------------


def test_the_relay_speaks_first_and_advertises_its_settings() -> None:
    relay = H2Relay(route_by_header, max_streams=7)
    actions = relay.actions()
    assert len(actions) == 1 and isinstance(actions[0], ToClient)
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    events = client.receive_data(actions[0].data)
    assert any(isinstance(e, RemoteSettingsChanged) for e in events)
    assert client.remote_settings.max_concurrent_streams == 7
    # The connection window holds max_streams stream windows.
    assert client.outbound_flow_control_window == 7 * WINDOW


def test_one_request_to_the_original_server() -> None:
    world = World()
    stream = world.request(request_headers("GET", "/index.html"))
    assert world.text(stream) == "orig GET /index.html 0\n"
    assert world.relay.requests == {ORIGINAL: 1}
    assert world.kinds() == ["OpenUpstream('')"]
    server = world.servers[ORIGINAL]
    # Pseudo-headers first, as received; then the regular headers.
    assert server.streams[1].heads[0] == request_headers("GET", "/index.html")
    # Push is refused upstream.
    assert server.conn.remote_settings.enable_push == 0
    assert not world.relay.closed


def test_route_sees_the_head_with_host_from_the_authority() -> None:
    heads: list[RequestHead] = []

    def route(head: RequestHead) -> str:
        heads.append(head)
        return ORIGINAL

    world = World(route)
    world.request(request_headers("POST", "/api/x?y=1", ("x-dev", "a"), ("cookie", "k=v")))
    no_authority = [h for h in request_headers("GET", "/b") if h[0] != b":authority"]
    world.request([*no_authority, (b"host", b"other")])
    assert heads == [
        RequestHead(
            "POST",
            "/api/x?y=1",
            (("host", "shop.example"), ("x-dev", "a"), ("cookie", "k=v")),
        ),
        RequestHead("GET", "/b", (("host", "other"),)),
    ]


def test_route_raising_sends_to_the_original() -> None:
    def route(head: RequestHead) -> str:
        raise RuntimeError("broken filter")

    world = World(route)
    stream = world.request(request_headers("GET", "/"))
    assert world.text(stream) == "orig GET / 0\n"


def test_concurrent_streams_to_different_targets_interleaved() -> None:
    world = World()
    s1 = world.request(request_headers("POST", "/one"), end=False)
    s3 = world.request(request_headers("POST", "/three", to="a"), end=False)
    s5 = world.request(request_headers("POST", "/five", to="b"), end=False)
    s7 = world.request(request_headers("GET", "/seven", to="a"))
    assert world.text(s7) == "a GET /seven 0\n"  # while the others are in flight
    for part in (b"x" * 10, b"y" * 20_000, b"z" * 5):
        for stream in (s5, s1, s3):
            world.body(stream, part)
    world.body(s3, b"", end=True)
    assert world.text(s3) == "a POST /three 20015\n"
    assert not world.response(s1).heads and not world.response(s5).heads
    world.body(s5, b"!", end=True)
    world.body(s1, b"!", end=True)
    assert world.text(s1) == f"orig POST /one {20016}\n"
    assert world.text(s5) == f"b POST /five {20016}\n"
    assert world.relay.requests == {ORIGINAL: 1, "a": 2, "b": 1}
    # One connection per target, with one stream per request.
    assert sorted(world.kinds()) == ["OpenUpstream('')", "OpenUpstream('a')", "OpenUpstream('b')"]
    assert sorted(world.servers["a"].streams) == [1, 3]
    assert bytes(world.servers["b"].streams[1].data) == b"x" * 10 + b"y" * 20_000 + b"z" * 5 + b"!"
    assert world.relay.streams == 0


def test_large_bodies_both_ways_with_flow_control_end_to_end() -> None:
    world = World()
    session = world.new_server
    big_request = os.urandom(300_000)
    big_response = os.urandom(500_000)

    def slow_server(target: str) -> Server:
        server = session(target)
        server.auto = False
        server.ack = False
        return server

    world.new_server = slow_server
    stream = world.request(request_headers("PUT", "/blob", to="a"), big_request)
    server = world.servers["a"]
    # The upstream acknowledges nothing: the relay holds at most one window.
    got = len(server.streams[1].data)
    assert got == WINDOW
    assert world.client.unsent(stream) >= len(big_request) - 2 * WINDOW
    server.start_acking()
    world.pump()
    assert bytes(server.streams[1].data) == big_request and server.streams[1].ended
    # The client acknowledges nothing: the upstream cannot send more than two windows.
    world.client.ack = False
    server.answer(1, big_response)
    world.pump()
    assert len(world.response(stream).data) == WINDOW
    assert server.unsent(1) >= len(big_response) - 2 * WINDOW
    world.client.start_acking()
    world.pump()
    assert bytes(world.response(stream).data) == big_response
    assert world.response(stream).ended


def test_trailers_both_ways() -> None:
    world = World()

    def trailing_server(target: str) -> Server:
        server = Server(target)
        server.auto = False
        return server

    world.new_server = trailing_server
    stream = world.request(
        request_headers("POST", "/grpc", ("te", "trailers"), to="a"),
        b"request",
        trailers=[(b"x-checksum", b"123")],
    )
    server = world.servers["a"]
    log = server.streams[1]
    assert bytes(log.data) == b"request" and log.trailers == [(b"x-checksum", b"123")]
    assert log.ended
    server.send(1, [(b":status", b"200")], b"response", trailers=[(b"grpc-status", b"0")])
    world.pump()
    response = world.response(stream)
    assert bytes(response.data) == b"response"
    assert response.trailers == [(b"grpc-status", b"0")] and response.ended


def test_informational_responses_are_relayed() -> None:
    world = World()

    def early_hints(target: str) -> Server:
        server = Server(target)
        server.auto = False
        return server

    world.new_server = early_hints
    stream = world.request(request_headers("GET", "/", to="a"))
    server = world.servers["a"]
    server.send(1, [(b":status", b"103"), (b"link", b"</s.css>; rel=preload")], end=False)
    world.pump()
    server.answer(1)
    world.pump()
    heads = world.response(stream).heads
    assert [header(h, ":status") for h in heads] == ["103", "200"]
    assert world.text(stream) == "a GET / 0\n"


def test_the_client_resets_a_stream() -> None:
    world = World()
    world.new_server = manual
    stream = world.request(request_headers("POST", "/", to="a"), b"part", end=False)
    other = world.request(request_headers("GET", "/other", to="a"), end=True)
    world.client.conn.reset_stream(stream, ErrorCodes.CANCEL)
    world.pump()
    server = world.servers["a"]
    assert server.streams[1].reset == ErrorCodes.CANCEL
    assert server.streams[3].reset is None
    server.answer(3)
    world.pump()
    assert world.text(other) == "a GET /other 0\n"
    assert world.relay.streams == 0


def test_the_upstream_resets_a_stream() -> None:
    world = World()
    world.new_server = manual
    before = world.request(request_headers("GET", "/before", to="a"))
    after = world.request(request_headers("GET", "/after", to="a"))
    server = world.servers["a"]
    server.conn.reset_stream(1, ErrorCodes.ENHANCE_YOUR_CALM)  # no response: relayed as is
    server.send(3, [(b":status", b"200")], b"partial", end=False)
    world.pump()
    server.conn.reset_stream(3, ErrorCodes.INTERNAL_ERROR)
    world.pump()
    assert world.response(before).reset == ErrorCodes.ENHANCE_YOUR_CALM
    assert world.response(after).reset == ErrorCodes.INTERNAL_ERROR
    assert bytes(world.response(after).data) == b"partial"
    assert world.relay.requests == {"a": 2}  # a reset is an answer: no retry
    assert world.relay.streams == 0


def test_a_complete_response_then_reset_no_error_stops_the_request_body() -> None:
    world = World()
    world.new_server = manual
    stream = world.request(request_headers("POST", "/upload", to="a"), b"a" * 100, end=False)
    server = world.servers["a"]
    server.send(1, [(b":status", b"413")], b"too large")
    server.conn.reset_stream(1, ErrorCodes.NO_ERROR)
    world.pump()
    response = world.response(stream)
    assert header(response.head, ":status") == "413" and bytes(response.data) == b"too large"
    assert response.ended and response.reset == ErrorCodes.NO_ERROR
    assert world.relay.streams == 0


# --- upstream failures, retries -------------------------------------------------------------


def manual(target: str) -> Server:
    """A server that answers only when told to."""
    server = Server(target)
    server.auto = False
    return server


def manual_sessions(target: str) -> Server:
    """Sessions answer when told to, the original server at once."""
    return manual(target) if target != ORIGINAL else Server(target)


def test_a_session_failing_before_the_response_sends_the_request_to_the_original() -> None:
    world = World()
    world.new_server = manual_sessions
    headers = request_headers("POST", "/orders", ("content-type", "text/plain"), to="a")
    stream = world.request(headers, b"first half, ", end=False)
    assert bytes(world.servers["a"].streams[1].data) == b"first half, "
    world.fail("a")
    assert world.kinds() == ["OpenUpstream('a')", "CloseUpstream('a')", "OpenUpstream('')"]
    world.body(stream, b"second half", end=True)
    assert world.text(stream) == "orig POST /orders 23\n"
    original = world.servers[ORIGINAL].streams[1]
    assert original.heads[0] == headers  # the same head, x-to included
    assert bytes(original.data) == b"first half, second half"
    assert world.relay.requests == {"a": 1, ORIGINAL: 1}
    assert world.relay.retries == 1


def test_a_session_that_cannot_be_reached_sends_everything_to_the_original() -> None:
    world = World()
    world.down.add("a")
    streams = [world.request(request_headers("GET", f"/{i}", to="a")) for i in range(3)]
    assert [world.text(s) for s in streams] == [f"orig GET /{i} 0\n" for i in range(3)]
    assert world.relay.requests == {"a": 3, ORIGINAL: 3}


def test_a_session_speaking_http1_fails_and_the_original_answers() -> None:
    world = World()

    class Http1(Server):
        def receive(self, data: bytes) -> None:  # not HTTP/2 at all
            self.conn.clear_outbound_data_buffer()

    world.new_server = lambda t: Http1(t) if t else Server(t)
    stream = world.request(request_headers("GET", "/", to="a"))
    world.relay.upstream_data("a", b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    world.pump()
    assert world.text(stream) == "orig GET / 0\n"
    assert "CloseUpstream('a')" in world.kinds()


def test_a_session_failing_after_the_response_headers_resets_the_client_stream() -> None:
    world = World()
    world.new_server = manual
    stream = world.request(request_headers("GET", "/", to="a"))
    world.servers["a"].send(1, [(b":status", b"200")], b"some", end=False)
    world.pump()
    world.fail("a")
    response = world.response(stream)
    assert header(response.head, ":status") == "200" and bytes(response.data) == b"some"
    assert response.reset == ErrorCodes.INTERNAL_ERROR
    assert ORIGINAL not in world.relay.requests


def test_a_session_failing_after_a_long_body_refuses_the_stream() -> None:
    world = World()
    world.new_server = manual
    stream = world.request(request_headers("PUT", "/", to="a"), b"b" * (MAX_KEPT_BODY + 1))
    assert len(world.servers["a"].streams[1].data) == MAX_KEPT_BODY + 1
    world.fail("a")
    assert world.response(stream).reset == ErrorCodes.REFUSED_STREAM
    assert ORIGINAL not in world.relay.requests


def test_the_original_failing_resets_its_streams() -> None:
    world = World()
    world.new_server = manual
    answered = world.request(request_headers("GET", "/done"))
    world.servers[ORIGINAL].answer(1)
    world.pump()
    pending = world.request(request_headers("GET", "/pending"))
    world.fail(ORIGINAL)
    assert world.text(answered) == "orig GET /done 0\n"
    assert world.response(pending).reset == ErrorCodes.INTERNAL_ERROR
    assert world.kinds() == ["OpenUpstream('')", "CloseUpstream('')"]
    # The next request opens a new connection.
    world.new_server = Server
    again = world.request(request_headers("GET", "/again"))
    assert world.text(again) == "orig GET /again 0\n"


def test_an_original_that_cannot_be_reached_refuses_the_streams() -> None:
    world = World()
    world.down.add(ORIGINAL)
    stream = world.request(request_headers("GET", "/"))
    assert world.response(stream).reset == ErrorCodes.REFUSED_STREAM
    assert world.kinds() == ["OpenUpstream('')", "CloseUpstream('')"]
    assert not world.relay.closed


def test_an_upstream_closing_an_idle_connection_is_reopened_on_demand() -> None:
    world = World()
    first = world.request(request_headers("GET", "/1", to="a"))
    world.relay.upstream_eof("a")
    world.pump()
    second = world.request(request_headers("GET", "/2", to="a"))
    assert world.text(first) == "a GET /1 0\n" and world.text(second) == "a GET /2 0\n"
    assert world.kinds() == ["OpenUpstream('a')", "CloseUpstream('a')", "OpenUpstream('a')"]


def test_goaway_from_a_session_retries_unprocessed_streams_and_drains() -> None:
    world = World()
    world.new_server = manual_sessions
    processed = world.request(request_headers("GET", "/processed", to="a"))
    unprocessed = world.request(request_headers("POST", "/unprocessed", to="a"), b"body")
    old = world.servers["a"]
    old.go_away(last_stream_id=1)
    world.pump()
    # Stream 3 was not processed: the original answers it, with the same body.
    assert world.text(unprocessed) == "orig POST /unprocessed 4\n"
    # A new request waits for the old connection to finish its streams.
    later = world.request(request_headers("GET", "/later", to="a"))
    assert not world.response(later).heads
    assert world.kinds() == ["OpenUpstream('a')", "OpenUpstream('')"]
    old.answer(1)
    world.pump()
    assert world.text(processed) == "a GET /processed 0\n"
    assert world.kinds() == [
        "OpenUpstream('a')",
        "OpenUpstream('')",
        "CloseUpstream('a')",
        "OpenUpstream('a')",
    ]
    new = world.servers["a"]
    assert new is not old and old.goaway is not None  # the relay said goodbye too
    new.answer(1)
    world.pump()
    assert world.text(later) == "a GET /later 0\n"
    assert world.relay.requests == {"a": 3, ORIGINAL: 1}


def test_goaway_from_the_original_retries_on_a_new_original_connection() -> None:
    world = World()
    world.new_server = manual
    first = world.request(request_headers("GET", "/1"))
    second = world.request(request_headers("GET", "/2"))
    world.servers[ORIGINAL].go_away(last_stream_id=1)
    world.pump()
    world.new_server = Server
    world.servers[ORIGINAL].answer(1)
    world.pump()
    assert world.text(first) == "orig GET /1 0\n"
    assert world.text(second) == "orig GET /2 0\n"
    assert len(world.history) == 2


def test_a_refused_stream_is_sent_again() -> None:
    world = World()
    world.new_server = manual
    stream = world.request(request_headers("GET", "/", to="a"))
    world.servers["a"].conn.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    world.new_server = Server
    world.pump()
    assert world.text(stream) == "orig GET / 0\n"


def test_requests_wait_for_room_on_an_upstream() -> None:
    world = World()

    def narrow(target: str) -> Server:
        server = manual(target)
        server.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        return server

    world.new_server = narrow
    first = world.request(request_headers("GET", "/1", to="a"))
    second = world.request(request_headers("GET", "/2", to="a"))
    server = world.servers["a"]
    assert list(server.streams) == [1]
    server.answer(1)
    world.pump()
    assert world.text(first) == "a GET /1 0\n"
    assert list(server.streams) == [1, 3]
    server.answer(3)
    world.pump()
    assert world.text(second) == "a GET /2 0\n"


def test_requests_waiting_for_a_failing_session_go_to_the_original() -> None:
    world = World()

    def narrow(target: str) -> Server:
        server = manual(target) if target else Server(target)
        server.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        return server

    world.new_server = narrow
    first = world.request(request_headers("GET", "/1", to="a"))
    second = world.request(request_headers("GET", "/2", to="a"))
    assert list(world.servers["a"].streams) == [1]
    world.fail("a")
    assert world.text(first) == "orig GET /1 0\n" and world.text(second) == "orig GET /2 0\n"
    assert world.relay.retries == 2


def test_a_request_is_sent_at_most_three_times() -> None:
    world = World()
    world.new_server = manual
    stream = world.request(request_headers("GET", "/", to="a"))
    world.servers["a"].conn.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    world.pump()
    world.servers[ORIGINAL].conn.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    world.pump()
    assert world.response(stream).reset is None
    world.servers[ORIGINAL].conn.reset_stream(3, ErrorCodes.REFUSED_STREAM)
    world.pump()
    assert world.response(stream).reset == ErrorCodes.REFUSED_STREAM
    assert world.relay.requests == {"a": 1, ORIGINAL: 2}


def test_goaway_on_an_idle_upstream_closes_it() -> None:
    world = World()
    stream = world.request(request_headers("GET", "/", to="a"))
    assert world.text(stream) == "a GET / 0\n"
    world.servers["a"].go_away(last_stream_id=1)
    world.pump()
    assert world.kinds() == ["OpenUpstream('a')", "CloseUpstream('a')"]
    assert world.relay.streams == 0 and not world.relay.closed


@settings(deadline=None, max_examples=200, database=None)
@given(st.lists(st.binary(max_size=64), max_size=8), st.booleans())
def test_garbage_never_raises(chunks: list[bytes], to_upstream: bool) -> None:
    relay = H2Relay(route_by_header)
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, request_headers("POST", "/", to="a"))
    relay.client_data(client.data_to_send())
    for chunk in chunks:
        if to_upstream:
            relay.upstream_data("a", chunk)
        else:
            relay.client_data(chunk)
    relay.client_eof()
    actions = relay.actions()
    closes = [a for a in actions if isinstance(a, Close)]
    assert len(closes) <= 1 and (not closes or actions[-1] is closes[0])
    assert not any("internal error" in a.reason for a in closes)


# --- the client connection ------------------------------------------------------------------


def test_malformed_client_bytes_get_goaway_and_close() -> None:
    relay = H2Relay(route_by_header)
    relay.actions()
    relay.client_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    actions = relay.actions()
    assert isinstance(actions[-1], Close) and not actions[-1].reset
    assert relay.closed
    data = b"".join(a.data for a in actions if isinstance(a, ToClient))
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    goaways = [e for e in client.receive_data(data) if isinstance(e, ConnectionTerminated)]
    assert goaways and goaways[0].error_code == ErrorCodes.PROTOCOL_ERROR
    relay.client_data(PREFACE)  # ignored after the end
    relay.upstream_failed(ORIGINAL, "late")
    assert relay.actions() == []


def test_a_protocol_error_midway_closes_everything() -> None:
    world = World()
    world.new_server = manual
    world.request(request_headers("GET", "/", to="a"))
    world.relay.client_data(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + bytes(4))  # WINDOW_UPDATE 0
    world.pump()
    assert world.closed is not None and not world.closed.reset
    assert world.client.goaway is not None
    assert world.client.goaway.error_code == ErrorCodes.PROTOCOL_ERROR


def test_client_eof_finishes_complete_requests_then_closes() -> None:
    world = World()
    world.new_server = manual
    complete = world.request(request_headers("POST", "/complete", to="a"), b"all")
    incomplete = world.request(request_headers("POST", "/incomplete", to="a"), b"some", end=False)
    world.relay.client_eof()
    world.pump()
    server = world.servers["a"]
    assert server.streams[3].reset == ErrorCodes.CANCEL
    assert world.closed is None
    server.answer(1)
    world.pump()
    assert world.text(complete) == "a POST /complete 3\n"
    assert world.response(incomplete).reset == ErrorCodes.CANCEL
    assert world.closed is not None and not world.closed.reset
    assert world.client.goaway is not None


def test_client_eof_with_nothing_in_flight_closes_at_once() -> None:
    world = World()
    world.request(request_headers("GET", "/"))
    world.relay.client_eof()
    world.pump()
    assert world.closed is not None and not world.closed.reset


def test_client_goaway_finishes_streams_in_flight_then_closes() -> None:
    world = World()
    world.new_server = manual
    stream = world.request(request_headers("GET", "/", to="a"))
    world.relay.client_data(GoAwayFrame(0, last_stream_id=0).serialize())
    world.pump()
    assert world.closed is None
    world.servers["a"].answer(1)
    world.pump()
    assert world.text(stream) == "a GET / 0\n"
    assert world.closed is not None and not world.closed.reset


def test_client_eof_gives_up_a_response_blocked_by_flow_control() -> None:
    world = World()
    world.new_server = manual
    world.client.ack = False
    stream = world.request(request_headers("GET", "/", to="a"))
    world.relay.client_eof()
    world.pump()
    server = world.servers["a"]
    server.answer(1, b"x" * (3 * WINDOW))
    world.pump()
    assert len(world.response(stream).data) == WINDOW
    assert server.streams[1].reset == ErrorCodes.CANCEL
    assert world.closed is not None and not world.closed.reset


def test_max_streams_is_advertised_and_enforced() -> None:
    world = World(max_streams=2)
    world.new_server = manual
    assert world.client.conn.remote_settings.max_concurrent_streams == 2
    world.request(request_headers("GET", "/1"))
    world.request(request_headers("GET", "/2"))
    # A third one, forced past the client's own check, is a protocol error.
    world.client.conn.remote_settings = Settings(
        client=False, initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: 3}
    )
    world.request(request_headers("GET", "/3"))
    assert world.closed is not None and not world.closed.reset


def test_upstream_events_for_unknown_targets_are_ignored() -> None:
    world = World()
    before = len(world.log)
    world.relay.upstream_data("nobody", b"junk")
    world.relay.upstream_eof("nobody")
    world.relay.upstream_failed("nobody", "?")
    world.pump()
    assert world.log[before:] == []
    assert not world.relay.closed


# --- through sockets: the relay with real servers, and curl ---------------------------------

H2SERVER = Path(__file__).resolve().parents[2] / "support" / "h2server.py"


def _curl_version() -> tuple[int, ...] | None:
    """curl's version if it can do HTTP/2, else None."""
    if shutil.which("curl") is None:
        return None
    try:
        out = subprocess.run(
            ["curl", "-V"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if not re.search(r"^Features:.*\bHTTP2\b", out, re.MULTILINE):
        return None
    match = re.match(r"curl (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else (0, 0)


CURL = _curl_version()


class _ProxyConnection:
    """The I/O layer for one client connection: carries out the relay's actions."""

    def __init__(
        self,
        relay: H2Relay,
        writer: asyncio.StreamWriter,
        addresses: dict[str, tuple[str, int]],
    ) -> None:
        self.relay = relay
        self.writer = writer
        self.addresses = addresses
        self.upstreams: dict[str, _ProxyUpstream] = {}
        self.done = asyncio.Event()

    def apply(self) -> None:
        for action in self.relay.actions():
            if isinstance(action, OpenUpstream):
                old = self.upstreams.pop(action.target, None)
                if old is not None:
                    old.close()
                self.upstreams[action.target] = _ProxyUpstream(self, action.target)
            elif isinstance(action, ToUpstream):
                self.upstreams[action.target].send(action.data)
            elif isinstance(action, ToClient):
                if not self.writer.is_closing():
                    self.writer.write(action.data)
            elif isinstance(action, CloseUpstream):
                upstream = self.upstreams.pop(action.target, None)
                if upstream is not None:
                    upstream.close()
            else:
                for upstream in self.upstreams.values():
                    upstream.close()
                self.upstreams.clear()
                if action.reset:
                    self.writer.transport.abort()
                else:
                    self.writer.close()
                self.done.set()

    async def run(self, reader: asyncio.StreamReader) -> None:
        self.apply()
        try:
            while not self.relay.closed and (data := await reader.read(65536)):
                self.relay.client_data(data)
                self.apply()
            if not self.relay.closed:
                self.relay.client_eof()
                self.apply()
            await asyncio.wait_for(self.done.wait(), 15)
        except (OSError, TimeoutError):
            pass
        finally:
            for upstream in self.upstreams.values():
                upstream.close()
            self.writer.close()


class _ProxyUpstream:
    def __init__(self, owner: _ProxyConnection, target: str) -> None:
        self.owner = owner
        self.target = target
        self.buffer = bytearray()
        self.writer: asyncio.StreamWriter | None = None
        self.closed = False
        self.task = asyncio.create_task(self.run())

    def current(self) -> bool:
        return not self.closed and self.owner.upstreams.get(self.target) is self

    def send(self, data: bytes) -> None:
        if self.writer is None:
            self.buffer += data
        else:
            self.writer.write(data)

    def close(self) -> None:
        self.closed = True
        self.task.cancel()
        if self.writer is not None:
            self.writer.close()

    async def run(self) -> None:
        relay = self.owner.relay
        try:
            host, port = self.owner.addresses[self.target]
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            self.writer = writer
            writer.write(bytes(self.buffer))
            self.buffer.clear()
            while data := await reader.read(65536):
                if not self.current():
                    return
                relay.upstream_data(self.target, data)
                self.owner.apply()
            if self.current():
                relay.upstream_eof(self.target)
                self.owner.apply()
        except (OSError, KeyError, TimeoutError) as exc:
            if self.current():
                relay.upstream_failed(self.target, repr(exc))
                self.owner.apply()


def route_x_dev(head: RequestHead) -> str:
    return "sess" if ("x-dev", "a") in head.headers else ORIGINAL


@pytest.fixture
async def h2_servers() -> AsyncIterator[dict[str, tuple[str, int]]]:
    """The original server and a session's, real processes: target -> address."""
    procs: list[asyncio.subprocess.Process] = []
    addresses: dict[str, tuple[str, int]] = {}
    try:
        for target, tag in ((ORIGINAL, "orig"), ("sess", "sess")):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(H2SERVER),
                *("--host", "127.0.0.1", "--port", "0", "--tag", tag),
                stdout=asyncio.subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line.startswith(b"ready "), line
            addresses[target] = ("127.0.0.1", int(line.split()[1]))
        yield addresses
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


@pytest.fixture
async def proxy(
    h2_servers: dict[str, tuple[str, int]],
) -> AsyncIterator[tuple[int, list[H2Relay]]]:
    """An asyncio TCP proxy running H2Relay: its port, and the relays it ran."""
    relays: list[H2Relay] = []
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay = H2Relay(route_x_dev)
        relays.append(relay)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        await _ProxyConnection(relay, writer, h2_servers).run(reader)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], relays
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(server.wait_closed(), 10)


async def _curl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        *("-sS", "--fail", "--http2-prior-knowledge", "--max-time", "20", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.skipif(CURL is None, reason="curl without HTTP/2")
@pytest.mark.timeout(120)
async def test_curl_through_the_relay(proxy: tuple[int, list[H2Relay]], tmp_path: Path) -> None:
    port, relays = proxy
    base = f"http://127.0.0.1:{port}"
    assert await _curl(f"{base}/plain") == "orig GET /plain 0\n"
    assert await _curl("-H", "x-dev: a", f"{base}/mine") == "sess GET /mine 0\n"
    assert await _curl("-H", "x-dev: b", f"{base}/theirs") == "orig GET /theirs 0\n"
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(300_000))
    assert (
        await _curl("-H", "x-dev: a", "--data-binary", f"@{upload}", f"{base}/up")
        == "sess POST /up 300000\n"
    )
    assert await _curl("--data-binary", f"@{upload}", f"{base}/up") == "orig POST /up 300000\n"

    # Several URLs at once. curl before 8.0 cannot reuse a prior-knowledge connection
    # (curl issue 10634): it then gets one connection per URL.
    parallel = ["--parallel"] if CURL and CURL >= (8, 0) else ["--parallel", "--parallel-immediate"]
    for extra, tag in (([], "orig"), (["-H", "x-dev: a"], "sess")):
        paths = ["/slow", "/slow", "/slow", "/p1", "/p2"]
        outputs: list[str] = []
        for i, path in enumerate(paths):
            outputs += ["-o", str(tmp_path / f"{tag}{i}"), f"{base}{path}"]
        started = time.monotonic()
        await _curl(*parallel, *extra, *outputs)
        elapsed = time.monotonic() - started
        got = [(tmp_path / f"{tag}{i}").read_text() for i in range(len(paths))]
        assert got == [f"{tag} GET {path} 0\n" for path in paths]
        assert elapsed < 1.4, f"not concurrent: {elapsed:.2f} s"  # 3 x /slow is 1.5 s

    total: dict[str, int] = {}
    for relay in relays:
        for target, count in relay.requests.items():
            total[target] = total.get(target, 0) + count
    assert total == {ORIGINAL: 8, "sess": 7}


@pytest.mark.timeout(120)
async def test_one_multiplexed_connection_through_the_relay(
    proxy: tuple[int, list[H2Relay]],
) -> None:
    """Many streams of one connection, to both targets at once (an h2 client)."""
    port, relays = proxy
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Peer(client_side=True)
    expected: dict[int, str] = {}
    body = os.urandom(200_000)
    for i in range(12):
        path = "/slow" if i % 3 == 0 else f"/r{i}"
        extra = (("x-dev", "a"),) if i % 2 else ()
        stream_id = client.conn.get_next_available_stream_id()
        payload = body if i == 5 else b""
        client.send(stream_id, request_headers("POST", path, *extra), payload)
        tag = "sess" if i % 2 else "orig"
        expected[stream_id] = f"{tag} POST {path} {len(payload)}\n"
    started = time.monotonic()
    try:
        while not all(client.log(s).ended for s in expected):
            writer.write(client.conn.data_to_send())
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the relay closed the connection"
            client.receive(data)
        writer.write(client.conn.data_to_send())
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    assert {s: client.log(s).data.decode() for s in expected} == expected
    assert all(client.log(s).reset is None for s in expected)
    assert elapsed < 1.4, f"not concurrent: {elapsed:.2f} s"  # 4 x /slow is 2 s
    assert len(relays) == 1 and relays[0].requests == {ORIGINAL: 6, "sess": 6}


# --- h2c upgrade -------------------------------------------------------------------------


def upgraded_world(extra: list[tuple[bytes, bytes]], body: bytes = b"") -> World:
    """A world whose client upgraded from HTTP/1.1: its request is stream 1."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    settings_header = client.initiate_upgrade_connection()
    assert settings_header is not None
    upgrade = H2cUpgrade.from_http1(
        b"POST" if body else b"GET",
        b"/first?x=1",
        [
            (b"Host", b"shop.example"),
            (b"Connection", b"Upgrade, HTTP2-Settings"),
            (b"Upgrade", b"h2c"),
            (b"HTTP2-Settings", settings_header),
            *extra,
        ],
        body,
    )
    assert upgrade is not None
    world = World.__new__(World)
    world.relay = H2Relay(route_by_header, upgrade=upgrade)
    world.client = Peer(client_side=True)
    world.client.conn = client
    world.servers, world.history, world.log = {}, [], []
    world.closed, world.down, world.new_server = None, set(), Server
    world.pump()
    return world


def test_h2c_upgrade_request_is_stream_1_routed_like_any_other() -> None:
    world = upgraded_world([(b"x-to", b"alice")])
    assert world.text(1) == "alice GET /first?x=1 0\n"
    # HTTP/1.1-only headers are gone; the host became the authority.
    head = world.servers["alice"].streams[1].heads[0]
    names = [name for name, _ in head]
    assert names[:4] == [b":method", b":scheme", b":authority", b":path"]
    assert header(head, ":authority") == "shop.example"
    assert not {b"connection", b"upgrade", b"http2-settings", b"host"} & set(names)
    # The streams after it are routed one by one too.
    stream = world.request(request_headers("GET", "/second"))
    assert world.text(stream) == "orig GET /second 0\n"
    assert world.relay.requests == {"alice": 1, ORIGINAL: 1}


def test_h2c_upgrade_body_goes_with_the_request() -> None:
    world = upgraded_world([], body=b"x" * 70_000)
    assert world.text(1) == "orig POST /first?x=1 70000\n"


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Upgrade", b"websocket"), (b"HTTP2-Settings", b"AAMAAABkAAQAoAAAAAIAAAAA")],
        [(b"Upgrade", b"h2c")],
    ],
)
def test_not_an_h2c_upgrade(headers: list[tuple[bytes, bytes]]) -> None:
    assert H2cUpgrade.from_http1(b"GET", b"/", [(b"Host", b"h"), *headers], b"") is None
