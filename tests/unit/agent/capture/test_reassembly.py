"""The sans-I/O TCP reassembler: ordering, duplicates, wraparound, gaps and limits."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from netmirror.agent.capture.packets import FIN, RST, SYN, Segment, parse
from netmirror.agent.capture.reassembly import (
    ENDED_MEMORY,
    SEQ_MASK,
    FlowClosed,
    FlowData,
    FlowEvent,
    FlowGap,
    FlowKey,
    FlowOpened,
    Reassembler,
    seq_diff,
)

ACK = 0x10
PSH = 0x08
KEY: FlowKey = ("10.0.0.1", 40000, "10.0.0.2", 8080)
KEY6: FlowKey = ("fd00::1", 40001, "fd00::2", 8080)
ISN = 1000
WRAP_ISN = 0xFFFFFFF0
STREAM = b"abcdefghijklmnopqrstuvwxyz0123456789"

FUZZ = settings(
    deadline=None,
    database=None,
    max_examples=250,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def seg(seq: int, payload: bytes = b"", flags: int = ACK, key: FlowKey = KEY) -> Segment:
    """A segment built directly."""
    return Segment(key[0], key[1], key[2], key[3], seq & SEQ_MASK, flags, memoryview(payload))


def wire(seq: int, payload: bytes = b"", flags: str = "A", key: FlowKey = KEY) -> Segment:
    """A segment crafted with scapy, then parsed like a captured packet."""
    ip = IPv6 if ":" in key[0] else IP
    packet = ip(src=key[0], dst=key[2]) / TCP(
        sport=key[1], dport=key[3], seq=seq & SEQ_MASK, flags=flags
    )
    if payload:
        packet = packet / Raw(payload)
    parsed = parse(memoryview(bytes(packet)))
    assert parsed is not None
    return parsed


def at(
    offset: int, payload: bytes = b"", flags: int = ACK, isn: int = ISN, key: FlowKey = KEY
) -> Segment:
    """The segment carrying stream byte ``offset`` onwards (byte 0 is at isn + 1)."""
    return seg(isn + 1 + offset, payload, flags, key)


def data_of(events: Sequence[FlowEvent], key: FlowKey = KEY) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, FlowData) and e.key == key)


def opened(r: Reassembler, isn: int = ISN, key: FlowKey = KEY, now: float = 0.0) -> None:
    r.feed(seg(isn, flags=SYN, key=key), now)
    assert r.events() == [FlowOpened(key, False)]


# --- ordering ----------------------------------------------------------------------


def test_seq_diff() -> None:
    assert seq_diff(5, 3) == 2
    assert seq_diff(3, 5) == -2
    assert seq_diff(2, 0xFFFFFFFE) == 4
    assert seq_diff(0xFFFFFFFE, 2) == -4


def test_in_order_scapy_packets() -> None:
    r = Reassembler()
    r.feed(wire(ISN, flags="S"), 0.0)
    r.feed(wire(ISN + 1, b"GET / HTTP/1.1\r\n", "PA"), 0.1)
    r.feed(wire(ISN + 17, b"Host: x\r\n\r\n", "PA"), 0.2)
    r.feed(wire(ISN + 28, flags="FA"), 0.3)
    assert r.events() == [
        FlowOpened(KEY, False),
        FlowData(KEY, b"GET / HTTP/1.1\r\n"),
        FlowData(KEY, b"Host: x\r\n\r\n"),
        FlowClosed(KEY, "fin"),
    ]
    assert len(r) == 0


def test_in_order_ipv6_scapy_packets() -> None:
    r = Reassembler()
    r.feed(wire(ISN, flags="S", key=KEY6), 0.0)
    r.feed(wire(ISN + 1, b"hello", "PA", key=KEY6), 0.0)
    r.feed(wire(ISN + 6, b" world", "FPA", key=KEY6), 0.0)
    assert r.events() == [
        FlowOpened(KEY6, False),
        FlowData(KEY6, b"hello"),
        FlowData(KEY6, b" world"),
        FlowClosed(KEY6, "fin"),
    ]


def test_data_is_copied_out_of_the_capture_buffer() -> None:
    r = Reassembler()
    opened(r)
    buf = bytearray(b"first")
    r.feed(Segment(*KEY[:2], *KEY[2:], ISN + 1, ACK, memoryview(buf)), 0.0)
    buf[:] = b"XXXXX"  # the capture buffer is reused
    held = bytearray(b"later")
    r.feed(Segment(*KEY[:2], *KEY[2:], ISN + 1 + 10, ACK, memoryview(held)), 0.0)
    held[:] = b"YYYYY"
    r.feed(at(5, b"-mid-"), 0.0)
    assert data_of(r.events()) == b"first-mid-later"


def test_out_of_order() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(6, b"ghi"), 0.0)
    r.feed(at(3, b"def"), 0.0)
    assert r.events() == []
    r.feed(at(0, b"abc"), 0.0)
    assert r.events() == [
        FlowData(KEY, b"abc"),
        FlowData(KEY, b"def"),
        FlowData(KEY, b"ghi"),
    ]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_every_order_of_four_segments(order: tuple[int, ...]) -> None:
    r = Reassembler()
    opened(r)
    chunks = [STREAM[i * 9 : i * 9 + 9] for i in range(4)]
    for i in order:
        r.feed(at(i * 9, chunks[i]), 0.0)
    assert data_of(r.events()) == STREAM


def test_retransmissions_are_delivered_once() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(0, b"abc"), 0.0)
    r.feed(at(0, b"abc"), 0.1)
    r.feed(at(6, b"ghi"), 0.2)
    r.feed(at(6, b"ghi"), 0.3)  # duplicate of a held segment
    r.feed(at(3, b"def"), 0.4)
    r.feed(at(3, b"def"), 0.5)
    r.feed(at(6, b"ghi"), 0.6)
    assert data_of(r.events()) == b"abcdefghi"
    assert r.counters.duplicate_bytes == 12


def test_overlap_with_the_delivered_prefix() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(0, b"abcd"), 0.0)
    r.feed(at(2, b"cdef"), 0.0)  # first half already delivered
    r.feed(at(1, b"bc"), 0.0)  # entirely inside
    assert r.events() == [FlowData(KEY, b"abcd"), FlowData(KEY, b"ef")]
    assert r.counters.duplicate_bytes == 4


def test_overlaps_at_both_ends_of_held_segments() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(0, STREAM[0:4]), 0.0)
    r.feed(at(6, STREAM[6:10]), 0.0)  # X
    r.feed(at(8, STREAM[8:14]), 0.0)  # overlaps the end of X
    r.feed(at(5, STREAM[5:7]), 0.0)  # overlaps the start of X
    r.feed(at(9, STREAM[9:11]), 0.0)  # inside
    assert data_of(r.events()) == STREAM[:4]
    r.feed(at(3, STREAM[3:6]), 0.0)  # overlaps the delivered prefix and the next held one
    events = r.events()
    assert data_of(events) == STREAM[4:14]
    assert sum(len(e.data) for e in events if isinstance(e, FlowData)) == 10
    r.feed(at(14, STREAM[14:20]), 0.0)
    assert data_of(r.events()) == STREAM[14:20]


def test_held_segment_replaced_by_a_longer_one_at_the_same_seq() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(4, STREAM[4:6]), 0.0)
    r.feed(at(4, STREAM[4:10]), 0.0)
    r.feed(at(4, STREAM[4:8]), 0.0)
    r.feed(at(0, STREAM[0:4]), 0.0)
    assert data_of(r.events()) == STREAM[:10]


def test_overlap_resolved_while_draining_counts_duplicate_bytes() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(4, STREAM[4:10]), 0.0)
    r.feed(at(6, STREAM[6:12]), 0.0)  # 4 bytes overlap the previous held segment
    r.feed(at(0, STREAM[0:4]), 0.0)
    assert data_of(r.events()) == STREAM[:12]
    assert r.counters.duplicate_bytes == 4


# --- sequence wraparound -------------------------------------------------------------


@pytest.mark.parametrize("isn", [WRAP_ISN, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFF8])
@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1), (1, 3, 0, 2)])
def test_wraparound(isn: int, order: tuple[int, ...]) -> None:
    r = Reassembler()
    opened(r, isn)
    chunks = [STREAM[i * 9 : i * 9 + 9] for i in range(4)]
    for i in order:
        r.feed(at(i * 9, chunks[i], isn=isn), 0.0)
    r.feed(at(36, flags=FIN | ACK, isn=isn), 0.0)
    events = r.events()
    assert data_of(events) == STREAM
    assert events[-1] == FlowClosed(KEY, "fin")


def test_wraparound_with_scapy_packets_out_of_order() -> None:
    r = Reassembler()
    r.feed(wire(WRAP_ISN, flags="S"), 0.0)
    r.feed(wire(WRAP_ISN + 1 + 20, STREAM[20:30], "FPA"), 0.0)  # seq 5 after the wrap
    r.feed(wire(WRAP_ISN + 1 + 10, STREAM[10:20], "PA"), 0.0)  # crosses 2**32
    assert r.events() == [FlowOpened(KEY, False)]
    r.feed(wire(WRAP_ISN + 1, STREAM[:10], "PA"), 0.0)
    events = r.events()
    assert data_of(events) == STREAM[:30]
    assert events[-1] == FlowClosed(KEY, "fin")


def test_syn_at_the_last_sequence_number() -> None:
    r = Reassembler()
    opened(r, 0xFFFFFFFF)
    r.feed(seg(0, b"zero"), 0.0)
    assert r.events() == [FlowData(KEY, b"zero")]


# --- opening -------------------------------------------------------------------------


def test_syn_with_data_fast_open() -> None:
    r = Reassembler()
    r.feed(wire(ISN, b"GET /", "S"), 0.0)
    assert r.events() == [FlowOpened(KEY, False), FlowData(KEY, b"GET /")]
    r.feed(at(5, b" HTTP/1.1"), 0.0)
    assert r.events() == [FlowData(KEY, b" HTTP/1.1")]
    r.feed(wire(ISN, b"GET /", "S"), 0.1)  # retransmitted SYN with data
    assert r.events() == []
    assert r.counters.duplicate_bytes == 5
    assert r.counters.flows == 1


def test_retransmitted_syn_opens_once() -> None:
    r = Reassembler()
    opened(r)
    r.feed(seg(ISN, flags=SYN), 1.0)
    r.feed(at(0, b"x"), 1.1)
    assert r.events() == [FlowData(KEY, b"x")]
    assert r.counters.flows == 1


def test_flow_first_seen_mid_stream_is_partial() -> None:
    r = Reassembler()
    r.feed(seg(5000, flags=ACK), 0.0)  # a bare ACK opens nothing
    assert r.events() == []
    assert len(r) == 0
    r.feed(seg(5000, b"middle"), 0.1)
    assert r.events() == [FlowOpened(KEY, True), FlowData(KEY, b"middle")]
    r.feed(seg(4990, b"0123456789"), 0.2)  # before the first seen byte
    r.feed(seg(5010, b"after"), 0.3)
    r.feed(seg(5006, b"-and"), 0.4)
    assert r.events() == [FlowData(KEY, b"-and"), FlowData(KEY, b"after")]
    assert r.counters.flows == 1
    assert r.counters.partial == 1


def test_rst_or_fin_of_an_unknown_flow_opens_nothing() -> None:
    r = Reassembler()
    r.feed(seg(5000, flags=RST), 0.0)
    r.feed(seg(5000, flags=FIN | ACK), 0.0)
    assert r.events() == []
    assert len(r) == 0
    assert r.counters.flows == 0


# --- closing -------------------------------------------------------------------------


def test_fin_with_data_closes() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(0, b"bye", FIN | ACK), 0.0)
    assert r.events() == [FlowData(KEY, b"bye"), FlowClosed(KEY, "fin")]
    assert len(r) == 0


def test_fin_waits_for_a_missing_segment() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(0, b"abc"), 0.0)
    r.feed(at(6, flags=FIN | ACK), 0.0)  # bare FIN, bytes 3..5 still missing
    assert r.events() == [FlowData(KEY, b"abc")]
    assert len(r) == 1
    r.feed(at(3, b"def"), 0.0)
    assert r.events() == [FlowData(KEY, b"def"), FlowClosed(KEY, "fin")]


def test_fin_carrying_data_waits_for_a_missing_segment() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(6, b"ghi", FIN | ACK), 0.0)
    r.feed(at(3, b"def"), 0.0)
    assert r.events() == []
    r.feed(at(0, b"abc"), 0.0)
    assert r.events() == [
        FlowData(KEY, b"abc"),
        FlowData(KEY, b"def"),
        FlowData(KEY, b"ghi"),
        FlowClosed(KEY, "fin"),
    ]


def test_hole_before_a_bare_fin_is_reported_as_a_gap() -> None:
    r = Reassembler(gap_timeout=1.0, idle_timeout=60.0)
    opened(r)
    r.feed(at(0, b"abc"), 0.0)
    r.feed(at(6, flags=FIN | ACK), 0.0)  # bytes 3..5 never come
    r.events()
    r.tick(5.0)
    r.tick(100.0)
    events = r.events()
    assert FlowGap(KEY, 3, 3) in events


def test_rst_closes() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(0, b"abc"), 0.0)
    r.feed(at(3, flags=RST), 0.1)
    assert r.events() == [FlowData(KEY, b"abc"), FlowClosed(KEY, "rst")]
    assert len(r) == 0


def test_rst_with_held_bytes_reports_the_gap_first() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(0, b"abc"), 0.0)
    r.feed(at(5, b"fgh"), 0.0)
    r.feed(at(3, flags=RST | ACK), 0.1)
    assert r.events() == [
        FlowData(KEY, b"abc"),
        FlowGap(KEY, 2, 3),
        FlowClosed(KEY, "rst"),
    ]
    assert r.counters.gaps == 1


def test_close_all_evicts() -> None:
    r = Reassembler()
    opened(r)
    opened(r, key=KEY6)
    r.feed(at(0, b"a"), 0.0)
    r.feed(at(5, b"f", key=KEY6), 0.0)
    r.close_all()
    events = r.events()
    assert FlowClosed(KEY, "evicted") in events
    assert FlowClosed(KEY6, "evicted") in events
    assert FlowGap(KEY6, 5, 0) in events
    assert len(r) == 0


# --- gaps ------------------------------------------------------------------------------


@pytest.mark.parametrize("isn", [ISN, WRAP_ISN])
def test_gap_reported_after_timeout_and_never_spliced(isn: int) -> None:
    r = Reassembler(gap_timeout=1.0)
    opened(r, isn)
    r.feed(at(0, b"abc", isn=isn), 0.0)
    r.feed(at(7, b"hij", isn=isn), 0.2)  # bytes 3..6 missing
    r.feed(at(10, b"klm", isn=isn), 0.3)
    r.tick(1.0)
    assert r.events() == [FlowData(KEY, b"abc")]
    r.tick(1.3)
    assert r.events() == [FlowGap(KEY, 4, 3)]
    assert r.counters.gaps == 1
    # The hole is filled too late, and more data comes: nothing after the hole.
    r.feed(at(3, b"defg", isn=isn), 1.5)
    r.feed(at(13, b"nop", isn=isn), 1.6)
    r.feed(at(0, b"abc", isn=isn), 1.7)
    r.tick(10.0)
    assert r.events() == []
    assert r.counters.gaps == 1
    r.feed(at(16, flags=FIN | ACK, isn=isn), 11.0)
    assert r.events() == [FlowClosed(KEY, "fin")]


def test_gap_timer_is_not_restarted_by_later_segments() -> None:
    r = Reassembler(gap_timeout=1.0)
    opened(r)
    r.feed(at(5, b"x"), 0.0)
    r.feed(at(7, b"y"), 0.9)
    r.tick(1.1)
    assert r.events() == [FlowGap(KEY, 5, 0)]


def test_filled_hole_resets_the_gap_timer() -> None:
    r = Reassembler(gap_timeout=1.0)
    opened(r)
    r.feed(at(3, b"def"), 0.0)
    r.feed(at(0, b"abc"), 0.9)
    r.feed(at(9, b"jkl"), 1.0)
    r.tick(1.5)
    assert data_of(r.events()) == b"abcdef"
    r.tick(2.1)
    assert r.events() == [FlowGap(KEY, 3, 6)]


def test_held_bytes_bound_reports_a_gap_immediately() -> None:
    r = Reassembler(max_held_bytes=10, gap_timeout=100.0)
    opened(r)
    r.feed(at(0, b"ab"), 0.0)
    r.feed(at(5, b"fghijk"), 0.0)
    r.feed(at(11, b"lmab"), 0.0)  # exactly at the bound: still held
    assert r.events() == [FlowData(KEY, b"ab")]
    r.feed(at(15, b"p"), 0.0)  # one byte over
    assert r.events() == [FlowGap(KEY, 3, 2)]
    r.feed(at(2, b"cde"), 0.0)
    assert r.events() == []
    assert r.counters.gaps == 1


def test_gaps_are_per_flow() -> None:
    r = Reassembler(gap_timeout=1.0)
    opened(r)
    opened(r, key=KEY6)
    r.feed(at(3, b"d"), 0.0)
    r.feed(at(0, b"ok", key=KEY6), 0.0)
    r.tick(2.0)
    r.feed(at(2, b"!", key=KEY6), 2.0)
    assert r.events() == [
        FlowData(KEY6, b"ok"),
        FlowGap(KEY, 3, 0),
        FlowData(KEY6, b"!"),
    ]


# --- limits and timeouts -----------------------------------------------------------------


def test_max_flows_refuses_and_counts() -> None:
    r = Reassembler(max_flows=1)
    opened(r)
    r.feed(seg(ISN, flags=SYN, key=KEY6), 0.0)
    assert r.events() == []
    assert r.counters.refused_flows == 1
    assert r.counters.flows == 1
    assert len(r) == 1
    r.feed(at(0, b"x", FIN | ACK), 0.1)  # the first flow ends: room again
    assert r.events() == [FlowData(KEY, b"x"), FlowClosed(KEY, "fin")]
    r.feed(seg(7, flags=SYN, key=KEY6), 0.2)
    assert r.events() == [FlowOpened(KEY6, False)]
    assert r.counters.flows == 2


def test_refused_flow_is_counted_once() -> None:
    r = Reassembler(max_flows=1)
    opened(r)
    r.feed(seg(ISN, flags=SYN, key=KEY6), 0.0)
    r.feed(at(0, b"one", key=KEY6), 0.1)
    r.feed(at(3, b"two", key=KEY6), 0.2)
    assert r.counters.refused_flows == 1


def test_idle_timeout() -> None:
    r = Reassembler(idle_timeout=10.0)
    opened(r)
    r.feed(at(0, b"a"), 5.0)
    r.tick(15.0)
    assert r.events() == [FlowData(KEY, b"a")]
    r.tick(15.5)
    assert r.events() == [FlowClosed(KEY, "idle")]
    assert len(r) == 0
    r.feed(at(1, b"b"), 16.0)  # the flow is remembered as ended for a while
    assert r.events() == []
    r.tick(15.5 + ENDED_MEMORY + 1)
    r.feed(at(1, b"b"), 15.5 + ENDED_MEMORY + 2)  # forgotten: a new partial flow
    assert r.events() == [FlowOpened(KEY, True), FlowData(KEY, b"b")]


def test_late_retransmission_after_fin_does_not_reopen() -> None:
    r = Reassembler()
    opened(r)
    r.feed(at(0, b"abc"), 0.0)
    r.feed(at(3, b"def", FIN | ACK), 0.1)
    assert data_of(r.events()) == b"abcdef"
    r.feed(at(3, b"def", FIN | ACK), 0.5)
    r.feed(at(0, b"abc"), 0.6)
    r.feed(at(6, flags=FIN | ACK), 0.7)
    assert r.events() == []
    assert len(r) == 0
    assert r.counters.flows == 1
    assert r.counters.duplicate_bytes == 6
    # A new connection on the same 4-tuple.
    r.feed(seg(777, flags=SYN), 1.0)
    r.feed(seg(778, b"again"), 1.1)
    assert r.events() == [FlowOpened(KEY, False), FlowData(KEY, b"again")]
    assert r.counters.flows == 2


def test_counters() -> None:
    r = Reassembler(gap_timeout=1.0)
    opened(r)
    r.feed(at(0, b"abc"), 0.0)
    r.feed(at(0, b"abc"), 0.0)
    r.feed(at(1, b"bcd"), 0.0)
    r.feed(seg(9000, b"mid", key=KEY6), 0.0)
    r.feed(seg(9010, b"later", key=KEY6), 0.0)
    r.tick(2.0)
    c = r.counters
    assert (c.flows, c.partial, c.gaps, c.duplicate_bytes, c.refused_flows) == (2, 1, 1, 5, 0)


# --- property: any cut, order and duplication gives back the stream ----------------------


@st.composite
def _ranges(draw: st.DrawFn, size: int) -> list[tuple[int, int]]:
    """A cut of [0, size) into pieces, plus a few overlapping extra ranges."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(size - 1, 1)), max_size=25))))
    bounds = [0, *(c for c in cuts if 0 < c < size), size]
    pieces = list(itertools.pairwise(bounds))
    extra = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 300)), max_size=5))
    return pieces + [(a, min(size, a + n)) for a, n in extra]


def _draw_isn(data: st.DataObject, size: int) -> int:
    """Any ISN, or one that makes the stream's sequence numbers cross 2**32."""
    if data.draw(st.booleans(), label="wrap"):
        return SEQ_MASK - data.draw(st.integers(0, size - 1), label="bytes before the wrap")
    return data.draw(st.integers(0, SEQ_MASK), label="isn")


@FUZZ
@given(data=st.data(), stream=st.binary(min_size=1, max_size=1500))
def test_reassembly_property(data: st.DataObject, stream: bytes) -> None:
    isn = _draw_isn(data, len(stream))
    ranges = data.draw(_ranges(len(stream)))
    dups = data.draw(st.lists(st.sampled_from(ranges), max_size=10))
    order = data.draw(st.permutations(ranges + dups))
    fin_on_last = data.draw(st.booleans())
    r = Reassembler()
    r.feed(seg(isn, flags=SYN), 0.0)
    for a, b in order:
        flags = PSH | ACK | (FIN if fin_on_last and b == len(stream) else 0)
        r.feed(at(a, stream[a:b], flags, isn=isn), 0.0)
    r.feed(at(len(stream), flags=FIN | ACK, isn=isn), 0.0)
    events = r.events()
    assert events[0] == FlowOpened(KEY, False)
    assert data_of(events) == stream
    assert [e for e in events if isinstance(e, FlowClosed | FlowGap)] == [FlowClosed(KEY, "fin")]
    assert events[-1] == FlowClosed(KEY, "fin")
    assert len(r) == 0
    assert r.counters.gaps == 0


@FUZZ
@given(data=st.data(), stream=st.binary(min_size=3, max_size=1500))
def test_gap_property_never_splices(data: st.DataObject, stream: bytes) -> None:
    isn = _draw_isn(data, len(stream))
    size = len(stream)
    cuts = sorted(data.draw(st.sets(st.integers(1, size - 1), min_size=2, max_size=20)))
    bounds = [0, *cuts, size]
    pieces = list(itertools.pairwise(bounds))
    lost = data.draw(st.integers(0, len(pieces) - 2))  # never the last piece
    kept = [p for i, p in enumerate(pieces) if i != lost]
    dups = data.draw(st.lists(st.sampled_from(kept), max_size=5))
    order = data.draw(st.permutations(kept + dups))
    r = Reassembler(gap_timeout=1.0)
    r.feed(seg(isn, flags=SYN), 0.0)
    for a, b in order:
        r.feed(at(a, stream[a:b], isn=isn), 0.5)
    hole, after = pieces[lost]
    r.tick(1.0)
    assert data_of(r.events()) == stream[:hole]
    r.tick(1.6)
    assert r.events() == [FlowGap(KEY, after - hole, hole)]
    r.feed(at(hole, stream[hole:after], isn=isn), 2.0)  # too late
    r.feed(at(size, flags=FIN | ACK, isn=isn), 2.0)
    assert r.events() == [FlowClosed(KEY, "fin")]
