"""The daemon's client of the agent's file service: requests, and content streams.

Every call waits for a live tunnel for at most ``timeout`` seconds (the daemon
reconnects a cut tunnel meanwhile); past that, it fails with EIO, so a program
reading the target's files never hangs on a tunnel that is gone.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from netmirror.errors import NetmirrorError, ProtocolError
from netmirror.tunnel import Tunnel
from netmirror.wire.files import MAX_READ, errno_value
from netmirror.wire.kinds import StreamKind, stream_info
from netmirror.wire.stats import PortStats


class RemoteError(Exception):
    """A file operation failed in the target (or could not reach it): ``code`` is an errno."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.code = code


class _Collector:
    """Gathers the bytes of one ``file-read``/``file-write`` stream until it ends."""

    def __init__(self, stream_id: int, stats: PortStats) -> None:
        self.stream_id = stream_id
        self.stats = stats
        self.chunks: list[bytes] = []
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.credit = asyncio.Event()

    def on_data(self, data: bytes | memoryview) -> None:
        self.chunks.append(bytes(data))
        self.stats.bytes_in += len(data)

    def on_credit(self) -> None:
        self.credit.set()

    def on_half_closed(self) -> None:
        if not self.done.done():
            self.done.set_result(b"".join(self.chunks))

    def on_reset(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_exception(RemoteError(errno_value(reason), reason))

    def pause_for_output(self) -> None:
        pass

    def resume_after_output(self) -> None:
        pass


class RemoteFiles:
    """File operations on the target, through whatever tunnel is live."""

    def __init__(
        self,
        *,
        tunnel_of: Callable[[], Tunnel | None],
        ask: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]],
        timeout: float,
    ) -> None:
        self._tunnel_of = tunnel_of
        self._ask = ask
        self.timeout = timeout
        self.stats = PortStats()
        self._closing = asyncio.Event()

    def close(self) -> None:
        """Every call waiting now, and every later one, fails with EIO at once."""
        self._closing.set()

    async def _race(self, what: Awaitable[Any], deadline: float, *extra: Awaitable[Any]) -> Any:
        """``what``'s result, unless the deadline passes, the files close, or one of
        ``extra`` ends first (then :class:`RemoteError` EIO)."""
        task = asyncio.ensure_future(what)
        stops = [asyncio.ensure_future(self._closing.wait()), *map(asyncio.ensure_future, extra)]
        try:
            done, _ = await asyncio.wait(
                [task, *stops],
                timeout=max(deadline - time.monotonic(), 0.01),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for stop in stops:
                stop.cancel()
        if task not in done:
            task.cancel()
            why = "the files are closing" if self._closing.is_set() else "the target is unreachable"
            raise RemoteError(errno.EIO, why)
        return task.result()

    async def _tunnel(self, deadline: float) -> Tunnel:
        while True:
            if self._closing.is_set():
                raise RemoteError(errno.EIO, "the files are closing")
            tunnel = self._tunnel_of()
            if tunnel is not None:
                return tunnel
            if time.monotonic() >= deadline:
                raise RemoteError(errno.EIO, "no tunnel to the target")
            await self._race(asyncio.sleep(0.05), deadline)

    async def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One metadata request; the target's errno is raised as :class:`RemoteError`."""
        deadline = time.monotonic() + self.timeout
        while True:
            tunnel = await self._tunnel(deadline)
            try:
                result: dict[str, Any] = await self._race(self._ask(op, args), deadline)
            except NetmirrorError as exc:
                if self._tunnel_of() is tunnel:
                    # The agent answered with an error, on a tunnel that is still up.
                    raise RemoteError(errno.EIO, str(exc)) from None
                # The tunnel went away under the request: wait for the next one.
                continue
            if "errno" in result:
                raise RemoteError(errno_value(result["errno"]))
            return result

    async def read(self, path: str, offset: int, length: int) -> bytes:
        """Bytes ``offset..offset+length`` of a file (fewer at its end)."""
        length = min(length, MAX_READ)
        info = stream_info(StreamKind.FILE_READ, path=path, offset=offset, length=length)
        return await self._stream(info, b"", grant=length)

    async def write(self, path: str, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset``; how many bytes the target wrote."""
        info = stream_info(StreamKind.FILE_WRITE, path=path, offset=offset)
        answer = await self._stream(info, data, grant=0)
        try:
            return int(json.loads(answer)["written"])
        except (ValueError, KeyError, TypeError):
            raise RemoteError(errno.EIO, "the agent answered a write strangely") from None

    async def _stream(self, info: dict[str, Any], data: bytes, *, grant: int) -> bytes:
        deadline = time.monotonic() + self.timeout
        tunnel = await self._tunnel(deadline)
        conn = tunnel.conn
        try:
            stream_id = conn.open_stream(port=0, original_dst=("", 0), client=("", 0), info=info)
        except ProtocolError as exc:
            raise RemoteError(errno.EIO, str(exc)) from None
        collector = _Collector(stream_id, self.stats)
        tunnel.attach(collector)
        try:
            if grant > conn.limits.initial_window:
                conn.grant(stream_id, grant - conn.limits.initial_window)
            view = memoryview(data)
            while view:
                sent = conn.send_data(stream_id, view)
                self.stats.bytes_out += sent
                view = view[sent:]
                tunnel.kick()
                if view:
                    collector.credit.clear()
                    await self._race(collector.credit.wait(), deadline, tunnel.closed())
            if data:
                conn.shutdown(stream_id)
            tunnel.kick()
            data_back: bytes = await self._race(collector.done, deadline, tunnel.closed())
            return data_back
        finally:
            tunnel.forget(collector)
            if conn.is_open(stream_id):
                conn.reset(stream_id, "abandoned")
                tunnel.kick()
