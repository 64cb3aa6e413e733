"""Per-stream windows: send_data takes what fits, CREDIT reopens, violations close."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from netmirror.wire import (
    Connection,
    CreditGranted,
    DataReceived,
    Limits,
    State,
    StreamHalfClosed,
)
from netmirror.wire.frames import MAX_WINDOW, FrameType

from ._support import (
    DST,
    SRC,
    connected,
    credit,
    data,
    expect_violation,
    parse_frames,
    pump,
    raw,
    shutdown,
    single_frame,
)

WINDOW = 4096


def pair(
    daemon_window: int = WINDOW, agent_window: int = WINDOW
) -> tuple[Connection, Connection, int]:
    """(agent, daemon, stream opened by the agent and seen by the daemon)."""
    daemon, agent = connected(
        daemon_limits=Limits(initial_window=daemon_window, max_frame_size=1024),
        agent_limits=Limits(initial_window=agent_window, max_frame_size=1024),
    )
    sid = agent.open_stream(port=80, original_dst=DST, client=SRC)
    pump(agent, daemon)
    return agent, daemon, sid


def received(events: Sequence[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived))


# --------------------------------------------------------------- local window


def test_initial_windows_come_from_the_peer() -> None:
    agent, daemon, sid = pair(daemon_window=1000, agent_window=3000)
    assert agent.send_window(sid) == 1000  # what the daemon lets the agent send
    assert daemon.send_window(sid) == 3000  # what the agent lets the daemon send


def test_send_data_takes_at_most_the_window() -> None:
    agent, daemon, sid = pair()
    assert agent.send_data(sid, b"a" * 1000) == 1000
    assert agent.send_window(sid) == WINDOW - 1000
    assert agent.send_data(sid, b"b" * 10_000) == WINDOW - 1000
    assert agent.send_window(sid) == 0
    assert agent.send_data(sid, b"c") == 0
    assert agent.send_data(sid, b"c" * 10_000) == 0
    out = agent.data_to_send()
    assert sum(len(f.payload) for f in parse_frames(out)) == WINDOW
    daemon.receive_data(out)
    assert received(daemon.events_received()) == b"a" * 1000 + b"b" * (WINDOW - 1000)
    assert daemon.state is State.OPEN


def test_window_of_one_byte() -> None:
    agent, daemon, sid = pair(daemon_window=1)
    assert agent.send_data(sid, b"xyz") == 1
    assert agent.send_data(sid, b"yz") == 0
    assert pump(agent, daemon) == [DataReceived(sid, b"x")]
    daemon.grant(sid, 1)
    assert pump(daemon, agent) == [CreditGranted(sid, 1, 1)]
    assert agent.send_data(sid, b"yz") == 1
    assert pump(agent, daemon) == [DataReceived(sid, b"y")]


def test_credit_granted_reopens_the_window() -> None:
    agent, daemon, sid = pair()
    assert agent.send_data(sid, b"x" * WINDOW) == WINDOW
    pump(agent, daemon)
    daemon.grant(sid, 1500)
    out = daemon.data_to_send()
    frame = single_frame(out)
    assert (frame.ftype, frame.stream_id, frame.payload) == (
        FrameType.CREDIT,
        sid,
        (1500).to_bytes(4, "big"),
    )
    agent.receive_data(out)
    assert agent.events_received() == [CreditGranted(sid, 1500, 1500)]
    assert agent.send_window(sid) == 1500
    assert agent.send_data(sid, b"y" * 2000) == 1500
    daemon.grant(sid, 100)
    daemon.grant(sid, 200)
    assert pump(daemon, agent) == [CreditGranted(sid, 100, 100), CreditGranted(sid, 200, 300)]
    assert agent.send_window(sid) == 300


def test_windows_are_per_stream_and_per_direction() -> None:
    agent, daemon, s1 = pair()
    s2 = agent.open_stream(port=81, original_dst=DST, client=SRC)
    pump(agent, daemon)
    assert agent.send_data(s1, b"1" * WINDOW) == WINDOW
    assert agent.send_window(s2) == WINDOW
    assert daemon.send_window(s1) == WINDOW
    assert agent.send_data(s2, b"2" * 10) == 10
    events = pump(agent, daemon)
    assert [(e.stream_id, len(e.data)) for e in events if isinstance(e, DataReceived)] == [
        (s1, 1024),
        (s1, 1024),
        (s1, 1024),
        (s1, 1024),
        (s2, 10),
    ]


def test_send_window_of_unknown_or_shut_stream_is_zero() -> None:
    agent, daemon, sid = pair()
    assert agent.send_window(999) == 0
    agent.shutdown(sid)
    assert agent.send_window(sid) == 0
    assert daemon.send_window(sid) == WINDOW


# ------------------------------------------------------------------- granting


@pytest.mark.parametrize("amount", [0, -1, -(2**40)])
def test_grant_of_nothing_is_a_no_op(amount: int) -> None:
    _agent, daemon, sid = pair()
    daemon.grant(sid, amount)
    assert daemon.data_to_send() == b""


def test_grant_for_unknown_stream_is_a_no_op() -> None:
    _agent, daemon, _sid = pair()
    daemon.grant(77, 10)
    daemon.grant(0, 10)
    assert daemon.data_to_send() == b""


def test_grant_is_capped_at_the_largest_window() -> None:
    agent, daemon, sid = pair(daemon_window=MAX_WINDOW - 10)
    daemon.grant(sid, 2**40)
    assert pump(daemon, agent) == [CreditGranted(sid, 10, MAX_WINDOW)]
    daemon.grant(sid, 1)
    assert daemon.data_to_send() == b""


def test_grant_at_full_window_is_a_no_op() -> None:
    _agent, daemon, sid = pair(daemon_window=MAX_WINDOW)
    daemon.grant(sid, 5)
    assert daemon.data_to_send() == b""


def test_grant_after_peer_shutdown_is_a_no_op() -> None:
    agent, daemon, sid = pair()
    agent.send_data(sid, b"x" * 100)
    agent.shutdown(sid)
    assert pump(agent, daemon) == [DataReceived(sid, b"x" * 100), StreamHalfClosed(sid)]
    daemon.grant(sid, 100)
    assert daemon.data_to_send() == b""
    assert daemon.pending_output == 0


def test_grant_after_local_reset_is_a_no_op() -> None:
    _agent, daemon, sid = pair()
    daemon.reset(sid, "x")
    daemon.data_to_send()
    daemon.grant(sid, 100)
    assert daemon.data_to_send() == b""


def test_credit_after_own_shutdown_is_silent() -> None:
    agent, daemon, sid = pair()
    agent.shutdown(sid)
    pump(agent, daemon)
    agent.receive_data(credit(sid, 10))
    assert agent.events_received() == []
    assert agent.state is State.OPEN
    assert agent.send_window(sid) == 0


# ------------------------------------------------------------- peer violations


def test_peer_sending_exactly_the_window_is_fine() -> None:
    _agent, daemon, sid = pair()
    daemon.receive_data(b"".join(data(sid, b"d" * 1024) for _ in range(4)))
    assert len(received(daemon.events_received())) == WINDOW
    assert daemon.state is State.OPEN


def test_peer_sending_beyond_the_window_in_one_frame() -> None:
    _agent, daemon, sid = pair(daemon_window=1000)
    expect_violation(daemon, data(sid, b"d" * 1001), "window of 1000")


def test_peer_sending_beyond_the_window_over_frames() -> None:
    _agent, daemon, sid = pair()
    frames = b"".join(data(sid, b"d" * 1024) for _ in range(4))
    expect_violation(daemon, frames + data(sid, b"!"), "window of 0")
    assert len(received(daemon.events_received())) == WINDOW


def test_peer_sending_beyond_the_granted_window() -> None:
    _agent, daemon, sid = pair()
    daemon.receive_data(b"".join(data(sid, b"d" * 1024) for _ in range(4)))
    daemon.grant(sid, 10)
    daemon.receive_data(data(sid, b"e" * 10))
    expect_violation(daemon, data(sid, b"f"), "window")


def test_agent_checks_the_window_of_daemon_streams() -> None:
    daemon, agent = connected(agent_limits=Limits(initial_window=2000))
    sid = daemon.open_stream(port=80, original_dst=DST, client=SRC)
    pump(daemon, agent)
    agent.receive_data(data(sid, b"a" * 1500))
    expect_violation(agent, data(sid, b"a" * 501), "window of 500")


@pytest.mark.parametrize("size", [0, 1, 3, 5, 8, 1024])
def test_credit_of_wrong_size(size: int) -> None:
    agent, _daemon, sid = pair()
    expect_violation(agent, raw(FrameType.CREDIT, sid, b"\x01" * size), "4 bytes")


def test_credit_of_zero() -> None:
    agent, _daemon, sid = pair()
    expect_violation(agent, credit(sid, 0), "CREDIT of 0")


def test_credit_of_zero_for_a_closed_stream_is_still_an_error() -> None:
    agent, daemon, sid = pair()
    agent.reset(sid, "x")
    pump(agent, daemon)
    expect_violation(agent, credit(sid, 0), "CREDIT of 0")


def test_credit_up_to_the_largest_window() -> None:
    agent, _daemon, sid = pair()
    agent.receive_data(credit(sid, MAX_WINDOW - WINDOW))
    assert agent.events_received() == [CreditGranted(sid, MAX_WINDOW - WINDOW, MAX_WINDOW)]
    assert agent.send_window(sid) == MAX_WINDOW


@pytest.mark.parametrize(
    "amounts",
    [[MAX_WINDOW - WINDOW + 1], [2**32 - 1], [MAX_WINDOW - WINDOW, 1], [2**30, 2**30]],
    ids=["just-over", "u32-max", "two-steps", "halves"],
)
def test_credit_overflowing_the_window(amounts: list[int]) -> None:
    agent, _daemon, sid = pair()
    frames = b"".join(credit(sid, amount) for amount in amounts)
    expect_violation(agent, frames, "overflows")


def test_credit_overflow_on_a_half_closed_stream() -> None:
    agent, daemon, sid = pair()
    agent.shutdown(sid)
    pump(agent, daemon)
    expect_violation(agent, credit(sid, MAX_WINDOW), "overflows")


def test_credit_after_reset_is_dropped() -> None:
    agent, daemon, sid = pair()
    daemon.grant(sid, 10)
    agent.reset(sid, "x")
    assert pump(daemon, agent) == []
    assert agent.state is State.OPEN
    # Even an amount that would overflow a live window.
    agent.receive_data(credit(sid, 2**32 - 1))
    assert agent.events_received() == []


def test_data_of_a_shut_stream_does_not_use_the_window() -> None:
    _agent, daemon, sid = pair()
    daemon.receive_data(shutdown(sid))
    daemon.events_received()
    expect_violation(daemon, data(sid, b"x"), "after SHUTDOWN")
