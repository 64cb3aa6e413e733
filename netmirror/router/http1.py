"""Sans-I/O relay of one client connection of an HTTP-filtered stolen port.

The router accepts a client's connection and hands every byte to a :class:`Relay`,
which finds the HTTP/1.x requests in them, asks ``route(head)`` where each goes
(:data:`ORIGINAL`, the target's own server, or a session's name), and answers with
:data:`Action` values that the I/O layer carries out in order: attach an upstream,
send bytes to it or to the client, release the upstream, turn the connection into
a raw pipe, or close. Nothing here touches a socket, a clock or an event loop.

Bytes are relayed exactly as received. llhttp (through httptools, in C) parses the
heads, request and response, and validates them strictly; it also finds the end of
chunked bodies. Where a message ends is worked out here, because httptools reports
no offsets: a head ends at its first empty line; a ``Content-Length`` body is
counted; a chunked body is fed to llhttp in pieces that each end at a ``CRLF CRLF``
(where any chunked body must end), so the piece after which llhttp completes the
message ends exactly where the message does. No per-byte Python work is done on
bodies. One exchange (request and response) runs at a time: requests that a client
pipelines are held, and routed one by one as the previous response completes, so
responses return in order. Between requests, stray empty lines (CR, LF) that some
clients send after a body are dropped.

Decisions:

* Every :class:`Connect` is followed by exactly one :class:`Release`, unless the
  connection ends first with :class:`Pipe` or :class:`Close` (which ends the
  attached upstream too). An exchange ends when both its request and its response
  are complete; an upstream that answers before the request body is over still gets
  the rest of the body (or, if it is gone, the rest is dropped). ``Release(True)``
  only when both sides kept the connection alive and the upstream sent nothing
  after its response and did not close.
* Bytes that cannot be filtered go to the original server untouched, with the rest
  of the connection (a raw pipe), and the server answers them as it would without
  netmirror; the router never answers for it. That is: a request head llhttp
  rejects (not HTTP, a method it does not know, obs-fold, bare LF line ends, both
  ``Content-Length`` and ``Transfer-Encoding``, the request-smuggling shape...), as
  soon as llhttp rejects it; a version other than HTTP/1.0 or 1.1 (HTTP/2's
  ``PRI * HTTP/2.0`` preface among them); an HTTP/1.1 request without ``Host``; a
  head longer than ``max_head``; no complete first head when the I/O layer calls
  :meth:`Relay.head_timeout`; a client that half-closes in the middle of its first
  head. A later request is piped the same way (the previous exchanges are all
  complete by then). A malformed request *body* has gone to the upstream as it
  came: from then on the connection is a raw pipe to that upstream.
* An upstream that fails, closes or answers garbage before the final response head
  went to the client gives the client ``502 Bad Gateway`` (1xx responses already
  relayed do not count); after that head, the connection is reset.
* Keep-alive follows RFC 9112 (section 9.3): an HTTP/1.1 message keeps the
  connection unless it says ``Connection: close``; an HTTP/1.0 one only if it says
  ``Connection: keep-alive``, and an HTTP/1.0 client's connection stays only if the
  response says ``keep-alive`` as well. A response delimited by the upstream's EOF
  closes the client connection after the exchange. So does a response with both
  ``Content-Length`` and ``Transfer-Encoding`` (read as chunked, RFC 9112 6.3), and
  a final response to an ``Expect: 100-continue`` request that came before any of
  its body (whether the client sends the body then is its choice: what follows is
  ambiguous).
* A client that half-closes after a complete request still gets its response (and
  those of complete requests it pipelined before), then the connection closes.
* ``route`` raising, or returning something other than a string, sends the request
  to :data:`ORIGINAL`.
* The public methods never raise: an internal error becomes ``Close(reset=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeAlias

import httptools

from netmirror.wire.httpfilter import RequestHead

#: The target name meaning "the target's own server".
ORIGINAL: Final = ""

#: What the client gets when the upstream fails before its final response head.
BAD_GATEWAY: Final = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

DEFAULT_MAX_HEAD: Final = 64 * 1024
DEFAULT_MAX_HELD: Final = 256 * 1024

_HTTP1 = ("1.0", "1.1")
_BLANK = b"\r\n"
_END = b"\r\n\r\n"
_OWS = b" \t"
#: The headers the relay reads itself, found in a lower-cased head.
_WATCHED = re.compile(
    rb"\r\n(connection|content-length|expect|host|transfer-encoding|upgrade):([^\r]*)"
)


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


# --- heads ------------------------------------------------------------------------------


class Head:
    """One message head, once llhttp has validated it; also the parser's callback object.

    llhttp only checks the head and says where the message ends: its fields are read
    from the head's bytes here, as they are needed (a Python callback per header from
    llhttp costs more than reading the few that matter). Reading them this simply is
    exact because llhttp is strict: lines end with CRLF, there is no obs-fold, and no
    whitespace before a header's colon.
    """

    __slots__ = ("_connection", "_fields", "complete", "done", "raw", "upgraded")

    def __init__(self) -> None:
        self.raw = b""
        """The whole head, up to and including its empty line (once complete)."""
        self.complete = False  # the head is over
        self.done = False  # the whole message is over
        self.upgraded = False  # llhttp stopped after the head (Upgrade, CONNECT, 101)
        self._fields: dict[bytes, list[bytes]] | None = None
        self._connection: list[bytes] | None = None

    # llhttp's callbacks

    def on_headers_complete(self) -> None:
        self.complete = True

    def on_message_begin(self) -> None:
        if self.complete:
            # Fed past the end of this message: the offsets worked out here are wrong.
            raise RuntimeError("llhttp saw a second message")

    def on_message_complete(self) -> None:
        self.done = True

    # what the relay needs

    @property
    def target(self) -> bytes:
        """A request's target, as sent."""
        return self.raw[: self.raw.find(_BLANK)].split(b" ")[1]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """``(name, value)`` as sent, in order; values without surrounding whitespace."""
        fields = []
        for line in self.raw.split(_BLANK)[1:-2]:
            name, _, value = line.partition(b":")
            fields.append((name, value.strip(_OWS)))
        return fields

    def values(self, name: bytes) -> list[bytes]:
        """The values of header ``name`` (one of :data:`_WATCHED`, in lower case), in order."""
        fields = self._fields
        if fields is None:
            # One scan in C of the lower-cased head; the values come from the head as sent.
            fields = self._fields = {}
            raw = self.raw
            for match in _WATCHED.finditer(raw.lower()):
                fields.setdefault(match[1], []).append(
                    raw[match.end(1) + 1 : match.end()].strip(_OWS)
                )
        return fields.get(name, [])

    def tokens(self, name: bytes) -> list[bytes]:
        """The comma-separated options of every ``name`` header, in lower case."""
        return [token.strip().lower() for value in self.values(name) for token in value.split(b",")]

    @property
    def connection(self) -> list[bytes]:
        """The options of the ``Connection`` headers, in lower case."""
        if self._connection is None:
            self._connection = self.tokens(b"connection") if self.values(b"connection") else []
        return self._connection

    def keeps_alive(self, version: str) -> bool:
        """Whether the sender keeps the connection after this message (RFC 9112, 9.3):
        HTTP/1.1 unless it says ``close``; HTTP/1.0 only if it says ``keep-alive``."""
        tokens = self.connection
        if b"close" in tokens:
            return False
        return version == "1.1" or b"keep-alive" in tokens

    def chunked(self) -> bool:
        """Whether the last transfer coding is ``chunked``."""
        if not self.values(b"transfer-encoding"):
            return False
        codings = self.tokens(b"transfer-encoding")
        return bool(codings) and codings[-1] == b"chunked"

    def request_head(self, method: bytes) -> RequestHead:
        return RequestHead(
            method=method.decode("latin-1"),
            target=self.target.decode("latin-1"),
            headers=tuple(
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in self.headers
            ),
        )


class _Reader:
    """Feeds one message to llhttp and finds where its head (and chunked body) end."""

    __slots__ = ("fed", "head", "parser", "tail")

    def __init__(self, *, response: bool) -> None:
        self.head = Head()
        if response:
            self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser = (
                httptools.HttpResponseParser(self.head)
            )
            # Both lengths: RFC 9112 (6.3) reads it as chunked; the relay closes after.
            self.parser.set_dangerous_leniencies(
                lenient_chunked_length=True, lenient_spaces_after_chunk_size=True
            )
        else:
            self.parser = httptools.HttpRequestParser(self.head)
            # "A \r\n": common, and where the chunk ends is not in doubt.
            self.parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self.fed = 0  # head bytes fed so far
        self.tail = b""  # the last bytes fed, to find a CRLF CRLF split across reads

    def feed_head(self, buf: bytearray, max_head: int) -> int | None:
        """Feed the head bytes of ``buf`` (which starts with the message) not fed yet.

        Returns the head's length once it is complete, else None (more is needed);
        raises :class:`TooLong` past ``max_head`` and httptools' errors on bad heads.
        """
        start = self.fed
        end = buf.find(_END, max(start - 3, 0))
        stop = len(buf) if end < 0 else end + 4
        if stop > max_head:
            raise TooLong
        if stop > start:
            try:
                self.parser.feed_data(bytes(buf[start:stop]))
            except httptools.HttpParserUpgrade:
                self.head.upgraded = True  # llhttp parses nothing after this head
            self.fed = stop
        if not self.head.complete:
            if end >= 0:
                raise httptools.HttpParserError("no end of head where one was expected")
            return None
        self.head.raw = bytes(buf[:stop])
        return stop

    def feed_chunked(self, data: bytes) -> int | None:
        """Feed chunked body bytes; returns how many end the body, or None (all fed).

        A chunked body (its last chunk, trailers and final CRLF) always ends with CRLF
        CRLF: pieces cut just after each one let llhttp say which one ends it.
        """
        pos = 0
        size = len(data)
        while pos < size:
            stop = _end_after(self.tail, data, pos)
            self.parser.feed_data(data[pos:stop] if pos or stop < size else data)
            if stop - pos >= 3:
                self.tail = data[stop - 3 : stop]
            else:
                self.tail = (self.tail + data[pos:stop])[-3:]
            pos = stop
            if self.head.done:
                return pos
        return None


def _end_after(tail: bytes, data: bytes, pos: int) -> int:
    """Where the piece of ``data`` from ``pos`` ends: just after its first CRLF CRLF
    (which may begin in ``tail``, the bytes before ``pos``), or at the end."""
    if pos == 0 and tail:
        for have in (3, 2, 1):
            if tail.endswith(_END[:have]) and data.startswith(_END[have:]):
                return 4 - have
    end = data.find(_END, pos)
    return len(data) if end < 0 else end + 4


class TooLong(Exception):
    """A head longer than the limit."""


def parse_request_head(data: bytes) -> tuple[bytes, str, Head] | None:
    """The method, version and head of a complete request head alone, or None if invalid."""
    reader = _Reader(response=False)
    try:
        if reader.feed_head(bytearray(data), len(data)) is None:
            return None
    except (httptools.HttpParserError, TooLong, RuntimeError):
        return None
    parser = reader.parser
    assert isinstance(parser, httptools.HttpRequestParser)
    return parser.get_method(), parser.get_http_version(), reader.head


# --- the relay --------------------------------------------------------------------------


class _Phase(Enum):
    HEAD = "waiting for a request head"
    EXCHANGE = "relaying an exchange"
    PIPE = "piping raw bytes"
    CLOSED = "closed"


class _Exchange:
    """One request and its response, with the upstream attached for it."""

    __slots__ = (
        "body_started",
        "expects_continue",
        "final_head_sent",
        "method",
        "raw",
        "reader",
        "remaining",
        "request_done",
        "request_keep_alive",
        "request_version",
        "response_by_eof",
        "response_done",
        "response_keep_alive",
        "target",
        "upgrade_asked",
        "upstream_dirty",
        "upstream_gone",
    )

    def __init__(self, target: str, method: bytes, version: str, head: Head) -> None:
        self.target = target
        self.method = method
        self.request_done = False
        self.request_version = version
        self.request_keep_alive = head.keeps_alive(version)
        self.expects_continue = bool(head.values(b"expect")) and b"100-continue" in head.tokens(
            b"expect"
        )
        self.upgrade_asked = bool(head.values(b"upgrade")) and b"upgrade" in head.connection
        self.body_started = False  # request bytes past the head went upstream
        self.raw = bytearray()  # upstream bytes received and not yet sent to the client
        self.reader: _Reader | None = _Reader(response=True)  # the response head or body
        self.remaining: int | None = None  # of a response body with a length
        self.final_head_sent = False
        self.response_done = False
        self.response_keep_alive = True
        self.response_by_eof = False
        self.upstream_gone = False  # closed or failed after its complete response
        self.upstream_dirty = False  # sent bytes after its complete response

    def on_response(self, head: Head, status: int, version: str) -> bool:
        """Note the final response head; returns whether a body follows."""
        self.final_head_sent = True
        # An HTTP/1.0 client keeps the connection only if the response says keep-alive
        # too, whatever the response's version (RFC 9112, section 9.3).
        self.response_keep_alive = head.keeps_alive(version) and (
            self.request_version == "1.1" or b"keep-alive" in head.connection
        )
        no_body = (
            status in (204, 304)
            or self.method == b"HEAD"
            or (self.method == b"CONNECT" and 200 <= status < 300)
        )
        if no_body:
            return False
        sized = bool(head.values(b"content-length"))
        coded = bool(head.values(b"transfer-encoding"))
        if sized and coded:  # the client may read it otherwise than llhttp does
            self.response_keep_alive = False
        if coded:
            # Chunked last: llhttp finds the end; any other coding: the close does.
            self.response_by_eof = not head.chunked()
        elif sized:
            self.remaining = int(head.values(b"content-length")[0])
            self.reader = None
        else:
            self.response_by_eof = True
        if self.response_by_eof:
            self.reader = None
        return True

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
        self._reader: _Reader | None = None  # the current request's head, then chunked body
        self._remaining: int | None = None  # of the current request's body with a length
        self._in_body = False  # the current request's body is still coming
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
        if self._phase is _Phase.EXCHANGE and not self._in_body:
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
        try:  # _guard, inlined on the two paths every request takes
            self._client_data(data)
        except Exception as exc:
            self._internal_error(exc)

    def client_eof(self) -> None:
        """The client closed its side."""
        self._guard(self._on_client_eof)

    def upstream_data(self, data: bytes) -> None:
        """Bytes from the upstream currently attached (after :class:`Pipe`, passed through)."""
        try:
            self._upstream_data(data)
        except Exception as exc:
            self._internal_error(exc)

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
            self._internal_error(exc)

    def _internal_error(self, exc: Exception) -> None:
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
        if self._in_body:
            self._pump_request_body()
        elif self._phase is _Phase.HEAD:
            self._pump_request_head()
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

    def _pump_request_head(self) -> None:
        """Parse the next request's head from the held bytes, as far as it came."""
        if self._reader is None:
            # Empty lines before a request are tolerated (RFC 9112, section 2.2).
            skip = len(self._raw) - len(self._raw.lstrip(_BLANK))
            del self._raw[:skip]
            if not self._raw:
                if self._client_eof:
                    self._check_client_eof()
                return
            self._reader = _Reader(response=False)
        reader = self._reader
        try:
            length = reader.feed_head(self._raw, self._max_head)
        except TooLong:
            self._pipe_original()
            return
        except (httptools.HttpParserError, RuntimeError):
            self._pipe_original()  # the server judges it, as without netmirror
            return
        if length is None:
            if self._client_eof:
                self._check_client_eof()
            return
        parser = reader.parser
        assert isinstance(parser, httptools.HttpRequestParser)
        head = reader.head
        version = parser.get_http_version()
        if version not in _HTTP1 or (version == "1.1" and not head.values(b"host")):
            self._pipe_original()
            return
        method = parser.get_method()
        target = self._call_route(head.request_head(method))
        self._routed = True
        self.requests[target] = self.requests.get(target, 0) + 1
        exchange = _Exchange(target, method, version, head)
        self._exchange = exchange
        self._phase = _Phase.EXCHANGE
        self._emit(Connect(target))
        self._emit(ToUpstream(head.raw))
        del self._raw[:length]
        if head.chunked():
            self._in_body = True  # llhttp, fed the head, is ready for the chunks
        elif head.values(b"content-length"):
            self._remaining = int(head.values(b"content-length")[0])
            self._reader = None
            self._in_body = self._remaining > 0
        else:
            self._reader = None
        if not self._in_body:
            self._on_request_end()
        elif self._raw:
            self._pump_request_body()
        elif self._client_eof:
            self._check_client_eof()

    def _pump_request_body(self) -> None:
        exchange = self._exchange
        if exchange is None or not self._raw:
            return
        if self._remaining is not None:
            size = min(self._remaining, len(self._raw))
            self._remaining -= size
            ended = self._remaining == 0
        else:
            assert self._reader is not None
            try:
                end = self._reader.feed_chunked(bytes(self._raw))
            except (httptools.HttpParserError, RuntimeError):
                # The body goes upstream as it came: the upstream judges it, and what
                # it answers (and anything after) is relayed as it is.
                self._switch_protocol(exchange)
                return
            ended = end is not None
            size = len(self._raw) if end is None else end
        if size:
            chunk = bytes(self._raw[:size])
            del self._raw[:size]
            exchange.body_started = True
            if not exchange.upstream_gone:
                self._emit(ToUpstream(chunk))
        if ended:
            self._on_request_end()
        elif self._client_eof:
            self._check_client_eof()

    def _on_request_end(self) -> None:
        self._in_body = False
        self._reader = None
        self._remaining = None  # what follows in _raw is held until the exchange ends
        exchange = self._exchange
        if exchange is not None:
            exchange.request_done = True
            self._maybe_finish(exchange)

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
        self._pump_response(exchange)

    def _upstream_eof(self) -> None:
        exchange = self._exchange
        if self._phase is not _Phase.EXCHANGE or exchange is None or exchange.upstream_gone:
            return
        if exchange.response_done:
            exchange.upstream_gone = True
            return
        if exchange.response_by_eof:
            self._response_end(exchange)
        elif not exchange.final_head_sent and not exchange.raw:
            self._upstream_broken(exchange, "the upstream closed the connection without answering")
        else:
            self._upstream_broken(exchange, "the upstream closed the connection within a response")

    def _upstream_failed(self, reason: str) -> None:
        exchange = self._exchange
        if self._phase is not _Phase.EXCHANGE or exchange is None or exchange.upstream_gone:
            return
        if exchange.response_done:
            exchange.upstream_gone = True
            return
        self._upstream_broken(exchange, f"upstream failed: {reason}")

    def _pump_response(self, exchange: _Exchange) -> None:
        while exchange is self._exchange and not exchange.response_done and exchange.raw:
            if exchange.final_head_sent:
                self._pump_response_body(exchange)
                return
            reader = exchange.reader
            assert reader is not None
            try:
                length = reader.feed_head(exchange.raw, self._max_head)
            except TooLong:
                self._upstream_broken(exchange, "response head too long")
                return
            except (httptools.HttpParserError, RuntimeError) as exc:
                self._upstream_broken(exchange, f"malformed response: {exc}")
                return
            if length is None:
                return
            parser = reader.parser
            assert isinstance(parser, httptools.HttpResponseParser)
            status = parser.get_status_code()
            version = parser.get_http_version()
            if status == 101:
                if not exchange.upgrade_asked:
                    self._upstream_broken(exchange, "101 to a request that asked no upgrade")
                    return
                self._switch_protocol(exchange)
                return
            if 100 <= status < 200:
                self._to_client(exchange, length)
                exchange.reader = _Reader(response=True)  # another head follows
                continue
            has_body = exchange.on_response(reader.head, status, version)
            self._to_client(exchange, length)
            if exchange.method == b"CONNECT" and 200 <= status < 300:
                self._switch_protocol(exchange)
                return
            if not has_body or exchange.remaining == 0:
                self._response_end(exchange)
                return

    def _pump_response_body(self, exchange: _Exchange) -> None:
        raw = exchange.raw
        if exchange.response_by_eof:
            self._to_client(exchange, len(raw))
            return
        if exchange.remaining is not None:
            size = min(exchange.remaining, len(raw))
            exchange.remaining -= size
            ended = exchange.remaining == 0
        else:
            assert exchange.reader is not None
            try:
                end = exchange.reader.feed_chunked(bytes(raw))
            except (httptools.HttpParserError, RuntimeError) as exc:
                self._upstream_broken(exchange, f"malformed response: {exc}")
                return
            ended = end is not None
            size = len(raw) if end is None else end
        self._to_client(exchange, size)
        if ended:
            self._response_end(exchange)

    def _to_client(self, exchange: _Exchange, size: int) -> None:
        if size:
            self._emit(ToClient(bytes(exchange.raw[:size])))
            del exchange.raw[:size]

    def _response_end(self, exchange: _Exchange) -> None:
        exchange.response_done = True
        if exchange.raw:
            exchange.upstream_dirty = True
            exchange.raw.clear()
        self._maybe_finish(exchange)

    def _upstream_broken(self, exchange: _Exchange, reason: str) -> None:
        if not exchange.final_head_sent:
            self._emit(ToClient(BAD_GATEWAY))
            self._close(reason, reset=False)
        else:
            self._close(reason, reset=True)

    def _switch_protocol(self, exchange: _Exchange) -> None:
        """The upstream accepted an Upgrade or a CONNECT, or the request's body is
        malformed: the rest is raw bytes."""
        if exchange.raw:
            self._emit(ToClient(bytes(exchange.raw)))
            exchange.raw.clear()
        if self._raw:
            self._emit(ToUpstream(bytes(self._raw)))
            self._raw.clear()
        self._reader = None
        self._in_body = False
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
        self._pump_request_head()

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
        self._reader = None
        self._phase = _Phase.PIPE
        self._emit(Pipe())

    def _close(self, reason: str, *, reset: bool) -> None:
        self._emit(Close(reason, reset))
        self._phase = _Phase.CLOSED
        self._reader = None
        self._in_body = False
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
