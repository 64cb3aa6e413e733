"""What the tunnel writes to its websocket: message sizes, and order when it closes."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aiohttp

from netmirror.tunnel import WS_MAX_MESSAGE, WS_MESSAGE_SIZE, Tunnel
from netmirror.wire import Connection, Limits
from tests.unit.wire._support import DST, SRC, connected, pump, stream_bytes


class RecordingSocket:
    """Stands in for an aiohttp websocket: records what is sent, yields on each send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False
        self._closing = asyncio.Event()

    async def send_bytes(self, data: bytes) -> None:
        await asyncio.sleep(0)  # like a real send may, let other tasks run
        self.sent.append(bytes(data))

    async def receive(self) -> aiohttp.WSMessage:
        await self._closing.wait()
        return aiohttp.WSMessage(aiohttp.WSMsgType.CLOSED, None, None)

    async def close(self) -> None:
        self.closed = True
        self._closing.set()


def tunnel_pair(limits: Limits) -> tuple[Tunnel, RecordingSocket, Connection, int]:
    """(the agent's tunnel, its socket, the daemon's connection, a stream id)."""
    daemon, agent = connected(daemon_limits=limits, agent_limits=limits)
    sid = agent.open_stream(port=80, original_dst=DST, client=SRC)
    pump(agent, daemon)
    ws = RecordingSocket()
    tunnel = Tunnel(cast(Any, ws), agent, handler=lambda event: None, name="test")
    return tunnel, ws, daemon, sid


async def test_a_frame_above_the_message_limit_goes_in_pieces() -> None:
    size = 16 * 1024 * 1024
    tunnel, ws, daemon, sid = tunnel_pair(Limits(max_frame_size=size, initial_window=size))
    payload = bytes(range(256)) * (size // 256)
    assert tunnel.conn.send_data(sid, payload) == size
    await tunnel.close()
    assert len(ws.sent) == 2  # the frame and its header exceed 16 MiB by 9 bytes
    assert all(len(m) <= WS_MAX_MESSAGE for m in ws.sent)
    assert stream_bytes(daemon, ws.sent) == payload
    assert ws.closed


async def test_close_sends_what_the_writer_had_left_in_order() -> None:
    tunnel, ws, daemon, sid = tunnel_pair(Limits(initial_window=1 << 22))
    run = asyncio.create_task(tunnel.run())
    await asyncio.sleep(0)
    chunks = [bytes([n]) * (WS_MESSAGE_SIZE // 2) for n in range(12)]
    for chunk in chunks:  # several messages: the writer is mid-way when close() comes
        tunnel.conn.send_data(sid, chunk)
    tunnel.kick()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    tunnel.conn.send_data(sid, b"last")
    await tunnel.close()
    await asyncio.wait_for(run, 5)
    assert len(ws.sent) > 2
    assert stream_bytes(daemon, ws.sent) == b"".join(chunks) + b"last"
