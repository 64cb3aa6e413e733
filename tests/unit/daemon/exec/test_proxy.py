"""The greeting of proxy clients (netmirror exec's fallback), parsed without I/O."""

from __future__ import annotations

import socket

import pytest

from netmirror.daemon.exec.proxy import MAX_GREETING, parse_greeting

SOCKS_OK = b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6)


def socks(atyp: int, addr: bytes, port: int, methods: bytes = b"\x00") -> bytes:
    return (
        bytes([5, len(methods)]) + methods + bytes([5, 1, 0, atyp]) + addr + port.to_bytes(2, "big")
    )


def test_socks5_domain_name_is_left_to_the_target() -> None:
    name = b"orders.shop.svc"
    greeting = socks(3, bytes([len(name)]) + name, 5432) + b"first bytes"
    assert parse_greeting(greeting) == (("orders.shop.svc", 5432), SOCKS_OK, b"first bytes")


@pytest.mark.parametrize(
    ("atyp", "family", "address"),
    [(1, socket.AF_INET, "10.1.2.3"), (4, socket.AF_INET6, "fd00::7")],
)
def test_socks5_addresses(atyp: int, family: int, address: str) -> None:
    greeting = socks(atyp, socket.inet_pton(family, address), 80)
    assert parse_greeting(greeting) == ((address, 80), SOCKS_OK, b"")


def test_socks5_needs_every_byte_before_answering() -> None:
    greeting = socks(1, socket.inet_pton(socket.AF_INET, "10.1.2.3"), 80)
    for cut in range(len(greeting)):
        assert parse_greeting(greeting[:cut]) is None


@pytest.mark.parametrize(
    ("greeting", "error"),
    [
        (b"\x05\x01\x02" + b"\x05\x01\x00\x01" + bytes(6), "no method without authentication"),
        (b"\x05\x01\x00" + b"\x05\x02\x00\x01" + bytes(6), "only SOCKS5 CONNECT"),
        (b"\x05\x01\x00" + b"\x05\x01\x00\x09" + bytes(6), "unknown SOCKS5 address type 9"),
    ],
)
def test_socks5_refusals(greeting: bytes, error: str) -> None:
    result = parse_greeting(greeting)
    assert isinstance(result, str) and error in result


def test_http_connect() -> None:
    head = b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"
    assert parse_greeting(head + b"\x16\x03") == (
        ("db.internal", 5432),
        b"HTTP/1.1 200 Connection established\r\n\r\n",
        b"\x16\x03",
    )


def test_http_connect_ipv6_and_default_port() -> None:
    result = parse_greeting(b"CONNECT [fd00::1] HTTP/1.1\r\n\r\n")
    assert result is not None and not isinstance(result, str)
    assert result[0] == ("fd00::1", 443)


def test_absolute_form_request_is_forwarded_for_one_request() -> None:
    head = (
        b"GET http://orders:8000/list?x=1 HTTP/1.1\r\nHost: orders:8000\r\n"
        b"Proxy-Connection: keep-alive\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n"
    )
    assert parse_greeting(head) == (
        ("orders", 8000),
        b"",
        b"GET http://orders:8000/list?x=1 HTTP/1.1\r\nHost: orders:8000\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n",
    )
    head = b"POST http://user@api/ HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
    assert parse_greeting(head) == (
        ("api", 80),
        b"",
        b"POST http://user@api/ HTTP/1.1\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbody",
    )


@pytest.mark.parametrize(
    "head",
    [
        b"GET /local HTTP/1.1\r\n\r\n",
        b"garbage\r\n\r\n",
        b"CONNECT host:99999 HTTP/1.1\r\n\r\n",
        b"CONNECT :80 HTTP/1.1\r\n\r\n",
        b"GET http://h:x/ HTTP/1.1\r\n\r\n",
    ],
)
def test_http_refusals(head: bytes) -> None:
    assert isinstance(parse_greeting(head), str)


def test_endless_head_is_refused() -> None:
    assert parse_greeting(b"GET http://a/ HTTP/1.1\r\n") is None
    result = parse_greeting(b"GET http://a/ HTTP/1.1\r\nX: " + b"y" * MAX_GREETING)
    assert isinstance(result, str)
