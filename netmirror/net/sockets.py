"""Small socket operations shared by the agent, the daemon and the HTTP router.

Nothing here knows about the tunnel or HTTP: these are the few system calls
whose details (option numbers, address layouts, the clean-up on failure) should
be written once.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, same value for IP6T_SO_ORIGINAL_DST

#: Socket buffers of the tunnel's own connection: room for several messages in
#: flight, so neither end waits on the other for each one.
TUNNEL_SOCKET_BUFFER = 4 * 1024 * 1024

#: Listen backlog of the sockets that take redirected connections.
BACKLOG = 4096


@functools.cache
def has_ipv6() -> bool:
    """Whether this network namespace has IPv6 loopback (a socket can bind ``::1``).

    Cached: a process asks for the namespace it runs in, which does not change
    once it is there (the agent enters its target before it asks).
    """
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def original_destination(sock: Any) -> tuple[str, int] | None:
    """Where a redirected connection was going, from conntrack (None if not redirected).

    conntrack also answers for a connection no rule touched: with the socket's own
    address. That is someone connecting to our listener directly, and counts as not
    redirected (answering it by connecting to the "original" would connect to
    ourselves).
    """
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            host = socket.inet_ntop(socket.AF_INET, raw[4:8])
        port: int = struct.unpack_from("!H", raw, 2)[0]
        local = sock.getsockname()
    except OSError:
        return None
    if port == local[1] and host == local[0]:
        return None
    return host, port


def abort_with_reset(transport: asyncio.BaseTransport | None) -> None:
    """Close a TCP transport so the peer sees RST, not FIN."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()  # type: ignore[attr-defined]


def tune_tunnel_socket(sock: Any) -> None:
    """Large buffers (and no Nagle delay) on the connection that carries the tunnel."""
    if sock is None:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, TUNNEL_SOCKET_BUFFER)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


async def listen_any_port(
    factory: Callable[[], asyncio.BaseProtocol],
) -> list[tuple[int, asyncio.AbstractServer, int]]:
    """Listen on a free port of every address family this namespace has.

    One socket for ``0.0.0.0`` and, where IPv6 works, one ``IPV6_V6ONLY`` socket
    for ``::`` (REDIRECT keeps the family, so each family needs its own port).
    Returns ``(family, server, port)`` with family 4 or 6. On failure nothing is
    left listening.
    """
    loop = asyncio.get_running_loop()
    families = [(4, socket.AF_INET, "0.0.0.0")]
    if has_ipv6():
        families.append((6, socket.AF_INET6, "::"))
    opened: list[tuple[int, asyncio.AbstractServer, int]] = []
    for family, af, host in families:
        sock = socket.socket(af, socket.SOCK_STREAM)
        try:
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, 0))
            sock.listen(BACKLOG)
            sock.setblocking(False)
            server = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
        except OSError:
            sock.close()
            for _, other, _ in opened:
                other.close()
            raise
        opened.append((family, server, sock.getsockname()[1]))
    return opened


async def connect_marked(address: tuple[str, int], *, mark: int) -> socket.socket:
    """A connected non-blocking TCP socket to ``address``, carrying ``mark`` (SO_MARK).

    The mark lets the connection pass the session's own REDIRECT rules, so a
    connection to a stolen port reaches the target's server, not netmirror again
    (0: no mark). Raises OSError (the socket is closed) if the connection fails.
    """
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setblocking(False)
        await connect_socket(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_socket(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect the non-blocking ``sock`` to the numeric ``address``; raises OSError.

    To an address of this host or namespace (the pod's server, the developer's
    local process) the kernel completes the handshake inside ``connect()``, so
    the socket is usually connected when it returns: then there is nothing to
    wait for. Only a handshake still in flight waits for the loop (the future
    and the writer registration cost as much as the rest of a short connection).
    """
    err = sock.connect_ex(address)
    if err == 0:
        return
    if err != errno.EINPROGRESS:
        raise OSError(err, os.strerror(err))
    try:
        sock.getpeername()  # ENOTCONN while the handshake is in flight or failed
        return
    except OSError:
        pending = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if pending:
            raise OSError(pending, os.strerror(pending)) from None
    # The loop retries connect() (EALREADY), waits until writable, and raises the
    # socket's error if the handshake failed.
    await asyncio.get_running_loop().sock_connect(sock, address)


@functools.lru_cache(maxsize=256)
def numeric_family(host: str) -> socket.AddressFamily | None:
    """AF_INET or AF_INET6 for a numeric address; None for a name or a scoped address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return None if ip.scope_id else socket.AF_INET6
    return socket.AF_INET


async def open_local(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
) -> None:
    """``loop.create_connection(factory, host, port)``, quicker for a numeric host.

    Raises OSError like ``create_connection``. A host name still goes through the
    loop's resolver.
    """
    family = numeric_family(host)
    if family is None:
        await loop.create_connection(factory, host, port)
        return
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await connect_socket(sock, (host, port))
        await loop.create_connection(factory, sock=sock)
    except BaseException:
        sock.close()
        raise


# --- transparent UDP (TPROXY) ---------------------------------------------------------

_IP_TRANSPARENT = 19
_IP_RECVORIGDSTADDR = 20
_IPV6_RECVORIGDSTADDR = 74
_IPV6_TRANSPARENT = 75
#: Room for the ancillary data of one received datagram (its original destination).
ORIGDST_ANCILLARY = socket.CMSG_SPACE(28)


def transparent_udp(host: str, port: int, *, receive_destination: bool) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port``, even an address not of this host.

    ``receive_destination``: each datagram comes with where it was going (for a
    socket TPROXY hands datagrams to; read it with :func:`original_destination_of`).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_TRANSPARENT, 1)
            if receive_destination:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
            if receive_destination:
                sock.setsockopt(socket.SOL_IP, _IP_RECVORIGDSTADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def original_destination_of(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The destination a TPROXYed datagram had, from ``recvmsg``'s ancillary data. Pure."""
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == _IP_RECVORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntop(socket.AF_INET, data[4:8]), struct.unpack_from("!H", data, 2)[0]
        if level == socket.IPPROTO_IPV6 and kind == _IPV6_RECVORIGDSTADDR and len(data) >= 24:
            return (
                socket.inet_ntop(socket.AF_INET6, data[8:24]),
                struct.unpack_from("!H", data, 2)[0],
            )
    return None
