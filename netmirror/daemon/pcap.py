"""The pcap file on the developer's machine, fed by the agent's pcap stream."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import IO

from netmirror.errors import ConfigError
from netmirror.tunnel import Tunnel
from netmirror.wire import pcap
from netmirror.wire.stats import PcapStatus, PortStats

log = logging.getLogger(__name__)

_CAPLEN = struct.Struct("<I")


class PcapWriter:
    """Writes whole pcap records up to ``max_bytes``, then stops and says so."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        try:
            self._file: IO[bytes] | None = open(path, "wb")
        except OSError as exc:
            raise ConfigError(f"pcap: cannot write {path}: {exc.strerror or exc}") from None
        self._file.write(pcap.global_header())
        self._file.flush()
        self.written = len(pcap.global_header())
        self.records = 0
        self.full = False
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes of the record stream; only whole records reach the file."""
        if self.full or self._file is None:
            return
        buf = self._buf
        buf += data
        start = 0
        while len(buf) - start >= pcap.RECORD_HEADER_SIZE:
            (caplen,) = _CAPLEN.unpack_from(buf, start + 8)
            total = pcap.RECORD_HEADER_SIZE + caplen
            if len(buf) - start < total:
                break
            if self.written + total > self.max_bytes:
                self.full = True
                log.warning(
                    "pcap file %s reached its limit of %d bytes: no more packets are written",
                    self.path,
                    self.max_bytes,
                )
                break
            self._file.write(buf[start : start + total])
            self.written += total
            self.records += 1
            start += total
        del buf[:start]
        self._file.flush()

    def restart_stream(self) -> None:
        """A new agent stream starts at a record boundary: drop any partial record."""
        self._buf.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def status(self) -> PcapStatus:
        """The file and how much of it is written."""
        return PcapStatus(
            path=str(self.path),
            bytes=self.written,
            records=self.records,
            max_bytes=self.max_bytes,
            state="full: stopped writing" if self.full else "writing",
        )


class PcapSink:
    """The daemon's end of the agent's pcap stream."""

    def __init__(self, tunnel: Tunnel, stream_id: int, writer: PcapWriter) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self.stats = PortStats()
        self.writer = writer
        writer.restart_stream()

    def on_data(self, data: bytes | memoryview) -> None:
        self.writer.feed(data)
        self.tunnel.conn.grant(self.stream_id, len(data))
        self.tunnel.kick()

    def on_credit(self) -> None:
        pass

    def on_half_closed(self) -> None:
        self.tunnel.conn.shutdown(self.stream_id)
        self.tunnel.kick()
        self.tunnel.forget(self)

    def on_reset(self, reason: str) -> None:
        self.tunnel.forget(self)

    def pause_for_output(self) -> None:
        pass

    def resume_after_output(self) -> None:
        pass
