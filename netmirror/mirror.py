"""Mirror mode in the agent: copies of client bytes, never in the traffic's way.

Two methods, per port:

- **capture** (:class:`CaptureMirror`): an AF_PACKET socket reads a copy of the
  packets; the reassembler rebuilds each connection's client bytes. No rule is in
  the traffic path, so the target is unaffected even if the agent dies.
- **passthrough** (:class:`PassthroughBridge`): a REDIRECT rule sends connections
  to the agent, which relays them to the original server and copies the client's
  bytes.

Either way a copy goes to the daemon as a stream (:class:`MirrorCopy`) that holds
at most ``MAX_PENDING`` bytes: when the daemon or the local process is slower than
the real traffic, the copy is dropped and counted; the real traffic is never
slowed down for it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from netmirror.capture import pcap
from netmirror.capture.packets import Segment
from netmirror.capture.reassembly import (
    FlowClosed,
    FlowData,
    FlowEvent,
    FlowGap,
    FlowKey,
    FlowOpened,
    Reassembler,
)
from netmirror.capture.sniffer import Sniffer
from netmirror.firewall import AGENT_MARK
from netmirror.tunnel import PortStats, Tunnel, abort_with_reset

if TYPE_CHECKING:
    from netmirror.agent import Agent, Subscription

log = logging.getLogger(__name__)

MAX_PENDING = 32 * 1024 * 1024
RELAY_HIGH_WATER = 1024 * 1024


@dataclass
class MirrorCounters:
    """Per mirrored port, what only the agent sees."""

    flows: int = 0
    partial: int = 0
    gaps: int = 0
    dropped: int = 0
    """Copies abandoned because the daemon or local process fell behind."""
    no_daemon: int = 0
    """Connections not copied because no daemon was connected."""

    def as_dict(self) -> dict[str, int]:
        return {
            "flows": self.flows,
            "partial": self.partial,
            "gaps": self.gaps,
            "dropped": self.dropped,
            "no_daemon": self.no_daemon,
        }


class MirrorCopy:
    """One connection's client bytes, sent to the daemon as a stream.

    Fed by the capture or a passthrough relay; it never pushes back on them.
    """

    def __init__(
        self,
        tunnel: Tunnel,
        stats: PortStats,
        counters: MirrorCounters,
        *,
        port: int,
        original_dst: tuple[str, int],
        client: tuple[str, int],
        info: dict[str, Any],
    ) -> None:
        self.tunnel = tunnel
        self.stats = stats
        self.counters = counters
        self.stream_id = tunnel.conn.open_stream(
            port=port, original_dst=original_dst, client=client, info=info
        )
        self._pending: deque[bytes | memoryview] = deque()
        self._pending_bytes = 0
        self._finishing = False
        self.done = False
        tunnel.attach(self)
        tunnel.kick()

    def feed(self, data: bytes | memoryview) -> None:
        """Queue client bytes for the copy (dropped if the copy is too far behind)."""
        if self.done:
            return
        self.stats.bytes_in += len(data)
        if self._pending:
            self._pending.append(data)
            self._pending_bytes += len(data)
        else:
            sent = self.tunnel.conn.send_data(self.stream_id, data)
            if sent < len(data):
                rest = memoryview(data)[sent:]
                self._pending.append(rest)
                self._pending_bytes += len(rest)
            self.tunnel.kick()
        if self._pending_bytes > MAX_PENDING:
            self.counters.dropped += 1
            self.abort("the local copy fell behind the real traffic; copy dropped")

    def finish(self) -> None:
        """The client finished sending: half-close the copy once it is flushed."""
        if self.done:
            return
        self._finishing = True
        if not self._pending:
            self._end()

    def abort(self, reason: str) -> None:
        """End the copy with a reset (the local process sees the connection reset)."""
        if self.done:
            return
        self.stats.error(reason)
        self.tunnel.conn.reset(self.stream_id, reason)
        self.tunnel.kick()
        self._close()

    def _end(self) -> None:
        self.tunnel.conn.shutdown(self.stream_id)
        self.tunnel.kick()
        self._close()

    def _close(self) -> None:
        self.done = True
        self._pending.clear()
        self._pending_bytes = 0
        self.tunnel.forget(self)

    # --- tunnel side (the Endpoint interface) ----------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        """The daemon sends nothing on a copy; anything it does is ignored."""

    def on_credit(self) -> None:
        conn = self.tunnel.conn
        while self._pending:
            chunk = self._pending[0]
            sent = conn.send_data(self.stream_id, chunk)
            self._pending_bytes -= sent
            if sent < len(chunk):
                self._pending[0] = memoryview(chunk)[sent:]
                break
            self._pending.popleft()
        self.tunnel.kick()
        if not self._pending and self._finishing:
            self._end()

    def on_half_closed(self) -> None:
        """The local process closed its side; the copy may still be written."""

    def on_reset(self, reason: str) -> None:
        if not self.done:
            self.stats.error(f"local copy: {reason}")
            self.done = True
            self._pending.clear()
            self.tunnel.forget(self)

    def pause_for_output(self) -> None:
        """Never: the source is real traffic."""

    def resume_after_output(self) -> None:
        """Never paused."""


class PcapStream:
    """Raw captured packets, framed as pcap records, on a stream of their own."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.stats = PortStats()
        self.records = 0
        self.dropped = 0
        self.stream_id = tunnel.conn.open_stream(
            port=0, original_dst=("", 0), client=("", 0), info={"kind": "pcap"}
        )
        tunnel.attach(self)
        self.done = False

    def write(self, packet: memoryview, length: int) -> None:
        if self.done:
            return
        rec = pcap.record(packet, timestamp_ns=time.time_ns(), original_length=length)
        # Whole records or nothing, so the file stays readable when we drop.
        if self.tunnel.conn.send_window(self.stream_id) < len(rec):
            self.dropped += 1
            return
        self.tunnel.conn.send_data(self.stream_id, rec)
        self.records += 1
        self.tunnel.kick()

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.tunnel.conn.shutdown(self.stream_id)
            self.tunnel.kick()
            self.tunnel.forget(self)

    def on_data(self, data: bytes | memoryview) -> None:
        pass

    def on_credit(self) -> None:
        pass

    def on_half_closed(self) -> None:
        pass

    def on_reset(self, reason: str) -> None:
        if not self.done:
            log.warning("pcap stream reset by the daemon: %s", reason)
            self.done = True
            self.tunnel.forget(self)

    def pause_for_output(self) -> None:
        pass

    def resume_after_output(self) -> None:
        pass


class CaptureMirror:
    """The capture method for every port mirrored by capture in this agent."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.reassembler = Reassembler()
        self.sniffer = Sniffer(self._on_segment)
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

    def stats(self) -> dict[str, Any]:
        r = self.reassembler.counters
        return {
            "packets": self.sniffer.packets,
            "kernel_packets": self.sniffer.kernel_packets,
            "kernel_drops": self.sniffer.kernel_drops,
            "truncated": self.sniffer.truncated,
            "duplicate_bytes": r.duplicate_bytes,
            "refused_flows": r.refused_flows,
            "open_flows": len(self.reassembler),
            "pcap_records": self.pcap.records if self.pcap else 0,
            "pcap_dropped": self.pcap.dropped if self.pcap else 0,
        }

    def _on_packet(self, packet: memoryview, length: int) -> None:
        tunnel = self.agent.tunnel
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
        tunnel = self.agent.tunnel
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
            info={"mirror": "capture", "partial": partial},
        )


class _Half(asyncio.Protocol):
    """One side of a relay inside the agent; writes what it reads to its peer."""

    def __init__(self, relay: PassthroughBridge) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.eof = False
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=RELAY_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            # Not connected onward yet (pausing in connection_made is not honoured by
            # every loop): hold the bytes and stop reading until connected.
            self.early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
        elif not peer.transport.is_closing():
            peer.transport.write(data)
        self.relay.on_bytes(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.forward_eof()
        self.relay.on_eof(self)
        return True

    def forward_eof(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            if not peer.transport.is_closing():
                peer.transport.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.on_lost(self, exc)

    # The peer's socket is full: stop reading ours (real TCP backpressure).
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class PassthroughBridge(_Half):
    """The client side of a passthrough-mirrored connection."""

    def __init__(
        self, agent: Agent, sub: Subscription, counters: MirrorCounters, *, copy: bool = True
    ) -> None:
        super().__init__(self)
        self.agent = agent
        self.sub = sub
        self.counters = counters
        # Without a copy this is a plain relay to the original server (a stolen
        # port while no daemon is connected).
        self._copy = copy
        self.copy: MirrorCopy | None = None
        self._buffer: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        from netmirror.tunnel import original_destination

        assert self.transport is not None
        dst = original_destination(self.transport.get_extra_info("socket"))
        if dst is None:
            abort_with_reset(self.transport)
            return
        peer = self.transport.get_extra_info("peername") or ("", 0)
        self.counters.flows += 1
        tunnel = self.agent.tunnel
        if tunnel is None or not self._copy:
            self.counters.no_daemon += 1
        else:
            self.copy = MirrorCopy(
                tunnel,
                self.sub.stats,
                self.counters,
                port=self.sub.port,
                original_dst=dst,
                client=(str(peer[0]), int(peer[1])),
                info={"mirror": "passthrough"},
            )
        self.transport.pause_reading()
        self.agent.tasks.spawn(self._connect(dst), name=f"passthrough-{dst[1]}")

    async def _connect(self, dst: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Marked so our own rules never redirect this connection back to us.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
            sock.setblocking(False)
            await loop.sock_connect(sock, dst)
            upstream = _Half(self)
            # The server may speak first: its bytes must find their way at once.
            upstream.peer = self
            await loop.create_connection(lambda: upstream, sock=sock)
        except OSError as exc:
            sock.close()
            log.warning("passthrough to %s:%d failed: %s", dst[0], dst[1], exc)
            self.sub.stats.error(f"original server {dst[0]}:{dst[1]}: {exc}")
            if self.copy is not None:
                self.copy.abort("the original server refused the connection")
            abort_with_reset(self.transport)
            return
        self.peer = upstream
        if self.transport is None or self.transport.is_closing():
            abort_with_reset(upstream.transport)
            return
        assert upstream.transport is not None
        for chunk in self.early:
            upstream.transport.write(chunk)
        self.early.clear()
        if self.eof:
            self.forward_eof()
        else:
            self.transport.resume_reading()

    def on_bytes(self, side: _Half, data: bytes) -> None:
        if side is self:
            if self.copy is not None:
                self.copy.feed(data)
        else:
            self.sub.stats.bytes_out += len(data)

    def on_eof(self, side: _Half) -> None:
        if side is self and self.copy is not None:
            self.copy.finish()
        self._maybe_close()

    def on_lost(self, side: _Half, exc: Exception | None) -> None:
        other = self.peer if side is self else self
        if exc is not None:
            if side is self and self.copy is not None:
                self.copy.abort("the client reset the connection")
            if other is not None:
                abort_with_reset(other.transport)
        elif other is not None and other.transport is not None:
            other.transport.close()

    def _maybe_close(self) -> None:
        upstream = self.peer
        if self.eof and upstream is not None and upstream.eof:
            for half in (self, upstream):
                if half.transport is not None:
                    half.transport.close()
