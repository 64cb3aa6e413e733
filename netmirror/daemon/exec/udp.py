"""The exec command's UDP, sent from the target: one association per socket of the command.

The session's routes put the command's UDP onto ``lo``, where TPROXY hands it to
the transparent socket of :class:`UdpRelay` with its original destination. The
first datagram from a socket of the command (its address and port) opens a
``udp`` stream; the agent sends it, and every later one, from one socket of its
own in the target, so the far end sees one peer per socket of the command, as it
would in the pod. Answers come back in the stream with their source, and are
sent to the command's socket from that source address (a transparent socket
bound to it), so a connected UDP socket of the command takes them.

An association idle for :data:`UDP_IDLE` seconds is closed, on both ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from netmirror.errors import ProtocolError
from netmirror.net.sockets import ORIGDST_ANCILLARY, original_destination_of, transparent_udp
from netmirror.tunnel import DatagramStream, Tunnel
from netmirror.wire.datagrams import MAX_PAYLOAD
from netmirror.wire.kinds import StreamKind, stream_info
from netmirror.wire.stats import PortStats

log = logging.getLogger(__name__)

#: Seconds without a datagram either way after which an association is closed.
UDP_IDLE = 60.0
#: How often idle associations and answer sockets are looked for.
SWEEP_INTERVAL = 5.0
#: Destinations one association may send to (and so take answers from) at a time.
MAX_PEERS = 256
#: Answer sockets the relay holds at once (each bound to one far end's address).
MAX_ANSWERERS = 1024

Client = tuple[str, int]


@dataclass
class _Association:
    stream: DatagramStream
    family: int
    last: float = field(default_factory=time.monotonic)
    #: Where the command's socket sent: only these may answer it (as a NAT lets
    #: answers in only from where a datagram went).
    peers: set[Client] = field(default_factory=set)


class UdpRelay:
    """Transparent UDP sockets on loopback, and the associations behind them."""

    def __init__(self, tunnel_of: Callable[[], Tunnel | None], *, idle: float = UDP_IDLE) -> None:
        self._tunnel_of = tunnel_of
        self._idle = idle
        self.stats = PortStats()
        self.datagrams_out = 0
        self.datagrams_in = 0
        self._sockets: list[socket.socket] = []
        self._associations: dict[Client, _Association] = {}
        self._answerers: dict[tuple[str, int], tuple[socket.socket, float]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, hosts: list[str]) -> int:
        """Bind the relay on ``hosts`` (the same free port on each); returns the port."""
        loop = asyncio.get_running_loop()
        port = 0
        for host in hosts:
            sock = transparent_udp(host, port, receive_destination=True)
            port = sock.getsockname()[1]
            self._sockets.append(sock)
            loop.add_reader(sock.fileno(), self._readable, sock)
        self.port = port
        self._sweeper = loop.create_task(self._sweep(), name="udp-idle-sweep")
        return port

    @property
    def associations(self) -> int:
        return len(self._associations)

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(64):  # then let the loop breathe
            try:
                payload, ancdata, _flags, client = sock.recvmsg(MAX_PAYLOAD, ORIGDST_ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("UDP relay: %s", exc)
                return
            dst = original_destination_of(ancdata)
            if dst is None or _is_local(dst, sock.getsockname()):
                continue  # sent to the relay itself (not by TPROXY): nobody's to carry
            self._from_command((str(client[0]), int(client[1])), sock.family, dst, payload)

    def _from_command(self, client: Client, family: int, dst: Client, payload: bytes) -> None:
        association = self._associations.get(client)
        if association is None or not association.stream.open:
            association = self._open(client, family, dst)
            if association is None:
                return
        association.last = time.monotonic()
        if dst not in association.peers:
            if len(association.peers) >= MAX_PEERS:
                self.stats.error(f"a socket of the command sends to over {MAX_PEERS} peers")
                return
            association.peers.add(dst)
        if association.stream.send(dst[0], dst[1], payload):
            self.datagrams_out += 1

    def _open(self, client: Client, family: int, dst: Client) -> _Association | None:
        tunnel = self._tunnel_of()
        if tunnel is None:
            self.stats.error("no tunnel to the agent: datagram dropped")
            return None
        try:
            stream_id = tunnel.conn.open_stream(
                port=0, original_dst=dst, client=client, info=stream_info(StreamKind.UDP)
            )
        except ProtocolError as exc:
            self.stats.error(f"cannot open a UDP stream: {exc}")
            return None
        stream = DatagramStream(
            tunnel,
            self.stats,
            stream_id,
            deliver=lambda host, port, data: self._answer(client, host, port, data),
            closed=lambda: self._forget(client, stream_id),
        )
        tunnel.attach(stream)
        tunnel.kick()
        association = _Association(stream, family)
        self._associations[client] = association
        log.debug("UDP association %s:%d (stream %d)", client[0], client[1], stream_id)
        return association

    def _forget(self, client: Client, stream_id: int) -> None:
        association = self._associations.get(client)
        if association is not None and association.stream.stream_id == stream_id:
            del self._associations[client]

    def _answer(self, client: Client, host: str, port: int, payload: bytes) -> None:
        """An answer from ``host:port`` in the target, for the command's socket ``client``."""
        association = self._associations.get(client)
        key = (host, port)
        if association is None or key not in association.peers:
            return  # from nowhere the command sent to: dropped, as a NAT would
        association.last = time.monotonic()
        if (":" in host) != (":" in client[0]):
            return  # an answer of the other family cannot reach that socket
        entry = self._answerers.get(key)
        if entry is None and len(self._answerers) >= MAX_ANSWERERS:
            self.stats.error("too many peers answer at once: answer dropped")
            return
        try:
            sock = (
                entry[0]
                if entry is not None
                else transparent_udp(host, port, receive_destination=False)
            )
        except OSError as exc:
            self.stats.error(f"cannot answer from {host}:{port}: {exc.strerror or exc}")
            return
        self._answerers[key] = (sock, time.monotonic())
        try:
            sock.sendto(payload, client)
            self.datagrams_in += 1
        except OSError as exc:  # a full buffer, the socket is gone: UDP drops it
            log.debug("UDP answer to %s dropped: %s", client, exc)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_INTERVAL, self._idle))
            try:
                self._close_idle(time.monotonic())
            except Exception:  # one bad association must not end the sweep
                log.exception("UDP idle sweep")

    def _close_idle(self, now: float) -> None:
        for association in list(self._associations.values()):
            if now - association.last > self._idle:
                association.stream.close("idle")
        for key, (sock, last) in list(self._answerers.items()):
            if now - last > self._idle:
                sock.close()
                del self._answerers[key]

    def stop(self) -> None:
        """Close every association, the sockets and the sweep."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for association in list(self._associations.values()):
            association.stream.close("the session ended")
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        for sock, _ in self._answerers.values():
            sock.close()
        self._answerers.clear()


def _is_local(dst: Client, own: Client) -> bool:
    """A destination that is the relay itself or loopback: never sent to the target."""
    if dst[1] == own[1] and dst[0] == own[0]:
        return True
    try:
        address = ipaddress.ip_address(dst[0])
    except ValueError:
        return True
    return address.is_loopback or address.is_unspecified or dst[1] == 0
