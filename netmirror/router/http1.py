"""Sans-I/O relay of one client connection of an HTTP-filtered stolen port.

The router accepts a client's connection and hands every byte to a :class:`Relay`,
which finds the HTTP/1.x requests in them, asks ``route(head)`` where each goes
(:data:`ORIGINAL`, the target's own server, or a session's name), and answers with
:data:`Action` values that the I/O layer carries out in order: attach an upstream,
send bytes to it or to the client, release the upstream, turn the connection into
a raw pipe, or close. Nothing here touches a socket, a clock or an event loop.

Bytes are relayed exactly as received: h11 only finds where messages begin and end
(and parses heads for the route); the client's request bytes go to the upstream
unchanged and the upstream's response bytes go to the client unchanged. One
exchange (request and response) runs at a time: requests that a client pipelines
are held, and routed one by one as the previous response completes, so responses
return in order. Between requests, stray empty lines (CR, LF) that some clients
send after a body are dropped.

Decisions:

* Every :class:`Connect` is followed by exactly one :class:`Release`, unless the
  connection ends first with :class:`Pipe` or :class:`Close` (which ends the
  attached upstream too). An exchange ends when both its request and its response
  are complete; an upstream that answers before the request body is over still gets
  the rest of the body (or, if it is gone, the rest is dropped). ``Release(True)``
  only when both sides kept the connection alive and the upstream sent nothing
  after its response and did not close.
* Bytes that cannot be filtered go to the original server untouched: if the first
  request is not HTTP/1.0 or 1.1 (h11 rejects it, or it is HTTP/2's
  ``PRI * HTTP/2.0`` preface), if no complete head came when the I/O layer calls
  :meth:`Relay.head_timeout`, or if the client half-closes in the middle of its first
  head, the relay emits ``Connect(ORIGINAL)``, the bytes so far and :class:`Pipe`.
* A request head longer than ``max_head`` goes to the original server the same way,
  whether it is the first request or a later one (the previous exchanges are all
  complete by then): the rest of the connection is piped, unfiltered.
* A later request head that cannot be filtered (malformed, or with both
  ``Content-Length`` and ``Transfer-Encoding``, a request-smuggling shape) goes to the
  original server the same way, with the rest of the connection: the server answers
  it as it would without netmirror. A malformed request *body* has gone to the
  upstream as it came: from then on the connection is a raw pipe to that upstream.
* An upstream that fails, closes or answers garbage before the final response head
  went to the client gives the client ``502 Bad Gateway`` (1xx responses already
  relayed do not count); after that head, the connection is reset.
* Keep-alive follows RFC 9112 (section 9.3): an HTTP/1.1 message keeps the
  connection unless it says ``Connection: close``; an HTTP/1.0 one only if it says
  ``Connection: keep-alive``, and an HTTP/1.0 client's connection stays only if the
  response says ``keep-alive`` as well. A response delimited by the upstream's EOF
  closes the client connection after the exchange. So does
  a response with both ``Content-Length`` and ``Transfer-Encoding``, and a final
  response to an ``Expect: 100-continue`` request that came before any of its body
  (whether the client sends the body then is its choice: what follows is ambiguous).
* A client that half-closes after a complete request still gets its response (and
  those of complete requests it pipelined before), then the connection closes.
* ``route`` raising, or returning something other than a string, sends the request
  to :data:`ORIGINAL`.
* The public methods never raise: an internal error becomes ``Close(reset=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeAlias

import h11

from netmirror.wire.httpfilter import RequestHead

#: The target name meaning "the target's own server".
ORIGINAL: Final = ""

#: What the client gets when the upstream fails before its final response head.
BAD_GATEWAY: Final = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

DEFAULT_MAX_HEAD: Final = 64 * 1024
DEFAULT_MAX_HELD: Final = 256 * 1024

_HTTP1 = (b"1.0", b"1.1")
_BLANK = b"\r\n"


# --- actions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    """Attach an upstream for ``target``; the following :class:`ToUpstream` go to it.

    The I/O layer may reuse an idle connection it keeps for the target (a pooled one
    for :data:`ORIGINAL`, or one released as reusable on this client connection).
    """

    target: str


@dataclass(frozen=True, slots=True)
class ToUpstream:
    """Send ``data`` to the attached upstream."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ToClient:
    """Send ``data`` to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Release:
    """The exchange is over: detach the upstream, and keep it for reuse only if ``reusable``."""

    reusable: bool


@dataclass(frozen=True, slots=True)
class Pipe:
    """From now on copy raw bytes both ways between the client and the attached upstream.

    Everything received before was already emitted as :class:`ToUpstream` and
    :class:`ToClient`. If :meth:`Relay.client_eof` was called before, the client's
    side is already over: the I/O layer half-closes the upstream's side (write EOF).
    """


@dataclass(frozen=True, slots=True)
class Close:
    """Close the client connection and the attached upstream, after writing what was emitted.

    ``reset``: abort (TCP RST) instead of an orderly close, when the client must not
    take what it got for a complete response.
    """

    reason: str
    reset: bool


Action: TypeAlias = Connect | ToUpstream | ToClient | Release | Pipe | Close


# --- the relay --------------------------------------------------------------------------


class _Phase(Enum):
    HEAD = "waiting for a request head"
    EXCHANGE = "relaying an exchange"
    PIPE = "piping raw bytes"
    CLOSED = "closed"


class _Exchange:
    """One request and its response, with the upstream attached for it."""

    def __init__(self, target: str, request: h11.Request, max_head: int) -> None:
        self.target = target
        self.method = request.method
        self.request_done = False
        self.request_version = request.http_version
        self.request_keep_alive = _keeps_alive(request)
        self.expects_continue = any(
            name == b"expect" and value.lower() == b"100-continue"
            for name, value in request.headers
        )
        self.body_started = False  # request bytes past the head went upstream
        # A client-role h11 connection to parse the response: it is told the request
        # (its method, Upgrade, Connection) and never sees the body, which it does not need.
        self.parser = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self.parser.send(_mirror(request))
        self.raw = bytearray()  # upstream bytes received and not yet sent to the client
        self.final_head_sent = False
        self.response_done = False
        self.response_keep_alive = True
        self.response_by_eof = False
        self.upstream_gone = False  # closed or failed after its complete response
        self.upstream_dirty = False  # sent bytes after its complete response

    def on_response(self, response: h11.Response) -> None:
        self.final_head_sent = True
        # An HTTP/1.0 client keeps the connection only if the response says keep-alive
        # too, whatever the response's version (RFC 9112, section 9.3).
        self.response_keep_alive = _keeps_alive(response) and (
            self.request_version == b"1.1" or b"keep-alive" in _connection_tokens(response)
        )
        status = response.status_code
        no_body = (
            status in (204, 304)
            or self.method == b"HEAD"
            or (self.method == b"CONNECT" and 200 <= status < 300)
        )
        sized, chunked = _has(response, b"content-length"), _has(response, b"transfer-encoding")
        self.response_by_eof = not no_body and not sized and not chunked
        if sized and chunked:  # the client may read it otherwise than h11 did
            self.response_keep_alive = False

    def close_reason(self) -> str | None:
        """Why the client connection ends with this exchange, if it does."""
        if self.response_by_eof:
            return "the response was delimited by the upstream closing"
        if self.expects_continue and not self.body_started and not self.request_done:
            # The client may send the body or not: the next bytes are ambiguous.
            return "the upstream answered without 100 Continue"
        if not self.request_keep_alive:
            return "the client did not keep the connection alive"
        if not self.response_keep_alive:
            return "the upstream did not keep the connection alive"
        return None


class Relay:
    """The HTTP/1.x relay of one client connection; see the module's docstring.

    Feed it with :meth:`client_data`, :meth:`client_eof`, :meth:`upstream_data`,
    :meth:`upstream_eof`, :meth:`upstream_failed` and :meth:`head_timeout`, and carry
    out :meth:`actions` after each call, in order. Pause reading the client while
    :attr:`want_client_data` is false.
    """

    def __init__(
        self,
        route: Callable[[RequestHead], str],
        *,
        max_head: int = DEFAULT_MAX_HEAD,
        max_held: int = DEFAULT_MAX_HELD,
    ) -> None:
        """``route(head)`` returns :data:`ORIGINAL` or a session name, once per request.

        ``max_head``: longest request (or response) head. ``max_held``: how many bytes
        of pipelined requests are held while a response is pending before
        :attr:`want_client_data` turns false.
        """
        self._route = route
        self._max_head = max_head
        self._max_held = max_held
        self._phase = _Phase.HEAD
        self._actions: list[Action] = []
        self._raw = bytearray()  # client bytes received and not yet sent upstream
        self._parser: h11.Connection | None = None  # parses the current request
        self._exchange: _Exchange | None = None
        self._client_eof = False
        self._routed = False  # a request was routed on this connection
        self.requests: dict[str, int] = {}
        """Requests routed per target (:data:`ORIGINAL` included)."""

    # --- state, for the I/O layer and status ------------------------------------------

    @property
    def want_client_data(self) -> bool:
        """False while the held pipelined bytes are over the limit, or after the end."""
        if self._phase is _Phase.CLOSED or self._client_eof:
            return False
        if self._phase is _Phase.EXCHANGE and self._parser is None:
            return len(self._raw) < self._max_held
        return True

    @property
    def piped(self) -> bool:
        """Whether the connection is now a raw pipe (after :class:`Pipe`)."""
        return self._phase is _Phase.PIPE

    @property
    def closed(self) -> bool:
        """Whether :class:`Close` was emitted."""
        return self._phase is _Phase.CLOSED

    def actions(self) -> list[Action]:
        """What to do, in order, since the last call."""
        out, self._actions = self._actions, []
        return out

    # --- input ----------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        """Bytes from the client (after :class:`Pipe`, passed straight through)."""
        self._guard(self._client_data, data)

    def client_eof(self) -> None:
        """The client closed its side."""
        self._guard(self._on_client_eof)

    def upstream_data(self, data: bytes) -> None:
        """Bytes from the upstream currently attached (after :class:`Pipe`, passed through)."""
        self._guard(self._upstream_data, data)

    def upstream_eof(self) -> None:
        """The upstream currently attached closed its side."""
        self._guard(self._upstream_eof)

    def upstream_failed(self, reason: str) -> None:
        """The upstream could not be connected, or was lost."""
        self._guard(self._upstream_failed, reason)

    def head_timeout(self) -> None:
        """No complete request head came in time (ignored while an exchange runs)."""
        self._guard(self._head_timeout)

    def _guard(self, method: Callable[..., None], *args: object) -> None:
        try:
            method(*args)
        except Exception as exc:
            if self._phase is not _Phase.CLOSED:
                self._close(f"internal error: {exc!r}", reset=True)

    # --- client side ------------------------------------------------------------------

    def _client_data(self, data: bytes) -> None:
        if not data or self._phase is _Phase.CLOSED or self._client_eof:
            return
        if self._phase is _Phase.PIPE:
            self._emit(ToUpstream(bytes(data)))
            return
        self._raw += data
        if self._parser is not None:
            self._parser.receive_data(data)
            self._pump_request()
        elif self._phase is _Phase.HEAD:
            self._start_request()
        # else: held behind the current exchange

    def _on_client_eof(self) -> None:
        if self._phase in (_Phase.CLOSED, _Phase.PIPE) or self._client_eof:
            return
        self._client_eof = True
        self._check_client_eof()

    def _check_client_eof(self) -> None:
        """Act on the client's EOF when the relay has nothing more to parse."""
        if self._phase is _Phase.HEAD:
            if not self._raw:
                self._close("the client closed the connection", reset=False)
            elif not self._routed:
                self._pipe_original()
            else:
                self._close("the client closed the connection within a request head", reset=False)
        elif self._phase is _Phase.EXCHANGE and self._exchange is not None:
            if not self._exchange.request_done:
                self._close(
                    "the client closed the connection within a request",
                    reset=not self._exchange.response_done,
                )
            # else: the response comes, then the held requests, then the close

    def _start_request(self) -> None:
        """Begin parsing the next request from the held bytes."""
        if self._routed:
            # Empty lines between requests are tolerated (RFC 9112, section 2.2).
            skip = len(self._raw) - len(self._raw.lstrip(_BLANK))
            del self._raw[:skip]
        if not self._raw:
            if self._client_eof:
                self._check_client_eof()
            return
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        self._parser.receive_data(bytes(self._raw))
        self._pump_request()

    def _pump_request(self) -> None:
        parser = self._parser
        while parser is not None and parser is self._parser:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                self._request_error(exc)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                self._flush_request()
                if self._client_eof:
                    self._check_client_eof()
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.EndOfMessage):
                self._on_request_end()
            # Data: relayed as raw bytes by _flush_request

    def _on_request(self, request: h11.Request) -> None:
        parser = self._parser
        if parser is not None and len(self._raw) - len(parser.trailing_data[0]) > self._max_head:
            # h11 only notices a long head that came in several pieces.
            self._pipe_original()
            return
        if request.http_version not in _HTTP1:
            self._bad_head(f"unsupported HTTP version {request.http_version.decode()!r}")
            return
        if _has(request, b"transfer-encoding") and _has(request, b"content-length"):
            # Framing that the upstream may read otherwise than h11 (request smuggling).
            self._bad_head("malformed request: both Transfer-Encoding and Content-Length")
            return
        target = self._call_route(_request_head(request))
        self._routed = True
        self.requests[target] = self.requests.get(target, 0) + 1
        self._exchange = _Exchange(target, request, self._max_head)
        self._phase = _Phase.EXCHANGE
        self._emit(Connect(target))
        self._flush_request()  # the head
        self._exchange.body_started = False

    def _on_request_end(self) -> None:
        self._flush_request()
        self._parser = None  # what follows in _raw is held until the exchange ends
        exchange = self._exchange
        if exchange is not None:
            exchange.request_done = True
            self._maybe_finish(exchange)

    def _flush_request(self) -> None:
        """Send upstream the client bytes that h11 has consumed."""
        parser = self._parser
        if parser is None:
            return
        consumed = len(self._raw) - len(parser.trailing_data[0])
        if consumed <= 0:
            return
        chunk = bytes(self._raw[:consumed])
        del self._raw[:consumed]
        exchange = self._exchange
        if exchange is None:
            return
        exchange.body_started = True
        if not exchange.upstream_gone:
            self._emit(ToUpstream(chunk))

    def _request_error(self, exc: h11.RemoteProtocolError) -> None:
        exchange = self._exchange
        if self._phase is _Phase.HEAD:
            if exc.error_status_hint == 431:  # longer than max_head
                self._pipe_original()
            else:
                self._bad_head(f"malformed request: {exc}")
        elif exchange is not None:
            # The body went upstream as it came: the upstream judges it, and what it
            # answers (and anything after) is relayed as it is.
            self._switch_protocol(exchange)

    def _bad_head(self, reason: str) -> None:
        """A request head that cannot be filtered: it and the rest of the connection go
        to the original server, unfiltered; the server answers it as it would without
        netmirror (the router never answers for it)."""
        self._pipe_original()

    def _call_route(self, head: RequestHead) -> str:
        try:
            target = self._route(head)
        except Exception:
            return ORIGINAL
        return target if isinstance(target, str) else ORIGINAL

    # --- upstream side ----------------------------------------------------------------

    def _upstream_data(self, data: bytes) -> None:
        if not data:
            return
        if self._phase is _Phase.PIPE:
            self._emit(ToClient(bytes(data)))
            return
        exchange = self._exchange
        if self._phase is not _Phase.EXCHANGE or exchange is None or exchange.upstream_gone:
            return
        if exchange.response_done:
            exchange.upstream_dirty = True  # nothing may follow a complete response
            return
        exchange.raw += data
        exchange.parser.receive_data(data)
        self._pump_response(exchange)

    def _upstream_eof(self) -> None:
        exchange = self._exchange
        if self._phase is not _Phase.EXCHANGE or exchange is None or exchange.upstream_gone:
            return
        if exchange.response_done:
            exchange.upstream_gone = True
            return
        exchange.parser.receive_data(b"")
        self._pump_response(exchange)

    def _upstream_failed(self, reason: str) -> None:
        exchange = self._exchange
        if self._phase is not _Phase.EXCHANGE or exchange is None or exchange.upstream_gone:
            return
        if exchange.response_done:
            exchange.upstream_gone = True
            return
        self._upstream_broken(exchange, f"upstream failed: {reason}")

    def _pump_response(self, exchange: _Exchange) -> None:
        parser = exchange.parser
        while exchange is self._exchange and not exchange.response_done:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                self._upstream_broken(exchange, f"malformed response: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                self._flush_response(exchange)
                return
            if isinstance(event, h11.InformationalResponse):
                self._flush_response(exchange)
                if parser.their_state is h11.SWITCHED_PROTOCOL:  # 101 to an Upgrade
                    self._switch_protocol(exchange)
                    return
            elif isinstance(event, h11.Response):
                exchange.on_response(event)
                self._flush_response(exchange)
                if parser.their_state is h11.SWITCHED_PROTOCOL:  # 2xx to a CONNECT
                    self._switch_protocol(exchange)
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._flush_response(exchange)
                exchange.response_done = True
                if parser.trailing_data[0]:
                    exchange.upstream_dirty = True
                    exchange.raw.clear()
                self._maybe_finish(exchange)
                return
            # Data: relayed as raw bytes by _flush_response

    def _flush_response(self, exchange: _Exchange) -> None:
        """Send the client the upstream bytes that h11 has consumed."""
        consumed = len(exchange.raw) - len(exchange.parser.trailing_data[0])
        if consumed <= 0:
            return
        chunk = bytes(exchange.raw[:consumed])
        del exchange.raw[:consumed]
        self._emit(ToClient(chunk))

    def _upstream_broken(self, exchange: _Exchange, reason: str) -> None:
        if not exchange.final_head_sent:
            self._emit(ToClient(BAD_GATEWAY))
            self._close(reason, reset=False)
        else:
            self._close(reason, reset=True)

    def _switch_protocol(self, exchange: _Exchange) -> None:
        """The upstream accepted an Upgrade or a CONNECT: the rest is raw bytes."""
        if exchange.raw:
            self._emit(ToClient(bytes(exchange.raw)))
            exchange.raw.clear()
        if self._raw:
            self._emit(ToUpstream(bytes(self._raw)))
            self._raw.clear()
        self._parser = None
        self._exchange = None
        self._phase = _Phase.PIPE
        self._emit(Pipe())

    # --- ends of exchanges --------------------------------------------------------------

    def _maybe_finish(self, exchange: _Exchange) -> None:
        if not exchange.response_done or exchange is not self._exchange:
            return
        reason = exchange.close_reason()
        if reason is not None:
            self._emit(Release(False))
            self._close(reason, reset=False)
            return
        if not exchange.request_done:
            return  # the rest of the request body still goes to the upstream
        self._emit(Release(not exchange.upstream_gone and not exchange.upstream_dirty))
        self._exchange = None
        self._phase = _Phase.HEAD
        self._start_request()

    def _head_timeout(self) -> None:
        if self._phase is not _Phase.HEAD:
            return
        if not self._routed:
            self._pipe_original()
        else:
            self._close("no request head in time", reset=False)

    def _pipe_original(self) -> None:
        """Give the connection, unfiltered, to the original server."""
        self._emit(Connect(ORIGINAL))
        if self._raw:
            self._emit(ToUpstream(bytes(self._raw)))
            self._raw.clear()
        self._parser = None
        self._phase = _Phase.PIPE
        self._emit(Pipe())

    def _close(self, reason: str, *, reset: bool) -> None:
        self._emit(Close(reason, reset))
        self._phase = _Phase.CLOSED
        self._parser = None
        self._exchange = None
        self._raw.clear()

    def _emit(self, action: Action) -> None:
        # Bytes for the same side in a row go as one write.
        last = self._actions[-1] if self._actions else None
        if isinstance(action, ToUpstream) and isinstance(last, ToUpstream):
            self._actions[-1] = ToUpstream(last.data + action.data)
        elif isinstance(action, ToClient) and isinstance(last, ToClient):
            self._actions[-1] = ToClient(last.data + action.data)
        else:
            self._actions.append(action)


# --- h11 helpers ---------------------------------------------------------------------------


def _request_head(request: h11.Request) -> RequestHead:
    return RequestHead(
        method=request.method.decode("latin-1"),
        target=request.target.decode("latin-1"),
        headers=tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers.raw_items()
        ),
    )


def _has(message: h11.Request | h11.Response, header: bytes) -> bool:
    return any(name == header for name, _ in message.headers)


def _connection_tokens(message: h11.Request | h11.Response) -> set[bytes]:
    """The options of a message's Connection headers, in lower case."""
    tokens: set[bytes] = set()
    for name, value in message.headers:
        if name == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return tokens


def _keeps_alive(message: h11.Request | h11.Response) -> bool:
    """Whether the sender of ``message`` keeps the connection after it (RFC 9112, 9.3):
    HTTP/1.1 unless it says ``close``; HTTP/1.0 only if it says ``keep-alive``."""
    tokens = _connection_tokens(message)
    if b"close" in tokens:
        return False
    return message.http_version == b"1.1" or b"keep-alive" in tokens


def _mirror(request: h11.Request) -> h11.Request:
    """What the response parser needs to know of ``request``.

    Its method (HEAD, CONNECT), Upgrade and Connection; the version is always 1.1 and
    a Host is always there, because h11 only sends such requests.
    """
    host = b""
    kept: list[tuple[bytes, bytes]] = []
    for name, value in request.headers:
        if name == b"host":
            host = value
        elif name in (b"connection", b"upgrade"):
            kept.append((name, value))
    return h11.Request(
        method=request.method,
        target=request.target,
        headers=[(b"host", host), *kept],
        http_version=b"1.1",
    )
