"""Output cut into transport messages on frame boundaries; large payloads not copied."""

from __future__ import annotations

import pytest

from netmirror.wire import Connection, DataReceived, Limits, StreamHalfClosed
from netmirror.wire.frames import HEADER_SIZE, FrameType

from ._support import DST, SRC, connected, data, parse_frames, pump, stream_bytes

FRAME = 4096


def pair() -> tuple[Connection, Connection, int]:
    """(agent, daemon, stream opened by the agent), with room for large payloads."""
    limits = Limits(initial_window=1 << 20, max_frame_size=FRAME)
    daemon, agent = connected(daemon_limits=limits, agent_limits=limits)
    sid = agent.open_stream(port=80, original_dst=DST, client=SRC)
    pump(agent, daemon)
    return agent, daemon, sid


def test_small_output_is_one_message() -> None:
    agent, _daemon, sid = pair()
    agent.send_data(sid, b"hello")
    agent.shutdown(sid)
    messages = agent.messages_to_send(1024)
    assert len(messages) == 1
    assert [f.ftype for f in parse_frames(messages[0])] == [FrameType.DATA, FrameType.SHUTDOWN]
    assert agent.pending_output == 0
    assert agent.messages_to_send(1024) == []


@pytest.mark.parametrize("size", [FRAME + HEADER_SIZE, 3 * FRAME, 10_000, 100_000])
def test_every_message_holds_whole_frames(size: int) -> None:
    agent, daemon, sid = pair()
    payload = bytes(range(256)) * 400  # 102,400 bytes: 25 frames of FRAME
    assert agent.send_data(sid, payload) == len(payload)
    agent.shutdown(sid)
    queued = agent.pending_output
    messages = agent.messages_to_send(size)
    assert sum(len(m) for m in messages) == queued
    assert len(messages) > 1
    for message in messages:
        frames = parse_frames(message)  # raises if a frame were cut
        assert frames
        assert len(message) <= size or len(frames) == 1
    # Fed one by one, the peer gets the bytes back in order.
    assert stream_bytes(daemon, messages) == payload


def test_a_frame_larger_than_the_message_size_goes_alone() -> None:
    agent, _daemon, sid = pair()
    agent.send_data(sid, b"x" * FRAME)
    agent.send_data(sid, b"y")
    messages = agent.messages_to_send(100)
    assert [len(m) for m in messages] == [HEADER_SIZE + FRAME, HEADER_SIZE + 1]


def test_messages_and_whole_output_agree() -> None:
    one, _, sid1 = pair()
    two, _, sid2 = pair()
    for conn, sid in ((one, sid1), (two, sid2)):
        conn.send_data(sid, b"a" * 5000)
        conn.grant(sid, 10)
        conn.send_data(sid, b"b" * 3)
        conn.reset(sid, "bye")
    assert b"".join(one.messages_to_send(FRAME)) == two.data_to_send()


def test_large_payloads_of_immutable_messages_are_views() -> None:
    agent, daemon, sid = pair()
    agent.send_data(sid, b"z" * FRAME)
    (message,) = agent.messages_to_send(1 << 20)
    daemon.receive_data(message)
    (event,) = daemon.events_received()
    assert isinstance(event, DataReceived)
    assert isinstance(event.data, memoryview)
    assert event.data.readonly
    assert event.data == b"z" * FRAME


def test_small_payloads_are_copied() -> None:
    """A view would keep the whole message alive for a few bytes."""
    agent, daemon, sid = pair()
    agent.send_data(sid, b"small")
    agent.send_data(sid, b"w" * FRAME)
    daemon.receive_data(b"".join(agent.messages_to_send(1 << 20)))
    first, second = daemon.events_received()
    assert isinstance(first, DataReceived) and type(first.data) is bytes
    assert first.data == b"small"
    assert isinstance(second, DataReceived) and isinstance(second.data, memoryview)


def test_payloads_of_a_reused_buffer_are_copied() -> None:
    """The caller may overwrite a bytearray after the call: nothing may point into it."""
    agent, daemon, sid = pair()
    agent.send_data(sid, b"q" * FRAME)
    agent.shutdown(sid)
    buf = bytearray(agent.data_to_send())
    daemon.receive_data(buf)
    received, closed = daemon.events_received()
    buf[:] = b"\0" * len(buf)
    assert isinstance(received, DataReceived) and type(received.data) is bytes
    assert received.data == b"q" * FRAME
    assert isinstance(closed, StreamHalfClosed)


def test_a_frame_split_across_messages_is_reassembled() -> None:
    _agent, daemon, sid = pair()
    wire = data(sid, b"split" * 100)
    daemon.receive_data(wire[:7])
    daemon.receive_data(wire[7:300])
    assert daemon.events_received() == []
    daemon.receive_data(wire[300:])
    (event,) = daemon.events_received()
    assert isinstance(event, DataReceived)
    assert event.data == b"split" * 100
