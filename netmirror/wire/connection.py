"""Sans-I/O state machine of one tunnel between a daemon and an agent.

Feed received bytes with :meth:`Connection.receive_data`, collect what happened
with :meth:`Connection.events_received`, and send what
:meth:`Connection.data_to_send` returns. Nothing here touches a socket, a clock or
an event loop, so every rule (handshake, authentication, flow control, limits) is
tested by feeding bytes.

Streams are numbered like HTTP/2's: the agent opens odd ids, the daemon even ids,
each side's ids strictly increasing. Each side grants its peer a receive window
per stream; DATA beyond the window is a protocol violation, so a slow consumer
bounds what the other side may buffer for it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from netmirror.errors import AuthenticationError, ProtocolError
from netmirror.wire import events as ev
from netmirror.wire.files import FILE_OPS
from netmirror.wire.frames import (
    CREDIT,
    HEADER,
    HEADER_SIZE,
    JSON_FRAMES,
    MAX_STREAM_ID,
    MAX_WINDOW,
    PING,
    PROTOCOL_VERSION,
    FrameType,
    address_field,
    decode_json,
    encode_json,
    field,
    port_field,
)

MODES = ("steal", "mirror")
#: A received DATA payload of at least 1/ZERO_COPY_SHARE of its message is not copied.
ZERO_COPY_SHARE = 4
MAX_REASON = 1024

#: What the daemon may ask the agent with a REQUEST, besides streams and ports.
OPS = ("resolve", "environ", "listening", *FILE_OPS)


def token_sha256(token: str) -> bytes:
    """The digest an agent may be given instead of the token itself."""
    return hashlib.sha256(token.encode()).digest()


class Role(enum.Enum):
    """Which end of the tunnel this is."""

    AGENT = "agent"
    DAEMON = "daemon"


class State(enum.Enum):
    """Life of a tunnel."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one tunnel; each side enforces its own."""

    max_frame_size: int = 256 * 1024
    """Largest DATA payload accepted; larger data is split into frames of this size."""
    max_control_size: int = 16 * 1024
    """Largest JSON control frame accepted."""
    max_streams: int = 16384
    """Streams open at once; the peer's further streams are reset."""
    initial_window: int = 256 * 1024
    """Bytes the peer may send on a stream before it waits for credit."""
    max_window: int = 4 * 1024 * 1024
    """Largest window the I/O layer grows a stream to while its consumer keeps up."""
    max_subscriptions: int = 256
    """Ports one tunnel may subscribe at once."""
    max_requests: int = 256
    """Requests the agent works on at once; more are answered with an error."""
    max_reply_size: int = 1024 * 1024
    """Largest REPLY accepted (an environment may be larger than a control frame)."""

    def __post_init__(self) -> None:
        if not 1024 <= self.max_frame_size <= 16 * 1024 * 1024:
            raise ValueError("max_frame_size must be within 1 KiB..16 MiB")
        if not 1 <= self.initial_window <= MAX_WINDOW or not 1 <= self.max_window <= MAX_WINDOW:
            raise ValueError("windows must be within 1..2**31-1")
        if self.max_streams < 1 or self.max_subscriptions < 1 or self.max_control_size < 512:
            raise ValueError("limits must be positive")


class _Stream:
    __slots__ = ("recv_eof", "recv_window", "send_window", "sent_eof")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        self.sent_eof = False
        self.recv_eof = False


class Connection:
    """One end of a tunnel.

    The daemon's end sends its hello at construction; the agent's end checks the
    token in constant time before it accepts any other frame.
    """

    def __init__(
        self,
        role: Role,
        *,
        token: str = "",
        token_digest: bytes | None = None,
        session: str = "",
        limits: Limits | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        """``token`` is the session's secret; an agent may instead be given only its
        SHA-256 ``token_digest`` (so a pod spec can carry it without revealing it)."""
        self.role = role
        self.session = session
        self.limits = limits or Limits()
        self.state = State.HANDSHAKE
        self.peer_info: dict[str, Any] = {}
        # The agent keeps only the digest and compares digests in constant time.
        self._token_digest = token_digest or token_sha256(token)
        self._info = info or {}
        self._inbuf = bytearray()
        self._need = 0  # bytes the buffered, incomplete frame needs in all
        self._out: list[bytes | memoryview] = []
        self._out_size = 0
        # The size of each queued frame, in order (a frame is one or more chunks).
        self._out_frames: list[int] = []
        self._events: list[ev.Event] = []
        self._streams: dict[int, _Stream] = {}
        # Our own ids: odd for the agent, even for the daemon.
        self._next_id = 1 if role is Role.AGENT else 2
        self._last_peer_id = 0
        self._peer_parity = 0 if role is Role.AGENT else 1
        self._peer_window = self.limits.initial_window
        self._peer_max_frame = self.limits.max_frame_size
        self._next_request = 1
        self._subscribed: set[int] = set()
        self._pending_subs: dict[int, int] = {}
        # Requests: ids the daemon is waiting on, or the agent is working on.
        self._requests: set[int] = set()
        if role is Role.DAEMON:
            self._send_json(
                FrameType.HELLO,
                0,
                {
                    "version": PROTOCOL_VERSION,
                    "token": token,
                    "session": session,
                    "window": self.limits.initial_window,
                    "max_frame": self.limits.max_frame_size,
                },
            )

    # ------------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        """All bytes queued for the peer, in order; empties the queue."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        self._out_frames.clear()
        self._out_size = 0
        return data

    def messages_to_send(self, size: int) -> list[bytes]:
        """All bytes queued for the peer, cut into messages on frame boundaries.

        Each message holds whole frames and at most ``size`` bytes, unless one frame
        alone is larger. A peer that receives messages cut like this finds every
        frame inside one message and can hand out payloads without copying them.
        """
        if self._out_size <= size:
            data = self.data_to_send()
            return [data] if data else []
        chunks = self._out
        messages: list[bytes] = []
        batch: list[bytes | memoryview] = []
        batch_size = 0
        index = 0
        for frame_size in self._out_frames:
            if batch and batch_size + frame_size > size:
                messages.append(b"".join(batch))
                batch = []
                batch_size = 0
            taken = 0
            while taken < frame_size:
                chunk = chunks[index]
                index += 1
                batch.append(chunk)
                taken += len(chunk)
            batch_size += frame_size
        if batch:
            messages.append(b"".join(batch))
        chunks.clear()
        self._out_frames.clear()
        self._out_size = 0
        return messages

    @property
    def pending_output(self) -> int:
        """Bytes queued and not yet taken by :meth:`data_to_send`."""
        return self._out_size

    def events_received(self) -> list[ev.Event]:
        """Events parsed since the last call; empties the list."""
        events, self._events = self._events, []
        return events

    def _queue(self, *chunks: bytes | memoryview) -> None:
        """Queue one frame, given as one or more chunks."""
        size = 0
        for chunk in chunks:
            self._out.append(chunk)
            size += len(chunk)
        self._out_size += size
        self._out_frames.append(size)

    def _send_json(self, ftype: FrameType, stream_id: int, body: dict[str, Any]) -> None:
        self._queue(encode_json(ftype, stream_id, body))

    # ------------------------------------------------------------ local actions

    def open_stream(
        self,
        *,
        port: int,
        original_dst: tuple[str, int],
        client: tuple[str, int],
        info: dict[str, Any] | None = None,
    ) -> int:
        """Announce a new stream; returns its id."""
        self._require_open()
        stream_id = self._next_id
        if stream_id > MAX_STREAM_ID:
            raise ProtocolError("stream ids exhausted; reconnect the tunnel")
        self._next_id += 2
        self._streams[stream_id] = _Stream(self._peer_window, self.limits.initial_window)
        body: dict[str, Any] = {
            "port": port,
            "dst": list(original_dst),
            "src": list(client),
        }
        if info:
            body["info"] = info
        self._send_json(FrameType.OPEN, stream_id, body)
        return stream_id

    def send_window(self, stream_id: int) -> int:
        """How many bytes :meth:`send_data` would take now (0 for a closed stream)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.sent_eof:
            return 0
        return stream.send_window

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the window allows; returns how much.

        The caller keeps the rest and waits for :class:`CreditGranted`. Data for a
        stream that is gone (reset meanwhile) is dropped and 0 returned.
        """
        stream = self._streams.get(stream_id)
        if stream is None or stream.sent_eof:
            return 0
        size = min(len(data), stream.send_window)
        if size <= 0:
            return 0
        view = memoryview(data)
        if not view.readonly:
            # Zero-copy only for immutable buffers: a caller may reuse a bytearray.
            view = memoryview(view[:size].tobytes())
        step = self._peer_max_frame
        pack = HEADER.pack
        out = self._out
        frames = self._out_frames
        for start in range(0, size, step):
            chunk = view[start : min(start + step, size)]
            out.append(pack(FrameType.DATA, stream_id, len(chunk)))
            out.append(chunk)
            frames.append(HEADER_SIZE + len(chunk))
        self._out_size += size + HEADER_SIZE * ((size + step - 1) // step)
        stream.send_window -= size
        return size

    def shutdown(self, stream_id: int) -> None:
        """Half-close: we send no more data on the stream (TCP FIN)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.sent_eof:
            return
        stream.sent_eof = True
        self._queue(HEADER.pack(FrameType.SHUTDOWN, stream_id, 0))
        if stream.recv_eof:
            del self._streams[stream_id]

    def reset(self, stream_id: int, reason: str) -> None:
        """Abort the stream in both directions."""
        if self._streams.pop(stream_id, None) is None:
            return
        payload = reason.encode()[:MAX_REASON]
        self._queue(HEADER.pack(FrameType.RESET, stream_id, len(payload)), payload)

    def grant(self, stream_id: int, amount: int) -> None:
        """Let the peer send ``amount`` more bytes: we consumed that much."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.recv_eof or amount <= 0:
            return
        amount = min(amount, MAX_WINDOW - stream.recv_window)
        if amount <= 0:
            return
        stream.recv_window += amount
        self._queue(HEADER.pack(FrameType.CREDIT, stream_id, 4), CREDIT.pack(amount))

    def is_open(self, stream_id: int) -> bool:
        """True while the stream exists in at least one direction."""
        return stream_id in self._streams

    @property
    def open_streams(self) -> int:
        """Number of streams alive."""
        return len(self._streams)

    def ping(self, payload: int) -> None:
        """Ask the peer for a pong carrying ``payload``."""
        if self.state is State.CLOSED:
            return
        self._queue(HEADER.pack(FrameType.PING, 0, 8), PING.pack(payload))

    def subscribe(self, port: int, mode: str, options: dict[str, Any] | None = None) -> int:
        """(daemon) Ask the agent to take ``port``; returns the request id."""
        self._require_role(Role.DAEMON, "subscribe")
        request_id = self._new_request()
        self._send_json(
            FrameType.SUBSCRIBE,
            0,
            {"id": request_id, "port": port, "mode": mode, "options": options or {}},
        )
        return request_id

    def unsubscribe(self, port: int) -> int:
        """(daemon) Give ``port`` back; returns the request id."""
        self._require_role(Role.DAEMON, "unsubscribe")
        request_id = self._new_request()
        self._send_json(FrameType.UNSUBSCRIBE, 0, {"id": request_id, "port": port})
        return request_id

    def answer(self, request_id: int, port: int, *, ok: bool, error: str = "") -> None:
        """(agent) Answer a subscribe or unsubscribe request."""
        self._require_role(Role.AGENT, "answer")
        kind = self._pending_subs.pop(request_id, None)
        if ok and kind == FrameType.SUBSCRIBE:
            self._subscribed.add(port)
        elif ok and kind == FrameType.UNSUBSCRIBE:
            self._subscribed.discard(port)
        self._send_json(
            FrameType.SUBSCRIBED,
            0,
            {"id": request_id, "port": port, "ok": ok, "error": error[:MAX_REASON]},
        )

    def request(self, op: str, args: dict[str, Any] | None = None) -> int:
        """(daemon) Ask the agent to do ``op`` (one of :data:`OPS`); returns the request id.

        The answer arrives as :class:`~netmirror.wire.events.ReplyReceived`.
        """
        self._require_role(Role.DAEMON, "send requests")
        if op not in OPS:
            raise ValueError(f"unknown request {op!r}")
        request_id = self._new_request()
        self._requests.add(request_id)
        self._send_json(FrameType.REQUEST, 0, {"id": request_id, "op": op, "args": args or {}})
        return request_id

    def reply(
        self, request_id: int, result: dict[str, Any] | None = None, *, error: str = ""
    ) -> None:
        """(agent) Answer a request: with ``result``, or with ``error`` if it is set."""
        self._require_role(Role.AGENT, "reply")
        if request_id not in self._requests or self.state is not State.OPEN:
            return  # answered already, or the tunnel is gone
        self._requests.discard(request_id)
        body: dict[str, Any] = {"id": request_id, "ok": not error}
        if error:
            body["error"] = error[:MAX_REASON]
        else:
            body["result"] = result or {}
        frame = encode_json(FrameType.REPLY, 0, body)
        if len(frame) - HEADER_SIZE > self.limits.max_reply_size:
            frame = encode_json(
                FrameType.REPLY,
                0,
                {"id": request_id, "ok": False, "error": "the answer is too large to send"},
            )
        self._queue(frame)

    def report_stats(self, stats: dict[str, Any]) -> None:
        """(agent) Send counters only the agent knows to the daemon."""
        self._require_role(Role.AGENT, "report stats")
        if self.state is State.OPEN:
            self._send_json(FrameType.STATS, 0, stats)

    def fail(self, code: str, message: str) -> None:
        """Report a fatal error to the peer and close the tunnel."""
        if self.state is not State.CLOSED:
            self._send_json(FrameType.ERROR, 0, {"code": code, "message": message[:MAX_REASON]})
            self._close()

    def _close(self) -> None:
        """No stream survives a closed tunnel, and nothing more is queued."""
        self.state = State.CLOSED
        self._streams.clear()
        self._inbuf.clear()

    def _new_request(self) -> int:
        self._require_open()
        request_id = self._next_request
        self._next_request += 1
        return request_id

    def _require_open(self) -> None:
        if self.state is not State.OPEN:
            raise ProtocolError(f"tunnel is {self.state.value}, not open")

    def _require_role(self, role: Role, what: str) -> None:
        if self.role is not role:
            raise ProtocolError(f"only the {role.value} may {what}")

    # ------------------------------------------------------------------- input

    def receive_data(self, data: bytes) -> None:
        """Parse received bytes; raises :class:`ProtocolError` on a violation.

        After a violation an ERROR frame is queued for the peer and the tunnel is
        closed: flush :meth:`data_to_send`, then close the transport.
        """
        if self.state is State.CLOSED:
            raise ProtocolError("tunnel is closed")
        try:
            self._parse(data)
        except ProtocolError as exc:
            code = "auth" if isinstance(exc, AuthenticationError) else "protocol"
            self.fail(code, str(exc))
            raise

    def _parse(self, data: bytes) -> None:
        buf = self._inbuf
        if buf:
            buf += data
            if len(buf) < self._need:
                return  # the pending frame is still incomplete: do not copy it again
            view = memoryview(bytes(buf))
            buf.clear()
        else:
            view = memoryview(data)
        # A large payload of an immutable message is handed out as a view of it (no
        # copy); smaller ones are copied, so a view never pins a message more than
        # ZERO_COPY_SHARE times its own size.
        zero_copy = len(view) // ZERO_COPY_SHARE if view.readonly else -1
        self._need = 0
        total = len(view)
        offset = 0
        unpack = HEADER.unpack_from
        limits = self.limits
        while total - offset >= HEADER_SIZE:
            ftype, stream_id, length = unpack(view, offset)
            if ftype == FrameType.DATA:
                if length > limits.max_frame_size:
                    raise ProtocolError(
                        f"DATA frame of {length} bytes exceeds the limit of {limits.max_frame_size}"
                    )
            elif ftype == FrameType.REPLY:
                if length > limits.max_reply_size:
                    raise ProtocolError(
                        f"REPLY frame of {length} bytes exceeds the limit of "
                        f"{limits.max_reply_size}"
                    )
            elif ftype in JSON_FRAMES:
                if length > limits.max_control_size:
                    raise ProtocolError(
                        f"{FrameType(ftype).name} frame of {length} bytes exceeds the "
                        f"limit of {limits.max_control_size}"
                    )
            elif length > MAX_REASON:
                # Binary control frames are tiny; their exact sizes are checked below.
                raise ProtocolError(f"frame type {ftype} of {length} bytes is too large")
            end = offset + HEADER_SIZE + length
            if end > total:
                self._need = end - offset
                break
            payload = view[offset + HEADER_SIZE : end]
            offset = end
            if ftype == FrameType.DATA:
                self._on_data(stream_id, payload, 0 <= zero_copy <= length)
            else:
                self._on_frame(ftype, stream_id, bytes(payload))
                if self.state is State.CLOSED:
                    return  # the peer's ERROR ends the tunnel: ignore what follows
        if offset < total:
            buf += view[offset:]

    def _on_data(self, stream_id: int, payload: memoryview, share: bool) -> None:
        if self.state is not State.OPEN:
            raise ProtocolError("DATA before the handshake")
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_known(stream_id, "DATA")
            return  # in flight when the stream was reset: drop
        if stream.recv_eof:
            raise ProtocolError(f"DATA after SHUTDOWN on stream {stream_id}")
        size = len(payload)
        if size > stream.recv_window:
            raise ProtocolError(
                f"stream {stream_id} sent {size} bytes with a window of {stream.recv_window}"
            )
        stream.recv_window -= size
        self._events.append(ev.DataReceived(stream_id, payload if share else payload.tobytes()))

    def _check_known(self, stream_id: int, what: str) -> None:
        """Frames for a stream that was once open are late, not wrong."""
        if stream_id == 0:
            raise ProtocolError(f"{what} on stream 0")
        if stream_id % 2 == self._peer_parity:
            known = stream_id <= self._last_peer_id
        else:
            known = stream_id < self._next_id
        if not known:
            raise ProtocolError(f"{what} for stream {stream_id}, which was never opened")

    def _on_frame(self, ftype: int, stream_id: int, payload: bytes) -> None:
        try:
            frame_type = FrameType(ftype)
        except ValueError:
            raise ProtocolError(f"unknown frame type {ftype}") from None
        if self.state is State.HANDSHAKE:
            self._on_handshake(frame_type, stream_id, payload)
            return
        if frame_type in (FrameType.HELLO, FrameType.WELCOME):
            raise ProtocolError(f"{frame_type.name} after the handshake")
        handler = self._HANDLERS[frame_type]
        handler(self, frame_type, stream_id, payload)

    def _on_handshake(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        if ftype is FrameType.ERROR:
            self._on_error(ftype, stream_id, payload)
            return
        expected = FrameType.HELLO if self.role is Role.AGENT else FrameType.WELCOME
        if ftype is not expected:
            raise ProtocolError(f"expected {expected.name}, got {ftype.name}")
        if stream_id != 0:
            raise ProtocolError(f"{ftype.name} on stream {stream_id}")
        body = decode_json(ftype, payload)
        version = field(body, "version", int, ftype)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version} is not supported (this side speaks "
                f"{PROTOCOL_VERSION}); use the same netmirror version on both ends"
            )
        window = field(body, "window", int, ftype)
        max_frame = field(body, "max_frame", int, ftype)
        if not 1 <= window <= MAX_WINDOW or not 1024 <= max_frame <= 16 * 1024 * 1024:
            raise ProtocolError(f"malformed {ftype.name} frame: window or max_frame out of range")
        if self.role is Role.AGENT:
            token = body.get("token")
            # surrogatepass: a JSON token may hold lone surrogates; it must still
            # compare (unequal) rather than fail to encode.
            if not isinstance(token, str) or not hmac.compare_digest(
                hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest(),
                self._token_digest,
            ):
                raise AuthenticationError("authentication failed: wrong or missing token")
            session = field(body, "session", str, ftype)
            if self.session and session != self.session:
                raise AuthenticationError(
                    f"this agent serves session {self.session!r}, not {session!r}"
                )
            self.session = session
        else:
            info = body.get("info", {})
            self.peer_info = info if isinstance(info, dict) else {}
        self._peer_window = window
        self._peer_max_frame = min(max_frame, self.limits.max_frame_size)
        self.state = State.OPEN
        if self.role is Role.AGENT:
            self._send_json(
                FrameType.WELCOME,
                0,
                {
                    "version": PROTOCOL_VERSION,
                    "session": self.session,
                    "window": self.limits.initial_window,
                    "max_frame": self.limits.max_frame_size,
                    "info": self._info,
                },
            )
            self._events.append(ev.HelloReceived(self.session, version))
        else:
            self._events.append(ev.Welcomed(self.session, version, self.peer_info))

    def _stream_frame(self, ftype: FrameType, stream_id: int) -> _Stream | None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_known(stream_id, ftype.name)
        return stream

    def _on_shutdown(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        if payload:
            raise ProtocolError("SHUTDOWN frame with a payload")
        stream = self._stream_frame(ftype, stream_id)
        if stream is None or stream.recv_eof:
            return
        stream.recv_eof = True
        if stream.sent_eof:
            del self._streams[stream_id]
        self._events.append(ev.StreamHalfClosed(stream_id))

    def _on_reset(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        if self._stream_frame(ftype, stream_id) is None:
            return
        del self._streams[stream_id]
        reason = payload.decode("utf-8", "replace")
        self._events.append(ev.StreamReset(stream_id, reason))

    def _on_credit(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        if len(payload) != CREDIT.size:
            raise ProtocolError("CREDIT frame must carry 4 bytes")
        (amount,) = CREDIT.unpack(payload)
        if amount == 0:
            raise ProtocolError("CREDIT of 0 bytes")
        stream = self._stream_frame(ftype, stream_id)
        if stream is None:
            return
        stream.send_window += amount
        if stream.send_window > MAX_WINDOW:
            raise ProtocolError(f"CREDIT overflows the window of stream {stream_id}")
        if not stream.sent_eof:
            self._events.append(ev.CreditGranted(stream_id, amount, stream.send_window))

    def _on_open(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        if stream_id % 2 != self._peer_parity or stream_id <= self._last_peer_id:
            raise ProtocolError(f"OPEN with invalid stream id {stream_id}")
        self._last_peer_id = stream_id
        body = decode_json(ftype, payload)
        # Port 0: a stream tied to no port (the capture's pcap stream).
        port = port_field(body, "port", ftype, allow_zero=True)
        dst = address_field(body, "dst", ftype)
        src = address_field(body, "src", ftype)
        info = body.get("info", {})
        if not isinstance(info, dict):
            raise ProtocolError("malformed OPEN frame: info must be an object")
        if len(self._streams) >= self.limits.max_streams:
            reason = f"too many streams (limit {self.limits.max_streams})".encode()
            self._queue(HEADER.pack(FrameType.RESET, stream_id, len(reason)), reason)
            return
        self._streams[stream_id] = _Stream(self._peer_window, self.limits.initial_window)
        self._events.append(ev.StreamOpened(stream_id, port, dst, src, info))

    def _on_ping(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        if len(payload) != PING.size or stream_id != 0:
            raise ProtocolError(f"malformed {ftype.name} frame")
        if ftype is FrameType.PING:
            self._queue(HEADER.pack(FrameType.PONG, 0, 8), payload)
        else:
            self._events.append(ev.PongReceived(PING.unpack(payload)[0]))

    def _on_error(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        body = decode_json(ftype, payload)
        code = body.get("code")
        message = body.get("message")
        self._events.append(
            ev.ErrorReceived(
                code[:64] if isinstance(code, str) else "unknown",
                message[:MAX_REASON] if isinstance(message, str) else "",
            )
        )
        self._close()

    def _on_subscribe(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        self._check_control(ftype, stream_id, Role.AGENT)
        body = decode_json(ftype, payload)
        request_id = field(body, "id", int, ftype)
        port = port_field(body, "port", ftype)
        mode = field(body, "mode", str, ftype)
        options = body.get("options", {})
        if not isinstance(options, dict):
            raise ProtocolError("malformed SUBSCRIBE frame: options must be an object")
        if request_id in self._pending_subs:
            raise ProtocolError(f"request id {request_id} is already in use")
        if mode not in MODES:
            self._reply(request_id, port, f"unknown mode {mode[:20]!r}")
            return
        held = len(self._subscribed) + len(self._pending_subs)
        if port not in self._subscribed and held >= self.limits.max_subscriptions:
            self._reply(
                request_id,
                port,
                f"too many subscriptions (limit {self.limits.max_subscriptions})",
            )
            return
        self._pending_subs[request_id] = FrameType.SUBSCRIBE
        self._events.append(ev.SubscribeRequested(request_id, port, mode, options))

    def _reply(self, request_id: int, port: int, error: str) -> None:
        self._send_json(
            FrameType.SUBSCRIBED,
            0,
            {"id": request_id, "port": port, "ok": False, "error": error},
        )

    def _on_unsubscribe(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        self._check_control(ftype, stream_id, Role.AGENT)
        body = decode_json(ftype, payload)
        request_id = field(body, "id", int, ftype)
        port = port_field(body, "port", ftype)
        if request_id in self._pending_subs:
            raise ProtocolError(f"request id {request_id} is already in use")
        self._pending_subs[request_id] = FrameType.UNSUBSCRIBE
        self._events.append(ev.UnsubscribeRequested(request_id, port))

    def _on_subscribed(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        self._check_control(ftype, stream_id, Role.DAEMON)
        body = decode_json(ftype, payload)
        request_id = field(body, "id", int, ftype)
        port = port_field(body, "port", ftype)
        ok = field(body, "ok", bool, ftype)
        error = body.get("error", "")
        if not isinstance(error, str):
            raise ProtocolError("malformed SUBSCRIBED frame: error must be a string")
        self._events.append(ev.SubscriptionAnswered(request_id, port, ok, error))

    def _on_stats(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        self._check_control(ftype, stream_id, Role.DAEMON)
        self._events.append(ev.StatsReported(decode_json(ftype, payload)))

    def _on_request(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        self._check_control(ftype, stream_id, Role.AGENT)
        body = decode_json(ftype, payload)
        request_id = field(body, "id", int, ftype)
        op = field(body, "op", str, ftype)
        args = body.get("args", {})
        if not isinstance(args, dict):
            raise ProtocolError("malformed REQUEST frame: args must be an object")
        if request_id in self._requests:
            raise ProtocolError(f"request id {request_id} is already in use")
        if op not in OPS:
            self._requests.add(request_id)
            self.reply(request_id, error=f"unknown request {op[:20]!r}")
            return
        if len(self._requests) >= self.limits.max_requests:
            self._requests.add(request_id)
            self.reply(request_id, error=f"too many requests (limit {self.limits.max_requests})")
            return
        self._requests.add(request_id)
        self._events.append(ev.RequestReceived(request_id, op, args))

    def _on_reply(self, ftype: FrameType, stream_id: int, payload: bytes) -> None:
        self._check_control(ftype, stream_id, Role.DAEMON)
        body = decode_json(ftype, payload)
        request_id = field(body, "id", int, ftype)
        ok = field(body, "ok", bool, ftype)
        if request_id not in self._requests:
            raise ProtocolError(f"REPLY to request {request_id}, which is not pending")
        self._requests.discard(request_id)
        if ok:
            result = body.get("result", {})
            if not isinstance(result, dict):
                raise ProtocolError("malformed REPLY frame: result must be an object")
            self._events.append(ev.ReplyReceived(request_id, True, result))
        else:
            error = body.get("error", "")
            if not isinstance(error, str):
                raise ProtocolError("malformed REPLY frame: error must be a string")
            self._events.append(ev.ReplyReceived(request_id, False, {}, error[:MAX_REASON]))

    def _check_control(self, ftype: FrameType, stream_id: int, receiver: Role) -> None:
        if self.role is not receiver:
            raise ProtocolError(f"{ftype.name} may only be sent to the {receiver.value}")
        if stream_id != 0:
            raise ProtocolError(f"{ftype.name} on stream {stream_id}")

    _HANDLERS: dict[FrameType, Any] = {
        FrameType.SUBSCRIBE: _on_subscribe,
        FrameType.SUBSCRIBED: _on_subscribed,
        FrameType.UNSUBSCRIBE: _on_unsubscribe,
        FrameType.OPEN: _on_open,
        FrameType.SHUTDOWN: _on_shutdown,
        FrameType.RESET: _on_reset,
        FrameType.CREDIT: _on_credit,
        FrameType.PING: _on_ping,
        FrameType.PONG: _on_ping,
        FrameType.ERROR: _on_error,
        FrameType.STATS: _on_stats,
        FrameType.REQUEST: _on_request,
        FrameType.REPLY: _on_reply,
    }
