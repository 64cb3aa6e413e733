"""The agent's end of a UDP association: the exec command's datagrams, sent as the target.

Each ``udp`` stream gets sockets of its own in the target's namespace (one per
address family, made when first needed), so every socket of the command has one
source port here, as it would in the pod. What the far end answers goes back
in the stream with its source. The daemon closes the stream when the
association is idle; the sockets go with it.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from netmirror.netfilter import AGENT_MARK
from netmirror.tunnel import DatagramStream, Tunnel
from netmirror.wire.datagrams import MAX_PAYLOAD
from netmirror.wire.stats import PortStats

log = logging.getLogger(__name__)


class UdpAssociation:
    """A ``udp`` stream and the target-side sockets it sends from."""

    def __init__(
        self, tunnel: Tunnel, stats: PortStats, stream_id: int, *, mark: int = AGENT_MARK
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._mark = mark
        self._sockets: dict[int, socket.socket] = {}
        self.stream = DatagramStream(
            tunnel, stats, stream_id, deliver=self._send, closed=self._close_sockets
        )
        tunnel.attach(self.stream)

    def _socket(self, family: int) -> socket.socket:
        sock = self._sockets.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                if self._mark:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self._mark)
                self._loop.add_reader(sock.fileno(), self._readable, sock)
            except BaseException:
                sock.close()
                raise
            self._sockets[family] = sock
        return sock

    def _send(self, host: str, port: int, payload: bytes) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._socket(family).sendto(payload, (host, port))
        except OSError as exc:
            # No route from the target, a full buffer: UDP drops it, and so do we.
            self.stream.stats.error(f"UDP to {host}:{port}: {exc.strerror or exc}")

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                payload, source = sock.recvfrom(MAX_PAYLOAD)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ECONNREFUSED from an ICMP port unreachable
                log.debug("UDP association %d: %s", self.stream.stream_id, exc)
                continue
            host = str(source[0]).split("%", 1)[0]  # a link-local source's scope: not carried
            try:
                self.stream.send(host, int(source[1]), payload)
            except ValueError as exc:
                log.debug("UDP association %d: answer dropped: %s", self.stream.stream_id, exc)

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
