"""Reach a TCP port inside a pod through the Kubernetes API server's port-forward.

:func:`open_stream` opens one port-forward websocket (one TCP connection inside the
pod) and returns a :class:`PortForwardStream`. :class:`LocalForwarder` serves a Unix
socket and joins every connection accepted there to a fresh stream.

The ``v4.channel.k8s.io`` protocol has no half-close: when the local side sends EOF
the websocket is closed, and bytes the pod was still sending are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import stat
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from netmirror.errors import AgentError, NetmirrorError, ProtocolError
from netmirror.kube.channels import (
    SUBPROTOCOL,
    DataReceived,
    PortAnnounced,
    PortForwardChannels,
    RemoteError,
)

log = logging.getLogger(__name__)

#: Largest payload of one websocket message we send.
WS_MESSAGE_SIZE = 64 * 1024
#: Largest websocket message we accept from the API server.
WS_MAX_MESSAGE = 16 * 1024 * 1024
#: Seconds to wait for the server's answer to our websocket close.
CLOSE_TIMEOUT = 5.0
#: Bytes read from a local connection at a time.
LOCAL_READ_SIZE = 64 * 1024


class HeaderProvider(Protocol):
    """Fresh credential headers; ``force`` renews them (the server answered 401)."""

    def __call__(self, *, force: bool = False) -> Awaitable[Mapping[str, str]]: ...


@dataclass(frozen=True)
class ApiEndpoint:
    """How to reach the API server; the caller builds it from a kubeconfig.

    ``base_url`` is e.g. ``https://10.0.0.1:6443`` (a path prefix is kept), ``headers``
    are sent as they are (static credentials: ``Authorization: Bearer ...``), ``ssl`` is
    passed to aiohttp (``None`` means default verification). ``auth``, for credentials
    that expire, is awaited before every connect for headers that override ``headers``;
    after a 401 it is called with ``force=True`` and the connect is tried once more.
    """

    base_url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    ssl: ssl.SSLContext | bool | None = None
    auth: HeaderProvider | None = None

    async def request_headers(self, *, force: bool = False) -> dict[str, str]:
        """The headers of one request: ``headers``, then what ``auth`` gives."""
        headers = dict(self.headers)
        if self.auth is not None:
            headers.update(await self.auth(force=force))
        return headers


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class PortForwardStream:
    """One TCP connection inside a pod, carried by one port-forward websocket.

    Build it with :func:`open_stream`. One task may :meth:`read` while another
    :meth:`write`\\ s; :meth:`close` may be called from any task, any number of times.
    """

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        channels: PortForwardChannels,
        *,
        label: str,
    ) -> None:
        """Wrap an open websocket; ``label`` (``ns/pod:port``) names it in messages."""
        self.label = label
        self._ws = ws
        self._channels = channels
        self._pending: deque[bytes] = deque()
        self._eof = False
        self._closed = False
        self.remote_error = ""
        """The last error text the server sent, if any."""

    @property
    def closed(self) -> bool:
        """Whether the websocket is closed (by either side)."""
        return self._closed or self._ws.closed

    async def _wait_announcement(self) -> None:
        """Read until the data channel's port announcement; keep any data that follows."""
        while not self._channels.data_announced:
            if not await self._receive():
                raise AgentError(
                    f"port-forward to pod {self.label} closed before the port was announced"
                )

    async def _receive(self) -> bool:
        """Handle one websocket message; False at the end of the stream."""
        msg = await self._ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            try:
                events = self._channels.feed(msg.data)
            except ProtocolError as err:
                raise ProtocolError(f"{err} (pod {self.label})") from None
            for event in events:
                if isinstance(event, DataReceived):
                    self._pending.append(event.data)
                elif isinstance(event, RemoteError):
                    self.remote_error = _one_line(event.text)
                    raise AgentError(f"port-forward to pod {self.label}: {self.remote_error}")
                elif isinstance(event, PortAnnounced):
                    log.debug("port-forward %s: channel %s open", self.label, event.channel)
            return True
        if msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
        ):
            return False
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise AgentError(
                f"port-forward to pod {self.label}: websocket failed: {_one_line(msg.data)}"
            )
        raise ProtocolError(
            f"port-forward to pod {self.label}: unexpected {msg.type.name} websocket message"
        )

    async def read(self) -> bytes:
        """Next bytes from the pod; ``b""`` once the stream has ended.

        Raises :class:`AgentError` when the server reports an error (then the stream
        is at its end) and :class:`ProtocolError` when it breaks the framing.
        """
        while not self._pending:
            if self._eof or self._closed:
                return b""
            try:
                if not await self._receive():
                    self._eof = True
            except NetmirrorError:
                self._eof = True
                raise
        return self._pending.popleft()

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the pod; returns once the websocket took it (backpressure).

        Raises :class:`AgentError` when the websocket is closed or fails.
        """
        view = memoryview(data)
        for start in range(0, len(view), WS_MESSAGE_SIZE):
            if self.closed:
                raise AgentError(f"port-forward to pod {self.label} is closed")
            chunk = view[start : start + WS_MESSAGE_SIZE]
            try:
                await self._ws.send_bytes(self._channels.encode_data(bytes(chunk)))
            except (aiohttp.ClientError, OSError, RuntimeError) as err:
                raise AgentError(
                    f"port-forward to pod {self.label}: sending failed: {_one_line(err)}"
                ) from err

    async def close(self) -> None:
        """Close the websocket: the server then closes the connection inside the pod."""
        self._closed = True
        if not self._ws.closed:
            await self._ws.close()


async def open_stream(
    session: aiohttp.ClientSession,
    endpoint: ApiEndpoint,
    *,
    namespace: str,
    pod: str,
    port: int,
    timeout: float = 10,
) -> PortForwardStream:
    """Open a port-forward websocket to ``port`` of ``namespace/pod``.

    Returns once the server announced the data channel. A connection refused inside
    the pod is reported after that (the server dials asynchronously): the first
    :meth:`PortForwardStream.read` raises :class:`AgentError` with the server's text.
    Raises :class:`AgentError` (one line) on HTTP errors, an error text from the server
    before the announcement, an unreachable API server or a timeout.
    """
    where = f"{namespace}/{pod}"
    url = (
        f"{endpoint.base_url.rstrip('/')}/api/v1/namespaces/{quote(namespace, safe='')}"
        f"/pods/{quote(pod, safe='')}/portforward"
    )
    channels = PortForwardChannels(port)
    ws: aiohttp.ClientWebSocketResponse | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                ws = await _ws_connect(session, endpoint, url, port, force=False)
            except aiohttp.WSServerHandshakeError as err:
                if err.status != 401 or endpoint.auth is None:
                    raise
                # The token may have expired (or been revoked): renew it, try once more.
                log.debug("port-forward %s: HTTP 401, renewing the credentials", where)
                ws = await _ws_connect(session, endpoint, url, port, force=True)
            if ws.protocol != SUBPROTOCOL:
                # Kubernetes falls back to the same binary framing without a subprotocol.
                log.debug("port-forward %s: server chose subprotocol %r", where, ws.protocol)
            stream = PortForwardStream(ws, channels, label=f"{where}:{port}")
            await stream._wait_announcement()
    except aiohttp.WSServerHandshakeError as err:
        raise AgentError(_http_error(err.status, err.message, where)) from None
    except TimeoutError:
        await _abort(ws)
        raise AgentError(
            f"port-forward to pod {where} port {port} timed out after {timeout:g} s"
        ) from None
    except NetmirrorError:
        await _abort(ws)
        raise
    except (aiohttp.ClientError, OSError) as err:
        await _abort(ws)
        raise AgentError(
            f"cannot reach the API server at {endpoint.base_url}: {_one_line(err)}"
        ) from None
    except BaseException:
        await _abort(ws)
        raise
    log.debug("port-forward to %s port %s open", where, port)
    return stream


async def _ws_connect(
    session: aiohttp.ClientSession, endpoint: ApiEndpoint, url: str, port: int, *, force: bool
) -> aiohttp.ClientWebSocketResponse:
    return await session.ws_connect(
        url,
        params={"ports": str(port)},
        protocols=(SUBPROTOCOL,),
        headers=await endpoint.request_headers(force=force),
        ssl=True if endpoint.ssl is None else endpoint.ssl,
        max_msg_size=WS_MAX_MESSAGE,
        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
    )


def _http_error(status: int, message: str, where: str) -> str:
    if status == 403:
        return f"forbidden: cannot create pods/portforward for pod {where} (check your RBAC)"
    if status == 404:
        return f"pod {where} not found"
    if status == 401:
        return f"unauthorized: the API server rejected the credentials for pod {where} (HTTP 401)"
    return f"port-forward to pod {where} failed: HTTP {status} {_one_line(message)}".rstrip()


async def _abort(ws: aiohttp.ClientWebSocketResponse | None) -> None:
    if ws is not None and not ws.closed:
        with contextlib.suppress(Exception):
            await ws.close()


class LocalForwarder:
    """Serve a Unix socket whose every connection is one port-forward stream.

    ``opener`` opens a new :class:`PortForwardStream` (e.g. a ``functools.partial`` of
    :func:`open_stream`); it is retried ``attempts`` times with exponential backoff
    (``backoff`` seconds doubling up to ``max_backoff``), after which the local
    connection is closed. Bytes then flow both ways until either side ends.
    """

    def __init__(
        self,
        opener: Callable[[], Awaitable[PortForwardStream]],
        *,
        path: Path,
        attempts: int = 5,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
    ) -> None:
        """Prepare to serve at ``path``; nothing happens until :meth:`start`."""
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.path = path
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._opener = opener
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.connections = 0
        """Local connections accepted."""
        self.failures = 0
        """Local connections that ended in an error: no stream could be opened, or the
        server reported an error or broke the protocol."""
        self.last_error = ""
        """Message of the last failure."""

    @property
    def active(self) -> int:
        """Local connections being served now."""
        return len(self._tasks)

    async def start(self) -> None:
        """Listen on :attr:`path` (mode 0600; a stale socket there is replaced)."""
        if self._server is not None:
            raise RuntimeError("LocalForwarder already started")
        self._closing = False
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(self.path))
            # Not listening yet: nobody can connect before the mode is set.
            os.chmod(self.path, 0o600)
            self._inode = os.stat(self.path).st_ino
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.debug("port-forward listening on %s", self.path)

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise AgentError(f"{self.path} exists and is not a socket")
        self.path.unlink()

    def _unlink(self) -> None:
        if self._inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()
        self._inode = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        self.connections += 1
        number = self.connections
        task = asyncio.create_task(
            self._serve(reader, writer, number), name=f"netmirror.kube.forward-{number}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, number: int) -> PortForwardStream:
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return await self._opener()
            except Exception as err:
                if attempt == self.attempts:
                    raise
                log.debug(
                    "connection %s: port-forward attempt %s failed (%s); retrying in %.1f s",
                    number,
                    attempt,
                    err,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")

    def _fail(self, number: int, err: BaseException) -> None:
        self.failures += 1
        self.last_error = _one_line(err) or type(err).__name__
        log.warning("port-forward connection %s: %s", number, self.last_error)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        stream: PortForwardStream | None = None
        try:
            try:
                stream = await self._open(number)
            except Exception as err:
                self._fail(number, err)
                return
            await self._pipe(reader, writer, stream, number)
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.close()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stream: PortForwardStream,
        number: int,
    ) -> None:
        up = asyncio.create_task(
            _local_to_remote(reader, stream), name=f"netmirror.kube.forward-{number}-up"
        )
        down = asyncio.create_task(
            _remote_to_local(stream, writer), name=f"netmirror.kube.forward-{number}-down"
        )
        try:
            await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
            if not down.done():
                if isinstance(_exception(up), NetmirrorError):
                    # The websocket refused our bytes: the server closed it. Let the
                    # reader drain it, so that an error text it sent is reported.
                    await asyncio.wait((down,))
                else:
                    # Local EOF (or the local socket broke): no half-close in the
                    # protocol, so close the websocket; that ends the reader.
                    await stream.close()
                    down.cancel()
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        err = _exception(down)
        if isinstance(err, NetmirrorError):
            self._fail(number, err)
        elif isinstance(err, OSError):
            log.debug("connection %s: local socket failed: %s", number, err)
        elif err is not None:
            log.error("connection %s: unexpected error", number, exc_info=err)
            self._fail(number, err)
        log.debug("connection %s: closed", number)

    async def close(self) -> None:
        """Stop listening, end every open connection and remove the socket file."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        self._unlink()

    async def __aenter__(self) -> LocalForwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


def _exception(task: asyncio.Task[Any]) -> BaseException | None:
    if not task.done() or task.cancelled():
        return None
    return task.exception()


async def _local_to_remote(reader: asyncio.StreamReader, stream: PortForwardStream) -> None:
    """Copy local bytes to the websocket until local EOF; one send at a time."""
    while data := await reader.read(LOCAL_READ_SIZE):
        await stream.write(data)


async def _remote_to_local(stream: PortForwardStream, writer: asyncio.StreamWriter) -> None:
    """Copy the pod's bytes to the local socket until the websocket ends."""
    while data := await stream.read():
        writer.write(data)
        await writer.drain()


__all__ = [
    "ApiEndpoint",
    "HeaderProvider",
    "LocalForwarder",
    "PortForwardStream",
    "open_stream",
]
