"""The daemon's HELLO, the agent's WELCOME, and everything that may go wrong first."""

from __future__ import annotations

from typing import Any

import pytest

from netmirror.errors import AuthenticationError, NetmirrorError, ProtocolError
from netmirror.wire import (
    PROTOCOL_VERSION,
    Connection,
    ErrorReceived,
    HelloReceived,
    Limits,
    Role,
    State,
    Welcomed,
)
from netmirror.wire.frames import FrameType

from ._support import (
    SESSION,
    SMALL,
    TOKEN,
    connected,
    credit,
    data,
    error_frame,
    expect_violation,
    hello_body,
    jframe,
    last_error,
    new_agent,
    new_daemon,
    open_frame,
    parse_frames,
    ping,
    pump,
    raw,
    reset,
    shutdown,
    single_frame,
    welcome_body,
)


def hello(**overrides: Any) -> bytes:
    return jframe(FrameType.HELLO, 0, hello_body(**overrides))


def hello_without(name: str) -> bytes:
    body = hello_body()
    del body[name]
    return jframe(FrameType.HELLO, 0, body)


def welcome(**overrides: Any) -> bytes:
    return jframe(FrameType.WELCOME, 0, welcome_body(**overrides))


# ------------------------------------------------------------------ success


def test_daemon_sends_hello_at_construction() -> None:
    daemon = new_daemon(SMALL)
    assert daemon.state is State.HANDSHAKE
    frame = single_frame(daemon.data_to_send())
    assert frame.ftype == FrameType.HELLO
    assert frame.stream_id == 0
    assert frame.json() == {
        "version": PROTOCOL_VERSION,
        "token": TOKEN,
        "session": SESSION,
        "window": SMALL.initial_window,
        "max_frame": SMALL.max_frame_size,
    }
    assert daemon.data_to_send() == b""
    assert daemon.pending_output == 0


def test_agent_sends_nothing_before_hello() -> None:
    agent = new_agent()
    assert agent.state is State.HANDSHAKE
    assert agent.data_to_send() == b""
    assert agent.pending_output == 0
    assert agent.events_received() == []


def test_full_handshake() -> None:
    daemon = new_daemon(SMALL)
    agent = new_agent(Limits(initial_window=5000, max_frame_size=2048), info={"pod": "web-0"})
    hello_bytes = daemon.data_to_send()

    agent.receive_data(hello_bytes)
    assert agent.state is State.OPEN
    assert agent.events_received() == [HelloReceived(SESSION, PROTOCOL_VERSION)]
    assert agent.pending_output > 0
    welcome_bytes = agent.data_to_send()
    frame = single_frame(welcome_bytes)
    assert frame.ftype == FrameType.WELCOME
    assert frame.stream_id == 0
    assert frame.json() == {
        "version": PROTOCOL_VERSION,
        "session": SESSION,
        "window": 5000,
        "max_frame": 2048,
        "info": {"pod": "web-0"},
    }

    daemon.receive_data(welcome_bytes)
    assert daemon.state is State.OPEN
    assert daemon.events_received() == [Welcomed(SESSION, PROTOCOL_VERSION, {"pod": "web-0"})]
    assert daemon.peer_info == {"pod": "web-0"}
    assert daemon.data_to_send() == b""
    # Each side learned the other's window.
    sid = daemon.open_stream(port=80, original_dst=("1.1.1.1", 80), client=("2.2.2.2", 2))
    assert daemon.send_window(sid) == 5000
    sid = agent.open_stream(port=80, original_dst=("1.1.1.1", 80), client=("2.2.2.2", 2))
    assert agent.send_window(sid) == SMALL.initial_window


def test_handshake_one_byte_at_a_time() -> None:
    daemon = new_daemon()
    agent = new_agent()
    for byte in daemon.data_to_send():
        assert agent.state is State.HANDSHAKE
        agent.receive_data(bytes([byte]))
    assert agent.state is State.OPEN
    assert agent.events_received() == [HelloReceived(SESSION, PROTOCOL_VERSION)]
    for byte in agent.data_to_send():
        assert daemon.state is State.HANDSHAKE
        daemon.receive_data(bytes([byte]))
    assert daemon.state is State.OPEN
    assert daemon.events_received() == [Welcomed(SESSION, PROTOCOL_VERSION, {})]


def test_hello_and_first_frames_in_one_chunk() -> None:
    daemon = new_daemon()
    agent = new_agent()
    agent.receive_data(daemon.data_to_send() + open_frame(2) + ping(9))
    events = agent.events_received()
    assert events[0] == HelloReceived(SESSION, PROTOCOL_VERSION)
    assert [type(e).__name__ for e in events[1:]] == ["StreamOpened"]
    types = [f.ftype for f in parse_frames(agent.data_to_send())]
    assert types == [FrameType.WELCOME, FrameType.PONG]


def test_agent_without_session_takes_the_daemons() -> None:
    agent = new_agent(session="")
    agent.receive_data(new_daemon().data_to_send())
    assert agent.events_received() == [HelloReceived(SESSION, PROTOCOL_VERSION)]
    assert agent.session == SESSION
    assert single_frame(agent.data_to_send()).json()["session"] == SESSION


def test_welcome_info_that_is_not_an_object_is_ignored() -> None:
    daemon = new_daemon()
    daemon.data_to_send()
    daemon.receive_data(welcome(info=["not", "a", "dict"]))
    assert daemon.state is State.OPEN
    assert daemon.peer_info == {}
    assert daemon.events_received() == [Welcomed(SESSION, PROTOCOL_VERSION, {})]


def test_agent_adopts_the_smaller_max_frame() -> None:
    _daemon, agent = connected(daemon_limits=Limits(max_frame_size=4096))
    sid = agent.open_stream(port=1, original_dst=("a", 1), client=("b", 2))
    assert agent.send_data(sid, b"x" * 10000) == 10000
    sizes = [len(f.payload) for f in parse_frames(agent.data_to_send())[1:]]
    assert sizes == [4096, 4096, 1808]


# --------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    "token",
    ["wrong", "", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), " " + TOKEN],
    ids=["wrong", "empty", "prefix", "longer", "case", "space"],
)
def test_wrong_token_is_an_authentication_error(token: str) -> None:
    daemon = Connection(Role.DAEMON, token=token, session=SESSION)
    agent = new_agent()
    err = expect_violation(agent, daemon.data_to_send(), "authentication failed", code="auth")
    assert isinstance(err, AuthenticationError)
    assert agent.events_received() == []


def test_auth_error_reaches_the_daemon_as_error_received() -> None:
    daemon = new_daemon(token="not-the-token")
    agent = new_agent()
    with pytest.raises(AuthenticationError):
        agent.receive_data(daemon.data_to_send())
    assert agent.state is State.CLOSED
    out = agent.data_to_send()
    frames = parse_frames(out)
    # Nothing but the ERROR: in particular no WELCOME.
    assert [f.ftype for f in frames] == [FrameType.ERROR]
    message = frames[0].json()["message"]
    assert TOKEN not in message and "not-the-token" not in message

    daemon.receive_data(out)
    assert daemon.state is State.CLOSED
    assert daemon.events_received() == [ErrorReceived("auth", message)]
    with pytest.raises(ProtocolError, match="closed"):
        daemon.receive_data(b"")


@pytest.mark.parametrize("token", [None, 1234, ["s3cret-token"], {"t": TOKEN}, True])
def test_token_of_wrong_type(token: Any) -> None:
    agent = new_agent()
    expect_violation(agent, hello(token=token), "token", code="auth")


def test_missing_token() -> None:
    agent = new_agent()
    expect_violation(agent, hello_without("token"), "missing token", code="auth")


def test_wrong_session() -> None:
    agent = new_agent(session="other-session")
    err = expect_violation(agent, hello(), "session", code="auth")
    assert isinstance(err, AuthenticationError)
    assert agent.events_received() == []


def test_missing_session_is_rejected() -> None:
    agent = new_agent()
    expect_violation(agent, hello_without("session"), "session")


def test_errors_are_netmirror_errors() -> None:
    assert issubclass(AuthenticationError, ProtocolError)
    assert issubclass(ProtocolError, NetmirrorError)


def test_token_with_lone_surrogate_is_an_authentication_error() -> None:
    agent = new_agent()
    # json.dumps writes "\ud800" as an escape; json.loads turns it back into a surrogate.
    expect_violation(agent, hello(token="\ud800"), code="auth")


# ------------------------------------------------------------------ versions


@pytest.mark.parametrize("version", [0, 2, PROTOCOL_VERSION + 1, -1, 2**40])
def test_agent_rejects_other_versions(version: int) -> None:
    agent = new_agent()
    expect_violation(agent, hello(version=version), "version")
    assert agent.events_received() == []


@pytest.mark.parametrize("version", [0, 2])
def test_daemon_rejects_other_versions(version: int) -> None:
    daemon = new_daemon()
    daemon.data_to_send()
    expect_violation(daemon, welcome(version=version), "version")
    assert daemon.events_received() == []


@pytest.mark.parametrize("version", ["1", 1.0, True, None, [1]])
def test_version_of_wrong_type(version: Any) -> None:
    expect_violation(new_agent(), hello(version=version), "version")


def test_missing_version() -> None:
    expect_violation(new_agent(), hello_without("version"), "version")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("window", 0),
        ("window", -1),
        ("window", 2**31),
        ("window", "4096"),
        ("window", True),
        ("max_frame", 1023),
        ("max_frame", 16 * 1024 * 1024 + 1),
        ("max_frame", 0),
        ("max_frame", 1024.0),
    ],
)
def test_hello_limits_out_of_range(name: str, value: Any) -> None:
    expect_violation(new_agent(), hello(**{name: value}), "window|max_frame")
    daemon = new_daemon()
    daemon.data_to_send()
    expect_violation(daemon, welcome(**{name: value}), "window|max_frame")


@pytest.mark.parametrize("name", ["window", "max_frame"])
def test_hello_limits_missing(name: str) -> None:
    expect_violation(new_agent(), hello_without(name), name)


@pytest.mark.parametrize(
    ("window", "max_frame"), [(1, 1024), (2**31 - 1, 16 * 1024 * 1024)], ids=["min", "max"]
)
def test_hello_limits_at_the_bounds(window: int, max_frame: int) -> None:
    agent = new_agent()
    agent.receive_data(hello(window=window, max_frame=max_frame))
    assert agent.state is State.OPEN
    sid = agent.open_stream(port=1, original_dst=("a", 1), client=("b", 2))
    assert agent.send_window(sid) == window


def test_hello_on_a_stream() -> None:
    agent = new_agent()
    expect_violation(agent, jframe(FrameType.HELLO, 1, hello_body()), "stream")


def test_welcome_on_a_stream() -> None:
    daemon = new_daemon()
    daemon.data_to_send()
    expect_violation(daemon, jframe(FrameType.WELCOME, 2, welcome_body()), "stream")


# ------------------------------------------------------------ frames too early


def _early_frames() -> dict[str, bytes]:
    return {
        "SUBSCRIBE": jframe(FrameType.SUBSCRIBE, 0, {"id": 1, "port": 80, "mode": "steal"}),
        "SUBSCRIBED": jframe(FrameType.SUBSCRIBED, 0, {"id": 1, "port": 80, "ok": True}),
        "UNSUBSCRIBE": jframe(FrameType.UNSUBSCRIBE, 0, {"id": 1, "port": 80}),
        "OPEN_even": open_frame(2),
        "OPEN_odd": open_frame(1),
        "DATA": data(1, b"hello"),
        "DATA_empty": data(2, b""),
        "SHUTDOWN": shutdown(1),
        "RESET": reset(2, b"x"),
        "CREDIT": credit(1, 100),
        "PING": ping(1),
        "PONG": ping(1, FrameType.PONG),
        "unknown": raw(200, 0, b"??"),
    }


@pytest.mark.parametrize("name", [*_early_frames(), "WELCOME"])
def test_agent_rejects_any_frame_before_hello(name: str) -> None:
    frame = welcome() if name == "WELCOME" else _early_frames()[name]
    agent = new_agent()
    expect_violation(agent, frame + hello())
    assert agent.events_received() == []


@pytest.mark.parametrize("name", [*_early_frames(), "HELLO"])
def test_daemon_rejects_any_frame_before_welcome(name: str) -> None:
    frame = hello() if name == "HELLO" else _early_frames()[name]
    daemon = new_daemon()
    daemon.data_to_send()
    expect_violation(daemon, frame + welcome())
    assert daemon.events_received() == []


def test_local_actions_before_the_handshake() -> None:
    daemon = new_daemon()
    agent = new_agent()
    with pytest.raises(ProtocolError, match="handshake"):
        daemon.open_stream(port=1, original_dst=("a", 1), client=("b", 2))
    with pytest.raises(ProtocolError, match="handshake"):
        agent.open_stream(port=1, original_dst=("a", 1), client=("b", 2))
    with pytest.raises(ProtocolError, match="handshake"):
        daemon.subscribe(80, "steal")
    with pytest.raises(ProtocolError, match="handshake"):
        daemon.unsubscribe(80)
    # Misuse raises but is local: nothing is queued and the tunnel still works.
    assert agent.data_to_send() == b""
    pump(daemon, agent)
    assert agent.state is State.OPEN


# ----------------------------------------------------------------- repetition


def test_hello_twice() -> None:
    daemon = new_daemon()
    first = daemon.data_to_send()
    agent = new_agent()
    agent.receive_data(first)
    agent.events_received()
    agent.data_to_send()
    expect_violation(agent, first, "HELLO after the handshake")
    assert agent.events_received() == []


def test_hello_twice_in_one_chunk() -> None:
    first = new_daemon().data_to_send()
    agent = new_agent()
    expect_violation(agent, first + first, "HELLO after the handshake")
    # The first HELLO was accepted before the second one broke the tunnel.
    assert agent.events_received() == [HelloReceived(SESSION, PROTOCOL_VERSION)]


def test_welcome_twice() -> None:
    daemon, _agent = connected()
    expect_violation(daemon, welcome(), "WELCOME after the handshake")


def test_daemon_rejects_hello() -> None:
    daemon, _agent = connected()
    expect_violation(daemon, hello(), "HELLO")


def test_agent_rejects_welcome_after_hello() -> None:
    _daemon, agent = connected()
    expect_violation(agent, welcome(), "WELCOME")


# --------------------------------------------------------------------- errors


def test_error_during_handshake_reaches_the_daemon() -> None:
    daemon = new_daemon()
    daemon.data_to_send()
    agent = new_agent()
    agent.fail("busy", "agent is shutting down")
    assert agent.state is State.CLOSED
    daemon.receive_data(agent.data_to_send())
    assert daemon.events_received() == [ErrorReceived("busy", "agent is shutting down")]
    assert daemon.state is State.CLOSED
    assert daemon.data_to_send() == b""
    with pytest.raises(ProtocolError, match="closed"):
        daemon.receive_data(welcome())


def test_error_during_handshake_reaches_the_agent() -> None:
    agent = new_agent()
    agent.receive_data(error_frame("shutdown", "daemon stopping"))
    assert agent.events_received() == [ErrorReceived("shutdown", "daemon stopping")]
    assert agent.state is State.CLOSED
    assert agent.data_to_send() == b""


def test_error_after_handshake() -> None:
    daemon, agent = connected()
    daemon.fail("bye", "session deleted")
    assert daemon.state is State.CLOSED
    assert pump(daemon, agent) == [ErrorReceived("bye", "session deleted")]
    assert agent.state is State.CLOSED


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, ErrorReceived("unknown", "")),
        ({"code": 42, "message": None}, ErrorReceived("unknown", "")),
        ({"code": "c" * 100, "message": "m" * 5000}, ErrorReceived("c" * 64, "m" * 1024)),
        ({"code": "x", "message": ["a"]}, ErrorReceived("x", "")),
    ],
)
def test_error_fields_are_normalised(body: dict[str, Any], expected: ErrorReceived) -> None:
    daemon = new_daemon()
    daemon.receive_data(jframe(FrameType.ERROR, 0, body))
    assert daemon.events_received() == [expected]
    assert daemon.state is State.CLOSED


@pytest.mark.parametrize("payload", [b"", b"not json", b"[1, 2]", b'"text"', b"\xff"])
def test_malformed_error_frame(payload: bytes) -> None:
    daemon = new_daemon()
    daemon.data_to_send()
    expect_violation(daemon, raw(FrameType.ERROR, 0, payload), "ERROR")


def test_fail_is_idempotent() -> None:
    _daemon, agent = connected()
    agent.fail("one", "first")
    agent.fail("two", "second")
    assert [f.json()["code"] for f in parse_frames(agent.data_to_send())] == ["one"]


def test_fail_truncates_the_message() -> None:
    agent = new_agent()
    agent.fail("c", "x" * 5000)
    assert last_error(agent.data_to_send())["message"] == "x" * 1024


# --------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_frame_size": 1023},
        {"max_frame_size": 16 * 1024 * 1024 + 1},
        {"initial_window": 0},
        {"initial_window": 2**31},
        {"max_streams": 0},
        {"max_subscriptions": 0},
        {"max_control_size": 511},
    ],
)
def test_invalid_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)


def test_valid_extreme_limits() -> None:
    Limits(
        max_frame_size=1024,
        initial_window=1,
        max_streams=1,
        max_subscriptions=1,
        max_control_size=512,
    )
    Limits(max_frame_size=16 * 1024 * 1024, initial_window=2**31 - 1)
