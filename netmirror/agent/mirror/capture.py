"""Mirror by capture: copies rebuilt from packets, with nothing in the traffic path.

An AF_PACKET socket (:mod:`netmirror.agent.capture.sniffer`) reads a copy of the
packets of the mirrored ports; the reassembler rebuilds each connection's client
bytes and :class:`CaptureMirror` sends them as :class:`~.copy.MirrorCopy` streams.
No rule is in the traffic path, so the target is unaffected even if the agent dies.
"""

from __future__ import annotations

import logging

from netmirror.agent.capture.packets import Segment
from netmirror.agent.capture.reassembly import (
    FlowClosed,
    FlowData,
    FlowEvent,
    FlowGap,
    FlowKey,
    FlowOpened,
    Reassembler,
)
from netmirror.agent.capture.sniffer import Sniffer
from netmirror.agent.link import Link
from netmirror.agent.mirror.copy import MirrorCopy, PcapStream
from netmirror.agent.subscription import Subscription
from netmirror.wire.kinds import StreamKind, stream_info
from netmirror.wire.stats import CaptureStats, MirrorCounters

log = logging.getLogger(__name__)


class CaptureMirror:
    """The capture method for every port mirrored by capture in this agent."""

    def __init__(self, link: Link, *, interface: str | None = None) -> None:
        """``interface``: where to capture (``lo`` behind a mesh's sidecar: the
        plaintext hop to the application, never the sidecars' ciphertext)."""
        self.link = link
        self.reassembler = Reassembler()
        self.sniffer = Sniffer(self._on_segment, interface=interface)
        self.subs: dict[int, Subscription] = {}
        self.counters: dict[int, MirrorCounters] = {}
        self.copies: dict[FlowKey, MirrorCopy | None] = {}
        self.pcap_ports: set[int] = set()
        self.pcap: PcapStream | None = None

    def add(self, sub: Subscription, *, pcap_enabled: bool) -> None:
        self.subs[sub.port] = sub
        self.counters[sub.port] = sub.counters
        if pcap_enabled:
            self.pcap_ports.add(sub.port)
        self.sniffer.on_packet = self._on_packet if self.pcap_ports else None
        self.sniffer.set_ports(self.subs)

    def remove(self, port: int) -> None:
        self.subs.pop(port, None)
        self.pcap_ports.discard(port)
        if self.subs:
            self.sniffer.set_ports(self.subs)
        else:
            self.stop()

    def stop(self) -> None:
        self.sniffer.stop()
        self.reassembler.close_all("evicted")
        self._handle(self.reassembler.events())
        if self.pcap is not None:
            self.pcap.close()
            self.pcap = None

    def tunnel_lost(self) -> None:
        """Copies cannot continue without a tunnel; flows go on uncopied."""
        for key in list(self.copies):
            self.copies[key] = None
        self.pcap = None

    def tick(self, now: float) -> None:
        self.reassembler.tick(now)
        self._handle(self.reassembler.events())
        self.sniffer.read_kernel_stats()

    def stats(self) -> CaptureStats:
        """The capture's counters, for the agent's report."""
        r = self.reassembler.counters
        return CaptureStats(
            packets=self.sniffer.packets,
            kernel_packets=self.sniffer.kernel_packets,
            kernel_drops=self.sniffer.kernel_drops,
            truncated=self.sniffer.truncated,
            duplicate_bytes=r.duplicate_bytes,
            refused_flows=r.refused_flows,
            open_flows=len(self.reassembler),
            pcap_records=self.pcap.records if self.pcap else 0,
            pcap_dropped=self.pcap.dropped if self.pcap else 0,
        )

    def _on_packet(self, packet: memoryview, length: int) -> None:
        tunnel = self.link.tunnel
        if tunnel is None:
            return
        if self.pcap is None or self.pcap.tunnel is not tunnel:
            self.pcap = PcapStream(tunnel)
        self.pcap.write(packet, length)

    def _on_segment(self, seg: Segment, now: float) -> None:
        self.reassembler.feed(seg, now)
        self._handle(self.reassembler.events())

    def _handle(self, events: list[FlowEvent]) -> None:
        for event in events:
            key = event.key
            if type(event) is FlowData:
                copy = self.copies.get(key)
                if copy is not None:
                    copy.feed(event.data)
            elif type(event) is FlowOpened:
                self._open(key, event.partial)
            elif type(event) is FlowGap:
                counters = self.counters.get(key[3])
                if counters is not None:
                    counters.gaps += 1
                copy = self.copies.get(key)
                if copy is not None:
                    copy.abort(
                        f"capture gap: {event.missing or 'some'} bytes missing after byte "
                        f"{event.offset}; the copy stops here"
                    )
                    self.copies[key] = None
            elif type(event) is FlowClosed:
                copy = self.copies.pop(key, None)
                if copy is not None:
                    if event.reason == "fin":
                        copy.finish()
                    else:
                        copy.abort(f"connection ended ({event.reason})")

    def _open(self, key: FlowKey, partial: bool) -> None:
        port = key[3]
        sub = self.subs.get(port)
        counters = self.counters.get(port)
        if sub is None or counters is None:
            return
        counters.flows += 1
        counters.partial += partial
        tunnel = self.link.tunnel
        if tunnel is None:
            counters.no_daemon += 1
            self.copies[key] = None
            return
        self.copies[key] = MirrorCopy(
            tunnel,
            sub.stats,
            counters,
            port=port,
            original_dst=(key[2], port),
            client=(key[0], key[1]),
            info=stream_info(StreamKind.MIRROR, mirror="capture", partial=partial),
        )
