"""The kind of a stream, as its OPEN frame names it."""

from __future__ import annotations

import pytest

from netmirror.wire.kinds import StreamKind, stream_info, stream_kind


@pytest.mark.parametrize("kind", list(StreamKind))
def test_every_kind_reads_back(kind: StreamKind) -> None:
    assert stream_kind(stream_info(kind, partial=True)) is kind


def test_details_travel_beside_the_kind() -> None:
    info = stream_info(StreamKind.MIRROR, mirror="capture", partial=False)
    assert info == {"kind": "mirror", "mirror": "capture", "partial": False}


def test_a_stream_without_a_kind_is_stolen_or_a_copy() -> None:
    assert stream_kind({}) is StreamKind.STOLEN
    assert stream_kind({"mirror": "passthrough"}) is StreamKind.MIRROR


def test_a_kind_this_version_does_not_know() -> None:
    assert stream_kind({"kind": "teleport"}) is None
    assert stream_kind({"kind": 7}) is None
