"""A fake of the Kubernetes API server's pod port-forward endpoint, for tests.

``GET /api/v1/namespaces/{ns}/pods/{pod}/portforward?ports=P`` upgraded to a
``v4.channel.k8s.io`` websocket: the fake announces port P on channels 0 and 1, opens
a real TCP connection to ``resolve(ns, pod, P)`` and relays bytes between it and
channel 0. A refused connection is reported as text on channel 1, then the websocket
is closed, as the kubelet does. Mount it with :meth:`FakePortForward.add_routes` or
run it alone with :meth:`FakePortForward.running`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

SUBPROTOCOL = "v4.channel.k8s.io"
ROUTE = "/api/v1/namespaces/{ns}/pods/{pod}/portforward"

Resolver = Callable[[str, str, int], tuple[str, int] | None]


@dataclass(frozen=True)
class Request:
    """One port-forward request the fake answered."""

    namespace: str
    pod: str
    port: int
    status: int
    """101 when the websocket was accepted, else the HTTP error status."""


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.Response(status=code, text=json.dumps(body), content_type="application/json")


Connector = Callable[
    [tuple[str, int]], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
]


class FakePortForward:
    """Handler of the port-forward endpoint; ``resolve`` maps (ns, pod, port) to TCP.

    With ``require_token``, a request without ``Authorization: Bearer ...`` gets 401
    and one with another token gets 403.
    """

    def __init__(
        self,
        resolve: Resolver,
        *,
        require_token: str | None = None,
        connect: Connector | None = None,
    ) -> None:
        self.resolve = resolve
        self.require_token = require_token
        # How to reach the pod: a test may connect inside a network namespace.
        self.connect: Connector = connect or (lambda target: asyncio.open_connection(*target))
        self.requests: list[Request] = []
        self.bytes_to_pod = 0
        self.bytes_from_pod = 0
        self._sockets: set[web.WebSocketResponse] = set()

    @property
    def open_websockets(self) -> int:
        """Websockets being relayed now."""
        return len(self._sockets)

    def add_routes(self, app: web.Application) -> None:
        """Mount the endpoint on ``app``; its shutdown closes every open websocket."""
        app.router.add_get(ROUTE, self.handle)
        app.on_shutdown.append(self._on_shutdown)

    def make_app(self) -> web.Application:
        """An application serving only this endpoint."""
        app = web.Application()
        self.add_routes(app)
        return app

    @contextlib.asynccontextmanager
    async def running(self, host: str = "127.0.0.1") -> AsyncIterator[str]:
        """Serve on ``host`` at a free port; yields the base URL (``http://host:port``)."""
        runner = web.AppRunner(self.make_app(), shutdown_timeout=5)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, 0)
            await site.start()
            port = runner.addresses[0][1]
            yield f"http://{host}:{port}"
        finally:
            await runner.cleanup()

    async def close(self) -> None:
        """Close every open websocket (which ends its relay)."""
        await asyncio.gather(*(ws.close() for ws in list(self._sockets)), return_exceptions=True)

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.close()

    def _refuse(self, ns: str, pod: str, port: int, response: web.Response) -> web.Response:
        self.requests.append(Request(ns, pod, port, response.status))
        return response

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one port-forward request."""
        ns, pod = request.match_info["ns"], request.match_info["pod"]
        if self.require_token is not None:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return self._refuse(ns, pod, 0, _status(401, "Unauthorized", "Unauthorized"))
            if auth.removeprefix("Bearer ") != self.require_token:
                message = (
                    f'pods "{pod}" is forbidden: User "test" cannot create resource '
                    f'"pods/portforward" in API group "" in the namespace "{ns}"'
                )
                return self._refuse(ns, pod, 0, _status(403, "Forbidden", message))
        ports = request.query.getall("ports", [])
        if len(ports) != 1 or not ports[0].isdigit() or not 0 < int(ports[0]) < 65536:
            message = f"the fake forwards exactly one port in 1..65535, got {ports}"
            return self._refuse(ns, pod, 0, _status(400, "BadRequest", message))
        port = int(ports[0])
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,))
        if ws.can_prepare(request).protocol != SUBPROTOCOL:
            message = f"websocket upgrade with subprotocol {SUBPROTOCOL} required"
            return self._refuse(ns, pod, port, _status(400, "BadRequest", message))
        target = self.resolve(ns, pod, port)
        if target is None:
            message = f'pods "{pod}" not found'
            return self._refuse(ns, pod, port, _status(404, "NotFound", message))
        self.requests.append(Request(ns, pod, port, 101))
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await self._relay(ws, port, target)
        finally:
            self._sockets.discard(ws)
            await ws.close()
        return ws

    async def _relay(self, ws: web.WebSocketResponse, port: int, target: tuple[str, int]) -> None:
        announcement = struct.pack("<H", port)
        await ws.send_bytes(b"\x00" + announcement)
        await ws.send_bytes(b"\x01" + announcement)
        try:
            reader, writer = await self.connect(target)
        except OSError as err:
            text = (
                f"an error occurred forwarding {port} -> {port}: error forwarding port {port} "
                f"to pod: failed to connect to {target[0]}:{target[1]}: {err}"
            )
            await ws.send_bytes(b"\x01" + text.encode())
            return
        to_pod = asyncio.create_task(self._to_pod(ws, writer), name="fake-portforward-to-pod")
        from_pod = asyncio.create_task(self._from_pod(reader, ws), name="fake-portforward-from-pod")
        try:
            await asyncio.wait((to_pod, from_pod), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_pod, from_pod):
                task.cancel()
            await asyncio.gather(to_pod, from_pod, return_exceptions=True)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _to_pod(self, ws: web.WebSocketResponse, writer: asyncio.StreamWriter) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY or not msg.data or msg.data[0] != 0:
                await ws.close(code=aiohttp.WSCloseCode.PROTOCOL_ERROR)
                return
            data = msg.data[1:]
            self.bytes_to_pod += len(data)
            writer.write(data)
            await writer.drain()

    async def _from_pod(self, reader: asyncio.StreamReader, ws: web.WebSocketResponse) -> None:
        while data := await reader.read(32 * 1024):
            self.bytes_from_pod += len(data)
            await ws.send_bytes(b"\x00" + data)
