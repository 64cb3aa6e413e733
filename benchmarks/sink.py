"""A local process for mirror benchmarks: reads every connection, logs its size."""

from __future__ import annotations

import argparse
import asyncio


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = 0
        ended = "eof"
        try:
            while chunk := await reader.read(1 << 20):
                size += len(chunk)
        except ConnectionError:
            ended = "reset"
        writer.close()
        with open(args.log, "a") as log:  # noqa: ASYNC230 - one line per connection
            log.write(f"{size} {ended}\n")

    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
