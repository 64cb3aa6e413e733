"""The agent's two kinds of stream bridge: connections in, and connections out.

:class:`InboundBridge` takes a connection the REDIRECT rule (or the HTTP router)
sent to the agent and opens a stream to the daemon for it; with no daemon it
hands the connection to the target's own server instead. :class:`OutboundBridge`
makes, from the target's namespace, a connection the daemon asked for (an
outgoing connection of ``netmirror exec``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import cast

from netmirror.agent.link import Link
from netmirror.agent.mirror.passthrough import PassthroughBridge
from netmirror.agent.subscription import Subscription
from netmirror.errors import NetmirrorError
from netmirror.net.sockets import connect_marked, original_destination
from netmirror.netfilter import AGENT_MARK
from netmirror.tunnel import OpeningBridge, StreamBridge, Tunnel
from netmirror.wire.kinds import StreamKind, stream_info
from netmirror.wire.stats import PortStats

log = logging.getLogger(__name__)

#: How the target resolves a host name: its addresses, IPv4 first.
Resolve = Callable[[str], Awaitable[list[str]]]


class InboundBridge(OpeningBridge):
    """A connection the REDIRECT rule sent to us: becomes a stream to the daemon.

    ``dst`` is given for connections the HTTP router hands over (on a unix socket,
    where there is no original destination to read).
    """

    def __init__(self, link: Link, sub: Subscription, dst: tuple[str, int] | None = None) -> None:
        self.link = link
        self.sub = sub
        self.dst = dst
        tunnel = link.tunnel
        if tunnel is None:
            self._refused = True
            self.stats = sub.stats
            return
        super().__init__(tunnel, sub.stats, inbound=False)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        tunnel = self.link.tunnel
        gone = self._refused or tunnel is None or tunnel is not self.tunnel or self.sub.draining
        if gone and self.dst:
            # A request from the HTTP router while no daemon is here: refuse it
            # before reading; the router gives it to the original server.
            self._refused = True
            transport.abort()
            return
        if gone or tunnel is None:
            # No daemon (it crashed, the tunnel is reconnecting, or the session is
            # draining): rather than reset the client, let the target's own server
            # answer it.
            self._refused = True
            relay = PassthroughBridge(self.link, self.sub, self.sub.counters, copy=False)
            transport.set_protocol(relay)
            relay.connection_made(transport)
            return
        dst = self.dst or original_destination(transport.get_extra_info("socket"))
        if dst is None:
            # Not redirected: someone connected to our listening port directly.
            self.refuse(transport)
            return
        self.open_stream(
            tunnel, transport, port=self.sub.port, dst=dst, info=stream_info(StreamKind.STOLEN)
        )


class OutboundBridge(StreamBridge):
    """A connection the daemon asked for: made from the target's namespace, as the target."""

    def __init__(
        self, tunnel: Tunnel, stats: PortStats, stream_id: int, *, mark: int = AGENT_MARK
    ) -> None:
        super().__init__(tunnel, stats, inbound=True, stream_id=stream_id)
        self._mark = mark

    async def connect(self, dst: tuple[str, int], resolver: Resolve) -> None:
        loop = asyncio.get_running_loop()
        host, port = dst
        sock: socket.socket | None = None
        try:
            addresses = [host] if _is_ip(host) else await resolver(host)
            if not addresses:
                raise OSError(f"{host} has no address")
            last: OSError | None = None
            for address in addresses:
                try:
                    # Marked: a connection to one of our own stolen ports reaches the
                    # target's server, not the daemon again.
                    sock = await connect_marked((address, port), mark=self._mark)
                    break
                except OSError as exc:
                    last = exc
            if sock is None:
                assert last is not None
                raise last
            await loop.create_connection(lambda: self, sock=sock)
        except (OSError, NetmirrorError) as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, ConnectionRefusedError):
                reason = f"{host}:{port} refused the connection"
            else:
                reason = f"cannot connect to {host}:{port}: {getattr(exc, 'strerror', '') or exc}"
            log.info("outgoing connection: %s", reason)
            self.stats.error(reason)
            if self.tunnel.conn.is_open(self.stream_id):
                self.tunnel.conn.reset(self.stream_id, reason)
            self.tunnel.forget(self)
            self.tunnel.kick()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
