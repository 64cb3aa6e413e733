"""Real servers for the integration tests and the demo, run as separate processes.

``sha``: for each connection, send an 8-byte tag, read until the client half-closes,
then send sha256(received) followed by N random bytes (N from the first 8 bytes the
client sent) and sha256 of those bytes, then close. The client checks both ways.

``http``: a minimal HTTP/1.1 server (keep-alive) answering every request with TEXT.

``echo``: echoes bytes back until the client half-closes.

Each prints ``ready`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import struct
import sys


async def sha_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tag: bytes
) -> None:
    try:
        writer.write(tag.ljust(8, b"\0")[:8])
        head = await reader.readexactly(8)
        (down_size,) = struct.unpack("!Q", head)
        digest = hashlib.sha256()
        while chunk := await reader.read(256 * 1024):
            digest.update(chunk)
        writer.write(digest.digest())
        sent = hashlib.sha256()
        remaining = down_size
        while remaining:
            block = os.urandom(min(remaining, 256 * 1024))
            sent.update(block)
            writer.write(block)
            remaining -= len(block)
            await writer.drain()
        writer.write(sent.digest())
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(256 * 1024):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def http_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: bytes
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                % (len(text), text)
            )
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def sink_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log_path: str
) -> None:
    """Read a whole connection; log its sha256 and size (a mirror's local process)."""
    digest = hashlib.sha256()
    size = 0
    ended = "eof"
    try:
        while chunk := await reader.read(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
    except ConnectionError:
        ended = "reset"
    finally:
        writer.close()
    # One short append per connection; a test helper, not worth a thread.
    with open(log_path, "a") as log:  # noqa: ASYNC230
        log.write(f"{digest.hexdigest()} {size} {ended}\n")


def dns_answer(records: dict[str, str], data: bytes, *, max_size: int | None) -> bytes:
    """The zone's answer to one query; A records of ``name=ip|ip...``, else NXDOMAIN.

    Over UDP (``max_size`` None) an answer larger than the query allows (512 bytes,
    or its EDNS payload) is truncated (TC), so the client asks again over TCP.
    """
    import dns.exception
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    query = dns.message.from_wire(data)
    response = dns.message.make_response(query)
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    if name not in records:
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif question.rdtype == dns.rdatatype.A:
        addresses = records[name].split("|")
        response.answer.append(dns.rrset.from_text_list(question.name, 30, "IN", "A", addresses))
    if max_size is None:
        max_size = query.payload if query.edns >= 0 else 512
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        response.answer = []
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=max_size)


class DnsZone(asyncio.DatagramProtocol):
    """A tiny authoritative DNS server over UDP (see :func:`dns_answer`)."""

    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(dns_answer(self.records, data, max_size=None), addr)


async def dns_tcp_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, records: dict[str, str]
) -> None:
    """The same zone over TCP: length-prefixed, never truncated."""
    try:
        while True:
            size = int.from_bytes(await reader.readexactly(2), "big")
            answer = dns_answer(records, await reader.readexactly(size), max_size=65535)
            writer.write(len(answer).to_bytes(2, "big") + answer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class UdpServer(asyncio.DatagramProtocol):
    """``udp-echo``: sends each datagram back, prefixed with its source; ``udp-sink``:
    appends each one to the log file, one line each."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        source = addr[0].removeprefix("::ffff:")  # a dual-stack socket's IPv4 peer
        if self.log_path:
            with open(self.log_path, "ab") as log:
                log.write(f"{source} ".encode() + data.rstrip(b"\n") + b"\n")
            return
        assert self.transport is not None
        self.transport.sendto(f"from {source}:{addr[1]}: ".encode() + data, addr)


async def web_app(host: str, port: int, tag: str) -> None:
    """A real HTTP/1.1 server (aiohttp): keep-alive, chunked, 100-continue, WebSocket.

    Every answer names the server (``tag``), so a test sees who answered.
    """
    from aiohttp import WSMsgType, web

    async def any_request(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (tag, " chunked", "\n"):
                await response.write(part.encode())
            await response.write_eof()
            return response
        text = f"{tag} {request.method} {request.path_qs} {len(body)}\n"
        return web.Response(text=text)

    async def websocket(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(f"{tag}: {msg.data}")
        return ws

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", any_request)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "kind",
        choices=["sha", "http", "echo", "sink", "stall", "dns", "web", "udp-echo", "udp-sink"],
    )
    parser.add_argument("--log", default="")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="::")
    parser.add_argument("--tag", default="server")
    parser.add_argument("--text", default="hello\n")
    args = parser.parse_args()
    if args.kind == "sha":
        tag = args.tag.encode()
        handler = lambda r, w: sha_handler(r, w, tag)  # noqa: E731
    elif args.kind == "http":
        text = args.text.encode()
        handler = lambda r, w: http_handler(r, w, text)  # noqa: E731
    elif args.kind == "stall":
        held: list[asyncio.StreamWriter] = []

        async def stall(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            held.append(w)  # accept, never read: a local process that hangs

        handler = stall
    elif args.kind == "sink":
        log_path = args.log
        handler = lambda r, w: sink_handler(r, w, log_path)  # noqa: E731
    elif args.kind == "web":
        await web_app(args.host, args.port, args.tag)
        return
    elif args.kind == "dns":
        records = dict(item.split("=", 1) for item in args.text.split(","))
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(
            lambda: DnsZone(records), local_addr=(args.host, args.port)
        )
        tcp = await asyncio.start_server(
            lambda r, w: dns_tcp_handler(r, w, records), args.host, args.port
        )
        print("ready", flush=True)
        async with tcp:
            await asyncio.Event().wait()
        return
    elif args.kind in ("udp-echo", "udp-sink"):
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((args.host, args.port))
        log_path = args.log if args.kind == "udp-sink" else ""
        await loop.create_datagram_endpoint(lambda: UdpServer(log_path), sock=sock)
        print("ready", flush=True)
        await asyncio.Event().wait()
        return
    else:
        handler = echo_handler
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((args.host, args.port))
    server = await asyncio.start_server(handler, sock=sock, backlog=4096, limit=1 << 20)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
