"""pcap file framing (the classic format Wireshark and tcpdump read)."""

from __future__ import annotations

import struct

#: Packets start at the IP header (what an AF_PACKET/SOCK_DGRAM socket gives).
LINKTYPE_RAW = 101
SNAPLEN = 262144
MAGIC = 0xA1B23C4D  # nanosecond timestamps

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
RECORD_HEADER_SIZE = _RECORD.size


def global_header(linktype: int = LINKTYPE_RAW, snaplen: int = SNAPLEN) -> bytes:
    """The 24-byte header that starts a pcap file."""
    return _GLOBAL.pack(MAGIC, 2, 4, 0, 0, snaplen, linktype)


def record(packet: bytes | memoryview, *, timestamp_ns: int, original_length: int = 0) -> bytes:
    """One packet record; ``packet`` is cut to the snap length."""
    captured = min(len(packet), SNAPLEN)
    seconds, nanos = divmod(timestamp_ns, 1_000_000_000)
    header = _RECORD.pack(seconds, nanos, captured, max(original_length, len(packet)))
    return header + bytes(packet[:captured])
