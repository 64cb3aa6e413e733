"""pcap framing, read back by scapy and by tcpdump."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw
from scapy.utils import RawPcapReader, rdpcap

from netmirror.wire import pcap

TS = 1_700_000_000_123_456_789

PACKETS: list[bytes] = [
    bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=8080, flags="S")),
    bytes(
        IP(src="10.0.0.1", dst="10.0.0.2")
        / TCP(sport=40000, dport=8080, seq=1, flags="PA")
        / Raw(b"GET / HTTP/1.1\r\n\r\n")
    ),
    bytes(
        IPv6(src="fd00::1", dst="fd00::2")
        / TCP(sport=40001, dport=443, seq=99, flags="PA")
        / Raw(b"\x16\x03\x01" + b"x" * 200)
    ),
]
EXPECTED = [
    ("10.0.0.1", 40000, "10.0.0.2", 8080),
    ("10.0.0.1", 40000, "10.0.0.2", 8080),
    ("fd00::1", 40001, "fd00::2", 443),
]


def _write(path: Path, packets: list[bytes], **record: int) -> None:
    with path.open("wb") as f:
        f.write(pcap.global_header())
        for i, packet in enumerate(packets):
            f.write(pcap.record(packet, timestamp_ns=TS + i * 1_000_000_001, **record))


def _tcpdump(path: Path, *args: str) -> list[str]:
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed")
    done = subprocess.run(
        ["tcpdump", "-nn", *args, "-r", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "RAW" in done.stderr  # "link-type RAW (Raw IP)"
    return done.stdout.splitlines()


def test_global_header() -> None:
    header = pcap.global_header()
    assert len(header) == 24
    assert header[:4] == bytes.fromhex("4d3cb2a1")  # little-endian, nanosecond magic
    assert struct.unpack("<HHiIII", header[4:]) == (2, 4, 0, 0, pcap.SNAPLEN, 101)
    assert struct.unpack("<I", pcap.global_header(linktype=1, snaplen=1500)[16:20]) == (1500,)


def test_record_header() -> None:
    rec = pcap.record(b"abcdef", timestamp_ns=5_000_000_007)
    assert len(rec) == pcap.RECORD_HEADER_SIZE + 6
    assert struct.unpack("<IIII", rec[:16]) == (5, 7, 6, 6)
    assert rec[16:] == b"abcdef"
    rec = pcap.record(memoryview(b"abc"), timestamp_ns=0, original_length=1500)
    assert struct.unpack("<IIII", rec[:16]) == (0, 0, 3, 1500)
    rec = pcap.record(b"abc", timestamp_ns=0, original_length=2)  # never below what we have
    assert struct.unpack("<IIII", rec[:16])[3] == 3


def test_read_back_with_scapy(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    _write(path, PACKETS)
    read = rdpcap(str(path))
    assert len(read) == len(PACKETS)
    for packet, raw, (src, sport, dst, dport) in zip(read, PACKETS, EXPECTED, strict=True):
        ip = packet[IPv6] if ":" in src else packet[IP]
        assert (ip.src, ip.dst) == (src, dst)
        assert (packet[TCP].sport, packet[TCP].dport) == (sport, dport)
        assert bytes(packet) == raw
    assert str(read[0].time) == "1700000000.123456789"
    assert str(read[2].time) == "1700000002.123456791"


def test_read_back_with_tcpdump(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    _write(path, PACKETS)
    lines = _tcpdump(path, "-tt", "--time-stamp-precision=nano")
    assert len(lines) == len(PACKETS)
    for line, (src, sport, dst, dport) in zip(lines, EXPECTED, strict=True):
        family = "IP6" if ":" in src else "IP"
        assert f" {family} {src}.{sport} > {dst}.{dport}: " in line, line
    assert lines[0].startswith("1700000000.123456789 ")
    assert "Flags [S]" in lines[0]
    assert "length 18" in lines[1]
    assert "length 203" in lines[2]


def test_packet_longer_than_the_snap_length(tmp_path: Path) -> None:
    # A GSO super-packet (IPv4 total length 0) longer than SNAPLEN.
    big = bytes(IP(src="10.0.0.1", dst="10.0.0.2", len=0) / TCP(sport=1, dport=8080))
    big += b"\xab" * (pcap.SNAPLEN + 1000)
    path = tmp_path / "big.pcap"
    _write(path, [PACKETS[0], big, PACKETS[2]])
    # scapy's reader keeps at most 64 KiB of a record's data, but reports the lengths.
    records = list(RawPcapReader(str(path)))
    assert [(meta.caplen, meta.wirelen) for _, meta in records] == [
        (len(PACKETS[0]), len(PACKETS[0])),
        (pcap.SNAPLEN, len(big)),
        (len(PACKETS[2]), len(PACKETS[2])),
    ]
    assert records[2][0] == PACKETS[2]
    raw = path.read_bytes()
    second = 24 + pcap.RECORD_HEADER_SIZE + len(PACKETS[0])
    caplen, wirelen = struct.unpack_from("<II", raw, second + 8)
    assert (caplen, wirelen) == (pcap.SNAPLEN, len(big))
    body = second + pcap.RECORD_HEADER_SIZE
    assert raw[body : body + caplen] == big[: pcap.SNAPLEN]
    lines = _tcpdump(path)
    assert len(lines) == 3
    assert " IP 10.0.0.1.40000 > 10.0.0.2.8080: " in lines[0]
    # tcpdump sizes a TSO packet (total length 0) by its original length, which is kept.
    assert re.search(rf"\b{len(big)}\b", lines[1]), lines[1]
    assert " IP6 fd00::1.40001 > fd00::2.443: " in lines[2]


def test_original_length_of_a_cut_packet_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "cut.pcap"
    _write(path, [PACKETS[1][:40]], original_length=len(PACKETS[1]))
    ((data, meta),) = list(RawPcapReader(str(path)))
    assert (len(data), meta.caplen, meta.wirelen) == (40, 40, len(PACKETS[1]))
    (line,) = _tcpdump(path)
    assert " IP 10.0.0.1.40000 > 10.0.0.2.8080: " in line
