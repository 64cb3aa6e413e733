"""The relay of one client connection, fed bytes and events: no sockets.

Every test goes through :class:`Conn`, which plays the I/O layer: it feeds the
relay, carries out its actions (which upstream is attached, what each upstream and
the client received) and checks, after each call, the rules every action sequence
follows (one upstream at a time, a Release per Connect, nothing after Close...).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netmirror.router.http1 import (
    BAD_GATEWAY,
    ORIGINAL,
    Action,
    Close,
    Connect,
    Pipe,
    Relay,
    Release,
    ToClient,
    ToUpstream,
)
from netmirror.wire.httpfilter import RequestHead

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def route_by_header(head: RequestHead) -> str:
    """Requests go to the session named by their ``X-To`` header, else to the original."""
    for name, value in head.headers:
        if name.lower() == "x-to":
            return value
    return ORIGINAL


@dataclass
class Upstream:
    """One attachment of an upstream: what it was sent, and how it ended."""

    target: str
    received: bytearray = field(default_factory=bytearray)
    released: bool | None = None  # the Release's reusable flag


class Conn:
    """The I/O layer around a relay, checking every action."""

    def __init__(
        self, route: Callable[[RequestHead], str] = route_by_header, **limits: int
    ) -> None:
        self.relay = Relay(route, **limits)
        self.log: list[Action] = []
        self.upstreams: list[Upstream] = []
        self.attached: Upstream | None = None
        self.client = bytearray()  # what the client received
        self.piped = False
        self.closed: Close | None = None

    # feeding

    def send(self, data: bytes) -> list[Action]:
        self.relay.client_data(data)
        return self._drain()

    def answer(self, data: bytes) -> list[Action]:
        self.relay.upstream_data(data)
        return self._drain()

    def client_eof(self) -> list[Action]:
        self.relay.client_eof()
        return self._drain()

    def upstream_eof(self) -> list[Action]:
        self.relay.upstream_eof()
        return self._drain()

    def upstream_failed(self, reason: str = "connection refused") -> list[Action]:
        self.relay.upstream_failed(reason)
        return self._drain()

    def head_timeout(self) -> list[Action]:
        self.relay.head_timeout()
        return self._drain()

    # checking

    def _drain(self) -> list[Action]:
        actions = self.relay.actions()
        for action in actions:
            assert self.closed is None, f"{action} after {self.closed}"
            self.log.append(action)
            if isinstance(action, Connect):
                assert self.attached is None, "Connect while an upstream is attached"
                assert not self.piped
                self.attached = Upstream(action.target)
                self.upstreams.append(self.attached)
            elif isinstance(action, ToUpstream):
                assert action.data, "empty ToUpstream"
                assert self.attached is not None, "ToUpstream with no upstream attached"
                self.attached.received += action.data
            elif isinstance(action, ToClient):
                assert action.data, "empty ToClient"
                self.client += action.data
            elif isinstance(action, Release):
                assert self.attached is not None, "Release with no upstream attached"
                assert not self.piped
                self.attached.released = action.reusable
                self.attached = None
            elif isinstance(action, Pipe):
                assert self.attached is not None, "Pipe with no upstream attached"
                assert not self.piped
                self.piped = True
            else:
                assert isinstance(action, Close)
                self.closed = action
        assert self.relay.closed == (self.closed is not None)
        assert self.relay.piped == self.piped
        if self.closed is not None:
            assert not self.relay.want_client_data
        assert self.relay.actions() == []
        return actions

    @property
    def targets(self) -> list[str]:
        return [up.target for up in self.upstreams]

    @property
    def sent(self) -> list[bytes]:
        """What each upstream attachment received, in order."""
        return [bytes(up.received) for up in self.upstreams]

    def kinds(self, actions: list[Action] | None = None) -> list[str]:
        return [type(a).__name__ for a in (self.log if actions is None else actions)]


def req(
    method: str = "GET",
    target: str = "/",
    *headers: str,
    body: bytes = b"",
    to: str | None = None,
) -> bytes:
    """A raw request; ``to`` adds ``X-To`` (the session it is routed to)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: svc", *headers]
    if to is not None:
        lines.append(f"X-To: {to}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def resp(status: str = "200 OK", *headers: str, body: bytes = b"", length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


OK = resp(body=b"hello")


# --- one request, keep-alive, pipelining ---------------------------------------------------


def test_one_request_to_the_original_server() -> None:
    conn = Conn()
    request = req("GET", "/index.html")
    assert conn.send(request) == [Connect(ORIGINAL), ToUpstream(request)]
    assert conn.answer(OK) == [ToClient(OK), Release(True)]
    assert conn.client == OK
    assert conn.relay.requests == {ORIGINAL: 1}
    assert conn.relay.want_client_data
    assert conn.client_eof() == [Close("the client closed the connection", False)]


def test_route_sees_the_head_as_sent() -> None:
    heads: list[RequestHead] = []

    def route(head: RequestHead) -> str:
        heads.append(head)
        return "alice"

    conn = Conn(route)
    conn.send(b"POST /api/v2/x?y=1 HTTP/1.1\r\nHOST: svc\r\nx-Dev:  feature-42 \r\n\r\n")
    assert heads == [
        RequestHead("POST", "/api/v2/x?y=1", (("HOST", "svc"), ("x-Dev", "feature-42")))
    ]
    assert conn.targets == ["alice"]
    assert conn.relay.requests == {"alice": 1}


@pytest.mark.parametrize(
    "head",
    [
        b"pOST / HTTP/1.1\r\nHost: svc\r\n\r\n",  # methods are case-sensitive
        b"BREW /pot HTTP/1.1\r\nHost: svc\r\n\r\n",  # a method llhttp does not know
        b"GET / HTTP/1.1\nHost: svc\n\n",  # bare LF line ends
        b"GET / HTTP/1.1\r\nHost: svc\r\nX-Long: a\r\n  b\r\n\r\n",  # obs-fold
    ],
)
def test_heads_llhttp_rejects_go_to_the_original_server_at_once(head: bytes) -> None:
    conn = Conn()
    actions = conn.send(head + b"rest")
    assert actions == [Connect(ORIGINAL), ToUpstream(head + b"rest"), Pipe()]
    assert conn.relay.requests == {}


def test_keep_alive_requests_go_to_different_targets() -> None:
    conn = Conn()
    first, second, third = req(to="alice"), req("POST", "/x", body=b"", to="bob"), req()
    conn.send(first)
    conn.answer(OK)
    conn.send(second)
    conn.answer(resp("201 Created"))
    conn.send(third)
    conn.answer(OK)
    assert conn.kinds() == ["Connect", "ToUpstream", "ToClient", "Release"] * 3
    assert conn.targets == ["alice", "bob", ORIGINAL]
    assert conn.sent == [first, second, third]
    assert [up.released for up in conn.upstreams] == [True, True, True]
    assert conn.client == OK + resp("201 Created") + OK
    assert conn.relay.requests == {"alice": 1, "bob": 1, ORIGINAL: 1}


def test_pipelined_requests_to_two_targets_are_routed_one_by_one_in_order() -> None:
    conn = Conn()
    first = req("POST", "/a", "Content-Length: 3", body=b"abc", to="alice")
    second = req("GET", "/b", to="bob")
    third = req("GET", "/c")
    assert conn.send(first + second + third) == [Connect("alice"), ToUpstream(first)]
    # The second and third are held until the first response is complete.
    assert conn.answer(resp(body=b"A")[:20]) == []
    actions = conn.answer(resp(body=b"A")[20:])
    assert conn.kinds(actions) == ["ToClient", "Release", "Connect", "ToUpstream"]
    assert conn.targets == ["alice", "bob"]
    actions = conn.answer(resp(body=b"B"))
    assert conn.kinds(actions)[-2:] == ["Connect", "ToUpstream"]
    conn.answer(resp(body=b"C"))
    assert conn.targets == ["alice", "bob", ORIGINAL]
    assert conn.sent == [first, second, third]
    assert conn.client == resp(body=b"A") + resp(body=b"B") + resp(body=b"C")
    assert [up.released for up in conn.upstreams] == [True, True, True]


def test_held_pipelined_bytes_are_bounded() -> None:
    assert len(req("GET", "/2")) == 30
    conn = Conn(max_held=80)
    conn.send(req(to="alice"))
    assert conn.relay.want_client_data
    conn.send(req("GET", "/2") + req("GET", "/3"))
    assert conn.relay.want_client_data  # 60 bytes held, under the limit
    conn.send(req("GET", "/4"))
    assert not conn.relay.want_client_data  # over: the I/O layer pauses reading
    conn.answer(OK)
    # The first held request is routed; the two others still wait, under the limit.
    assert conn.targets == ["alice", ORIGINAL]
    assert conn.relay.want_client_data


def test_reading_continues_while_a_request_body_streams() -> None:
    conn = Conn(max_held=10)
    conn.send(req("PUT", "/f", "Content-Length: 100000"))
    for _ in range(10):
        conn.send(b"x" * 10000)
        assert conn.relay.want_client_data
    assert len(conn.sent[0]) == len(req("PUT", "/f", "Content-Length: 100000")) + 100000


def test_stray_empty_lines_between_requests_are_dropped() -> None:
    conn = Conn()
    first = req("POST", "/a", "Content-Length: 2", body=b"hi")
    second = req("GET", "/b")
    conn.send(first + b"\r\n")
    conn.answer(OK)
    conn.send(b"\r\n\n")
    conn.send(second)
    conn.answer(OK)
    assert conn.sent == [first, second]
    assert conn.client == OK + OK


# --- bodies -------------------------------------------------------------------------------


def test_request_bodies_are_relayed_byte_for_byte() -> None:
    chunked = (
        b"POST /upload HTTP/1.1\r\nhost:svc\r\n"
        b"transfer-ENCODING:   chunked  \r\nX-To: alice\r\n\r\n"
        b'5;name=value;quoted="a b"\r\nhello\r\n'
        b"A \r\n0123456789\r\n"
        b"0\r\nChecksum: abc\r\nX-Trailer:  1\r\n\r\n"
    )
    sized = b"PUT /x HTTP/1.1\r\nHost: svc\r\nContent-Length:  4\r\n\r\nbody"
    conn = Conn()
    conn.send(chunked)
    conn.answer(OK)
    conn.send(sized)
    conn.answer(OK)
    assert conn.sent == [chunked, sized]
    assert conn.targets == ["alice", ORIGINAL]


def test_responses_are_relayed_byte_for_byte() -> None:
    chunked = (
        b"HTTP/1.1 200 Fine Thanks\r\nTRANSFER-encoding: chunked\r\nx-odd:  spaced \r\n\r\n"
        b"3;ext=1\r\nabc\r\n0\r\nTrailer-One: x\r\n\r\n"
    )
    conn = Conn()
    conn.send(req())
    for i in range(len(chunked)):  # byte by byte
        conn.answer(chunked[i : i + 1])
    assert conn.client == chunked
    assert conn.upstreams[0].released is True


def test_head_response_has_no_body_whatever_its_content_length() -> None:
    head_answer = resp("200 OK", "Content-Length: 1000", length=False)
    conn = Conn()
    conn.send(req("HEAD", "/big") + req("GET", "/next"))
    assert conn.answer(head_answer)[-2:] == [Connect(ORIGINAL), ToUpstream(req("GET", "/next"))]
    assert conn.upstreams[0].released is True
    conn.answer(OK)
    assert conn.client == head_answer + OK


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_204_and_304_have_no_body(status: str) -> None:
    answer = resp(status, 'ETag: "1"', length=False)
    conn = Conn()
    conn.send(req() + req("GET", "/2"))
    conn.answer(answer)
    assert conn.upstreams[0].released is True
    assert conn.targets == [ORIGINAL, ORIGINAL]
    assert conn.client == answer


def test_response_delimited_by_close() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    conn = Conn()
    conn.send(req() + req("GET", "/2"))
    conn.answer(head + b"part one, ")
    conn.answer(b"part two")
    assert conn.upstream_eof() == [
        Release(False),
        Close("the response was delimited by the upstream closing", False),
    ]
    assert conn.client == head + b"part one, part two"
    assert conn.targets == [ORIGINAL]  # the pipelined request is dropped with the connection


# --- 1xx, upgrades, CONNECT -------------------------------------------------------------------


def test_expect_100_continue() -> None:
    head = req("POST", "/upload", "Expect: 100-continue", "Content-Length: 5", to="alice")
    conn = Conn()
    assert conn.send(head) == [Connect("alice"), ToUpstream(head)]  # the head goes at once
    assert conn.answer(b"HTTP/1.1 100 Continue\r\n\r\n") == [
        ToClient(b"HTTP/1.1 100 Continue\r\n\r\n")
    ]
    assert conn.send(b"hello") == [ToUpstream(b"hello")]
    conn.answer(OK)
    assert conn.client == b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    assert conn.sent == [head + b"hello"]
    assert conn.upstreams[0].released is True


def test_several_informational_responses() -> None:
    informational = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    )
    conn = Conn()
    conn.send(req("POST", "/", "Content-Length: 1", body=b"x"))
    conn.answer(informational + OK)
    assert conn.client == informational + OK
    assert conn.upstreams[0].released is True


WS_REQUEST = req(
    "GET",
    "/chat",
    "Connection: Upgrade",
    "Upgrade: websocket",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
    to="alice",
)
WS_ACCEPT = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def test_websocket_upgrade_becomes_a_pipe() -> None:
    conn = Conn()
    early_frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # sent before the 101
    assert conn.send(WS_REQUEST + early_frame) == [Connect("alice"), ToUpstream(WS_REQUEST)]
    server_frame = b"\x81\x05hello"
    assert conn.answer(WS_ACCEPT + server_frame) == [
        ToClient(WS_ACCEPT + server_frame),
        ToUpstream(early_frame),
        Pipe(),
    ]
    assert conn.relay.piped
    # Afterwards, bytes pass straight through (if the I/O layer still feeds them).
    assert conn.send(b"\x88\x00") == [ToUpstream(b"\x88\x00")]
    assert conn.answer(b"\x88\x00") == [ToClient(b"\x88\x00")]
    assert conn.client_eof() == []
    assert conn.relay.want_client_data


def test_refused_upgrade_continues_as_http() -> None:
    conn = Conn()
    conn.send(WS_REQUEST + req("GET", "/next"))
    refusal = resp("426 Upgrade Required", body=b"no")
    conn.answer(refusal)
    assert not conn.relay.piped
    assert conn.targets == ["alice", ORIGINAL]
    assert conn.upstreams[0].released is True
    conn.answer(OK)
    assert conn.client == refusal + OK


def test_h2c_upgrade() -> None:
    request = req(
        "GET",
        "/",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
    )
    accept = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    conn = Conn()
    conn.send(request)
    assert conn.answer(accept + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00") == [
        ToClient(accept + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"),
        Pipe(),
    ]


def test_connect_accepted_becomes_a_pipe() -> None:
    request = b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"
    conn = Conn()
    assert conn.send(request + b"\x00\x00\x00\x08") == [Connect(ORIGINAL), ToUpstream(request)]
    accepted = b"HTTP/1.1 200 Connection Established\r\n\r\n"
    assert conn.answer(accepted + b"R") == [
        ToClient(accepted + b"R"),
        ToUpstream(b"\x00\x00\x00\x08"),
        Pipe(),
    ]


def test_connect_refused_continues_as_http() -> None:
    request = b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"
    refusal = resp("407 Proxy Authentication Required", body=b"who?")
    conn = Conn()
    conn.send(request)
    conn.answer(refusal)
    assert not conn.relay.piped
    assert conn.upstreams[0].released is True
    assert conn.client == refusal


# --- Connection: close and HTTP/1.0 -------------------------------------------------------------


def test_request_connection_close_ends_the_connection_after_the_exchange() -> None:
    conn = Conn()
    conn.send(req("GET", "/", "Connection: close") + req("GET", "/ignored"))
    assert conn.answer(OK)[-2:] == [
        Release(False),
        Close("the client did not keep the connection alive", False),
    ]
    assert conn.client == OK
    assert conn.targets == [ORIGINAL]


def test_response_connection_close_ends_the_connection_after_the_exchange() -> None:
    conn = Conn()
    conn.send(req(to="alice"))
    answer = resp("200 OK", "Connection: keep-alive, Close", body=b"bye")
    assert conn.answer(answer)[-2:] == [
        Release(False),
        Close("the upstream did not keep the connection alive", False),
    ]
    assert conn.client == answer


def test_http_1_0_without_keep_alive_in_the_response_closes() -> None:
    request = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    conn = Conn()
    assert conn.send(request) == [Connect(ORIGINAL), ToUpstream(request)]
    answer = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert conn.answer(answer)[-2:] == [
        Release(False),
        Close("the upstream did not keep the connection alive", False),
    ]
    assert conn.client == answer


def test_http_1_0_without_keep_alive_in_the_request_closes() -> None:
    conn = Conn()
    conn.send(b"GET / HTTP/1.0\r\n\r\n")
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
    assert conn.answer(answer)[-2:] == [
        Release(False),
        Close("the client did not keep the connection alive", False),
    ]


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
def test_http_1_0_keep_alive_is_honoured_both_ways(version: bytes) -> None:
    first = b"GET /a HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
    second = b"HEAD /b HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
    conn = Conn()
    conn.send(first + second)
    answer = (
        b"HTTP/" + version + b" 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
    )
    actions = conn.answer(answer)
    assert Release(True) in actions
    assert not any(isinstance(a, Close) for a in actions)
    # The second request went on, on the same client connection.
    assert ToUpstream(second) in actions
    head_answer = (
        b"HTTP/" + version + b" 200 OK\r\nContent-Length: 9\r\nConnection: keep-alive\r\n\r\n"
    )
    assert not any(isinstance(a, Close) for a in conn.answer(head_answer))
    assert conn.client == answer + head_answer
    assert conn.targets == [ORIGINAL, ORIGINAL]


def test_http_1_0_keep_alive_without_a_length_ends_with_the_close() -> None:
    conn = Conn()
    conn.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    conn.answer(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nall of it")
    assert conn.upstream_eof()[-1] == Close(
        "the response was delimited by the upstream closing", False
    )


def test_http_1_0_without_host_is_routed_by_path() -> None:
    conn = Conn(route=lambda head: "alice" if head.target.startswith("/dev") else ORIGINAL)
    conn.send(b"GET /dev/x HTTP/1.0\r\n\r\n")
    assert conn.targets == ["alice"]


def test_http_1_0_response_body_until_close() -> None:
    conn = Conn()
    conn.send(req())
    conn.answer(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    assert conn.upstream_eof()[-1] == Close(
        "the response was delimited by the upstream closing", False
    )
    assert conn.client == b"HTTP/1.0 200 OK\r\n\r\nall of it"


# --- early responses ---------------------------------------------------------------------------


def test_response_before_the_end_of_the_request_body() -> None:
    conn = Conn()
    conn.send(req("POST", "/", "Content-Length: 6", body=b"abc", to="alice"))
    refusal = resp("413 Payload Too Large")
    assert conn.kinds(conn.answer(refusal)) == ["ToClient"]  # no Release yet
    # The upstream still gets the rest of the body, then the exchange ends.
    assert conn.send(b"def" + req("GET", "/2")) == [
        ToUpstream(b"def"),
        Release(True),
        Connect(ORIGINAL),
        ToUpstream(req("GET", "/2")),
    ]
    assert conn.sent[0].endswith(b"abcdef")


def test_early_response_then_upstream_closes_the_rest_of_the_body_is_dropped() -> None:
    conn = Conn()
    conn.send(req("POST", "/", "Content-Length: 6", body=b"abc"))
    conn.answer(resp("401 Unauthorized"))
    assert conn.upstream_eof() == []
    assert conn.send(b"def") == [Release(False)]
    assert conn.sent[0].endswith(b"abc")


def test_early_response_with_close_ends_the_connection_at_once() -> None:
    conn = Conn()
    conn.send(req("POST", "/", "Content-Length: 6", body=b"abc"))
    assert conn.answer(resp("413 Payload Too Large", "Connection: close"))[-2:] == [
        Release(False),
        Close("the upstream did not keep the connection alive", False),
    ]


def test_final_answer_to_expect_100_continue_before_the_body_closes() -> None:
    # The client may send the body anyway or not at all: what follows is ambiguous.
    conn = Conn()
    conn.send(req("PUT", "/f", "Expect: 100-continue", "Content-Length: 5"))
    refusal = resp("401 Unauthorized", body=b"who?")
    assert conn.answer(refusal)[-2:] == [
        Release(False),
        Close("the upstream answered without 100 Continue", False),
    ]
    assert conn.client == refusal


def test_final_answer_to_expect_100_continue_once_the_body_started_waits_for_it() -> None:
    conn = Conn()
    conn.send(req("PUT", "/f", "Expect: 100-continue", "Content-Length: 5", body=b"he"))
    conn.answer(resp("413 Payload Too Large"))
    assert conn.send(b"llo") == [ToUpstream(b"llo"), Release(True)]


def test_bytes_after_a_complete_response_make_the_upstream_not_reusable() -> None:
    conn = Conn()
    conn.send(req())
    assert conn.answer(OK + b"junk")[-1] == Release(False)
    assert conn.client == OK


def test_bytes_after_a_complete_response_while_the_body_streams() -> None:
    conn = Conn()
    conn.send(req("POST", "/", "Content-Length: 2", body=b"a"))
    conn.answer(OK)
    assert conn.answer(b"junk") == []
    assert conn.send(b"b") == [ToUpstream(b"b"), Release(False)]
    assert conn.client == OK


# --- errors --------------------------------------------------------------------------------------


def test_a_malformed_second_request_goes_to_the_original_server_as_it_came() -> None:
    bad = b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n"
    conn = Conn()
    conn.send(req(to="alice") + bad)
    actions = conn.answer(OK)
    # The router answers nothing itself: the target's server judges the request.
    assert actions[-4:] == [Release(True), Connect(ORIGINAL), ToUpstream(bad), Pipe()]
    assert conn.client == OK
    assert conn.targets == ["alice", ORIGINAL]


def test_second_request_of_another_http_version_goes_to_the_original_server() -> None:
    conn = Conn()
    conn.send(req())
    conn.answer(OK)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert conn.send(preface) == [Connect(ORIGINAL), ToUpstream(preface), Pipe()]


def test_a_malformed_request_body_is_left_to_the_upstream() -> None:
    conn = Conn()
    conn.send(req("POST", "/", "Transfer-Encoding: chunked", to="alice"))
    actions = conn.send(b"zz\r\n")
    # The bytes went up as they came, and the connection is a pipe to that upstream.
    assert actions == [ToUpstream(b"zz\r\n"), Pipe()]
    assert conn.client == b""


def test_a_malformed_request_body_during_the_response_pipes_the_rest() -> None:
    conn = Conn()
    conn.send(req("POST", "/", "Transfer-Encoding: chunked", to="alice"))
    partial = resp(body=b"12345")[:-2]
    conn.answer(partial)
    actions = conn.send(b"zz\r\n")
    assert actions[-1] == Pipe()
    assert ToUpstream(b"zz\r\n") in actions
    assert conn.client == partial


def test_request_with_both_content_length_and_chunked_is_never_filtered() -> None:
    # Smuggling: the upstream might frame it by Content-Length where llhttp reads chunks.
    smuggler = req(
        "POST",
        "/",
        "Content-Length: 4",
        "Transfer-Encoding: chunked",
        body=b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: svc\r\n\r\n",
    )
    first = Conn()
    assert first.send(smuggler) == [Connect(ORIGINAL), ToUpstream(smuggler), Pipe()]
    later = Conn()
    later.send(req())
    later.answer(OK)
    assert later.send(smuggler) == [
        Connect(ORIGINAL),
        ToUpstream(smuggler),
        Pipe(),
    ]


def test_response_with_both_content_length_and_chunked_ends_the_connection() -> None:
    answer = resp("200 OK", "Content-Length: 3", "Transfer-Encoding: chunked", length=False)
    answer += b"3\r\nabc\r\n0\r\n\r\n"
    conn = Conn()
    conn.send(req())
    assert conn.answer(answer)[-2:] == [
        Release(False),
        Close("the upstream did not keep the connection alive", False),
    ]
    assert conn.client == answer


def test_upstream_failure_before_the_response_gives_502() -> None:
    conn = Conn()
    conn.send(req(to="alice"))
    assert conn.upstream_failed("session alice left") == [
        ToClient(BAD_GATEWAY),
        Close("upstream failed: session alice left", False),
    ]
    assert conn.client == BAD_GATEWAY


def test_upstream_failure_after_informational_responses_still_gives_502() -> None:
    conn = Conn()
    conn.send(req("POST", "/", "Expect: 100-continue", "Content-Length: 1"))
    conn.answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 O")
    assert conn.upstream_failed("reset by peer")[0] == ToClient(BAD_GATEWAY)
    assert conn.client == b"HTTP/1.1 100 Continue\r\n\r\n" + BAD_GATEWAY


def test_upstream_failure_mid_response_resets() -> None:
    conn = Conn()
    conn.send(req())
    conn.answer(resp(body=b"0123456789")[:-4])
    assert conn.upstream_failed("reset by peer") == [Close("upstream failed: reset by peer", True)]


def test_upstream_closing_without_an_answer_gives_502() -> None:
    conn = Conn()
    conn.send(req())
    actions = conn.upstream_eof()
    assert actions[0] == ToClient(BAD_GATEWAY)
    assert isinstance(actions[1], Close) and not actions[1].reset


def test_upstream_closing_mid_response_resets() -> None:
    conn = Conn()
    conn.send(req())
    conn.answer(resp(body=b"0123456789")[:-4])
    actions = conn.upstream_eof()
    assert len(actions) == 1 and isinstance(actions[0], Close) and actions[0].reset


def test_malformed_response_gives_502() -> None:
    conn = Conn()
    conn.send(req())
    actions = conn.answer(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert actions[0] == ToClient(BAD_GATEWAY)
    assert isinstance(actions[1], Close) and actions[1].reason.startswith("malformed response")


def test_101_without_an_upgrade_request_gives_502() -> None:
    conn = Conn()
    conn.send(req())
    assert conn.answer(WS_ACCEPT)[0] == ToClient(BAD_GATEWAY)


def test_upstream_events_with_nothing_attached_are_ignored() -> None:
    conn = Conn()
    assert conn.answer(b"HTTP/1.1 200 OK\r\n\r\n") == []
    assert conn.upstream_eof() == []
    assert conn.upstream_failed() == []
    conn.send(req())
    conn.answer(OK)
    assert conn.upstream_failed() == []
    assert conn.answer(b"late") == []


def test_route_failure_sends_the_request_to_the_original_server() -> None:
    def broken(head: RequestHead) -> str:
        raise RuntimeError("boom")

    conn = Conn(broken)
    conn.send(req())
    assert conn.targets == [ORIGINAL]


def test_internal_errors_close_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = Conn()
    conn.send(req())

    def boom(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(conn.relay, "_pump_response", boom)
    assert conn.answer(OK) == [Close("internal error: RuntimeError('bug')", True)]
    assert conn.send(req()) == []


# --- what is not HTTP/1, timeouts, EOF -----------------------------------------------------------


def test_non_http_first_bytes_are_piped_to_the_original_server() -> None:
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a TLS ClientHello
    conn = Conn()
    assert conn.send(hello) == [Connect(ORIGINAL), ToUpstream(hello), Pipe()]
    assert conn.send(b"more") == [ToUpstream(b"more")]
    assert conn.answer(b"\x16\x03\x03") == [ToClient(b"\x16\x03\x03")]
    assert conn.relay.requests == {}


def test_text_that_is_not_http_is_piped_as_soon_as_llhttp_rejects_it() -> None:
    conn = Conn()
    assert conn.send(b"HE") == []  # could be HEAD
    assert conn.send(b"LLO there\r\n") == [
        Connect(ORIGINAL),
        ToUpstream(b"HELLO there\r\n"),
        Pipe(),
    ]


def test_http2_prior_knowledge_is_piped_to_the_original_server() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings_frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    conn = Conn()
    actions = []
    for i in range(len(preface)):
        actions += conn.send(preface[i : i + 1])
    actions += conn.send(settings_frame)
    assert conn.kinds(actions)[0] == "Connect" and Pipe() in actions
    assert conn.sent == [preface + settings_frame]
    assert conn.targets == [ORIGINAL]


def test_missing_host_on_the_first_request_is_piped_unfiltered() -> None:
    request = b"GET / HTTP/1.1\r\nX-To: alice\r\n\r\n"  # HTTP/1.1 requires Host
    conn = Conn()
    assert conn.send(request) == [Connect(ORIGINAL), ToUpstream(request), Pipe()]


def test_head_timeout_before_the_first_head_pipes_to_the_original_server() -> None:
    conn = Conn()
    conn.send(b"GET / HT")
    assert conn.head_timeout() == [Connect(ORIGINAL), ToUpstream(b"GET / HT"), Pipe()]


def test_head_timeout_without_any_byte_pipes_too() -> None:
    # e.g. a protocol where the server speaks first
    conn = Conn()
    assert conn.head_timeout() == [Connect(ORIGINAL), Pipe()]
    assert conn.answer(b"220 smtp ready\r\n") == [ToClient(b"220 smtp ready\r\n")]


def test_head_timeout_after_a_request_closes_and_is_ignored_during_an_exchange() -> None:
    conn = Conn()
    conn.send(req())
    assert conn.head_timeout() == []
    conn.answer(OK)
    assert conn.head_timeout() == [Close("no request head in time", False)]


def test_oversized_first_head_is_piped_to_the_original_server() -> None:
    conn = Conn(max_head=1024)
    big = req("GET", "/", "X-Big: " + "a" * 2000)
    actions = conn.send(big)
    assert actions == [Connect(ORIGINAL), ToUpstream(big), Pipe()]


def test_oversized_later_head_is_piped_to_the_original_server_too() -> None:
    conn = Conn(max_head=1024)
    conn.send(req(to="alice"))
    conn.answer(OK)
    big = req("GET", "/", "X-Big: " + "a" * 2000, to="alice")
    actions = conn.send(big[:1500]) + conn.send(big[1500:])
    assert actions == [Connect(ORIGINAL), ToUpstream(big[:1500]), Pipe(), ToUpstream(big[1500:])]
    assert conn.targets == ["alice", ORIGINAL]


def test_oversized_response_head_gives_502() -> None:
    conn = Conn(max_head=1024)
    conn.send(req())
    assert conn.answer(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2000)[0] == ToClient(BAD_GATEWAY)


def test_client_eof_when_idle_closes() -> None:
    conn = Conn()
    assert conn.client_eof() == [Close("the client closed the connection", False)]
    assert conn.send(req()) == []


def test_client_eof_within_the_first_head_pipes_what_came() -> None:
    conn = Conn()
    conn.send(b"GET /sta")
    assert conn.client_eof() == [Connect(ORIGINAL), ToUpstream(b"GET /sta"), Pipe()]


def test_client_eof_within_a_later_head_closes() -> None:
    conn = Conn()
    conn.send(req())
    conn.answer(OK)
    conn.send(b"GET /x HTTP/1.1\r\n")
    assert conn.client_eof() == [
        Close("the client closed the connection within a request head", False)
    ]


def test_client_eof_within_a_request_body_resets() -> None:
    conn = Conn()
    conn.send(req("POST", "/", "Content-Length: 10", body=b"abc"))
    assert conn.client_eof() == [Close("the client closed the connection within a request", True)]


def test_client_half_close_after_pipelined_requests_still_gets_the_responses() -> None:
    conn = Conn()
    conn.send(req("GET", "/1", to="alice") + req("GET", "/2"))
    assert conn.client_eof() == []
    assert not conn.relay.want_client_data
    conn.answer(OK)
    actions = conn.answer(OK)
    assert actions[-2:] == [Release(True), Close("the client closed the connection", False)]
    assert conn.client == OK + OK
    assert conn.targets == ["alice", ORIGINAL]


def test_empty_data_is_ignored() -> None:
    conn = Conn()
    assert conn.send(b"") == []
    conn.send(req())
    assert conn.answer(b"") == []
    assert not conn.relay.closed


# --- random splits and garbage ---------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    request: bytes
    target: str
    response: bytes
    early: int | None = None
    """How much of the response the upstream may send before the whole request (all)."""


EXCHANGES = [
    Exchange(
        b"GET /a?x=1 HTTP/1.1\r\nHost:  example  \r\nx-to: alice\r\nX-weird:\tv \r\n\r\n",
        "alice",
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc",
    ),
    Exchange(
        b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world",
        ORIGINAL,
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nLocation: /form/1\r\n\r\n",
    ),
    Exchange(
        b"PUT /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX-To: bob\r\n\r\n"
        b"4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nTrailer: t\r\n\r\n",
        "bob",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"7\r\nMozilla\r\n0\r\nExpires: never\r\n\r\n",
    ),
    Exchange(
        b"HEAD /big HTTP/1.1\r\nHost: h\r\nX-To: alice\r\n\r\n",
        "alice",
        b"HTTP/1.1 200 OK\r\nContent-Length: 123456\r\n\r\n",
    ),
    Exchange(
        b'GET /cached HTTP/1.1\r\nHost: h\r\nIf-None-Match: "x"\r\n\r\n',
        ORIGINAL,
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
    ),
    Exchange(
        b"DELETE /item/7 HTTP/1.1\r\nhost: h\r\nX-TO: bob\r\n\r\n",
        "bob",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ),
    Exchange(
        b"POST /big HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\ndata",
        ORIGINAL,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        early=len(b"HTTP/1.1 100 Continue\r\n\r\n"),
    ),
]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(FUZZ, max_examples=300)
@given(
    st.lists(st.sampled_from(EXCHANGES), min_size=1, max_size=6),
    st.data(),
    st.integers(min_value=40, max_value=2000),
)
def test_random_splits_relay_every_byte_in_order(
    exchanges: list[Exchange], data: st.DataObject, max_held: int
) -> None:
    conn = Conn(max_held=max_held)
    stream = b"".join(e.request for e in exchanges)
    client_chunks = split(stream, data.draw(st.lists(st.integers(0, 10_000), max_size=30)))
    responses = [
        split(e.response, data.draw(st.lists(st.integers(0, 10_000), max_size=8)))
        for e in exchanges
    ]
    answered = [0] * len(exchanges)  # response bytes each upstream sent
    while True:
        index = len(conn.upstreams) - 1
        can_answer = conn.attached is not None and bool(responses[index])
        if can_answer and conn.sent[index] != exchanges[index].request:
            # Responses may start before the request is whole, as far as the server allows.
            early = exchanges[index].early
            can_answer = early is None or answered[index] + len(responses[index][0]) <= early
        can_send = bool(client_chunks) and conn.relay.want_client_data
        if not (can_answer or can_send):
            break
        if can_answer and (not can_send or data.draw(st.booleans())):
            chunk = responses[index].pop(0)
            answered[index] += len(chunk)
            conn.answer(chunk)
        else:
            conn.send(client_chunks.pop(0))
    assert conn.targets == [e.target for e in exchanges]
    assert conn.sent == [e.request for e in exchanges]
    assert conn.client == b"".join(e.response for e in exchanges)
    assert [up.released for up in conn.upstreams] == [True] * len(exchanges)
    assert not client_chunks
    expected: dict[str, int] = {}
    for e in exchanges:
        expected[e.target] = expected.get(e.target, 0) + 1
    assert conn.relay.requests == expected
    assert conn.client_eof() == [Close("the client closed the connection", False)]


FRAGMENTS = [
    *(e.request for e in EXCHANGES),
    *(e.response for e in EXCHANGES),
    WS_REQUEST,
    WS_ACCEPT,
    b"\r\n",
    b"0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"Content-Length: -1\r\n",
    b"\x00\xff",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
]

PAYLOAD = st.one_of(st.binary(max_size=40), st.sampled_from(FRAGMENTS))
OPERATION = st.one_of(
    st.tuples(st.sampled_from(["send", "answer"]), PAYLOAD),
    st.tuples(
        st.sampled_from(["client_eof", "upstream_eof", "upstream_failed", "head_timeout"]),
        st.just(b""),
    ),
)


def is_subsequence(small: bytes, big: bytes) -> bool:
    rest = iter(big)
    return all(byte in rest for byte in small)


@settings(FUZZ, max_examples=500)
@given(st.lists(OPERATION, max_size=30))
def test_garbage_never_raises_and_actions_stay_well_formed(
    operations: list[tuple[str, bytes]],
) -> None:
    conn = Conn(max_head=512, max_held=256)
    for name, payload in operations:
        if name in ("send", "answer"):
            getattr(conn, name)(payload)
        else:
            getattr(conn, name)()
    # Whatever happened, the relay only forwards bytes it was given, in order, and
    # makes up nothing but its own 502.
    from_client = b"".join(p for name, p in operations if name == "send")
    from_upstream = b"".join(p for name, p in operations if name == "answer")
    assert is_subsequence(b"".join(conn.sent), from_client)
    to_client = bytes(conn.client)
    if to_client.endswith(BAD_GATEWAY):
        to_client = to_client[: -len(BAD_GATEWAY)]
    assert is_subsequence(to_client, from_upstream)


def test_empty_lines_before_the_first_request_are_dropped() -> None:
    conn = Conn()
    assert conn.send(b"\r\n") == []
    conn.send(b"\r\n" + req(to="alice"))
    conn.answer(OK)
    assert conn.sent == [req(to="alice")]
    assert conn.client == OK
