"""The copy of one connection's client bytes, on a stream of its own to the daemon.

A :class:`MirrorCopy` never pushes back on its source (the capture or a
passthrough relay): it holds at most ``MAX_PENDING`` bytes and is dropped, and
counted, when the daemon or the local process falls behind. :class:`PcapStream`
carries raw captured packets as pcap records.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from netmirror.tunnel import Tunnel
from netmirror.wire import pcap
from netmirror.wire.kinds import StreamKind, stream_info
from netmirror.wire.stats import MirrorCounters, PortStats

log = logging.getLogger(__name__)

#: Bytes a copy may hold for a daemon that does not keep up before it is dropped.
MAX_PENDING = 32 * 1024 * 1024


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
            port=0, original_dst=("", 0), client=("", 0), info=stream_info(StreamKind.PCAP)
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
