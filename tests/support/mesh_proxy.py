"""A stand-in for a mesh's sidecar proxy (Envoy in Istio), for the mesh tests.

Run in the pod's network namespace as root: it loads its certificate, binds the
mesh's inbound port, then becomes the proxy's uid (the mesh's rules exempt it).
Each connection the mesh redirected to it is TLS, as from a peer sidecar: it
terminates it, reads the original destination, and connects to the application's
port from ``--source`` (Istio's 127.0.0.6), relaying plaintext both ways.

    python -m tests.support.mesh_proxy --port 15006 --uid 1337 --cert C --key K
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import struct


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()  # TLS has no half-close: the end of the answer ends it
    except (ConnectionError, OSError):
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--source", default="127.0.0.6")
    parser.add_argument("--outbound", type=int, help="the mesh's outbound port (plaintext)")
    parser.add_argument("--log", help="where the outbound listener notes each destination")
    args = parser.parse_args()
    log = open(args.log, "a", buffering=1) if args.log else None  # noqa: ASYNC230 - before serving
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = original_destination(writer.get_extra_info("socket"))
        up_reader, up_writer = await asyncio.open_connection(
            host, port, local_addr=(args.source, 0)
        )
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        writer.close()
        up_writer.close()

    async def outbound(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # What the pod sends out, redirected here by the mesh: on to where it was going.
        host, port = original_destination(writer.get_extra_info("socket"))
        if log is not None:
            log.write(f"{host}:{port}\n")
        up_reader, up_writer = await asyncio.open_connection(host, port)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        writer.close()
        up_writer.close()

    server = await asyncio.start_server(serve, "0.0.0.0", args.port, ssl=tls)
    if args.outbound:
        await asyncio.start_server(outbound, "0.0.0.0", args.outbound)
    os.setgroups([])
    os.setgid(args.uid)
    os.setuid(args.uid)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
