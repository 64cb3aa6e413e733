"""Clients that check every byte: counterparts of ``servers.py``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Exchange:
    """What one ``sha`` exchange proved."""

    tag: str
    upload_intact: bool
    download_intact: bool
    downloaded: int
    sent_sha256: str = ""
    """Digest of every byte the client sent (header included): what a mirror copies."""
    sent_bytes: int = 0


async def sha_exchange(
    host: str, port: int, *, up: int, down: int, timeout: float = 60
) -> Exchange:
    """Send ``up`` random bytes, half-close, receive ``down`` bytes; verify both digests."""

    async def run() -> Exchange:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        try:
            tag = (await reader.readexactly(8)).rstrip(b"\0").decode()
            head = struct.pack("!Q", down)
            writer.write(head)
            wire = hashlib.sha256(head)
            sent = hashlib.sha256()
            remaining = up
            while remaining:
                block = os.urandom(min(remaining, 256 * 1024))
                sent.update(block)
                wire.update(block)
                writer.write(block)
                remaining -= len(block)
                await writer.drain()
            writer.write_eof()  # half-close: the server replies after our EOF
            their_digest = await reader.readexactly(32)
            got = hashlib.sha256()
            remaining = down
            while remaining:
                block = await reader.read(min(remaining, 256 * 1024))
                if not block:
                    raise ConnectionError("stream ended early")
                got.update(block)
                remaining -= len(block)
            trailer = await reader.readexactly(32)
            rest = await reader.read()
            return Exchange(
                tag=tag,
                upload_intact=their_digest == sent.digest(),
                download_intact=trailer == got.digest() and rest == b"",
                downloaded=down,
                sent_sha256=wire.hexdigest(),
                sent_bytes=len(head) + up,
            )
        finally:
            writer.close()

    return await asyncio.wait_for(run(), timeout)
