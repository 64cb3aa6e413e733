"""The capture socket: AF_PACKET, kernel BPF filter, drained from the event loop.

A ``SOCK_DGRAM`` packet socket gives packets from the IP header on, whatever the
link type (veth, loopback, tunnels). Until its filter is in place it
rejects everything, so no unfiltered packet is ever read. Its receive buffer is forced
large (``SO_RCVBUFFORCE``): the kernel drops, rather than blocks, when we fall
behind, and those drops are read from ``PACKET_STATISTICS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable

from netmirror.agent.capture import bpf
from netmirror.agent.capture.packets import Segment, parse

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33
_STATS = struct.Struct("II")
#: Packets read per wake-up before yielding to the rest of the loop.
BATCH = 512


class Sniffer:
    """Captures TCP segments sent to a set of ports in the current namespace.

    ``on_segment`` gets each parsed segment with the capture time; ``on_packet``,
    if set, gets every raw packet (for the pcap file) with its real length.
    Packets the namespace sends (``PACKET_OUTGOING``) are skipped, so loopback
    traffic is seen once, on its way in.
    """

    def __init__(
        self,
        on_segment: Callable[[Segment, float], None],
        *,
        on_packet: Callable[[memoryview, int], None] | None = None,
        rcvbuf: int = 64 * 1024 * 1024,
        interface: str | None = None,
    ) -> None:
        """``interface``: capture on this one only (``lo`` behind a mesh's sidecar),
        else on all of the namespace's."""
        self.on_segment = on_segment
        self.interface = interface
        self.on_packet = on_packet
        self.rcvbuf = rcvbuf
        self.packets = 0
        self.kernel_packets = 0
        self.kernel_drops = 0
        self.truncated = 0
        self._sock: socket.socket | None = None
        self._buf = bytearray(bpf.ACCEPT_BYTES)
        self._view = memoryview(self._buf)
        self._ports: frozenset[int] = frozenset()

    @property
    def ports(self) -> frozenset[int]:
        return self._ports

    def set_ports(self, ports: Iterable[int]) -> None:
        """Capture exactly ``ports`` (compiles and swaps the kernel filter)."""
        wanted = frozenset(ports)
        if wanted == self._ports and self._sock is not None:
            return
        code = bpf.compile_ports(wanted)
        if self._sock is None:
            # Python cannot bind a packet socket to "every interface" (ifindex 0),
            # so the protocol is given at creation: reject everything, drain what
            # queued before that filter, then install the real one.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            try:
                bpf.attach(sock, bpf.REJECT_ALL)
                if self.interface is not None:
                    sock.bind((self.interface, ETH_P_ALL))
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while True:
                        sock.recv(1)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                bpf.attach(sock, code)
            except OSError:
                sock.close()
                raise
            self._sock = sock
            asyncio.get_running_loop().add_reader(sock.fileno(), self._drain)
            log.info(
                "capturing ports %s%s",
                ", ".join(map(str, sorted(wanted))),
                f" on {self.interface}" if self.interface else "",
            )
        else:
            bpf.attach(self._sock, code)
        self._ports = wanted

    def stop(self) -> None:
        """Close the socket (the counters stay readable)."""
        if self._sock is not None:
            self.read_kernel_stats()
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._ports = frozenset()

    def read_kernel_stats(self) -> None:
        """Add the kernel's counters (reset by each read) to ours."""
        if self._sock is None:
            return
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS.size)
        except OSError:
            return
        packets, drops = _STATS.unpack(raw)
        self.kernel_packets += packets
        self.kernel_drops += drops

    def _drain(self) -> None:
        sock = self._sock
        if sock is None:
            return
        buf = self._buf
        view = self._view
        size = len(buf)
        on_segment = self.on_segment
        on_packet = self.on_packet
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                length, address = sock.recvfrom_into(buf, 0, socket.MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("capture socket error: %s", exc)
                return
            if address[2] == PACKET_OUTGOING:
                continue
            self.packets += 1
            if length > size:
                self.truncated += 1
                packet = view
            else:
                packet = view[:length]
            if on_packet is not None:
                on_packet(packet, length)
            segment = parse(packet)
            if segment is not None:
                on_segment(segment, now)
