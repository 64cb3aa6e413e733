"""A StreamBridge between a fake socket and a protocol connection: flow control.

The agent's end of a tunnel carries a :class:`StreamBridge` on a fake transport; the
daemon's end is a plain :class:`Connection`. Bytes go between the two connections
through the protocol (so the daemon can never exceed a window the bridge did not
grant without a ProtocolError), and the CREDIT frames the bridge makes its
connection queue are decoded to see the window it grants.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from netmirror.tunnel import SOCKET_HIGH_WATER, StreamBridge, Tunnel
from netmirror.wire import (
    Connection,
    CreditGranted,
    DataReceived,
    Limits,
    StreamHalfClosed,
    StreamReset,
)
from netmirror.wire.frames import CREDIT, FrameType
from netmirror.wire.stats import PortStats
from tests.support.fake_transport import FakeTransport
from tests.unit.wire._support import DST, SRC, connected, parse_frames, pump

INITIAL = 4096
MAXIMUM = 32 * 1024
LIMITS = Limits(max_frame_size=1024, initial_window=INITIAL, max_window=MAXIMUM)


class IdleSocket:
    """The tunnel's websocket: never used, since nothing here runs the tunnel."""

    closed = False


class Pair:
    """A bridge on the agent's connection, one stream to the daemon's connection."""

    def __init__(self, limits: Limits = LIMITS, *, connect: bool = True) -> None:
        self.daemon, agent = connected(daemon_limits=limits, agent_limits=limits)
        self.sid = agent.open_stream(port=80, original_dst=DST, client=SRC)
        pump(agent, self.daemon)
        self.agent: Connection = agent
        self.tunnel = Tunnel(cast(Any, IdleSocket()), agent, handler=lambda e: None, name="t")
        self.stats = PortStats()
        self.bridge = StreamBridge(self.tunnel, self.stats, inbound=True, stream_id=self.sid)
        self.tunnel.attach(self.bridge)
        self.transport = FakeTransport(strict=True)
        self.credits: list[int] = []  # CREDIT amounts the bridge queued, in order
        self.to_daemon = bytearray()  # stream bytes the daemon received
        self.daemon_events: list[Any] = []
        if connect:
            self.bridge.connection_made(cast(Any, self.transport))

    # daemon -> socket

    def daemon_sends(self, size: int, fill: int = 0x61) -> int:
        """The daemon sends up to ``size`` bytes (as its window allows); returns how many."""
        payload = bytes([fill]) * size
        return self.daemon.send_data(self.sid, payload)

    def deliver_to_agent(self) -> list[int]:
        """Hand what the daemon queued to the agent, one DATA event at a time.

        Returns the window the bridge grants after each CREDIT it queued: the bytes
        the daemon may have outstanding, i.e. the daemon's send window once every
        byte written to the socket so far has been credited.
        """
        self.agent.receive_data(self.daemon.data_to_send())
        windows: list[int] = []
        for event in self.agent.events_received():
            if isinstance(event, DataReceived):
                self.bridge.on_data(event.data)
                for amount in self._take_credits():
                    self.credits.append(amount)
                    windows.append(self.window())
            else:
                raise AssertionError(f"unexpected event {event}")
        return windows

    def window(self) -> int:
        """initial + every credit - every byte the daemon sent (= daemon's send window)."""
        return INITIAL + sum(self.credits) - len(self.transport.written)

    def _take_credits(self) -> list[int]:
        """CREDIT amounts the agent queued since the last call; the frames go to the daemon."""
        out = self.agent.data_to_send()
        amounts: list[int] = []
        for frame in parse_frames(out):
            assert frame.stream_id == self.sid
            if frame.ftype == FrameType.CREDIT:
                amounts.append(CREDIT.unpack(frame.payload)[0])
        self._to_daemon(out)
        return amounts

    def _to_daemon(self, data: bytes) -> None:
        self.daemon.receive_data(data)
        for event in self.daemon.events_received():
            if isinstance(event, DataReceived):
                self.to_daemon += event.data
            elif not isinstance(event, CreditGranted):
                self.daemon_events.append(event)

    # socket -> daemon

    def flush_to_daemon(self) -> None:
        """Hand the daemon what the agent queued so far."""
        self._to_daemon(self.agent.data_to_send())

    def daemon_consumes(self, amount: int) -> None:
        """The daemon grants ``amount`` back; the agent hands the credit to the bridge."""
        self.daemon.grant(self.sid, amount)
        self.agent.receive_data(self.daemon.data_to_send())
        for event in self.agent.events_received():
            assert isinstance(event, CreditGranted), event
            self.bridge.on_credit()
        self.flush_to_daemon()


# --- the window the bridge grants ----------------------------------------------------


def test_the_window_starts_at_the_initial_window() -> None:
    pair = Pair()
    assert pair.daemon.send_window(pair.sid) == INITIAL
    assert pair.daemon_sends(INITIAL * 2) == INITIAL  # not a byte more
    assert pair.daemon.send_window(pair.sid) == 0


def test_the_window_doubles_while_the_socket_keeps_up_and_stops_at_the_maximum() -> None:
    pair = Pair()
    history: list[int] = []
    for _ in range(12):
        sent = pair.daemon_sends(pair.daemon.send_window(pair.sid))
        assert sent > 0
        history += pair.deliver_to_agent()
    # Each growing grant doubles the window, up to max_window and never beyond.
    assert history[:3] == [2 * INITIAL, 4 * INITIAL, 8 * INITIAL]
    assert 8 * INITIAL == MAXIMUM
    assert set(history[3:]) == {MAXIMUM}
    assert max(history) == MAXIMUM
    assert pair.transport.written == b"a" * len(pair.transport.written)
    # Everything written was credited at the last grant or is still being consumed.
    assert pair.daemon.send_window(pair.sid) == pair.window()
    assert pair.window() <= MAXIMUM


def test_the_first_grant_holds_what_was_consumed_plus_the_growth() -> None:
    pair = Pair()
    pair.daemon_sends(1024)
    assert pair.deliver_to_agent() == [2 * INITIAL]
    # The grant step is a quarter of the window: 1024 bytes consumed, INITIAL more room.
    assert pair.credits == [1024 + INITIAL]
    assert pair.daemon.send_window(pair.sid) == 2 * INITIAL


def test_less_than_a_grant_step_is_not_credited_yet() -> None:
    pair = Pair()
    pair.daemon_sends(1023)
    assert pair.deliver_to_agent() == []
    assert pair.credits == []
    assert pair.transport.written == b"a" * 1023
    pair.daemon_sends(1)
    assert pair.deliver_to_agent() == [2 * INITIAL]
    assert pair.credits == [1024 + INITIAL]


def test_a_max_window_below_the_initial_one_never_shrinks_or_grows_it() -> None:
    limits = Limits(max_frame_size=1024, initial_window=INITIAL, max_window=2048)
    pair = Pair(limits)
    for _ in range(5):
        pair.daemon_sends(pair.daemon.send_window(pair.sid))
        assert set(pair.deliver_to_agent()) <= {INITIAL}
    assert pair.credits and set(pair.credits) == {1024}
    assert pair.daemon.send_window(pair.sid) == INITIAL


def test_no_growth_while_the_socket_has_bytes_buffered() -> None:
    pair = Pair()
    pair.transport.buffered = 100  # the kernel did not take everything: behind
    for _ in range(6):
        pair.daemon_sends(pair.daemon.send_window(pair.sid))
        assert set(pair.deliver_to_agent()) == {INITIAL}
    # Credit gives back exactly what the socket took, nothing more.
    assert all(amount == 1024 for amount in pair.credits)
    assert sum(pair.credits) == len(pair.transport.written)


def test_growth_stops_when_the_socket_falls_behind_and_resumes_when_it_catches_up() -> None:
    pair = Pair()
    pair.daemon_sends(pair.daemon.send_window(pair.sid))
    assert pair.deliver_to_agent() == [2 * INITIAL, 4 * INITIAL]
    pair.transport.buffered = 1
    for _ in range(3):
        pair.daemon_sends(pair.daemon.send_window(pair.sid))
        assert set(pair.deliver_to_agent()) == {4 * INITIAL}
    pair.transport.buffered = 0
    pair.daemon_sends(pair.daemon.send_window(pair.sid))
    assert pair.deliver_to_agent()[0] == 8 * INITIAL


def test_no_credit_at_all_while_the_socket_asked_to_pause_writing() -> None:
    pair = Pair()
    pair.bridge.pause_writing()
    pair.daemon_sends(INITIAL)
    assert pair.deliver_to_agent() == []
    assert pair.credits == []
    assert pair.transport.written == b"a" * INITIAL  # written: the transport buffers it
    assert pair.daemon.send_window(pair.sid) == 0  # the daemon must wait
    pair.bridge.resume_writing()
    assert pair._take_credits() == [INITIAL]  # what was consumed, without growth
    assert pair.daemon.send_window(pair.sid) == INITIAL


def test_resume_writing_with_nothing_consumed_grants_nothing() -> None:
    pair = Pair()
    pair.bridge.pause_writing()
    pair.bridge.resume_writing()
    assert pair.agent.data_to_send() == b""


def test_bytes_before_the_socket_connects_are_credited_only_once_it_took_them() -> None:
    pair = Pair(connect=False)
    pair.daemon_sends(INITIAL)
    assert pair.deliver_to_agent() == []
    assert pair.credits == []
    assert pair.transport.written == b""
    pair.bridge.connection_made(cast(Any, pair.transport))
    assert pair.transport.written == b"a" * INITIAL
    assert pair.transport.high_water == SOCKET_HIGH_WATER
    # Credited as the socket took it (the last 1024 bytes wait for a grant step), and
    # the window grew twice: the socket took every write at once.
    assert pair._take_credits() == [1024 + INITIAL, 2048 + 2 * INITIAL]
    assert pair.daemon.send_window(pair.sid) == 4 * INITIAL - 1024


def test_the_bytes_reach_the_socket_in_order() -> None:
    pair = Pair()
    expected = bytearray()
    for n in range(40):
        size = pair.daemon.send_window(pair.sid)
        chunk = bytes([n]) * size
        assert pair.daemon.send_data(pair.sid, chunk) == size
        expected += chunk
        pair.deliver_to_agent()
    assert pair.transport.written == expected
    assert pair.stats.bytes_in == len(expected)


# --- reading from the socket ---------------------------------------------------------


def test_reading_pauses_when_the_send_window_is_used_up() -> None:
    pair = Pair()
    pair.bridge.data_received(b"x" * (INITIAL - 1))
    assert pair.transport.reading
    pair.bridge.data_received(b"yy")
    assert not pair.transport.reading
    assert pair.transport.pauses == 1
    pair.flush_to_daemon()
    assert pair.to_daemon == b"x" * (INITIAL - 1) + b"y"
    assert pair.agent.send_window(pair.sid) == 0


def test_reading_resumes_on_credit_once_the_backlog_is_sent() -> None:
    pair = Pair()
    pair.bridge.data_received(b"x" * (INITIAL + 10))
    assert not pair.transport.reading
    pair.flush_to_daemon()
    pair.daemon_consumes(5)  # not enough for the 10 waiting bytes
    assert not pair.transport.reading
    assert pair.to_daemon == b"x" * (INITIAL + 5)
    pair.daemon_consumes(5)
    assert pair.to_daemon == b"x" * (INITIAL + 10)
    # The backlog is gone: reading resumes, even with the window used up exactly...
    assert pair.transport.reading
    assert pair.transport.resumes == 1
    assert pair.agent.send_window(pair.sid) == 0
    # ...and the next read goes into a new backlog and pauses again.
    pair.bridge.data_received(b"next")
    assert not pair.transport.reading
    assert pair.transport.pauses == 2
    pair.daemon_consumes(4)
    assert pair.to_daemon == b"x" * (INITIAL + 10) + b"next"
    assert pair.transport.reading


def test_order_is_kept_across_a_backlog() -> None:
    pair = Pair()
    chunks = [bytes([n]) * 1500 for n in range(1, 9)]
    # Several reads arrive in the loop iteration that paused the socket.
    for chunk in chunks:
        pair.bridge.data_received(chunk)
    assert not pair.transport.reading
    pair.flush_to_daemon()
    assert len(pair.to_daemon) == INITIAL
    while len(pair.to_daemon) < 1500 * len(chunks):
        assert not pair.transport.reading  # paused as long as a backlog waits
        pair.daemon_consumes(700)
    assert pair.to_daemon == b"".join(chunks)
    assert pair.stats.bytes_out == 1500 * len(chunks)
    assert pair.transport.reading
    assert pair.transport.pauses == 1


def test_eof_waits_for_the_backlog() -> None:
    pair = Pair()
    pair.bridge.data_received(b"z" * (INITIAL + 100))
    assert pair.bridge.eof_received() is True  # half-close: keep the socket for writing
    pair.flush_to_daemon()
    assert pair.daemon_events == []  # no SHUTDOWN before the last byte
    pair.daemon_consumes(100)
    assert pair.to_daemon == b"z" * (INITIAL + 100)
    assert pair.daemon_events == [StreamHalfClosed(pair.sid)]
    assert not pair.transport.closed  # the daemon may still answer


def test_the_stream_closes_when_both_sides_are_done() -> None:
    pair = Pair()
    pair.bridge.data_received(b"ping")
    pair.bridge.eof_received()
    pair.flush_to_daemon()
    assert pair.daemon_events == [StreamHalfClosed(pair.sid)]
    assert not pair.transport.closed
    pair.daemon.send_data(pair.sid, b"pong")
    pair.daemon.shutdown(pair.sid)
    pair.agent.receive_data(pair.daemon.data_to_send())
    for event in pair.agent.events_received():
        if isinstance(event, DataReceived):
            pair.bridge.on_data(event.data)
        elif isinstance(event, StreamHalfClosed):
            pair.bridge.on_half_closed()
    assert pair.transport.written == b"pong"
    assert pair.transport.eof_written and pair.transport.closed
    assert not pair.agent.is_open(pair.sid)


def test_a_reset_while_paused_aborts_the_socket() -> None:
    pair = Pair()
    pair.bridge.data_received(b"x" * (INITIAL * 2))
    assert not pair.transport.reading
    pair.daemon.reset(pair.sid, "gone")
    pair.agent.receive_data(pair.daemon.data_to_send())
    (event,) = pair.agent.events_received()
    assert isinstance(event, StreamReset)
    pair.bridge.on_reset(event.reason)
    assert pair.transport.aborted
    assert pair.stats.errors == 1 and pair.stats.last_error == "gone"
    assert pair.sid not in pair.tunnel.bridges
    assert pair.stats.connections_open == 0


@pytest.mark.parametrize("exc", [None, ConnectionResetError("boom")])
def test_the_socket_closing_early_resets_the_stream(exc: Exception | None) -> None:
    pair = Pair()
    pair.bridge.data_received(b"half")
    pair.bridge.connection_lost(exc)
    pair.flush_to_daemon()
    assert pair.to_daemon == b"half"
    (event,) = pair.daemon_events
    assert isinstance(event, StreamReset)
    assert event.reason.startswith("local socket closed")
    assert pair.stats.errors == (0 if exc is None else 1)
    assert pair.sid not in pair.tunnel.bridges
