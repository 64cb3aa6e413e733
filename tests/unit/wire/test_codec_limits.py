"""Framing: arbitrary splits, size limits checked at the header, malformed payloads."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from netmirror.errors import ProtocolError
from netmirror.wire import (
    Connection,
    DataReceived,
    ErrorReceived,
    Event,
    Limits,
    PongReceived,
    State,
    StreamOpened,
)
from netmirror.wire.frames import HEADER, JSON_FRAMES, FrameType

from ._support import (
    SMALL,
    agent_with_hello,
    connected,
    credit,
    daemon_with_welcome,
    data,
    error_frame,
    expect_violation,
    hello_body,
    jframe,
    new_agent,
    new_daemon,
    open_body,
    open_frame,
    parse_frames,
    ping,
    raw,
    reset,
    shutdown,
    single_frame,
    welcome_body,
)

# ------------------------------------------------------- splits at every byte


def to_agent_stream() -> bytes:
    """What a daemon may send an agent, HELLO first, every frame type it may use."""
    return b"".join(
        [
            jframe(FrameType.HELLO, 0, hello_body()),
            open_frame(2),
            data(2, b"hello"),
            jframe(FrameType.SUBSCRIBE, 0, {"id": 1, "port": 80, "mode": "steal"}),
            ping(0x0102030405060708),
            credit(2, 100),
            open_frame(4, info={"k": ["v", 1]}),
            data(4, b""),
            data(2, bytes(range(256))),
            shutdown(2),
            jframe(FrameType.UNSUBSCRIBE, 0, {"id": 2, "port": 81}),
            reset(4, "bye ✓".encode()),
            ping(7, FrameType.PONG),
            data(4, b"late, dropped"),
            jframe(FrameType.SUBSCRIBE, 0, {"id": 3, "port": 82, "mode": "nope"}),
        ]
    )


def to_daemon_stream() -> bytes:
    """What an agent may send a daemon, WELCOME first."""
    return b"".join(
        [
            jframe(FrameType.WELCOME, 0, welcome_body(info={"pod": "p"})),
            open_frame(1),
            data(1, b"GET / HTTP/1.1\r\n\r\n"),
            jframe(FrameType.SUBSCRIBED, 0, {"id": 1, "port": 80, "ok": True, "error": ""}),
            open_frame(3, port=443),
            ping(2**64 - 1),
            data(3, b"\x00" * 300),
            shutdown(1),
            reset(3),
            jframe(FrameType.SUBSCRIBED, 0, {"id": 2, "port": 81, "ok": False, "error": "no"}),
            ping(1, FrameType.PONG),
        ]
    )


STREAMS = {"to_agent": to_agent_stream(), "to_daemon": to_daemon_stream()}


def fresh(direction: str) -> Connection:
    if direction == "to_agent":
        return new_agent(SMALL)
    daemon = new_daemon(SMALL)
    daemon.data_to_send()
    return daemon


def feed(direction: str, chunks: list[bytes]) -> tuple[list[Event], bytes, State]:
    conn = fresh(direction)
    for chunk in chunks:
        conn.receive_data(chunk)
    return conn.events_received(), conn.data_to_send(), conn.state


REFERENCE = {d: feed(d, [s]) for d, s in STREAMS.items()}


def test_reference_streams_are_meaningful() -> None:
    events, out, state = REFERENCE["to_agent"]
    assert state is State.OPEN
    names = [type(e).__name__ for e in events]
    for name in [
        "HelloReceived",
        "StreamOpened",
        "DataReceived",
        "SubscribeRequested",
        "CreditGranted",
        "StreamHalfClosed",
        "UnsubscribeRequested",
        "StreamReset",
        "PongReceived",
    ]:
        assert name in names
    types = [f.ftype for f in parse_frames(out)]
    assert types == [FrameType.WELCOME, FrameType.PONG, FrameType.SUBSCRIBED]

    events, out, state = REFERENCE["to_daemon"]
    assert state is State.OPEN
    names = [type(e).__name__ for e in events]
    for name in ["Welcomed", "StreamOpened", "DataReceived", "SubscriptionAnswered"]:
        assert name in names
    assert [f.ftype for f in parse_frames(out)] == [FrameType.PONG]


@pytest.mark.parametrize(
    ("direction", "cut"),
    [(d, cut) for d, s in STREAMS.items() for cut in range(1, len(s))],
)
def test_split_anywhere_gives_the_same_result(direction: str, cut: int) -> None:
    stream = STREAMS[direction]
    assert feed(direction, [stream[:cut], stream[cut:]]) == REFERENCE[direction]


@pytest.mark.parametrize("direction", list(STREAMS))
def test_one_byte_at_a_time(direction: str) -> None:
    stream = STREAMS[direction]
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert feed(direction, chunks) == REFERENCE[direction]


@pytest.mark.parametrize("direction", list(STREAMS))
@pytest.mark.parametrize("seed", range(20))
def test_random_chunkings(direction: str, seed: int) -> None:
    rng = random.Random(seed)
    stream = STREAMS[direction]
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 40)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    # Empty chunks are harmless too.
    chunks.insert(rng.randint(0, len(chunks)), b"")
    assert feed(direction, chunks) == REFERENCE[direction]


def test_partial_frame_waits_for_its_last_byte() -> None:
    agent = agent_with_hello(SMALL)
    agent.receive_data(open_frame(2))
    agent.events_received()
    frame = data(2, b"d" * 1024)
    agent.receive_data(frame[:-1])
    assert agent.events_received() == []
    agent.receive_data(frame[-1:])
    assert agent.events_received() == [DataReceived(2, b"d" * 1024)]


# ---------------------------------------------------- sizes checked at the header


def header(ftype: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(ftype, stream_id, length)


@pytest.mark.parametrize("length", [1025, 2**20, 2**32 - 1])
def test_oversize_data_rejected_at_the_header(length: int) -> None:
    agent = agent_with_hello(SMALL)
    agent.receive_data(open_frame(2))
    expect_violation(agent, header(FrameType.DATA, 2, length), "exceeds the limit of 1024")


def test_oversize_data_rejected_when_the_header_completes() -> None:
    agent = agent_with_hello(SMALL)
    hdr = header(FrameType.DATA, 2, 1025)
    agent.receive_data(hdr[:5])
    assert agent.state is State.OPEN
    expect_violation(agent, hdr[5:], "exceeds")


def test_data_at_the_limit_is_buffered() -> None:
    agent = agent_with_hello(SMALL)
    agent.receive_data(open_frame(2))
    agent.receive_data(header(FrameType.DATA, 2, 1024) + b"x" * 10)
    assert agent.state is State.OPEN


def test_data_limit_is_the_receivers_own() -> None:
    # The daemon advertised 1024; the agent accepts its own 16 KiB anyway.
    agent = agent_with_hello(Limits(max_frame_size=16 * 1024))
    agent.receive_data(open_frame(2) + data(2, b"x" * 16 * 1024))
    assert [len(e.data) for e in agent.events_received() if isinstance(e, DataReceived)] == [
        16 * 1024
    ]
    expect_violation(agent, header(FrameType.DATA, 2, 16 * 1024 + 1), "exceeds")


def test_oversize_data_before_the_handshake() -> None:
    expect_violation(new_agent(SMALL), header(FrameType.DATA, 1, 2**32 - 1), "exceeds")


# REPLY has a limit of its own (max_reply_size); its tests are in test_requests.
CONTROL_FRAMES = sorted(JSON_FRAMES - {FrameType.REPLY})


@pytest.mark.parametrize("ftype", CONTROL_FRAMES, ids=lambda t: t.name)
def test_oversize_control_rejected_at_the_header(ftype: FrameType) -> None:
    agent = agent_with_hello(SMALL)
    expect_violation(agent, header(ftype, 0, 513), f"{ftype.name} frame of 513 bytes")
    daemon = daemon_with_welcome(SMALL)
    expect_violation(daemon, header(ftype, 0, 2**32 - 1), "exceeds the limit of 512")


@pytest.mark.parametrize("ftype", sorted(JSON_FRAMES), ids=lambda t: t.name)
def test_control_at_the_limit_is_buffered(ftype: FrameType) -> None:
    agent = agent_with_hello(SMALL)
    agent.receive_data(header(ftype, 0, 512) + b"{")
    assert agent.state is State.OPEN


def test_oversize_hello_rejected_before_authentication() -> None:
    agent = new_agent()  # default limits: 16 KiB of control
    expect_violation(agent, header(FrameType.HELLO, 0, 16 * 1024 + 1), "HELLO frame")


def test_hello_at_the_control_limit_is_parsed() -> None:
    body = hello_body(padding="")
    size = len(jframe(FrameType.HELLO, 0, body)) - 9
    body["padding"] = "p" * (512 - size)
    frame = jframe(FrameType.HELLO, 0, body)
    assert len(frame) == 9 + 512
    agent = new_agent(SMALL)
    agent.receive_data(frame)
    assert agent.state is State.OPEN
    body["padding"] += "p"
    expect_violation(new_agent(SMALL), jframe(FrameType.HELLO, 0, body), "exceeds")


@pytest.mark.parametrize(
    "ftype",
    [FrameType.SHUTDOWN, FrameType.RESET, FrameType.CREDIT, FrameType.PING, FrameType.PONG, 0, 99],
)
def test_oversize_binary_frames_rejected_at_the_header(ftype: int) -> None:
    agent = agent_with_hello(SMALL)
    expect_violation(agent, header(ftype, 2, 1025), "too large")


# ------------------------------------------------------------ unknown types


@pytest.mark.parametrize("ftype", [0, 17, 18, 100, 255])
def test_unknown_frame_type(ftype: int) -> None:
    agent = agent_with_hello()
    expect_violation(agent, raw(ftype, 0, b"\x00" * 8), f"unknown frame type {ftype}")
    daemon = daemon_with_welcome()
    expect_violation(daemon, raw(ftype, 3, b""), f"unknown frame type {ftype}")


@pytest.mark.parametrize("ftype", [0, 17, 255])
def test_unknown_frame_type_before_the_handshake(ftype: int) -> None:
    expect_violation(new_agent(), raw(ftype, 0, b"{}"), "unknown frame type")


# ----------------------------------------------------------- malformed JSON


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"\xff\xfe\x00", b"{'port': 80}", b"{}x", b"\x80", b'{"a": NaN'],
    ids=["empty", "truncated", "binary", "single-quotes", "trailing", "bad-utf8", "unclosed"],
)
@pytest.mark.parametrize("ftype", [FrameType.OPEN, FrameType.SUBSCRIBE, FrameType.UNSUBSCRIBE])
def test_malformed_json(ftype: FrameType, payload: bytes) -> None:
    agent = agent_with_hello()
    expect_violation(agent, raw(ftype, 2 if ftype is FrameType.OPEN else 0, payload), "not JSON")


@pytest.mark.parametrize("payload", [b"[]", b"null", b"1", b'"x"', b"true", b"[{}]"])
@pytest.mark.parametrize(
    "ftype", [FrameType.OPEN, FrameType.SUBSCRIBE, FrameType.UNSUBSCRIBE, FrameType.ERROR]
)
def test_json_that_is_not_an_object(ftype: FrameType, payload: bytes) -> None:
    agent = agent_with_hello()
    sid = 2 if ftype is FrameType.OPEN else 0
    expect_violation(agent, raw(ftype, sid, payload), "not a JSON object")


@pytest.mark.parametrize("payload", [b"[]", b"nope", b""])
def test_malformed_hello(payload: bytes) -> None:
    expect_violation(new_agent(), raw(FrameType.HELLO, 0, payload), "HELLO")


@pytest.mark.parametrize("payload", [b"[]", b"nope", b""])
def test_malformed_welcome(payload: bytes) -> None:
    daemon = new_daemon()
    daemon.data_to_send()
    expect_violation(daemon, raw(FrameType.WELCOME, 0, payload), "WELCOME")


@pytest.mark.parametrize(
    "fields",
    [
        {"port": True},
        {"port": False},
        {"port": 70000},
        {"port": 65536},
        {"port": -1},
        {"port": "80"},
        {"port": 80.0},
        {"port": None},
        {"port": [80]},
        {"dst": "10.0.0.1:80"},
        {"dst": ["10.0.0.1"]},
        {"dst": ["10.0.0.1", 80, 1]},
        {"dst": [1, 80]},
        {"dst": ["10.0.0.1", "80"]},
        {"dst": ["10.0.0.1", True]},
        {"dst": ["10.0.0.1", 70000]},
        {"dst": ["10.0.0.1", 65536]},
        {"dst": ["10.0.0.1", -1]},
        {"dst": ["10.0.0.1", 8.5]},
        {"dst": {"host": "10.0.0.1", "port": 80}},
        {"dst": None},
        {"dst": []},
        {"src": ["10.0.0.2"]},
        {"src": [None, 1]},
        {"src": ["h", False]},
        {"src": ["h", 65536]},
        {"src": 1},
    ],
    ids=repr,
)
def test_open_with_wrong_field_types(fields: dict[str, Any]) -> None:
    agent = agent_with_hello()
    expect_violation(agent, jframe(FrameType.OPEN, 2, open_body(**fields)), "malformed OPEN")
    assert agent.events_received() == []


@pytest.mark.parametrize("name", ["port", "dst", "src"])
def test_open_with_missing_field(name: str) -> None:
    body = open_body()
    del body[name]
    agent = agent_with_hello()
    expect_violation(agent, jframe(FrameType.OPEN, 2, body), "malformed OPEN")


@pytest.mark.parametrize("info", [[], "x", 1, True])
def test_open_with_info_not_an_object(info: Any) -> None:
    agent = agent_with_hello()
    expect_violation(agent, open_frame(2, info=info), "info must be an object")


@pytest.mark.parametrize("port", [1, 65535])
def test_open_port_bounds(port: int) -> None:
    agent = agent_with_hello()
    agent.receive_data(open_frame(2, port=port, dst=["", 65535], src=["::", 0], extra=1))
    assert agent.events_received() == [StreamOpened(2, port, ("", 65535), ("::", 0), {})]


@pytest.mark.parametrize(
    "ftype", [FrameType.HELLO, FrameType.OPEN, FrameType.SUBSCRIBE], ids=lambda t: t.name
)
def test_deeply_nested_json_is_a_protocol_error(ftype: FrameType) -> None:
    payload = b"[" * 5000 + b"]" * 5000
    limits = Limits(max_control_size=16 * 1024)
    if ftype is FrameType.HELLO:
        conn = new_agent(limits)
    else:
        conn = agent_with_hello(limits)
    sid = 2 if ftype is FrameType.OPEN else 0
    expect_violation(conn, raw(ftype, sid, payload), "malformed")


# ------------------------------------------------------------------- ping


@pytest.mark.parametrize("value", [0, 1, 0x0102030405060708, 2**64 - 1])
def test_ping_answered_by_pong_with_the_same_payload(value: int) -> None:
    daemon, agent = connected()
    daemon.ping(value)
    out = daemon.data_to_send()
    assert out == ping(value)
    agent.receive_data(out)
    assert agent.events_received() == []
    answer = agent.data_to_send()
    frame = single_frame(answer)
    assert (frame.ftype, frame.stream_id) == (FrameType.PONG, 0)
    assert frame.payload == value.to_bytes(8, "big")
    daemon.receive_data(answer)
    assert daemon.events_received() == [PongReceived(value)]


def test_agent_pings_too() -> None:
    daemon, agent = connected()
    agent.ping(5)
    agent.ping(6)
    daemon.receive_data(agent.data_to_send())
    agent.receive_data(daemon.data_to_send())
    assert agent.events_received() == [PongReceived(5), PongReceived(6)]


@pytest.mark.parametrize(
    "frame",
    [
        raw(FrameType.PING, 0, b"\x00" * 7),
        raw(FrameType.PING, 0, b"\x00" * 9),
        raw(FrameType.PING, 0, b""),
        raw(FrameType.PING, 1, b"\x00" * 8),
        raw(FrameType.PONG, 0, b"\x00" * 4),
        raw(FrameType.PONG, 2, b"\x00" * 8),
    ],
)
def test_malformed_ping(frame: bytes) -> None:
    _daemon, agent = connected()
    expect_violation(agent, frame, "malformed P[IO]NG")


# ------------------------------------------------------------------ errors


def test_nothing_is_parsed_after_a_violation() -> None:
    agent = agent_with_hello()
    expect_violation(agent, raw(77, 0) + ping(1) + open_frame(2), "unknown")
    assert agent.events_received() == []


def test_error_then_more_data_in_another_call() -> None:
    _daemon, agent = connected()
    agent.receive_data(error_frame())
    assert agent.events_received() == [ErrorReceived("boom", "it broke")]
    with pytest.raises(ProtocolError, match="closed"):
        agent.receive_data(ping(1))
    assert agent.data_to_send() == b""
    assert agent.events_received() == []


def test_frames_behind_an_error_in_the_same_chunk_are_ignored() -> None:
    _daemon, agent = connected()
    agent.receive_data(error_frame() + ping(1) + open_frame(2))
    assert agent.state is State.CLOSED
    assert agent.events_received() == [ErrorReceived("boom", "it broke")]
    assert agent.data_to_send() == b""
