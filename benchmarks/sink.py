"""A local process for mirror benchmarks: reads every connection, logs its size.

A plain asyncio Protocol on uvloop, so the sink itself costs little next to the
traffic being mirrored (the benchmarks share two cores between everything).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import IO

import uvloop


class Counter(asyncio.Protocol):
    """Counts one connection's bytes; logs ``SIZE eof|reset`` when it ends."""

    def __init__(self, log: IO[str]) -> None:
        self.log = log
        self.size = 0
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.size += len(data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.log.write(f"{self.size} {'reset' if exc is not None else 'eof'}\n")


async def serve(port: int, log: IO[str]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Counter(log), "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    # Opened once and line-buffered: one write per copy.
    with open(args.log, "a", buffering=1) as log:
        uvloop.run(serve(args.port, log))


if __name__ == "__main__":
    main()
