"""Streams: opening, data, half-close, reset, ids and the stream limit."""

from __future__ import annotations

import pytest

from netmirror.wire import (
    Connection,
    DataReceived,
    Limits,
    State,
    StreamHalfClosed,
    StreamOpened,
    StreamReset,
)
from netmirror.wire.frames import FrameType

from ._support import (
    DST,
    SMALL,
    SRC,
    connected,
    credit,
    data,
    expect_violation,
    open_frame,
    parse_frames,
    pump,
    raw,
    reset,
    shutdown,
    single_frame,
)


def open_from(conn: Connection, port: int = 8080) -> int:
    return conn.open_stream(port=port, original_dst=DST, client=SRC)


def sides(opener: str) -> tuple[Connection, Connection]:
    """(opener, acceptor) of a connected pair; the acceptor saw the OPEN."""
    daemon, agent = connected(SMALL, SMALL)
    return (agent, daemon) if opener == "agent" else (daemon, agent)


def opened(opener: str) -> tuple[Connection, Connection, int]:
    a, b = sides(opener)
    sid = open_from(a)
    assert [type(e) for e in pump(a, b)] == [StreamOpened]
    return a, b, sid


OPENERS = ["agent", "daemon"]


# -------------------------------------------------------------------- opening


@pytest.mark.parametrize("opener", OPENERS)
def test_open_stream(opener: str) -> None:
    a, b = sides(opener)
    sid = a.open_stream(
        port=443, original_dst=("192.0.2.1", 443), client=("198.51.100.7", 51000), info={"k": 1}
    )
    assert a.is_open(sid) and a.open_streams == 1
    out = a.data_to_send()
    frame = single_frame(out)
    assert frame.ftype == FrameType.OPEN and frame.stream_id == sid
    assert frame.json() == {
        "port": 443,
        "dst": ["192.0.2.1", 443],
        "src": ["198.51.100.7", 51000],
        "info": {"k": 1},
    }
    b.receive_data(out)
    assert b.events_received() == [
        StreamOpened(sid, 443, ("192.0.2.1", 443), ("198.51.100.7", 51000), {"k": 1})
    ]
    assert b.is_open(sid) and b.open_streams == 1
    assert b.data_to_send() == b""


def test_open_without_info_omits_it() -> None:
    daemon, agent = connected()
    sid = open_from(agent)
    out = agent.data_to_send()
    assert "info" not in single_frame(out).json()
    daemon.receive_data(out)
    assert daemon.events_received() == [StreamOpened(sid, 8080, DST, SRC, {})]


def test_unknown_port_zero_in_addresses_is_allowed() -> None:
    daemon, agent = connected()
    agent.open_stream(port=1, original_dst=("::1", 0), client=("", 0))
    assert pump(agent, daemon) == [StreamOpened(1, 1, ("::1", 0), ("", 0), {})]


def test_stream_ids_parity_and_order() -> None:
    daemon, agent = connected()
    agent_ids = [open_from(agent) for _ in range(5)]
    daemon_ids = [open_from(daemon) for _ in range(5)]
    assert agent_ids == [1, 3, 5, 7, 9]
    assert daemon_ids == [2, 4, 6, 8, 10]
    # Crossing opens do not collide.
    a_events = pump(daemon, agent)
    d_events = pump(agent, daemon)
    assert [e.stream_id for e in a_events if isinstance(e, StreamOpened)] == daemon_ids
    assert [e.stream_id for e in d_events if isinstance(e, StreamOpened)] == agent_ids
    assert agent.open_streams == daemon.open_streams == 10


def test_ids_keep_increasing_after_streams_close() -> None:
    daemon, agent = connected()
    first = open_from(agent)
    agent.reset(first, "gone")
    pump(agent, daemon)
    assert open_from(agent) == first + 2
    assert [type(e) for e in pump(agent, daemon)] == [StreamOpened]


# ----------------------------------------------------------------------- data


@pytest.mark.parametrize("opener", OPENERS)
def test_data_both_directions(opener: str) -> None:
    a, b, sid = opened(opener)
    assert a.send_data(sid, b"request") == 7
    assert pump(a, b) == [DataReceived(sid, b"request")]
    assert b.send_data(sid, memoryview(b"response")) == 8
    assert pump(b, a) == [DataReceived(sid, b"response")]


def test_empty_send_queues_nothing() -> None:
    _daemon, agent = connected()
    sid = open_from(agent)
    agent.data_to_send()
    assert agent.send_data(sid, b"") == 0
    assert agent.pending_output == 0
    assert agent.data_to_send() == b""


def test_data_on_unknown_stream_is_dropped_locally() -> None:
    _daemon, agent = connected()
    assert agent.send_data(99, b"x") == 0
    assert agent.send_window(99) == 0
    assert agent.data_to_send() == b""


@pytest.mark.parametrize(
    ("sender_max", "receiver_max", "step"),
    [(1024, 1024, 1024), (4096, 1024, 1024), (1024, 4096, 1024), (2048, 4096, 2048)],
)
def test_data_split_into_peer_max_frame(sender_max: int, receiver_max: int, step: int) -> None:
    receiver_limits = Limits(max_frame_size=receiver_max)
    sender_limits = Limits(max_frame_size=sender_max)
    daemon, agent = connected(daemon_limits=receiver_limits, agent_limits=sender_limits)
    sid = open_from(agent)
    pump(agent, daemon)
    payload = bytes(range(256)) * 40 + b"tail"  # 10244 bytes
    n_frames = -(-len(payload) // step)
    assert agent.send_data(sid, payload) == len(payload)
    assert agent.pending_output == len(payload) + 9 * n_frames
    out = agent.data_to_send()
    assert len(out) == len(payload) + 9 * n_frames
    frames = parse_frames(out)
    assert len(frames) == n_frames
    assert all(f.ftype == FrameType.DATA and f.stream_id == sid for f in frames)
    assert [len(f.payload) for f in frames[:-1]] == [step] * (n_frames - 1)
    assert 0 < len(frames[-1].payload) <= step
    assert b"".join(f.payload for f in frames) == payload
    # The receiver gets one event per frame and the same bytes.
    daemon.receive_data(out)
    assert daemon.events_received() == [DataReceived(sid, f.payload) for f in frames]


def test_exact_multiple_of_max_frame() -> None:
    daemon, agent = connected(daemon_limits=SMALL, agent_limits=SMALL)
    sid = open_from(agent)
    agent.data_to_send()
    assert agent.send_data(sid, b"z" * 3072) == 3072
    assert [len(f.payload) for f in parse_frames(agent.data_to_send())] == [1024] * 3
    assert daemon.state is State.OPEN


def test_send_data_accepts_memoryview_slices() -> None:
    daemon, agent = connected()
    sid = open_from(agent)
    pump(agent, daemon)
    buf = b"0123456789"
    assert agent.send_data(sid, memoryview(buf)[3:7]) == 4
    assert pump(agent, daemon) == [DataReceived(sid, b"3456")]


def test_send_data_owns_what_it_queued() -> None:
    daemon, agent = connected()
    sid = open_from(agent)
    pump(agent, daemon)
    buf = bytearray(b"first")
    assert agent.send_data(sid, memoryview(buf)) == 5
    buf[:] = b"XXXXX"  # the caller reuses its buffer, as send_data returned
    assert pump(agent, daemon) == [DataReceived(sid, b"first")]


# ----------------------------------------------------------------- half-close


@pytest.mark.parametrize("opener", OPENERS)
@pytest.mark.parametrize("first", ["opener", "acceptor"])
def test_half_close_each_direction_then_both(opener: str, first: str) -> None:
    a, b, sid = opened(opener)
    x, y = (a, b) if first == "opener" else (b, a)

    x.shutdown(sid)
    out = x.data_to_send()
    assert out == shutdown(sid)
    y.receive_data(out)
    assert y.events_received() == [StreamHalfClosed(sid)]
    # Half-closed, not gone: both still know the stream.
    assert x.is_open(sid) and y.is_open(sid)
    # x may not send any more, y still may.
    assert x.send_window(sid) == 0
    assert x.send_data(sid, b"late") == 0
    assert x.data_to_send() == b""
    assert y.send_window(sid) > 0
    assert y.send_data(sid, b"still here") == 10
    assert pump(y, x) == [DataReceived(sid, b"still here")]
    # x can still grant y more room.
    x.grant(sid, 10)
    assert [type(e).__name__ for e in pump(x, y)] == ["CreditGranted"]

    y.shutdown(sid)
    assert not y.is_open(sid)
    assert y.open_streams == 0
    assert pump(y, x) == [StreamHalfClosed(sid)]
    assert not x.is_open(sid)
    assert x.open_streams == 0


def test_shutdowns_crossing() -> None:
    a, b, sid = opened("agent")
    a.shutdown(sid)
    b.shutdown(sid)
    assert a.is_open(sid) and b.is_open(sid)
    assert pump(a, b) == [StreamHalfClosed(sid)]
    assert pump(b, a) == [StreamHalfClosed(sid)]
    assert not a.is_open(sid) and not b.is_open(sid)


def test_shutdown_twice_sends_one_frame() -> None:
    a, _b, sid = opened("agent")
    a.shutdown(sid)
    a.shutdown(sid)
    assert [f.ftype for f in parse_frames(a.data_to_send())] == [FrameType.SHUTDOWN]


def test_shutdown_of_unknown_stream_is_a_no_op() -> None:
    _daemon, agent = connected()
    agent.shutdown(7)
    agent.shutdown(0)
    assert agent.data_to_send() == b""


def test_repeated_shutdown_from_peer_is_ignored() -> None:
    _a, b, sid = opened("daemon")
    b.receive_data(shutdown(sid) + shutdown(sid))
    assert b.events_received() == [StreamHalfClosed(sid)]
    assert b.is_open(sid)


def test_late_shutdown_after_full_close_is_ignored() -> None:
    a, b, sid = opened("agent")
    a.shutdown(sid)
    pump(a, b)
    b.shutdown(sid)
    pump(b, a)
    assert not a.is_open(sid) and not b.is_open(sid)
    b.receive_data(shutdown(sid))
    a.receive_data(shutdown(sid) + reset(sid, b"late") + credit(sid, 5))
    assert a.events_received() == b.events_received() == []
    assert a.state is b.state is State.OPEN


def test_shutdown_with_payload_is_an_error() -> None:
    _a, b, sid = opened("agent")
    expect_violation(b, raw(FrameType.SHUTDOWN, sid, b"x"), "SHUTDOWN")


def test_data_after_shutdown_is_an_error() -> None:
    _a, b, sid = opened("agent")
    b.receive_data(shutdown(sid))
    assert b.events_received() == [StreamHalfClosed(sid)]
    expect_violation(b, data(sid, b"more"), "after SHUTDOWN")


def test_data_after_shutdown_in_the_same_chunk_is_an_error() -> None:
    _a, b, sid = opened("daemon")
    expect_violation(b, data(sid, b"ok") + shutdown(sid) + data(sid, b"no"), "after SHUTDOWN")
    assert b.events_received() == [DataReceived(sid, b"ok"), StreamHalfClosed(sid)]


# ---------------------------------------------------------------------- reset


@pytest.mark.parametrize("opener", OPENERS)
@pytest.mark.parametrize("resetter", ["opener", "acceptor"])
def test_reset(opener: str, resetter: str) -> None:
    a, b, sid = opened(opener)
    x, y = (a, b) if resetter == "opener" else (b, a)
    x.reset(sid, "connection refused")
    assert not x.is_open(sid)
    assert x.send_data(sid, b"x") == 0
    out = x.data_to_send()
    assert out == reset(sid, b"connection refused")
    y.receive_data(out)
    assert y.events_received() == [StreamReset(sid, "connection refused")]
    assert not y.is_open(sid)
    assert y.open_streams == 0


def test_reset_after_half_close() -> None:
    a, b, sid = opened("agent")
    a.shutdown(sid)
    pump(a, b)
    b.reset(sid, "abort")
    assert pump(b, a) == [StreamReset(sid, "abort")]
    assert not a.is_open(sid) and not b.is_open(sid)


def test_reset_with_empty_reason() -> None:
    a, b, sid = opened("agent")
    a.reset(sid, "")
    assert pump(a, b) == [StreamReset(sid, "")]


@pytest.mark.parametrize(
    "reason",
    ["x" * 5000, "é" * 1000, "€" * 500, "a" * 1023 + "€"],
    ids=["ascii", "2-byte", "3-byte-split", "split-at-end"],
)
def test_reset_reason_truncated_to_1024_bytes(reason: str) -> None:
    a, b, sid = opened("agent")
    a.reset(sid, reason)
    out = a.data_to_send()
    frame = single_frame(out)
    assert frame.payload == reason.encode()[:1024]
    assert len(frame.payload) <= 1024
    b.receive_data(out)
    (event,) = b.events_received()
    assert isinstance(event, StreamReset)
    # A character cut in two decodes as a replacement, never as an error.
    assert event.reason == reason.encode()[:1024].decode("utf-8", "replace")


def test_reset_reason_of_1025_bytes_is_an_error() -> None:
    _a, b, sid = opened("agent")
    expect_violation(b, reset(sid, b"r" * 1025), "too large")


def test_reset_twice_or_unknown_is_a_no_op() -> None:
    a, _b, sid = opened("agent")
    a.reset(sid, "one")
    a.reset(sid, "two")
    a.reset(12345, "never")
    assert [f.payload for f in parse_frames(a.data_to_send())] == [b"one"]


def test_resets_crossing() -> None:
    a, b, sid = opened("agent")
    a.reset(sid, "from a")
    b.reset(sid, "from b")
    assert pump(a, b) == []
    assert pump(b, a) == []
    assert a.state is b.state is State.OPEN


@pytest.mark.parametrize("opener", OPENERS)
def test_data_arriving_after_local_reset_is_dropped(opener: str) -> None:
    a, b, sid = opened(opener)
    b.send_data(sid, b"in flight")
    b.shutdown(sid)
    a.reset(sid, "bye")
    assert pump(b, a) == []
    assert a.state is State.OPEN
    # Even more than the window (4096) is harmless: the stream is gone.
    a.receive_data(data(sid, b"z" * 1024) * 5 + credit(sid, 9))
    assert a.events_received() == []
    assert a.state is State.OPEN
    assert pump(a, b) == [StreamReset(sid, "bye")]


def test_frames_after_peer_reset_are_dropped() -> None:
    a, b, sid = opened("agent")
    a.reset(sid, "gone")
    pump(a, b)
    b.receive_data(data(sid, b"late") + shutdown(sid) + credit(sid, 1) + reset(sid, b"x"))
    assert b.events_received() == []
    assert b.state is State.OPEN


# ---------------------------------------------------------- invalid stream ids


def test_open_with_reused_id() -> None:
    _agent, daemon = sides("agent")
    daemon.receive_data(open_frame(5))
    assert [type(e) for e in daemon.events_received()] == [StreamOpened]
    expect_violation(daemon, open_frame(5), "invalid stream id 5")


def test_open_with_reused_id_of_a_closed_stream() -> None:
    a, b, sid = opened("agent")
    a.reset(sid, "x")
    pump(a, b)
    expect_violation(b, open_frame(sid), "invalid stream id")


def test_open_with_lower_id() -> None:
    _daemon, agent = connected()
    agent.receive_data(open_frame(10))
    agent.events_received()
    expect_violation(agent, open_frame(8), "invalid stream id 8")


@pytest.mark.parametrize("sid", [2, 4, 2**32 - 2, 0])
def test_daemon_rejects_even_ids_from_agent(sid: int) -> None:
    daemon, _agent = connected()
    expect_violation(daemon, open_frame(sid), f"invalid stream id {sid}")


@pytest.mark.parametrize("sid", [1, 3, 2**32 - 1, 0])
def test_agent_rejects_odd_ids_from_daemon(sid: int) -> None:
    _daemon, agent = connected()
    expect_violation(agent, open_frame(sid), f"invalid stream id {sid}")


def test_ids_may_skip() -> None:
    _daemon, agent = connected()
    agent.receive_data(open_frame(2) + open_frame(100) + open_frame(2**32 - 2))
    assert [e.stream_id for e in agent.events_received() if isinstance(e, StreamOpened)] == [
        2,
        100,
        2**32 - 2,
    ]
    # Skipped ids count as known: late frames for them are dropped.
    agent.receive_data(data(50, b"x") + shutdown(50))
    assert agent.events_received() == []


@pytest.mark.parametrize(
    ("frame", "what"),
    [
        (data(2, b"x"), "DATA"),  # the peer's parity, above its last id
        (data(3, b"x"), "DATA"),  # our parity, not yet used by us
        (data(1, b"x"), "DATA"),  # our next id, not yet used by us
        (credit(1, 10), "CREDIT"),
        (data(0, b"x"), "DATA on stream 0"),
        (data(4, b""), "DATA"),
        (shutdown(2), "SHUTDOWN"),
        (shutdown(0), "SHUTDOWN on stream 0"),
        (reset(2, b"r"), "RESET"),
        (reset(0), "RESET on stream 0"),
        (credit(3, 10), "CREDIT"),
        (credit(0, 10), "CREDIT on stream 0"),
    ],
)
def test_frames_for_never_opened_streams(frame: bytes, what: str) -> None:
    _daemon, agent = connected()
    expect_violation(agent, frame, what)


def test_data_for_never_opened_id_after_others() -> None:
    _daemon, agent = connected()
    open_from(agent)  # 1
    agent.receive_data(open_frame(2))
    agent.events_received()
    expect_violation(agent, data(4, b"x"), "never opened")


def test_data_for_our_next_id_is_an_error() -> None:
    _daemon, agent = connected()
    open_from(agent)  # 1
    expect_violation(agent, data(3, b"x"), "never opened")


# ---------------------------------------------------------------- max_streams


def test_max_streams_resets_the_extra_stream() -> None:
    daemon, agent = connected(daemon_limits=Limits(max_streams=2))
    ids = [open_from(agent) for _ in range(3)]
    extra = ids[-1]
    agent.send_data(extra, b"lost")
    events = pump(agent, daemon)
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == ids[:2]
    assert not any(getattr(e, "stream_id", None) == extra for e in events)
    assert daemon.open_streams == 2
    assert not daemon.is_open(extra)
    out = daemon.data_to_send()
    frame = single_frame(out)
    assert frame.ftype == FrameType.RESET and frame.stream_id == extra
    assert frame.payload.decode().startswith("too many streams")
    agent.receive_data(out)
    assert agent.events_received() == [StreamReset(extra, "too many streams (limit 2)")]
    assert not agent.is_open(extra)
    assert agent.open_streams == 2
    assert daemon.state is agent.state is State.OPEN


def test_max_streams_frees_a_slot_when_a_stream_closes() -> None:
    daemon, agent = connected(daemon_limits=Limits(max_streams=1))
    first = open_from(agent)
    pump(agent, daemon)
    agent.reset(first, "done")
    second = open_from(agent)
    events = pump(agent, daemon)
    assert events == [StreamReset(first, "done"), StreamOpened(second, 8080, DST, SRC, {})]
    assert daemon.data_to_send() == b""


def test_max_streams_on_the_agent() -> None:
    daemon, agent = connected(agent_limits=Limits(max_streams=1))
    s1 = open_from(daemon)
    s2 = open_from(daemon)
    events = pump(daemon, agent)
    assert events == [StreamOpened(s1, 8080, DST, SRC, {})]
    assert pump(agent, daemon) == [StreamReset(s2, "too many streams (limit 1)")]
