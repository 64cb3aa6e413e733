"""The daemon's pcap writer: whole records only, and it stops at its size limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from netmirror.daemon.pcap import PcapWriter
from netmirror.errors import ConfigError
from netmirror.wire import pcap


def test_records_split_anywhere_are_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.pcap"
    writer = PcapWriter(path, max_bytes=1 << 20)
    records = [pcap.record(bytes([i]) * (100 + i), timestamp_ns=i) for i in range(5)]
    stream = b"".join(records)
    for i in range(0, len(stream), 7):  # arrives in odd-sized pieces
        writer.feed(stream[i : i + 7])
    writer.close()
    assert path.read_bytes() == pcap.global_header() + stream
    assert writer.records == 5


def test_stops_at_the_limit_on_a_record_boundary(tmp_path: Path) -> None:
    path = tmp_path / "b.pcap"
    rec = pcap.record(b"x" * 1000, timestamp_ns=0)
    writer = PcapWriter(path, max_bytes=24 + 3 * len(rec) + 10)
    for _ in range(10):
        writer.feed(rec)
    writer.close()
    assert writer.full and writer.records == 3
    assert path.read_bytes() == pcap.global_header() + rec * 3
    assert writer.status().state == "full: stopped writing"


def test_unwritable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pcap: cannot write"):
        PcapWriter(tmp_path / "missing" / "c.pcap", max_bytes=1 << 20)
