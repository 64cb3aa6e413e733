"""Datagram records inside a stream: what a UDP association carries."""

from __future__ import annotations

import pytest

from netmirror.wire.datagrams import MAX_PAYLOAD, DatagramDecoder, encode_datagram


def test_records_round_trip_split_anywhere() -> None:
    datagrams = [
        ("10.0.0.5", 514, b"<14>order shipped"),
        ("fd00::7", 53, b"\x00" * 1500),
        ("192.0.2.1", 0, b""),
    ]
    stream = b"".join(encode_datagram(*d) for d in datagrams)
    for cut in range(1, len(stream)):
        decoder = DatagramDecoder()
        out = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert out == datagrams
        assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"\x00\x01\x05" + bytes(7), "family 5"),
        ((MAX_PAYLOAD + 1).to_bytes(2, "big") + b"\x04" + bytes(6), "bytes"),
    ],
)
def test_a_bad_record_is_an_error(record: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DatagramDecoder().feed(record)


def test_what_cannot_be_encoded_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_datagram("db.internal", 53, b"x")  # names are resolved before
    with pytest.raises(ValueError):
        encode_datagram("10.0.0.1", 70000, b"x")
    with pytest.raises(ValueError):
        encode_datagram("10.0.0.1", 1, bytes(MAX_PAYLOAD + 1))
