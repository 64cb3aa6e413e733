"""A MirrorCopy on the agent's end of a tunnel, with the daemon's end as a plain Connection.

The copy never pushes back on the real traffic: it holds what the daemon has no
credit for, up to MAX_PENDING bytes, and is dropped (counted, reset) beyond that.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from netmirror.agent.mirror import copy as copy_module
from netmirror.agent.mirror.copy import MAX_PENDING, MirrorCopy
from netmirror.tunnel import Tunnel
from netmirror.wire import (
    Connection,
    CreditGranted,
    DataReceived,
    Limits,
    StreamHalfClosed,
    StreamOpened,
    StreamReset,
)
from netmirror.wire.kinds import StreamKind, stream_info, stream_kind
from netmirror.wire.stats import MirrorCounters, PortStats
from tests.unit.wire._support import DST, SRC, connected

WINDOW = 4096
LIMITS = Limits(max_frame_size=1024, initial_window=WINDOW)
DROP_REASON = "the local copy fell behind the real traffic; copy dropped"
MIB = 1024 * 1024


class IdleSocket:
    closed = False


class Daemon:
    """The daemon's end: collects what arrives on the copy's stream."""

    def __init__(self, conn: Connection, agent: Connection) -> None:
        self.conn = conn
        self.agent = agent
        self.received = bytearray()
        self.events: list[Any] = []
        self.opened: list[StreamOpened] = []

    def take(self) -> None:
        """Receive everything the agent queued."""
        self.conn.receive_data(self.agent.data_to_send())
        for event in self.conn.events_received():
            if isinstance(event, DataReceived):
                self.received += event.data
            elif isinstance(event, StreamOpened):
                self.opened.append(event)
            else:
                self.events.append(event)

    def consume(self, copy: MirrorCopy, amount: int) -> None:
        """Grant ``amount`` back; the agent's tunnel hands the credit to the copy."""
        self.conn.grant(copy.stream_id, amount)
        self.agent.receive_data(self.conn.data_to_send())
        for event in self.agent.events_received():
            assert isinstance(event, CreditGranted), event
            copy.on_credit()
        self.take()


def setup() -> tuple[MirrorCopy, Daemon, PortStats, MirrorCounters, Tunnel]:
    daemon_conn, agent = connected(daemon_limits=LIMITS, agent_limits=LIMITS)
    tunnel = Tunnel(cast(Any, IdleSocket()), agent, handler=lambda e: None, name="t")
    stats, counters = PortStats(), MirrorCounters()
    copy = MirrorCopy(
        tunnel,
        stats,
        counters,
        port=8080,
        original_dst=DST,
        client=SRC,
        info=stream_info(StreamKind.MIRROR, mirror="capture", partial=False),
    )
    daemon = Daemon(daemon_conn, agent)
    daemon.take()
    return copy, daemon, stats, counters, tunnel


def test_the_copy_opens_a_mirror_stream() -> None:
    copy, daemon, stats, _, tunnel = setup()
    (opened,) = daemon.opened
    assert opened.stream_id == copy.stream_id
    assert (opened.port, opened.original_dst, opened.client) == (8080, DST, SRC)
    assert stream_kind(opened.info) is StreamKind.MIRROR
    assert tunnel.bridges[copy.stream_id] is copy
    assert stats.connections_open == 1 and stats.connections_total == 1


# --- falling behind ------------------------------------------------------------------


def test_a_copy_fed_faster_than_credit_is_dropped_beyond_max_pending() -> None:
    copy, daemon, stats, counters, tunnel = setup()
    chunk = bytes(range(256)) * (MIB // 256)
    fed = 0
    while not copy.done:
        copy.feed(chunk)
        fed += len(chunk)
        assert fed < MAX_PENDING + WINDOW + 2 * MIB, "never dropped"
    # Dropped on the first feed that left more than MAX_PENDING waiting.
    assert fed - WINDOW > MAX_PENDING >= fed - len(chunk) - WINDOW
    assert counters.dropped == 1
    assert stats.errors == 1 and stats.last_error == DROP_REASON
    assert copy.stream_id not in tunnel.bridges
    assert stats.connections_open == 0
    daemon.take()
    # The daemon got what its window allowed, then the reset with the reason.
    assert daemon.received == chunk[:WINDOW]
    assert daemon.events == [StreamReset(copy.stream_id, DROP_REASON)]
    assert not tunnel.conn.is_open(copy.stream_id)


def test_exactly_max_pending_waiting_is_kept_one_more_byte_is_not() -> None:
    copy, _, stats, counters, _ = setup()
    copy.feed(b"a" * (WINDOW + MIB))
    block = b"b" * MIB
    for _ in range(MAX_PENDING // MIB - 1):
        copy.feed(block)
    assert not copy.done  # MAX_PENDING bytes wait: at the limit, not over it
    assert counters.dropped == 0
    copy.feed(b"c")
    assert copy.done
    assert counters.dropped == 1
    assert stats.bytes_in == WINDOW + MAX_PENDING + 1


def test_feeds_after_the_drop_are_ignored() -> None:
    copy, daemon, stats, counters, tunnel = setup()
    copy.feed(b"x" * (MAX_PENDING + WINDOW + 1))
    assert copy.done and counters.dropped == 1
    daemon.take()
    counted = stats.bytes_in
    copy.feed(b"late bytes")
    copy.feed(memoryview(b"more late bytes"))
    copy.finish()
    copy.abort("again")
    copy.on_credit()
    assert stats.bytes_in == counted
    assert counters.dropped == 1  # counted once
    assert stats.errors == 1
    assert tunnel.conn.data_to_send() == b""  # no DATA, SHUTDOWN or second RESET
    assert tunnel.conn.pending_output == 0


def test_credit_that_keeps_the_backlog_below_the_limit_saves_the_copy() -> None:
    copy, daemon, _, counters, _ = setup()
    block = b"q" * MIB
    for _ in range(MAX_PENDING // MIB):
        copy.feed(block)
    assert not copy.done
    daemon.take()
    daemon.consume(copy, 2 * MIB)  # the daemon catches up a little
    for _ in range(2):
        copy.feed(block)
    assert not copy.done
    assert counters.dropped == 0
    copy.feed(block)
    assert copy.done and counters.dropped == 1


def test_a_drop_is_counted_per_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copy_module, "MAX_PENDING", 10_000)
    copy, _, _, counters, tunnel = setup()
    second = MirrorCopy(
        tunnel,
        copy.stats,
        counters,
        port=8080,
        original_dst=DST,
        client=("10.0.0.3", 1234),
        info=stream_info(StreamKind.MIRROR),
    )
    copy.feed(b"1" * (WINDOW + 10_001))
    assert copy.done and not second.done
    second.feed(b"2" * (WINDOW + 10_000))
    assert not second.done
    second.feed(b"2")
    assert second.done
    assert counters.dropped == 2


# --- keeping up ----------------------------------------------------------------------


def test_a_copy_within_the_limit_delivers_every_byte_in_order_then_half_closes() -> None:
    copy, daemon, stats, counters, tunnel = setup()
    expected = bytearray()
    granted = 0
    for n in range(60):
        chunk = bytes([n]) * (500 + 37 * n)
        copy.feed(chunk if n % 2 else memoryview(chunk))
        expected += chunk
        daemon.take()
        if n % 3 == 0 and len(daemon.received) > granted:
            # The daemon grants back what it consumed so far: less than what is fed.
            amount = len(daemon.received) - granted
            granted += amount
            daemon.consume(copy, amount)
    assert len(daemon.received) < len(expected)
    copy.finish()
    assert not copy.done  # bytes still wait for credit: no SHUTDOWN yet
    daemon.take()
    assert StreamHalfClosed(copy.stream_id) not in daemon.events
    while not copy.done:
        daemon.consume(copy, 3000)
    assert daemon.received == expected
    assert daemon.events == [StreamHalfClosed(copy.stream_id)]
    assert counters.dropped == 0
    assert stats.errors == 0
    assert stats.bytes_in == len(expected)
    assert copy.stream_id not in tunnel.bridges


def test_finish_with_nothing_waiting_half_closes_at_once() -> None:
    copy, daemon, _, counters, tunnel = setup()
    copy.feed(b"GET / HTTP/1.1\r\n\r\n")
    copy.finish()
    assert copy.done
    daemon.take()
    assert daemon.received == b"GET / HTTP/1.1\r\n\r\n"
    assert daemon.events == [StreamHalfClosed(copy.stream_id)]
    copy.feed(b"after the end")
    assert tunnel.conn.data_to_send() == b""
    assert counters.dropped == 0


def test_the_daemon_resetting_the_copy_ends_it_quietly() -> None:
    copy, daemon, stats, counters, tunnel = setup()
    copy.feed(b"x" * (WINDOW + 100))
    daemon.take()
    daemon.conn.reset(copy.stream_id, "no local process")
    tunnel.conn.receive_data(daemon.conn.data_to_send())
    (event,) = tunnel.conn.events_received()
    assert isinstance(event, StreamReset)
    copy.on_reset(event.reason)
    assert copy.done
    assert stats.last_error == "local copy: no local process"
    assert counters.dropped == 0  # reset, not dropped
    copy.feed(b"more")
    copy.finish()
    assert tunnel.conn.data_to_send() == b""
    assert copy.stream_id not in tunnel.bridges


def test_the_copy_never_pauses_its_source() -> None:
    copy, daemon, _, _, _ = setup()
    copy.pause_for_output()  # what the tunnel calls when its output is behind
    copy.feed(b"y" * (WINDOW * 3))
    assert not copy.done
    daemon.take()
    assert len(daemon.received) == WINDOW
    daemon.consume(copy, WINDOW * 2)
    assert daemon.received == b"y" * (WINDOW * 3)
