"""Proxy variables for ``netmirror exec`` where transparent redirection is impossible.

Programs that honour ``ALL_PROXY`` / ``HTTP(S)_PROXY`` connect to a listener of
the daemon and say where they want to go, in a SOCKS5 greeting, an HTTP CONNECT
or an absolute-form HTTP request. :func:`parse_greeting` reads it (pure); the
daemon's ``ProxyBridge`` (:mod:`netmirror.daemon.exec.outgoing`) opens the stream
to that destination through the target.
"""

from __future__ import annotations

import socket

#: Largest proxy greeting (SOCKS request or HTTP request head) buffered.
MAX_GREETING = 16 * 1024


def parse_greeting(buf: bytes) -> tuple[tuple[str, int], bytes, bytes] | str | None:
    """Where a proxy client wants to go. Pure.

    Returns ``((host, port), reply, rest)``: the destination, what to answer the
    client at once, and the bytes that already belong to the connection; ``None``
    while more bytes are needed; a string for an error (the connection is closed).
    SOCKS5 (``CONNECT`` with no authentication; host names are resolved by the
    target: ``socks5h``) and HTTP proxy requests (``CONNECT host:port``, and
    ``GET http://host/...``, which is forwarded as it is: servers accept the
    absolute form; it is sent with ``Connection: close``, so the client's next
    request comes on a new connection) are understood.
    """
    if not buf:
        return None
    if buf[0] == 5:
        return _socks5(buf)
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return "proxy request head too large" if len(buf) > MAX_GREETING else None
    line = buf[: buf.find(b"\r\n")].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "not a SOCKS5 or HTTP proxy request"
    method, target, _ = parts
    if method == "CONNECT":
        host, port = _host_port(target, 443)
        if host is None:
            return f"bad CONNECT target {target[:100]!r}"
        reply = b"HTTP/1.1 200 Connection established\r\n\r\n"
        return (host, port), reply, buf[head_end + 4 :]
    if target.startswith("http://"):
        authority = target[len("http://") :].split("/", 1)[0]
        host, port = _host_port(authority, 80)
        if host is None:
            return f"bad proxy URL {target[:100]!r}"
        # The connection is piped to this host from here on; a client that would send
        # its next request (maybe for another host) on it is told to open a new one.
        return (host, port), b"", _one_request(buf[: head_end + 4]) + buf[head_end + 4 :]
    return f"{method} {target[:100]!r} is not a proxy request"


def _one_request(head: bytes) -> bytes:
    """``head`` with ``Connection: close`` instead of any connection header."""
    lines = head[:-4].split(b"\r\n")
    kept = [
        line
        for line in lines[1:]
        if line.split(b":", 1)[0].strip().lower() not in (b"connection", b"proxy-connection")
    ]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


def _host_port(authority: str, default: int) -> tuple[str | None, int]:
    authority = authority.rsplit("@", 1)[-1]
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    else:
        host, port_text = authority, ""
    if not host:
        return None, 0
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None, 0
    return host, int(port_text)


def _socks5(buf: bytes) -> tuple[tuple[str, int], bytes, bytes] | str | None:
    if len(buf) < 2:
        return None
    methods_end = 2 + buf[1]
    if len(buf) < methods_end:
        return None
    if 0 not in buf[2:methods_end]:
        return "SOCKS5 client offers no method without authentication"
    req = buf[methods_end:]
    if len(req) < 5:
        return None
    if req[0] != 5 or req[1] != 1:
        return "only SOCKS5 CONNECT is supported"
    atyp = req[3]
    if atyp == 1:
        end = 4 + 4
        host = socket.inet_ntop(socket.AF_INET, req[4:end]) if len(req) >= end else ""
    elif atyp == 4:
        end = 4 + 16
        host = socket.inet_ntop(socket.AF_INET6, req[4:end]) if len(req) >= end else ""
    elif atyp == 3:
        end = 5 + req[4]
        host = req[5:end].decode("ascii", "replace") if len(req) >= end else ""
    else:
        return f"unknown SOCKS5 address type {atyp}"
    if len(req) < end + 2:
        return None
    port = int.from_bytes(req[end : end + 2], "big")
    # Method choice and success at once: the client waits for both before sending.
    reply = b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6)
    return (host, port), reply, req[end + 2 :]
