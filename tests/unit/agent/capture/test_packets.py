"""The struct-based IPv4/IPv6 + TCP parser, checked against packets built by scapy."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Raw

from netmirror.agent.capture.packets import FIN, RST, SYN, Segment, parse

FUZZ = settings(
    deadline=None,
    database=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)

PAYLOAD = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
ACK = 0x10
PSH = 0x08
TCP_OPTIONS: list[tuple[str, Any]] = [
    ("MSS", 1460),
    ("SAckOK", b""),
    ("Timestamp", (123456, 654321)),
    ("NOP", None),
    ("WScale", 7),
]


def _v4(payload: bytes = PAYLOAD, **tcp: Any) -> bytes:
    fields: dict[str, Any] = {"sport": 40000, "dport": 8080, "seq": 1_000_000, "flags": "PA"}
    fields.update(tcp)
    return bytes(IP(src="10.1.2.3", dst="10.4.5.6") / TCP(**fields) / Raw(payload))


def _v6(payload: bytes = PAYLOAD, **tcp: Any) -> bytes:
    fields: dict[str, Any] = {"sport": 40001, "dport": 443, "seq": 0xFFFFFFFE, "flags": "PA"}
    fields.update(tcp)
    return bytes(IPv6(src="fd00::1", dst="fd00::2") / TCP(**fields) / Raw(payload))


def _parse_ok(packet: bytes | bytearray) -> Segment:
    seg = parse(memoryview(packet))
    assert seg is not None
    return seg


# --- well-formed TCP ---------------------------------------------------------------


def test_ipv4_tcp() -> None:
    seg = _parse_ok(_v4())
    assert (seg.src, seg.sport, seg.dst, seg.dport) == ("10.1.2.3", 40000, "10.4.5.6", 8080)
    assert seg.seq == 1_000_000
    assert seg.flags == PSH | ACK
    assert not (seg.syn or seg.fin or seg.rst)
    assert bytes(seg.payload) == PAYLOAD


def test_ipv6_tcp() -> None:
    seg = _parse_ok(_v6())
    assert (seg.src, seg.sport, seg.dst, seg.dport) == ("fd00::1", 40001, "fd00::2", 443)
    assert seg.seq == 0xFFFFFFFE
    assert seg.flags == PSH | ACK
    assert bytes(seg.payload) == PAYLOAD


def test_ipv6_addresses_are_canonical_text() -> None:
    raw = bytes(
        IPv6(src="2001:0db8:0000:0000:0000:0000:0000:0001", dst="::ffff:10.0.0.1")
        / TCP(sport=1, dport=2)
    )
    seg = _parse_ok(raw)
    assert (seg.src, seg.dst) == ("2001:db8::1", "::ffff:10.0.0.1")


def test_ipv4_with_ip_options() -> None:
    raw = bytes(
        IP(src="10.1.2.3", dst="10.4.5.6", options=[IPOption_Router_Alert()])
        / TCP(sport=1234, dport=80, seq=7)
        / Raw(b"data")
    )
    assert raw[0] & 0x0F == 6  # ihl > 5: TCP does not start at byte 20
    seg = _parse_ok(raw)
    assert (seg.sport, seg.dport, seg.seq) == (1234, 80, 7)
    assert bytes(seg.payload) == b"data"


@pytest.mark.parametrize("build", [_v4, _v6], ids=["ipv4", "ipv6"])
def test_tcp_options_are_skipped(build: Any) -> None:
    raw: bytes = build(b"after-options", options=TCP_OPTIONS)
    seg = _parse_ok(raw)
    ip_len = 20 if raw[0] >> 4 == 4 else 40
    assert raw[ip_len + 12] >> 4 > 5  # data offset > 5
    assert bytes(seg.payload) == b"after-options"


def test_ipv6_hop_by_hop_extension_header() -> None:
    raw = bytes(
        IPv6(src="fd00::a", dst="fd00::b")
        / IPv6ExtHdrHopByHop()
        / TCP(sport=5555, dport=8080, seq=42, flags="PA", options=TCP_OPTIONS)
        / Raw(b"hop")
    )
    assert raw[6] == 0  # next header: hop-by-hop
    seg = _parse_ok(raw)
    assert (seg.src, seg.sport, seg.dst, seg.dport, seg.seq) == (
        "fd00::a",
        5555,
        "fd00::b",
        8080,
        42,
    )
    assert bytes(seg.payload) == b"hop"


def test_ipv6_chain_of_extension_headers() -> None:
    raw = bytes(
        IPv6(src="fd00::a", dst="fd00::b")
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting(addresses=["fd00::c"], segleft=0)
        / IPv6ExtHdrDestOpt()
        / TCP(sport=5555, dport=8080, seq=43)
        / Raw(b"chain")
    )
    seg = _parse_ok(raw)
    assert (seg.sport, seg.dport, seg.seq) == (5555, 8080, 43)
    assert bytes(seg.payload) == b"chain"


@pytest.mark.parametrize(
    ("flags", "syn", "fin", "rst"),
    [
        ("S", True, False, False),
        ("SA", True, False, False),
        ("F", False, True, False),
        ("FA", False, True, False),
        ("R", False, False, True),
        ("RA", False, False, True),
        ("A", False, False, False),
        ("FSRPAU", True, True, True),
    ],
)
def test_flags(flags: str, syn: bool, fin: bool, rst: bool) -> None:
    seg = _parse_ok(_v4(b"", flags=flags))
    assert (seg.syn, seg.fin, seg.rst) == (syn, fin, rst)
    assert bool(seg.flags & SYN) == syn
    assert bool(seg.flags & FIN) == fin
    assert bool(seg.flags & RST) == rst


def test_no_payload() -> None:
    seg = _parse_ok(_v4(b"", flags="A"))
    assert len(seg.payload) == 0
    seg = _parse_ok(_v6(b"", flags="S", options=TCP_OPTIONS))
    assert len(seg.payload) == 0


def test_payload_is_a_view_into_the_packet() -> None:
    buf = bytearray(_v4(b"abcdef"))
    seg = _parse_ok(buf)
    assert isinstance(seg.payload, memoryview)
    buf[-6:] = b"ABCDEF"
    assert bytes(seg.payload) == b"ABCDEF"


def test_dont_fragment_is_not_a_fragment() -> None:
    raw = bytes(IP(src="1.1.1.1", dst="2.2.2.2", flags="DF") / TCP(sport=1, dport=2) / Raw(b"x"))
    assert bytes(_parse_ok(raw).payload) == b"x"


# --- lengths ---------------------------------------------------------------------


@pytest.mark.parametrize("build", [_v4, _v6], ids=["ipv4", "ipv6"])
def test_trailing_padding_is_cut_at_total_length(build: Any) -> None:
    raw: bytes = build(b"abc")
    seg = _parse_ok(raw + b"\x00" * 17 + b"PADDING")
    assert bytes(seg.payload) == b"abc"


def test_ipv4_total_length_zero_uses_the_buffer_length() -> None:
    # GSO super-packets larger than 64 KiB carry total length 0.
    big = bytes(range(256)) * 300  # 76800 bytes
    header = bytes(IP(src="10.0.0.1", dst="10.0.0.2", len=0) / TCP(sport=1, dport=2, seq=9))
    assert header[2:4] == b"\x00\x00"
    seg = _parse_ok(header + big)
    assert seg.seq == 9
    assert bytes(seg.payload) == big


def test_ipv6_payload_length_zero_uses_the_buffer_length() -> None:
    big = b"J" * 70000
    header = bytes(IPv6(src="fd00::1", dst="fd00::2", plen=0) / TCP(sport=1, dport=2))
    seg = _parse_ok(header + big)
    assert bytes(seg.payload) == big


@pytest.mark.parametrize("build", [_v4, _v6], ids=["ipv4", "ipv6"])
def test_truncated_headers_give_none(build: Any) -> None:
    raw: bytes = build(b"payload", options=TCP_OPTIONS)
    headers = len(raw) - len(b"payload")
    for cut in range(headers):
        assert parse(memoryview(raw[:cut])) is None, cut


@pytest.mark.parametrize("build", [_v4, _v6], ids=["ipv4", "ipv6"])
def test_truncated_payload_never_reads_past_the_buffer(build: Any) -> None:
    # Headers complete, payload cut short (a capture shorter than the packet): what
    # is returned is at most the bytes actually present.
    raw: bytes = build(b"0123456789")
    seg = parse(memoryview(raw[:-4]))
    assert seg is None or bytes(seg.payload) == b"012345"


def test_ipv4_total_length_shorter_than_headers() -> None:
    raw = bytearray(_v4(b"abc"))
    raw[2:4] = (30).to_bytes(2, "big")  # IP 20 + 10: not even a TCP header
    assert parse(memoryview(bytes(raw))) is None


def test_ipv6_payload_length_shorter_than_tcp_header() -> None:
    raw = bytearray(_v6(b"abc"))
    raw[4:6] = (12).to_bytes(2, "big")
    assert parse(memoryview(bytes(raw))) is None


def test_tcp_data_offset_beyond_total_length() -> None:
    raw = bytearray(_v4(b""))
    raw[20 + 12] = 0xF0  # 60-byte TCP header claimed, only 20 present
    assert parse(memoryview(bytes(raw))) is None


def test_ipv6_extension_header_running_off_the_end() -> None:
    raw = bytes(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / TCP())
    assert parse(memoryview(raw[:44])) is None
    mangled = bytearray(raw)
    mangled[41] = 200  # hop-by-hop claims (200 + 1) * 8 bytes
    assert parse(memoryview(bytes(mangled))) is None


# --- not TCP ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        IP(src="1.1.1.1", dst="2.2.2.2") / UDP(sport=53, dport=8080) / Raw(b"x" * 30),
        IP(src="1.1.1.1", dst="2.2.2.2") / ICMP() / Raw(b"x" * 30),
        IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=53, dport=8080) / Raw(b"x" * 30),
        IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest() / Raw(b"x" * 30),
        IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / UDP() / Raw(b"x" * 30),
    ],
    ids=["udp4", "icmp", "udp6", "icmp6", "hbh-udp6"],
)
def test_not_tcp(packet: Any) -> None:
    assert parse(memoryview(bytes(packet))) is None


@pytest.mark.parametrize(
    ("flags", "frag"),
    [("MF", 0), ("MF", 3), ("", 3), ("DF+MF", 0)],
    ids=["first", "middle", "last", "df-mf"],
)
def test_ipv4_fragments(flags: str, frag: int) -> None:
    raw = bytes(
        IP(src="1.1.1.1", dst="2.2.2.2", flags=flags, frag=frag, proto=6)
        / TCP(sport=1, dport=8080)
        / Raw(b"y" * 40)
    )
    assert parse(memoryview(raw)) is None


def test_ipv6_fragment_header() -> None:
    raw = bytes(
        IPv6(src="fd00::1", dst="fd00::2")
        / IPv6ExtHdrFragment(m=1, offset=0)
        / TCP(sport=1, dport=8080)
        / Raw(b"z" * 40)
    )
    assert parse(memoryview(raw)) is None


@pytest.mark.parametrize("version", [0, 1, 5, 7, 15])
def test_other_ip_versions(version: int) -> None:
    raw = bytearray(_v4())
    raw[0] = (version << 4) | 5
    assert parse(memoryview(bytes(raw))) is None


@pytest.mark.parametrize("raw", [b"", b"\x45", b"\x60" * 39, b"\x45" + b"\x00" * 18])
def test_too_short(raw: bytes) -> None:
    assert parse(memoryview(raw)) is None


# --- malformed headers (bugs) --------------------------------------------------------


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ipv4_header_length_below_five_words_is_rejected(ihl: int) -> None:
    raw = bytearray(_v4(b"hello"))
    raw[0] = 0x40 | ihl
    assert parse(memoryview(bytes(raw))) is None


@pytest.mark.parametrize("doff", [0, 1, 4])
def test_tcp_data_offset_below_five_words_is_rejected(doff: int) -> None:
    raw = bytearray(_v4(b"hello"))
    raw[20 + 12] = doff << 4
    assert parse(memoryview(bytes(raw))) is None


# --- never an exception --------------------------------------------------------------


def _check(raw: bytes) -> None:
    seg = parse(memoryview(raw))
    if seg is not None:
        assert len(seg.payload) <= len(raw)
        assert 0 <= seg.sport < 65536 and 0 <= seg.dport < 65536
        assert 0 <= seg.seq < 2**32


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(raw: bytes) -> None:
    _check(raw)


@FUZZ
@given(
    st.sampled_from([0x45, 0x46, 0x4F, 0x40, 0x60, 0x6F]),
    st.sampled_from([0, 6, 17, 43, 60, 44]),
    st.binary(max_size=160),
)
def test_random_ip_like_bytes_never_raise(first: int, proto: int, rest: bytes) -> None:
    raw = bytearray([first]) + bytearray(rest)
    if first >> 4 == 4 and len(raw) > 9:
        raw[9] = proto
        raw[6] &= 0xC0  # mostly not a fragment, to reach the TCP header
    elif len(raw) > 6:
        raw[6] = proto
    _check(bytes(raw))


_SEEDS = [
    _v4(),
    _v6(),
    _v4(b"", options=TCP_OPTIONS),
    bytes(IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP() / Raw(b"q" * 20)),
]


@FUZZ
@given(
    st.sampled_from(_SEEDS),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(0, 200),
)
def test_mutated_packets_never_raise(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(seed)
    for pos, value in flips:
        if pos < len(raw):
            raw[pos] = value
    _check(bytes(raw[: len(raw) - cut % (len(raw) + 1)]))
