"""Datagrams inside a stream: the framing of a UDP association. Pure.

A stream of kind ``udp`` carries datagrams both ways, each as one record::

    u16 payload length | u8 family (4 or 6) | address (4 or 16 bytes) | u16 port | payload

From the daemon, the address is where the datagram goes; from the agent, where
the answer came from. The stream is a byte stream, so records may arrive split
or joined: :class:`DatagramDecoder` puts them back together.
"""

from __future__ import annotations

import socket
import struct

__all__ = ["DatagramDecoder", "encode_datagram"]

_HEAD = struct.Struct("!HB")
_ADDRESS_SIZE = {4: 4, 6: 16}
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
#: The largest UDP payload (IPv4's limit; an IPv6 jumbogram is not carried).
MAX_PAYLOAD = 65507


def encode_datagram(host: str, port: int, payload: bytes | memoryview) -> bytes:
    """One record. ValueError for an address that is not an IP, or a bad port or size."""
    family = 6 if ":" in host else 4
    try:
        packed = socket.inet_pton(_FAMILY[family], host)
    except OSError:
        raise ValueError(f"{host!r} is not an IPv{family} address") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not in 0..65535")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a datagram of {len(payload)} bytes is larger than UDP allows")
    return b"".join((_HEAD.pack(len(payload), family), packed, port.to_bytes(2, "big"), payload))


class DatagramDecoder:
    """Records in, ``(host, port, payload)`` out; ValueError for a record that cannot be."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> list[tuple[str, int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[str, int, bytes]] = []
        offset = 0
        while len(buf) - offset >= _HEAD.size:
            length, family = _HEAD.unpack_from(buf, offset)
            size = _ADDRESS_SIZE.get(family)
            if size is None:
                raise ValueError(f"datagram record with address family {family}")
            if length > MAX_PAYLOAD:
                raise ValueError(f"datagram record of {length} bytes")
            start = offset + _HEAD.size
            end = start + size + 2 + length
            if len(buf) < end:
                break
            host = socket.inet_ntop(_FAMILY[family], bytes(buf[start : start + size]))
            port = int.from_bytes(buf[start + size : start + size + 2], "big")
            out.append((host, port, bytes(buf[start + size + 2 : end])))
            offset = end
        if offset:
            del buf[:offset]
        return out

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete record held back."""
        return len(self._buf)
