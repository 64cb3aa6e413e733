"""A small HTTP/2 cleartext (prior knowledge) server, run as a separate process.

``python tests/support/h2server.py --host H --port P --tag TAG`` prints ``ready`` on
stdout once it listens (``--port 0``: ``ready PORT`` with the port it got). Every
request, once its whole body is read, gets ``200`` with ``content-type: text/plain``
and the body ``f"{tag} {method} {path} {body_length}\\n"``; for the path ``/slow``,
after 0.5 s. Many concurrent streams; flow control both ways (request bodies are
acknowledged as they are read, responses wait for window).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error


class _Request:
    def __init__(self, method: str, path: str) -> None:
        self.method = method
        self.path = path
        self.length = 0


class H2ServerConnection:
    """One client connection."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.tag = tag
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.requests: dict[int, _Request] = {}
        self.window_open = asyncio.Event()  # set on any window update
        self.tasks: set[asyncio.Task[None]] = set()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def run(self) -> None:
        self.conn.initiate_connection()
        self.flush()
        try:
            while data := await self.reader.read(65536):
                try:
                    events = self.conn.receive_data(data)
                except H2Error:
                    self.flush()
                    return
                for event in events:
                    if self.handle(event):
                        self.flush()
                        await self.writer.drain()
                        return
                self.flush()
                await self.writer.drain()
        except ConnectionError:
            pass
        finally:
            for task in self.tasks:
                task.cancel()
            self.writer.close()

    def handle(self, event: object) -> bool:
        """Act on one event; True if the connection is over."""
        if isinstance(event, RequestReceived):
            headers = dict(event.headers)
            self.requests[event.stream_id] = _Request(
                headers.get(b":method", b"").decode(), headers.get(b":path", b"").decode()
            )
        elif isinstance(event, DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            request = self.requests.get(event.stream_id)
            if request is not None:
                request.length += len(event.data)
        elif isinstance(event, StreamEnded):
            request = self.requests.pop(event.stream_id, None)
            if request is not None:
                task = asyncio.create_task(self.respond(event.stream_id, request))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        elif isinstance(event, StreamReset):
            self.requests.pop(event.stream_id, None)
        elif isinstance(event, WindowUpdated | RemoteSettingsChanged):
            self.window_open.set()
        elif isinstance(event, ConnectionTerminated):
            return True
        return False

    async def respond(self, stream_id: int, request: _Request) -> None:
        if request.path == "/slow":
            await asyncio.sleep(0.5)
        body = f"{self.tag} {request.method} {request.path} {request.length}\n".encode()
        try:
            self.conn.send_headers(
                stream_id,
                [
                    (":status", "200"),
                    ("content-type", "text/plain"),
                    ("content-length", str(len(body))),
                ],
            )
            while body:
                size = min(
                    len(body),
                    self.conn.local_flow_control_window(stream_id),
                    self.conn.max_outbound_frame_size,
                )
                if size <= 0:
                    self.flush()
                    self.window_open.clear()
                    await self.window_open.wait()
                    continue
                self.conn.send_data(stream_id, body[:size], end_stream=size == len(body))
                body = body[size:]
            self.flush()
        except H2Error:  # the stream was reset meanwhile
            self.flush()


async def serve(host: str, port: int, tag: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await H2ServerConnection(reader, writer, tag).run()

    server = await asyncio.start_server(handler, host, port)
    bound = server.sockets[0].getsockname()[1]
    print("ready" if port else f"ready {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tag", default="h2")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port, args.tag))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
