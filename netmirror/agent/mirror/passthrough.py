"""Mirror by passthrough: the agent relays each connection and copies the client's bytes.

A REDIRECT rule sends the port's connections to the agent; :class:`PassthroughBridge`
connects onward to the original server (marked, so the rule lets it pass) and
relays both ways with real TCP backpressure, feeding a :class:`~.copy.MirrorCopy`
on the side. Without a copy it is the plain relay a stolen port falls back to
while no daemon is attached.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from netmirror.agent.link import Link
from netmirror.agent.mirror.copy import MirrorCopy
from netmirror.agent.subscription import Subscription
from netmirror.net.sockets import abort_with_reset, connect_marked, original_destination
from netmirror.netfilter import AGENT_MARK
from netmirror.wire.kinds import StreamKind, stream_info
from netmirror.wire.stats import MirrorCounters

log = logging.getLogger(__name__)

#: Bytes buffered towards one side of a relay before the other side stops being read.
RELAY_HIGH_WATER = 1024 * 1024


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
        self, link: Link, sub: Subscription, counters: MirrorCounters, *, copy: bool = True
    ) -> None:
        super().__init__(self)
        self.link = link
        self.sub = sub
        self.counters = counters
        # Without a copy this is a plain relay to the original server (a stolen
        # port while no daemon is connected).
        self._copy = copy
        self.copy: MirrorCopy | None = None
        self._buffer: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        dst = original_destination(self.transport.get_extra_info("socket"))
        if dst is None:
            abort_with_reset(self.transport)
            return
        peer = self.transport.get_extra_info("peername") or ("", 0)
        self.counters.flows += 1
        tunnel = self.link.tunnel
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
                info=stream_info(StreamKind.MIRROR, mirror="passthrough"),
            )
        self.transport.pause_reading()
        self.link.tasks.spawn(self._connect(dst), name=f"passthrough-{dst[1]}")

    async def _connect(self, dst: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        sock = None
        try:
            # Marked so our own rules never redirect this connection back to us.
            sock = await connect_marked(dst, mark=AGENT_MARK)
            upstream = _Half(self)
            # The server may speak first: its bytes must find their way at once.
            upstream.peer = self
            await loop.create_connection(lambda: upstream, sock=sock)
        except OSError as exc:
            if sock is not None:
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
