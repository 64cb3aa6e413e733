"""The sans-I/O port-forward codec: decoding, encoding and every protocol error."""

from __future__ import annotations

import struct

import pytest

from netmirror.errors import ProtocolError
from netmirror.kube.channels import (
    DataReceived,
    PortAnnounced,
    PortForwardChannels,
    RemoteError,
)


def port_frame(channel: int, port: int) -> bytes:
    return bytes([channel]) + struct.pack("<H", port)


def announced(port: int = 8080) -> PortForwardChannels:
    codec = PortForwardChannels(port)
    codec.feed(port_frame(0, port))
    codec.feed(port_frame(1, port))
    return codec


def test_announcements_then_data_and_error() -> None:
    codec = PortForwardChannels(8080)
    assert not codec.data_announced and not codec.error_announced
    assert codec.feed(port_frame(0, 8080)) == [PortAnnounced(0, 8080)]
    assert codec.data_announced and not codec.error_announced
    assert codec.feed(port_frame(1, 8080)) == [PortAnnounced(1, 8080)]
    assert codec.error_announced
    assert codec.feed(b"\x00hello") == [DataReceived(b"hello")]
    # Later 2-byte data messages are data, not announcements.
    assert codec.feed(port_frame(0, 8080)) == [DataReceived(struct.pack("<H", 8080))]
    assert codec.feed(b"\x01dial tcp: connection refused") == [
        RemoteError("dial tcp: connection refused")
    ]


def test_port_is_little_endian() -> None:
    codec = PortForwardChannels(0x1234)
    assert codec.feed(b"\x00\x34\x12") == [PortAnnounced(0, 0x1234)]


def test_error_channel_may_be_announced_first() -> None:
    codec = PortForwardChannels(80)
    assert codec.feed(port_frame(1, 80)) == [PortAnnounced(1, 80)]
    assert codec.feed(b"\x01boom") == [RemoteError("boom")]
    assert not codec.data_announced


def test_empty_payloads_carry_no_event() -> None:
    codec = announced()
    assert codec.feed(b"\x00") == []
    assert codec.feed(b"\x01") == []


def test_error_text_with_invalid_utf8_is_replaced() -> None:
    codec = announced()
    assert codec.feed(b"\x01bad \xff byte") == [RemoteError("bad \ufffd byte")]


def test_binary_data_is_kept_exactly() -> None:
    codec = announced()
    payload = bytes(range(256)) * 3
    assert codec.feed(b"\x00" + payload) == [DataReceived(payload)]


def test_encode_data() -> None:
    codec = PortForwardChannels(8080)
    assert codec.encode_data(b"abc") == b"\x00abc"
    assert codec.encode_data(b"") == b"\x00"


def test_empty_message() -> None:
    with pytest.raises(ProtocolError, match="empty websocket message"):
        PortForwardChannels(80).feed(b"")


@pytest.mark.parametrize("channel", [2, 3, 255])
def test_unknown_channel(channel: int) -> None:
    with pytest.raises(ProtocolError, match=f"unknown channel {channel}"):
        announced().feed(bytes([channel]) + b"\x50\x00")


@pytest.mark.parametrize("body", [b"", b"\x50", b"\x50\x00\x00", b"hello world"])
@pytest.mark.parametrize("channel", [0, 1])
def test_first_frame_must_be_the_two_byte_port(channel: int, body: bytes) -> None:
    codec = PortForwardChannels(80)
    with pytest.raises(ProtocolError, match=f"first message on channel {channel} has"):
        codec.feed(bytes([channel]) + body)


def test_data_before_announcement() -> None:
    codec = PortForwardChannels(80)
    codec.feed(port_frame(1, 80))  # the error channel's announcement is not enough
    with pytest.raises(ProtocolError, match="data before the port announcement"):
        codec.feed(b"\x00GET / HTTP/1.1\r\n")


@pytest.mark.parametrize("channel", [0, 1])
def test_announced_port_must_match(channel: int) -> None:
    codec = PortForwardChannels(8080)
    with pytest.raises(
        ProtocolError, match=f"channel {channel} announced port 8081, expected 8080"
    ):
        codec.feed(port_frame(channel, 8081))


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_requested_port_must_be_valid(port: int) -> None:
    with pytest.raises(ValueError):
        PortForwardChannels(port)
