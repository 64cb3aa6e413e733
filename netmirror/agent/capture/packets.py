"""IPv4/IPv6 + TCP header parsing for captured packets (no link-layer header).

Packets come from an ``AF_PACKET``/``SOCK_DGRAM`` socket, so they start at the IP
header whatever the link type. Only what reassembly needs is decoded.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

FIN = 0x01
SYN = 0x02
RST = 0x04

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBB")
# IPv6 extension headers we step over to reach TCP.
_IPV6_EXT = frozenset({0, 43, 60})
PROTO_TCP = 6


@dataclass(frozen=True, slots=True)
class Segment:
    """One TCP segment: the addresses, flags, sequence number and payload."""

    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    flags: int
    payload: memoryview

    @property
    def syn(self) -> bool:
        return bool(self.flags & SYN)

    @property
    def fin(self) -> bool:
        return bool(self.flags & FIN)

    @property
    def rst(self) -> bool:
        return bool(self.flags & RST)


def parse(packet: memoryview) -> Segment | None:
    """Decode an IP packet carrying TCP; None for anything else or a fragment.

    The payload is a view into ``packet``: copy it before the buffer is reused.
    """
    if len(packet) < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        (vihl, _tos, total, _id, frag, _ttl, proto, _sum, src, dst) = _IPV4.unpack_from(packet)
        if proto != PROTO_TCP or frag & 0x3FFF:  # fragments (MF set or offset) are not TCP-parsable
            return None
        ihl = (vihl & 0x0F) * 4
        if ihl < 20:
            return None
        # GSO super-packets may carry total 0 when larger than 64 KiB.
        end = min(total, len(packet)) if total else len(packet)
        src_s = socket.inet_ntop(socket.AF_INET, src)
        dst_s = socket.inet_ntop(socket.AF_INET, dst)
        offset = ihl
    elif version == 6:
        if len(packet) < 40:
            return None
        (_vtf, plen, nxt, _hop, src, dst) = _IPV6.unpack_from(packet)
        offset = 40
        while nxt in _IPV6_EXT:
            if len(packet) < offset + 8:
                return None
            nxt, hlen = packet[offset], (packet[offset + 1] + 1) * 8
            offset += hlen
        if nxt != PROTO_TCP:
            return None
        end = min(40 + plen, len(packet)) if plen else len(packet)  # jumbograms: 0
        src_s = socket.inet_ntop(socket.AF_INET6, src)
        dst_s = socket.inet_ntop(socket.AF_INET6, dst)
    else:
        return None
    if end < offset + 20:
        return None
    sport, dport, seq, _ack, doff, flags = _TCP.unpack_from(packet, offset)
    data_start = offset + (doff >> 4) * 4
    if doff >> 4 < 5 or data_start > end:  # a data offset under 5 words is malformed
        return None
    return Segment(src_s, sport, dst_s, dport, seq, flags, packet[data_start:end])
