"""Sans-I/O relay of one HTTP/2 (cleartext, prior knowledge) client connection.

The HTTP/2 counterpart of :mod:`netmirror.router.http1`: the router hands a
:class:`H2Relay` every byte of a client connection that began with the HTTP/2
preface (``PRI * HTTP/2.0``), and the relay routes each request (each stream) on its
own: ``route(head)`` names :data:`~netmirror.router.http1.ORIGINAL`, the target's own
server, or a session. The relay is an HTTP/2 server towards the client and an HTTP/2
client towards each upstream it uses, one connection per target, opened when a
first request goes there, with one stream per request. HTTP/2 bytes cannot be
forwarded verbatim across connections (stream ids, HPACK state, windows), so frames
are decoded and re-encoded with ``h2``; header lists pass unchanged (``h2``
validates them on both sides), in their order, pseudo-headers first. It answers
with :data:`Action2` values that the I/O layer carries out in order.

Decisions:

* Upstreams speak h2c with prior knowledge: the original server does, since the
  client spoke it expecting that server; a session's local app must too (one whose
  first bytes cannot begin an HTTP/2 SETTINGS frame fails as an upstream, see
  below, and its requests go to the original).
* :class:`OpenUpstream` comes before any :class:`ToUpstream` for its connection.
  The relay keeps one connection per target: an upstream connection ends with
  :class:`CloseUpstream` (it failed, closed, or went away after a GOAWAY and has no
  stream left), or with :class:`Close`. Idle connections are kept while the client
  connection lives. After :class:`CloseUpstream` (or an :class:`OpenUpstream` for a
  target that already has one), the I/O layer delivers no more events of the old
  connection: the events of a target are those of its latest connection.
* Flow control holds end to end: DATA received from one side is acknowledged to it
  (``WINDOW_UPDATE``) only once the other side's stream and connection windows let
  the relay send it on, so a slow reader slows its writer and the relay holds at
  most about one stream window per stream and direction. The connection windows
  the relay advertises are ``max_streams`` stream windows, so that one stalled
  stream cannot stall the others. Padding is acknowledged at once.
* A client stream maps to at most one upstream stream at a time; requests wait (in
  order) when the upstream's ``SETTINGS_MAX_CONCURRENT_STREAMS`` is reached.
* Retries. A request is kept (its headers, trailers and the body sent so far, up to
  :data:`MAX_KEPT_BODY`) until its final response headers come; then:

  - a session's connection that fails, closes, or sends bytes that are not HTTP/2
    before a stream's final response headers: the request is re-sent to the
    original server, and so are the requests that were waiting for that session;
  - a stream the upstream did not process (refused with ``REFUSED_STREAM``, or above
    the ``last_stream_id`` of its GOAWAY) is re-sent to the original server, from a
    session or from the original itself;
  - a request whose body went past :data:`MAX_KEPT_BODY`, or that was already sent
    :data:`MAX_SENDS` times, is reset with ``REFUSED_STREAM`` instead (clients may
    retry those);
  - an original server whose connection fails or closes: its streams without final
    response headers are reset, with ``REFUSED_STREAM`` if it never sent a byte (it
    cannot have processed them), else ``INTERNAL_ERROR``;
  - any upstream failing after the final response headers went to the client:
    ``INTERNAL_ERROR``, unless the response was complete (then the client gets it,
    and a request body still coming is refused with ``RST_STREAM(NO_ERROR)``).

  1xx responses relayed before do not prevent a retry.
* An upstream's GOAWAY: its streams up to ``last_stream_id`` finish on it, no new
  stream goes to it; requests for that target wait until it has no stream left,
  then it is closed (``CloseUpstream``) and a new connection opened
  (``OpenUpstream``). (A stream that never ends on a connection that went away
  holds the target's new requests until the upstream closes that connection.)
* ``RST_STREAM`` is relayed both ways with its error code, except an upstream's
  ``REFUSED_STREAM`` before the response (a retry, above), and an upstream's
  ``NO_ERROR`` after a complete response (the response is delivered, then the
  client stream reset ``NO_ERROR``). A client stream that ``h2`` reset itself (a
  stream error of the client) resets the upstream stream with ``CANCEL``; an
  upstream stream that ``h2`` reset itself counts as that upstream failing.
* Server push is refused: ``SETTINGS_ENABLE_PUSH=0`` upstream (a PUSH_PROMISE is
  then a protocol error of that upstream).
* The client's GOAWAY or EOF: no new stream is expected; streams in flight finish
  (after EOF, only those whose request was complete, and only while they need no
  more flow-control window from the client, which can no longer send one), then a
  GOAWAY and ``Close(reset=False)``.
* A protocol error of the client (bytes that are not HTTP/2, a stream beyond
  ``max_streams``...): a GOAWAY with the error goes to the client, then
  ``Close(reset=False)``. A protocol error of an upstream: that upstream fails.
* ``route`` raising, or returning something other than a string, sends the request
  to :data:`~netmirror.router.http1.ORIGINAL`. For ``route``, a request's head is its
  ``:method``, its ``:path`` (``:authority`` for CONNECT) and its regular headers
  as received (lower-case names; ``h2`` joins ``cookie`` crumbs into one field),
  with a ``host`` header first, from ``:authority``, if there is none.
* :attr:`H2Relay.requests` counts the requests sent to each target: once when
  routed, once more at the original server each time re-sent there
  (:attr:`H2Relay.retries` counts those).
* The public methods never raise: an internal error becomes ``Close(reset=True)``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, NoAvailableStreamIDError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame

from netmirror.router.http1 import ORIGINAL, Close, ToClient
from netmirror.wire.httpfilter import RequestHead

#: How an HTTP/2 client with prior knowledge begins its connection.
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_MAX_STREAMS: Final = 100
#: Request body bytes kept per stream to re-send it (until its final response headers).
MAX_KEPT_BODY: Final = 1024 * 1024
#: Times one request may be sent (to a session or the original) before it is refused.
MAX_SENDS: Final = 3

_DEFAULT_WINDOW: Final = 65_535
_MAX_WINDOW: Final = 2**31 - 1

_Headers: TypeAlias = Sequence[tuple[bytes, bytes]]


# --- actions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """Connect to ``target``; the following :class:`ToUpstream` for it go to this connection.

    Bytes for it may follow before it is connected: the I/O layer buffers them. If the
    target already has a connection, this one replaces it (the relay closed the old
    one before with :class:`CloseUpstream`).
    """

    target: str


@dataclass(frozen=True, slots=True)
class ToUpstream:
    """Send ``data`` on the connection of ``target``."""

    target: str
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseUpstream:
    """Close the connection of ``target``, after writing what was emitted for it."""

    target: str


Action2: TypeAlias = OpenUpstream | ToUpstream | ToClient | CloseUpstream | Close


# --- h2 -----------------------------------------------------------------------------------


class _H2(H2Connection):
    """``h2``'s connection, except that a GOAWAY received does not end it.

    ``h2`` refuses to send anything once it received a GOAWAY, but streams up to its
    ``last_stream_id`` are to finish (RFC 9113, section 6.8): here the GOAWAY only
    becomes a :class:`ConnectionTerminated` event, and the relay opens no new stream.
    """

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        event = ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def _connection(
    *, client_side: bool, settings: dict[SettingCodes, int], upgrade: bytes | None = None
) -> _H2:
    conn = _H2(
        H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=True,
            # What goes out was received, and validated, on the other side: checking
            # it again cost a quarter of the relay's time.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    settings = {SettingCodes.MAX_HEADER_LIST_SIZE: conn.DEFAULT_MAX_HEADER_LIST_SIZE, **settings}
    # Initial values are what the first SETTINGS frame says, in force at once.
    conn.local_settings = Settings(client=client_side, initial_values=settings)
    if upgrade is not None:
        # An h2c upgrade: the client's HTTP2-Settings apply, stream 1 is its request.
        conn.initiate_upgrade_connection(upgrade)
    else:
        conn.initiate_connection()
    return conn


def _widen(conn: H2Connection, streams: int) -> None:
    """Make the connection window as large as ``streams`` default stream windows."""
    extra = min(streams * _DEFAULT_WINDOW, _MAX_WINDOW) - _DEFAULT_WINDOW
    if extra > 0:
        conn.increment_flow_control_window(extra)


def _code(value: ErrorCodes | int | None) -> ErrorCodes | int:
    return ErrorCodes.NO_ERROR if value is None else value


# --- state ----------------------------------------------------------------------------------


class _Upstream:
    """One HTTP/2 client connection to a target."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.conn = _connection(client_side=True, settings={SettingCodes.ENABLE_PUSH: 0})
        self.streams: dict[int, _Stream] = {}  # upstream stream id -> its stream, while open
        self.alive = True  # not closed (by CloseUpstream or Close)
        self.heard = False  # received bytes from it
        self.head = b""  # its first bytes, until they look like a SETTINGS frame
        self.draining = False  # went away: no new stream

    def has_room(self) -> bool:
        conn = self.conn
        return conn.open_outbound_streams < conn.remote_settings.max_concurrent_streams


@dataclass(frozen=True)
class H2cUpgrade:
    """An HTTP/1.1 request that asked for ``Upgrade: h2c``, as HTTP/2 headers."""

    settings: bytes
    """The ``HTTP2-Settings`` header's value."""
    headers: _Headers
    body: bytes = b""

    @classmethod
    def from_http1(
        cls, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> H2cUpgrade | None:
        """The upgrade a parsed HTTP/1.1 request asks for, or None if it asks none."""
        fields = [(name.lower(), value) for name, value in headers]
        upgrade = b",".join(v for n, v in fields if n == b"upgrade").lower()
        settings = [v for n, v in fields if n == b"http2-settings"]
        if b"h2c" not in [t.strip() for t in upgrade.split(b",")] or len(settings) != 1:
            return None
        authority = next((v for n, v in fields if n == b"host"), b"")
        h2_headers: list[tuple[bytes, bytes]] = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", target),
        ]
        for name, value in fields:
            if name not in _HTTP1_ONLY and not (name == b"te" and value.lower() != b"trailers"):
                h2_headers.append((name, value))
        return cls(settings=settings[0].strip(), headers=h2_headers, body=body)


#: Headers of an HTTP/1.1 request that have no place in HTTP/2.
_HTTP1_ONLY = frozenset(
    {
        b"connection",
        b"upgrade",
        b"http2-settings",
        b"host",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"content-length",
    }
)


class _Stream:
    """One request (a client stream) and where it went."""

    def __init__(self, client_id: int, headers: _Headers, target: str) -> None:
        self.cid = client_id
        self.headers = headers
        self.target = target
        self.sends = 0
        self.done = False
        # The upstream stream, once opened (kept after it closed, for acknowledgments).
        self.up: _Upstream | None = None
        self.uid = 0
        self.up_active = False  # in up.streams: open at the upstream
        # Request: client -> upstream.
        self.req_buf = bytearray()  # received, not sent upstream, not acknowledged
        self.replay = bytearray()  # acknowledged before, to send again (a retry)
        self.kept: bytearray | None = bytearray()  # sent upstream; None: not kept
        self.req_trailers: _Headers | None = None
        self.req_end = False  # the client ended its request
        self.req_end_sent = False  # END_STREAM went to the current upstream stream
        self.req_dropped = False  # the upstream wants no more of the request
        # Response: upstream -> client.
        self.resp_started = False  # final response headers went to the client
        self.resp_buf = bytearray()  # received, not sent to the client, not acknowledged
        self.resp_trailers: _Headers | None = None
        self.resp_end = False  # the upstream ended its response
        self.resp_end_sent = False  # END_STREAM went to the client

    def keep(self, chunk: bytes) -> None:
        if self.kept is not None:
            self.kept += chunk
            if len(self.kept) + len(self.replay) > MAX_KEPT_BODY:
                self.kept = None


# --- the relay ----------------------------------------------------------------------------


class H2Relay:
    """The HTTP/2 relay of one client connection; see the module's docstring.

    Feed it with :meth:`client_data`, :meth:`client_eof`, :meth:`upstream_data`,
    :meth:`upstream_eof` and :meth:`upstream_failed`, and carry out :meth:`actions`
    after each call (and after creating it: its SETTINGS), in order.
    """

    def __init__(
        self,
        route: Callable[[RequestHead], str],
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        upgrade: H2cUpgrade | None = None,
    ) -> None:
        """``route(head)`` returns ORIGINAL or a session name, once per request.

        ``max_streams``: the ``SETTINGS_MAX_CONCURRENT_STREAMS`` advertised to the client.
        ``upgrade``: the connection was upgraded from HTTP/1.1 (the I/O layer answered
        ``101`` itself); its request becomes stream 1, routed like any other.
        """
        self._route = route
        self._max_streams = max(1, max_streams)
        self._actions: list[Action2] = []
        self._streams: dict[int, _Stream] = {}  # client stream id -> stream
        self._upstreams: dict[str, _Upstream] = {}  # target -> its current connection
        self._waiting: dict[str, deque[_Stream]] = {}  # target -> streams to open there
        self._client_eof = False
        self._client_goaway = False
        self._closed = False
        self.requests: dict[str, int] = {}
        """Requests sent to each target (a request re-sent to ORIGINAL counts there too)."""
        self.retries = 0
        """Requests re-sent to ORIGINAL after their first upstream failed or refused them."""
        self._client = _connection(
            client_side=False,
            settings={SettingCodes.MAX_CONCURRENT_STREAMS: self._max_streams},
            upgrade=upgrade.settings if upgrade is not None else None,
        )
        _widen(self._client, self._max_streams)
        if upgrade is not None:
            headers = upgrade.headers
            stream = _Stream(1, headers, self._call_route(_request_head(headers)))
            # The body came over HTTP/1.1, outside HTTP/2's flow control: nothing to
            # acknowledge for it, so it is sent as a replay.
            stream.replay += upgrade.body
            stream.req_end = True
            self._streams[1] = stream
            self._send_to(stream, stream.target)
        self._flush()

    # --- state, for the I/O layer and status ------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :class:`Close` was emitted."""
        return self._closed

    @property
    def streams(self) -> int:
        """Requests in flight."""
        return len(self._streams)

    def actions(self) -> list[Action2]:
        """What to do, in order, since the last call."""
        out, self._actions = self._actions, []
        return out

    # --- input ----------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        """Bytes from the client."""
        self._guard(self._client_data, data)

    def client_eof(self) -> None:
        """The client closed its side."""
        self._guard(self._on_client_eof)

    def upstream_data(self, target: str, data: bytes) -> None:
        """Bytes from the connection of ``target``."""
        self._guard(self._upstream_data, target, data)

    def upstream_eof(self, target: str) -> None:
        """The connection of ``target`` closed its side."""
        self._guard(self._upstream_eof, target)

    def upstream_failed(self, target: str, reason: str) -> None:
        """The connection of ``target`` could not be made, or was lost."""
        self._guard(self._upstream_failed, target, reason)

    def _guard(self, method: Callable[..., None], *args: object) -> None:
        if self._closed:
            return
        try:
            method(*args)
            if not self._closed:
                self._flush()
        except Exception as exc:
            if not self._closed:
                self._closed = True
                self._actions.append(Close(f"internal error: {exc!r}", True))
                self._forget()

    # --- client side ------------------------------------------------------------------

    def _client_data(self, data: bytes) -> None:
        if not data or self._client_eof:
            return
        try:
            events = self._client.receive_data(data)
        except H2Error as exc:
            if self._client.state_machine.state is not ConnectionState.CLOSED:
                # h2 prepared no GOAWAY (a bad preface, or not a ProtocolError).
                self._client.close_connection(ErrorCodes.PROTOCOL_ERROR)
            self._close(f"HTTP/2 protocol error from the client: {exc}", reset=False)
            return
        for event in events:
            if self._closed:
                return
            self._on_client_event(event)
        self._maybe_end()

    def _on_client_event(self, event: Event) -> None:
        if isinstance(event, RequestReceived):
            self._on_request(event)
        elif isinstance(event, DataReceived):
            self._on_request_data(event)
        elif isinstance(event, TrailersReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.req_trailers = event.headers  # StreamEnded follows
        elif isinstance(event, StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None and not stream.req_end:
                stream.req_end = True
                self._flush_request(stream)
                self._check_done(stream)
        elif isinstance(event, StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                code = _code(event.error_code) if event.remote_reset else ErrorCodes.CANCEL
                self._finish(stream, code)
        elif isinstance(event, WindowUpdated):
            if event.stream_id:
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    self._flush_response(stream)
            else:
                self._flush_responses()
        elif isinstance(event, RemoteSettingsChanged):
            self._flush_responses()  # the initial window may have grown
        elif isinstance(event, ConnectionTerminated):
            self._client_goaway = True
        # Others (PING, PRIORITY, SETTINGS ack, unknown frames): h2 did what is needed.

    def _on_request(self, event: RequestReceived) -> None:
        headers = event.headers
        target = self._call_route(_request_head(headers))
        stream = _Stream(event.stream_id, headers, target)
        stream.req_end = event.stream_ended is not None
        self._streams[stream.cid] = stream
        self._send_to(stream, target)

    def _on_request_data(self, event: DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.req_dropped:  # nobody wants it
            self._client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        padding = event.flow_controlled_length - len(event.data)
        if padding > 0:
            self._client.acknowledge_received_data(padding, event.stream_id)
        stream.req_buf += event.data
        self._flush_request(stream)

    def _on_client_eof(self) -> None:
        if self._client_eof:
            return
        self._client_eof = True
        for stream in list(self._streams.values()):
            if not stream.req_end:  # the request can no longer complete
                self._reset_client(stream, ErrorCodes.CANCEL)
            else:
                self._flush_response(stream)  # gives up if blocked by flow control
        self._maybe_end()

    def _maybe_end(self) -> None:
        """After the client's GOAWAY or EOF, close once no stream is left."""
        if self._closed or self._streams or not (self._client_eof or self._client_goaway):
            return
        self._client.close_connection(ErrorCodes.NO_ERROR)
        why = "closed its side" if self._client_eof else "sent GOAWAY"
        self._close(f"the client {why} and its streams are over", reset=False)

    def _call_route(self, head: RequestHead) -> str:
        try:
            target = self._route(head)
        except Exception:
            return ORIGINAL
        return target if isinstance(target, str) else ORIGINAL

    # --- sending requests upstream --------------------------------------------------------

    def _send_to(self, stream: _Stream, target: str) -> None:
        """Queue ``stream`` for a new upstream stream on ``target``'s connection."""
        stream.target = target
        stream.sends += 1
        self.requests[target] = self.requests.get(target, 0) + 1
        self._waiting.setdefault(target, deque()).append(stream)
        self._tend(target)

    def _tend(self, target: str) -> None:
        """Close ``target``'s connection if it went away and is idle; open waiting streams."""
        up = self._upstreams.get(target)
        if up is not None and up.draining and not up.streams:
            self._drop_upstream(up, polite=True)
        while not self._closed:
            queue = self._waiting.get(target)
            if not queue:
                self._waiting.pop(target, None)
                return
            up = self._upstreams.get(target)
            if up is not None and up.draining:
                if up.streams:
                    return  # its streams finish first
                self._drop_upstream(up, polite=True)
                up = None
            if up is None:
                up = _Upstream(target)
                self._upstreams[target] = up
                self._emit(OpenUpstream(target))
                _widen(up.conn, self._max_streams)
            if not up.has_room():
                return
            stream = queue.popleft()
            try:
                uid = up.conn.get_next_available_stream_id()
            except NoAvailableStreamIDError:
                up.draining = True
                queue.appendleft(stream)
                continue
            self._start(stream, up, uid)

    def _start(self, stream: _Stream, up: _Upstream, uid: int) -> None:
        end = stream.req_end and not stream.replay and not stream.req_buf
        end = end and stream.req_trailers is None
        try:
            up.conn.send_headers(uid, stream.headers, end_stream=end)
        except H2Error:
            self._reset_client(stream, ErrorCodes.INTERNAL_ERROR)
            return
        stream.up, stream.uid, stream.up_active = up, uid, True
        stream.req_end_sent = end
        up.streams[uid] = stream
        self._flush_request(stream)

    def _flush_request(self, stream: _Stream) -> None:
        """Send upstream what its windows allow of the request's body, trailers and end."""
        up = stream.up
        if up is None or not stream.up_active or stream.req_end_sent:
            return
        conn, uid = up.conn, stream.uid
        try:
            for buf, acknowledged in ((stream.replay, True), (stream.req_buf, False)):
                while buf:
                    size = min(len(buf), conn.local_flow_control_window(uid))
                    size = min(size, conn.max_outbound_frame_size)
                    if size <= 0:
                        return
                    chunk = bytes(buf[:size])
                    del buf[:size]
                    end = stream.req_end and stream.req_trailers is None
                    end = end and not stream.replay and not stream.req_buf
                    conn.send_data(uid, chunk, end_stream=end)
                    stream.req_end_sent = end
                    stream.keep(chunk)
                    if not acknowledged:
                        self._client.acknowledge_received_data(size, stream.cid)
            if stream.req_end and not stream.req_end_sent:
                if stream.req_trailers is not None:
                    conn.send_headers(uid, stream.req_trailers, end_stream=True)
                else:
                    conn.end_stream(uid)
                stream.req_end_sent = True
        except H2Error:
            return  # the upstream stream closed: its event comes next
        self._upstream_half_done(stream)

    def _upstream_half_done(self, stream: _Stream) -> None:
        """Once both ends went through, the upstream stream is over: free its place."""
        up = stream.up
        if up is None or not stream.up_active or not (stream.req_end_sent and stream.resp_end):
            return
        stream.up_active = False
        up.streams.pop(stream.uid, None)
        self._check_done(stream)
        self._tend(up.target)

    # --- upstream side ----------------------------------------------------------------

    def _upstream_data(self, target: str, data: bytes) -> None:
        up = self._upstreams.get(target)
        if up is None or not data:
            return
        up.heard = True
        if len(up.head) < 9:
            # h2 would wait for a whole frame, of a length read from any bytes.
            up.head = (up.head + data)[:9]
            if not _settings_frame_start(up.head):
                self._upstream_lost(up, "the upstream does not speak HTTP/2")
                return
        try:
            events = up.conn.receive_data(data)
        except H2Error as exc:
            self._upstream_lost(up, f"HTTP/2 protocol error: {exc}")
            return
        for event in events:
            if self._closed or not up.alive:
                return
            self._on_upstream_event(up, event)

    def _upstream_eof(self, target: str) -> None:
        up = self._upstreams.get(target)
        if up is None:
            return
        if not up.streams:
            self._drop_upstream(up, polite=False)
            self._tend(target)
        else:
            self._upstream_lost(up, "the upstream closed the connection")

    def _upstream_failed(self, target: str, reason: str) -> None:
        up = self._upstreams.get(target)
        if up is not None:
            self._upstream_lost(up, reason)

    def _on_upstream_event(self, up: _Upstream, event: Event) -> None:
        if isinstance(event, ResponseReceived | InformationalResponseReceived):
            self._on_response_head(up, event)
        elif isinstance(event, DataReceived):
            stream = up.streams.get(event.stream_id)
            if stream is None:  # nobody wants it
                up.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            padding = event.flow_controlled_length - len(event.data)
            if padding > 0:
                up.conn.acknowledge_received_data(padding, event.stream_id)
            stream.resp_buf += event.data
            self._flush_response(stream)
        elif isinstance(event, TrailersReceived):
            stream = up.streams.get(event.stream_id)
            if stream is not None:
                stream.resp_trailers = event.headers  # StreamEnded follows
        elif isinstance(event, StreamEnded):
            stream = up.streams.get(event.stream_id)
            if stream is not None and not stream.resp_end:
                stream.resp_end = True
                self._flush_response(stream)
                self._upstream_half_done(stream)
        elif isinstance(event, StreamReset):
            self._on_upstream_reset(up, event)
        elif isinstance(event, WindowUpdated):
            if event.stream_id:
                stream = up.streams.get(event.stream_id)
                if stream is not None:
                    self._flush_request(stream)
            else:
                self._flush_requests(up)
        elif isinstance(event, RemoteSettingsChanged):
            self._flush_requests(up)  # the initial window may have grown
            self._tend(up.target)  # and the concurrency limit
        elif isinstance(event, ConnectionTerminated):
            self._on_upstream_goaway(up, event)

    def _on_response_head(
        self, up: _Upstream, event: ResponseReceived | InformationalResponseReceived
    ) -> None:
        stream = up.streams.get(event.stream_id)
        if stream is None:
            return
        final = isinstance(event, ResponseReceived)
        end = isinstance(event, ResponseReceived) and event.stream_ended is not None
        try:
            self._client.send_headers(stream.cid, event.headers, end_stream=end)
        except H2Error:
            self._reset_client(stream, ErrorCodes.INTERNAL_ERROR)
            return
        if final:
            stream.resp_started = True
            stream.kept = None  # no retry from now on
        if end:
            stream.resp_end = stream.resp_end_sent = True
            self._upstream_half_done(stream)
            self._check_done(stream)

    def _on_upstream_reset(self, up: _Upstream, event: StreamReset) -> None:
        stream = up.streams.pop(event.stream_id, None)
        if stream is None:
            return
        stream.up_active = False
        code = _code(event.error_code)
        if not event.remote_reset:  # h2 reset it: a protocol error of the upstream
            self._lost(stream, unprocessed=False, code=ErrorCodes.INTERNAL_ERROR)
        elif code == ErrorCodes.REFUSED_STREAM and not stream.resp_started:
            self._lost(stream, unprocessed=True, code=code)
        elif code == ErrorCodes.NO_ERROR and stream.resp_end:
            self._lost(stream, unprocessed=False, code=code)  # the response is complete
        else:
            self._reset_client(stream, code)
        self._tend(up.target)

    def _on_upstream_goaway(self, up: _Upstream, event: ConnectionTerminated) -> None:
        up.draining = True
        last = event.last_stream_id if event.last_stream_id is not None else _MAX_WINDOW
        for uid, stream in list(up.streams.items()):
            if uid > last:  # not processed: safe to send again
                del up.streams[uid]
                stream.up_active = False
                self._reset_upstream(up, uid, ErrorCodes.CANCEL)
                self._lost(stream, unprocessed=True, code=ErrorCodes.REFUSED_STREAM)
        self._tend(up.target)

    def _upstream_lost(self, up: _Upstream, reason: str) -> None:
        """The connection of ``up`` is over: each of its streams is re-sent or reset."""
        if not up.alive:
            return
        self._drop_upstream(up, polite=False)
        streams = list(up.streams.values())
        up.streams.clear()
        code = ErrorCodes.INTERNAL_ERROR if up.heard else ErrorCodes.REFUSED_STREAM
        for stream in streams:
            stream.up_active = False
            self._lost(stream, unprocessed=False, code=code)
        if up.target != ORIGINAL:  # the session is failing: its waiting requests too
            for stream in self._waiting.pop(up.target, deque()):
                self._retry(stream)
        self._tend(up.target)

    def _lost(self, stream: _Stream, *, unprocessed: bool, code: ErrorCodes | int) -> None:
        """``stream`` left its upstream early; ``unprocessed``: the upstream said it did not
        process it; ``code``: for the client stream if neither re-sent nor answered."""
        if stream.done:
            return
        if stream.resp_started:
            if stream.resp_end:  # the client gets the complete response
                stream.req_dropped = True
                self._drop_request(stream)
                self._flush_response(stream)
                self._check_done(stream)
            else:
                self._reset_client(stream, ErrorCodes.INTERNAL_ERROR)
        elif stream.target != ORIGINAL or unprocessed:
            self._retry(stream)
        else:
            self._reset_client(stream, code)

    def _retry(self, stream: _Stream) -> None:
        """Send ``stream``'s request again, to ORIGINAL, if it was kept."""
        if stream.kept is None or stream.sends >= MAX_SENDS:
            self._reset_client(stream, ErrorCodes.REFUSED_STREAM)
            return
        stream.replay[:0] = stream.kept
        stream.kept = bytearray()
        stream.up, stream.uid, stream.up_active = None, 0, False
        stream.req_end_sent = False
        self.retries += 1
        self._send_to(stream, ORIGINAL)

    def _flush_requests(self, up: _Upstream) -> None:
        for stream in list(up.streams.values()):
            self._flush_request(stream)

    # --- sending responses to the client --------------------------------------------------

    def _flush_response(self, stream: _Stream) -> None:
        """Send the client what its windows allow of the response's body, trailers and end."""
        if stream.done:
            return
        conn, cid = self._client, stream.cid
        try:
            while stream.resp_buf:
                size = min(len(stream.resp_buf), conn.local_flow_control_window(cid))
                size = min(size, conn.max_outbound_frame_size)
                if size <= 0:
                    break
                chunk = bytes(stream.resp_buf[:size])
                del stream.resp_buf[:size]
                end = stream.resp_end and stream.resp_trailers is None and not stream.resp_buf
                conn.send_data(cid, chunk, end_stream=end)
                stream.resp_end_sent = end
                self._ack_upstream(stream, size)
            if stream.resp_end and not stream.resp_buf and not stream.resp_end_sent:
                if stream.resp_trailers is not None:
                    conn.send_headers(cid, stream.resp_trailers, end_stream=True)
                else:
                    conn.end_stream(cid)
                stream.resp_end_sent = True
        except H2Error:
            return  # the client stream closed: its event comes next
        if stream.resp_buf and self._client_eof:
            # The client can send no WINDOW_UPDATE any more: the response cannot complete.
            self._reset_client(stream, ErrorCodes.CANCEL)
            return
        self._check_done(stream)

    def _flush_responses(self) -> None:
        for stream in list(self._streams.values()):
            self._flush_response(stream)

    def _ack_upstream(self, stream: _Stream, size: int) -> None:
        up = stream.up
        if up is not None and up.alive and size > 0:
            up.conn.acknowledge_received_data(size, stream.uid)

    def _check_done(self, stream: _Stream) -> None:
        if stream.done or not stream.resp_end_sent:
            return
        if stream.req_end and not stream.up_active:
            self._finish(stream, ErrorCodes.CANCEL)
        elif stream.req_dropped:  # tell the client to stop sending its body
            self._reset_client(stream, ErrorCodes.NO_ERROR)

    # --- ends of streams and connections --------------------------------------------------

    def _reset_client(self, stream: _Stream, code: ErrorCodes | int) -> None:
        try:
            self._client.reset_stream(stream.cid, code)
        except H2Error:
            pass  # already closed
        self._finish(stream, ErrorCodes.CANCEL)

    def _reset_upstream(self, up: _Upstream, uid: int, code: ErrorCodes | int) -> None:
        if up.alive:
            try:
                up.conn.reset_stream(uid, code)
            except H2Error:
                pass  # already closed

    def _finish(self, stream: _Stream, upstream_code: ErrorCodes | int) -> None:
        """Forget ``stream``: reset its upstream stream with ``upstream_code`` if still open."""
        if stream.done:
            return
        stream.done = True
        self._streams.pop(stream.cid, None)
        queue = self._waiting.get(stream.target)
        if queue is not None and stream in queue:
            queue.remove(stream)
        self._drop_request(stream)
        stream.replay.clear()
        stream.kept = None
        up = stream.up
        if stream.resp_buf:
            self._ack_upstream(stream, len(stream.resp_buf))
            stream.resp_buf.clear()
        if up is not None and stream.up_active:
            stream.up_active = False
            up.streams.pop(stream.uid, None)
            self._reset_upstream(up, stream.uid, upstream_code)
            self._tend(up.target)
        self._maybe_end()

    def _drop_request(self, stream: _Stream) -> None:
        """Drop the request's body not sent yet, acknowledged to the client."""
        if stream.req_buf:
            self._client.acknowledge_received_data(len(stream.req_buf), stream.cid)
            stream.req_buf.clear()

    def _drop_upstream(self, up: _Upstream, *, polite: bool) -> None:
        """Close the connection of ``up`` (``polite``: with a GOAWAY)."""
        if not up.alive:
            return
        if polite:
            try:
                up.conn.close_connection(ErrorCodes.NO_ERROR)
            except H2Error:
                pass
        self._emit_upstream(up)
        self._emit(CloseUpstream(up.target))
        up.alive = False
        if self._upstreams.get(up.target) is up:
            del self._upstreams[up.target]

    def _close(self, reason: str, *, reset: bool) -> None:
        self._flush()
        self._emit(Close(reason, reset))
        self._closed = True
        self._forget()

    def _forget(self) -> None:
        for up in self._upstreams.values():
            up.alive = False
        self._upstreams.clear()
        self._streams.clear()
        self._waiting.clear()

    # --- output ---------------------------------------------------------------------------

    def _flush(self) -> None:
        """Emit the bytes each h2 connection has to send."""
        data = self._client.data_to_send()
        if data:
            self._emit(ToClient(data))
        for up in list(self._upstreams.values()):
            self._emit_upstream(up)

    def _emit_upstream(self, up: _Upstream) -> None:
        data = up.conn.data_to_send()
        if data:
            self._emit(ToUpstream(up.target, data))

    def _emit(self, action: Action2) -> None:
        if self._closed:
            return
        # Bytes for the same side in a row go as one write.
        last = self._actions[-1] if self._actions else None
        if isinstance(action, ToClient) and isinstance(last, ToClient):
            self._actions[-1] = ToClient(last.data + action.data)
        elif (
            isinstance(action, ToUpstream)
            and isinstance(last, ToUpstream)
            and last.target == action.target
        ):
            self._actions[-1] = ToUpstream(action.target, last.data + action.data)
        else:
            self._actions.append(action)


def _settings_frame_start(head: bytes) -> bool:
    """Whether ``head`` may begin a server's connection preface: a SETTINGS frame."""
    length = int.from_bytes(head[:3].ljust(3, b"\0"))
    if length > 16_384 or (len(head) >= 3 and length % 6):
        return False
    if len(head) >= 4 and head[3] != 0x4:  # type SETTINGS
        return False
    if len(head) >= 5 and head[4] & 0x1:  # flags: not an ACK
        return False
    return len(head) < 9 or head[5:9] == b"\0\0\0\0"  # stream 0


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _request_head(headers: _Headers) -> RequestHead:
    method = path = authority = ""
    has_path = has_host = False
    regular: list[tuple[str, str]] = []
    for raw_name, raw_value in headers:
        name, value = _text(raw_name), _text(raw_value)
        if name == ":method":
            method = value
        elif name == ":path":
            path, has_path = value, True
        elif name == ":authority":
            authority = value
        elif not name.startswith(":"):
            regular.append((name, value))
            has_host = has_host or name == "host"
    if not has_host and authority:
        regular.insert(0, ("host", authority))
    return RequestHead(
        method=method, target=path if has_path else authority, headers=tuple(regular)
    )
