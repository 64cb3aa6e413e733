"""Thin I/O around the protocol: a websocket on one side, TCP sockets on the other.

:class:`Tunnel` feeds websocket messages into a :class:`~netmirror.wire.Connection`
and writes out what it queues. :class:`StreamBridge` joins one TCP connection to
one stream. Both agent and daemon use them; they differ only in who opens streams.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import aiohttp
from aiohttp import web

from netmirror.errors import ProtocolError
from netmirror.net.sockets import abort_with_reset
from netmirror.wire import Connection
from netmirror.wire import events as ev
from netmirror.wire.stats import PortStats

log = logging.getLogger(__name__)

#: Size of the websocket messages we send: whole frames up to this size, or one larger
#: frame alone (the protocol is a byte stream, so this is only a transport chunk).
WS_MESSAGE_SIZE = 256 * 1024
#: Largest websocket message either end accepts; anything larger is sent in pieces.
WS_MAX_MESSAGE = 16 * 1024 * 1024
#: Stop reading sockets while this much tunnel output is waiting for the websocket.
OUTPUT_HIGH_WATER = 4 * 1024 * 1024
#: Local socket write buffer above which we stop granting credit.
SOCKET_HIGH_WATER = 256 * 1024

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def _sink_queue() -> type[Any] | None:
    """aiohttp's websocket message queue, with binary messages handed over at once.

    aiohttp's parser puts every message in a queue and wakes the task waiting in
    ``receive()``: a future and an event-loop turn per message, the largest part of
    the tunnel's cost per message when traffic is one request at a time. The
    subclass calls the tunnel's sink from the parser instead, in the same callback
    that read the bytes, while the queue is empty (so order is kept); anything else
    (control frames, what came before the sink was set) goes through the queue
    as before. aiohttp creates its queue by the module-level name, which is
    replaced here; the class behaves exactly as aiohttp's while no sink is set, so
    other websockets of the process are unchanged. Where aiohttp's layout differs
    (another version), nothing is replaced and ``receive()`` does all.
    """
    try:
        import aiohttp.client as client_module
        import aiohttp.web_ws as web_ws_module
        from aiohttp._websocket.reader import WebSocketDataQueue
    except ImportError:
        return None
    if (
        getattr(client_module, "WebSocketDataQueue", None) is not WebSocketDataQueue
        or getattr(web_ws_module, "WebSocketDataQueue", None) is not WebSocketDataQueue
    ):
        return None
    binary = aiohttp.WSMsgType.BINARY

    class SinkQueue(WebSocketDataQueue):
        sink: Callable[[bytes], object] | None = None

        def feed_data(self, data: Any, size: int) -> None:
            sink = self.sink
            if sink is not None and data[0] == binary and not self._buffer:
                sink(data[1])
                return
            super().feed_data(data, size)

    client_module.WebSocketDataQueue = SinkQueue  # type: ignore[attr-defined]
    web_ws_module.WebSocketDataQueue = SinkQueue  # type: ignore[attr-defined]
    return SinkQueue


_SinkQueue = _sink_queue()
_BINARY = int(aiohttp.WSMsgType.BINARY)


def _direct_writer(ws: Any) -> tuple[Callable[[bytes, int, int], None], Any] | None:
    """aiohttp's synchronous frame writer and its protocol, where this aiohttp has them.

    ``send_bytes`` is a coroutine: called from a task, it costs a task wakeup per batch
    of frames. The writer's own synchronous method writes the same frame (masked on
    the client side); flow control stays ours (the protocol says when the transport is
    full, and the writer task then waits for it to drain).
    """
    writer = getattr(ws, "_writer", None)
    write = getattr(writer, "_write_websocket_frame", None)
    protocol = getattr(writer, "protocol", None)
    if (
        write is None
        or getattr(writer, "compress", None)
        or not hasattr(protocol, "writing_paused")
        or not hasattr(protocol, "_drain_helper")
    ):
        return None
    return write, protocol


#: Queued to wake a reader whose sink stopped; never reaches the protocol.
_WAKE_MESSAGE = aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, b"", None)


class Endpoint(Protocol):
    """What the tunnel dispatches a stream's events to."""

    stream_id: int
    stats: PortStats

    def on_data(self, data: bytes | memoryview) -> None: ...
    def on_credit(self) -> None: ...
    def on_half_closed(self) -> None: ...
    def on_reset(self, reason: str) -> None: ...
    def pause_for_output(self) -> None: ...
    def resume_after_output(self) -> None: ...


class StreamBridge(asyncio.Protocol):
    """One TCP connection <-> one tunnel stream.

    Reading from the socket stops when the stream's send window is used up and
    resumes on credit; credit is granted back only once the socket has taken the
    bytes, so a slow reader bounds memory on both ends to one window.
    """

    def __init__(
        self,
        tunnel: Tunnel,
        stats: PortStats,
        *,
        inbound: bool,
        stream_id: int = 0,
        discard_replies: bool = False,
    ) -> None:
        self.tunnel = tunnel
        # A mirror copy: what the local process answers is read and thrown away.
        self._discard = discard_replies
        self.stats = stats
        self.stream_id = stream_id
        # inbound: bytes from the tunnel go to this socket count as bytes_in.
        self._inbound = inbound
        self.transport: asyncio.Transport | None = None
        self._backlog: memoryview | None = None
        self._pending_writes: list[bytes | memoryview] = []
        self._eof_from_socket = False
        self._eof_sent = False
        self._eof_from_tunnel = False
        self._write_paused = False
        self._read_paused = False
        self._consumed = 0
        # The window this side grants starts small and doubles while the socket
        # keeps up, so a fast stream gets room for bandwidth x delay and a slow
        # one holds little memory.
        self._window = tunnel.conn.limits.initial_window
        self._max_window = max(self._window, tunnel.conn.limits.max_window)
        self._grant_step = max(1, self._window // 4)
        self._closed = False
        self._aborted = False

    # --- socket side -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        if self._aborted:
            # Reset by the peer while we were still connecting.
            abort_with_reset(transport)
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=SOCKET_HIGH_WATER)
        if self._pending_writes:
            for chunk in self._pending_writes:
                self._write(chunk)
            self._pending_writes.clear()
        if self._eof_from_tunnel:
            self._write_eof()

    def data_received(self, data: bytes) -> None:
        if self._inbound:
            self.stats.bytes_out += len(data)
        else:
            self.stats.bytes_in += len(data)
        if self._discard:
            return
        if self._backlog is not None:
            # Only possible in the loop iteration that paused us; keep order.
            self._backlog = memoryview(bytes(self._backlog) + data)
            return
        sent = self.tunnel.conn.send_data(self.stream_id, data)
        if sent < len(data) and self.tunnel.conn.is_open(self.stream_id):
            self._backlog = memoryview(data)[sent:]
            self._pause_reading()
        self.tunnel.kick(self)

    def eof_received(self) -> bool:
        self._eof_from_socket = True
        if self._backlog is None:
            self._send_eof()
        # Keep the socket open for writing: half-close is preserved.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self.tunnel.conn.is_open(self.stream_id):
            if exc is None and self._eof_sent and self._eof_from_tunnel:
                pass
            else:
                reason = f"local socket closed: {exc!r}" if exc else "local socket closed"
                if exc is not None:
                    self.stats.error(reason)
                self.tunnel.conn.reset(self.stream_id, reason)
                self.tunnel.kick()
        self.tunnel.forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._grant()

    # --- tunnel side -----------------------------------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        """Bytes that came through the tunnel for this socket."""
        if self._inbound:
            self.stats.bytes_in += len(data)
        else:
            self.stats.bytes_out += len(data)
        if self.transport is None:
            self._pending_writes.append(data)
            return
        self._write(data)

    def _write(self, data: bytes | memoryview) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.transport.write(data)
        self._consumed += len(data)
        if not self._write_paused and self._consumed >= self._grant_step:
            # Nothing left in the buffer: the socket keeps up, so the window may grow.
            self._grant(grow=self.transport.get_write_buffer_size() == 0)

    def _grant(self, *, grow: bool = False) -> None:
        if self._consumed:
            extra = 0
            if grow and self._window < self._max_window:
                extra = min(self._window, self._max_window - self._window)
                self._window += extra
                self._grant_step = self._window // 4
            self.tunnel.conn.grant(self.stream_id, self._consumed + extra)
            self._consumed = 0
            self.tunnel.kick()

    def on_credit(self) -> None:
        """The peer granted credit: send what waited, then read again."""
        if self._backlog is not None:
            backlog = self._backlog
            sent = self.tunnel.conn.send_data(self.stream_id, backlog)
            if sent < len(backlog):
                self._backlog = backlog[sent:]
                self.tunnel.kick()
                return
            self._backlog = None
            self.tunnel.kick()
            if self._eof_from_socket:
                self._send_eof()
                return
        self._resume_reading()

    def on_half_closed(self) -> None:
        """The remote end will send no more (FIN): pass it on to the socket."""
        self._eof_from_tunnel = True
        if self.transport is not None:
            self._write_eof()

    def on_reset(self, reason: str) -> None:
        """The other end aborted the stream: abort the socket with RST."""
        log.debug("stream %d reset by peer: %s", self.stream_id, reason)
        if not self._aborted:
            self.stats.error(reason)
        self._aborted = True
        self._pending_writes.clear()
        abort_with_reset(self.transport)
        self.tunnel.forget(self)

    def pause_for_output(self) -> None:
        """The websocket is behind: stop reading until it drains."""
        self._pause_reading()

    def resume_after_output(self) -> None:
        """The websocket drained."""
        if self._backlog is None:
            self._resume_reading()

    # --- helpers ---------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self._closed:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self._closed:
            self._read_paused = False
            self.transport.resume_reading()

    def _send_eof(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            self.tunnel.conn.shutdown(self.stream_id)
            self.tunnel.kick()
            self._maybe_close()

    def _write_eof(self) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._eof_sent and self._eof_from_tunnel and self.transport is not None:
            # Both directions are done; close() flushes what is buffered first.
            self.transport.close()


class OpeningBridge(StreamBridge):
    """A socket accepted here that opens a stream of its own, or is refused with RST.

    Subclasses decide where the stream goes and call :meth:`open_stream`; until then
    (and for good once refused) nothing of the socket reaches the tunnel.
    """

    _refused = False

    def refuse(self, transport: asyncio.Transport, error: str = "") -> None:
        """Reset the client: there is no stream for it."""
        self._refused = True
        if error:
            self.stats.error(error)
        abort_with_reset(transport)

    def open_stream(
        self,
        tunnel: Tunnel,
        transport: asyncio.Transport,
        *,
        port: int,
        dst: tuple[str, int],
        info: dict[str, Any] | None = None,
    ) -> None:
        """Announce the stream to the peer and start relaying ``transport``."""
        peer = transport.get_extra_info("peername") or ("", 0)
        if not isinstance(peer, tuple):
            peer = ("local", 0)  # a unix socket's peer has no address
        try:
            self.stream_id = tunnel.conn.open_stream(
                port=port, original_dst=dst, client=(str(peer[0]), int(peer[1])), info=info
            )
        except ProtocolError as exc:  # the tunnel is closing, or out of stream ids
            self.refuse(transport, f"cannot open a stream: {exc}")
            return
        tunnel.attach(self)
        super().connection_made(transport)
        tunnel.kick()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def eof_received(self) -> bool:
        return False if self._refused else super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._refused:
            super().connection_lost(exc)


@dataclass
class _Waiters:
    paused: set[Endpoint] = field(default_factory=set)


class Tunnel:
    """A protocol connection bound to one websocket.

    ``handler`` receives every event that is not stream traffic (stream traffic is
    dispatched to the bridges here, on the hot path).
    """

    def __init__(
        self,
        ws: WebSocket,
        conn: Connection,
        *,
        handler: Callable[[ev.Event], None],
        name: str,
    ) -> None:
        self.ws = ws
        self.conn = conn
        self.name = name
        self.bridges: dict[int, Endpoint] = {}
        self._handler = handler
        self._wakeup = asyncio.Event()
        self._waiters = _Waiters()
        self._closed = False
        self._ended = asyncio.Event()
        self._flush_soon = False
        # Frames are written straight to the transport while it takes them (a task
        # wakeup per batch saved); once it is full, the writer task waits for it.
        self._direct = _direct_writer(ws)
        self._draining = False
        self._writer_task: asyncio.Task[None] | None = None
        self._sink_failed = False
        self.close_reason = ""

    def kick(self, bridge: Endpoint | None = None) -> None:
        """Output is queued: flush it at the end of this loop turn (with everything else
        queued meanwhile), and apply backpressure if the websocket is behind."""
        if not self._flush_soon:
            try:
                asyncio.get_running_loop().call_soon(self._flush)
                self._flush_soon = True
            except RuntimeError:  # no loop running (a test driving the protocol)
                self._wakeup.set()
        if bridge is not None and self.conn.pending_output > OUTPUT_HIGH_WATER:
            self._waiters.paused.add(bridge)
            bridge.pause_for_output()

    def attach(self, bridge: Endpoint) -> None:
        """Route the events of ``bridge.stream_id`` to ``bridge``."""
        self.bridges[bridge.stream_id] = bridge
        bridge.stats.connections_total += 1
        bridge.stats.connections_open += 1

    def forget(self, bridge: Endpoint) -> None:
        """The bridge's socket is gone."""
        if self.bridges.get(bridge.stream_id) is bridge:
            del self.bridges[bridge.stream_id]
            bridge.stats.connections_open -= 1
        self._waiters.paused.discard(bridge)

    async def run(self) -> str:
        """Pump until the websocket closes; returns why it closed."""
        writer = asyncio.get_running_loop().create_task(self._writer(), name=f"{self.name}:writer")
        self._writer_task = writer
        try:
            await self._reader()
        finally:
            self._closed = True
            self._wakeup.set()
            try:
                await asyncio.wait_for(writer, timeout=2)
            except (TimeoutError, asyncio.CancelledError):
                writer.cancel()
            self.abort_streams("the tunnel closed")
            if not self.ws.closed:
                await self.ws.close()
            self._ended.set()
        return self.close_reason

    async def closed(self) -> None:
        """Wait until :meth:`run` has finished."""
        await self._ended.wait()

    def abort_streams(self, reason: str) -> None:
        """Reset every socket: their stream cannot continue."""
        for bridge in list(self.bridges.values()):
            bridge.on_reset(reason)

    async def close(self) -> None:
        """Flush what is queued, in order, and close the websocket."""
        self._closed = True
        self._wakeup.set()
        writer = self._writer_task
        if writer is not None and not writer.done():
            # The writer sends what is queued and then ends; sending beside it could
            # put later frames before earlier ones.
            try:
                await asyncio.wait_for(asyncio.shield(writer), timeout=2)
            except (TimeoutError, asyncio.CancelledError):
                writer.cancel()
        if not self.ws.closed:
            try:
                await self._send_queued()
            except (ConnectionError, RuntimeError):
                pass
            await self.ws.close()

    async def _send_queued(self) -> None:
        """Send everything the protocol has queued, as websocket messages."""
        ws = self.ws
        for message in self.conn.messages_to_send(WS_MESSAGE_SIZE):
            if len(message) <= WS_MAX_MESSAGE:
                await ws.send_bytes(message)
                continue
            for start in range(0, len(message), WS_MAX_MESSAGE):  # one frame above the limit
                await ws.send_bytes(message[start : start + WS_MAX_MESSAGE])

    async def _reader(self) -> None:
        ws = self.ws
        queue = getattr(ws, "_reader", None)
        if _SinkQueue is not None and isinstance(queue, _SinkQueue):
            # Binary messages are handled as the parser finds them (see _SinkQueue);
            # receive() still brings what was queued before, and control messages.
            queue.sink = self._receive
        try:
            while True:
                msg = await ws.receive()
                if self._sink_failed:
                    return
                if msg.type == aiohttp.WSMsgType.BINARY:
                    if not self._receive(msg.data):
                        return
                elif msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                ):
                    self.close_reason = self.close_reason or "the peer closed the tunnel"
                    return
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    self.close_reason = f"websocket error: {ws.exception()!r}"
                    return
                else:
                    self.conn.fail("protocol", f"unexpected websocket message type {msg.type.name}")
                    self.close_reason = f"unexpected websocket message type {msg.type.name}"
                    return
        finally:
            if _SinkQueue is not None and isinstance(queue, _SinkQueue):
                queue.sink = None

    def _receive(self, data: bytes) -> bool:
        """One binary message: into the protocol, its events out. False once the tunnel
        must close (a protocol error): the reader is woken to end."""
        conn = self.conn
        try:
            try:
                conn.receive_data(data)
            except ProtocolError as exc:
                log.warning("closing the tunnel: %s", exc)
                self.close_reason = str(exc)
                for event in conn.events_received():
                    self._dispatch(event, self.bridges)
                self._wakeup.set()
                self._sink_stop()
                return False
            for event in conn.events_received():
                self._dispatch(event, self.bridges)
            if conn.pending_output:
                self._wakeup.set()
            return True
        except Exception as exc:  # a bug in a bridge must not break the websocket's parser
            log.exception("closing the tunnel")
            self.close_reason = f"internal error: {exc!r}"
            self._sink_stop()
            return False

    def _sink_stop(self) -> None:
        """Handle no more messages; wake the reader (waiting in receive()) to end."""
        self._sink_failed = True
        queue = getattr(self.ws, "_reader", None)
        if _SinkQueue is not None and isinstance(queue, _SinkQueue) and queue.sink is not None:
            queue.sink = None
            queue.feed_data(_WAKE_MESSAGE, 0)

    def _dispatch(self, event: ev.Event, bridges: dict[int, Endpoint]) -> None:
        # Stream traffic first: it is nearly every event.
        if type(event) is ev.DataReceived:
            bridge = bridges.get(event.stream_id)
            if bridge is not None:
                bridge.on_data(event.data)
            return
        if type(event) is ev.CreditGranted:
            bridge = bridges.get(event.stream_id)
            if bridge is not None:
                bridge.on_credit()
            return
        if type(event) is ev.StreamHalfClosed:
            bridge = bridges.get(event.stream_id)
            if bridge is not None:
                bridge.on_half_closed()
            return
        if type(event) is ev.StreamReset:
            bridge = bridges.get(event.stream_id)
            if bridge is not None:
                bridge.on_reset(event.reason)
            return
        if type(event) is ev.ErrorReceived:
            self.close_reason = f"{event.code}: {event.message}"
        self._handler(event)

    def _flush(self) -> None:
        """Write what the protocol queued this turn, as frames, without a task switch."""
        self._flush_soon = False
        direct = self._direct
        if direct is None or self._draining or self._closed or self._writer_task is None:
            self._wakeup.set()  # the writer task does it
            return
        write, protocol = direct
        try:
            for message in self.conn.messages_to_send(WS_MESSAGE_SIZE):
                for start in range(0, len(message), WS_MAX_MESSAGE):
                    write(message[start : start + WS_MAX_MESSAGE], _BINARY, 0)
        except ConnectionError as exc:  # the transport is closing: the reader ends it
            log.debug("websocket send failed: %r", exc)
            return
        if protocol.writing_paused:
            self._draining = True
            self._wakeup.set()
        else:
            self._resume_bridges()

    def _resume_bridges(self) -> None:
        if self._waiters.paused and self.conn.pending_output < OUTPUT_HIGH_WATER // 2:
            paused, self._waiters.paused = self._waiters.paused, set()
            for bridge in paused:
                bridge.resume_after_output()

    async def _writer(self) -> None:
        conn = self.conn
        wakeup = self._wakeup
        while True:
            await wakeup.wait()
            wakeup.clear()
            try:
                if self._draining and self._direct is not None:
                    await self._direct[1]._drain_helper()
                    self._draining = False
                await self._send_queued()
            except (ConnectionError, RuntimeError) as exc:
                log.debug("websocket send failed: %r", exc)
                return
            self._resume_bridges()
            if self._closed and not conn.pending_output:
                return


class DatagramStream:
    """One UDP association <-> one tunnel stream of datagram records.

    UDP has no back-pressure: a datagram that finds the stream's send window full
    is dropped (and counted), as a full socket buffer would drop it. What comes in
    is handed to ``deliver`` at once, so credit goes straight back.
    """

    def __init__(
        self,
        tunnel: Tunnel,
        stats: PortStats,
        stream_id: int,
        *,
        deliver: Callable[[str, int, bytes], None],
        closed: Callable[[], None],
    ) -> None:
        from netmirror.wire.datagrams import DatagramDecoder

        self.tunnel = tunnel
        self.stats = stats
        self.stream_id = stream_id
        self._deliver = deliver
        self._closed_cb = closed
        self._decoder = DatagramDecoder()
        self.dropped = 0
        self.open = True

    def send(self, host: str, port: int, payload: bytes) -> bool:
        """Send one datagram to the other end; False if it was dropped."""
        from netmirror.wire.datagrams import encode_datagram

        if not self.open:
            return False
        record = encode_datagram(host, port, payload)
        conn = self.tunnel.conn
        if conn.send_window(self.stream_id) < len(record):
            self.dropped += 1
            return False
        conn.send_data(self.stream_id, record)
        self.stats.bytes_out += len(payload)
        self.tunnel.kick()
        return True

    def close(self, reason: str = "closed") -> None:
        """End the association here and at the other end."""
        if not self.open:
            return
        if self.tunnel.conn.is_open(self.stream_id):
            self.tunnel.conn.reset(self.stream_id, reason)
            self.tunnel.kick()
        self._end()

    def _end(self) -> None:
        if self.open:
            self.open = False
            self.tunnel.forget(self)
            self._closed_cb()

    # --- Endpoint ----------------------------------------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        try:
            datagrams = self._decoder.feed(data)
        except ValueError as exc:
            log.warning("UDP stream %d: %s; closing it", self.stream_id, exc)
            self.close(f"bad datagram record: {exc}")
            return
        self.tunnel.conn.grant(self.stream_id, len(data))
        self.tunnel.kick()
        for host, port, payload in datagrams:
            self.stats.bytes_in += len(payload)
            self._deliver(host, port, payload)

    def on_credit(self) -> None:
        pass

    def on_half_closed(self) -> None:
        self.close()

    def on_reset(self, reason: str) -> None:
        log.debug("UDP stream %d reset by peer: %s", self.stream_id, reason)
        self._end()

    def pause_for_output(self) -> None:
        pass  # datagrams are dropped instead, when the window is full

    def resume_after_output(self) -> None:
        pass
