"""Tests of netmirror.wire.files: errno names, paths, attributes, listings, links."""

from __future__ import annotations

import base64
import errno

import pytest

from netmirror.errors import ProtocolError
from netmirror.wire.files import (
    INLINE_MAX,
    Attr,
    Entry,
    clean_path,
    entries_from_wire,
    entries_to_wire,
    errno_name,
    errno_value,
    relative_link,
)

ATTR = Attr(0o100644, 1, 1000, 1000, 12, 0, 8, 1, 2, 3, 6)


@pytest.mark.parametrize("name", ["ENOENT", "EACCES", "ENOTEMPTY", "ENOTSUP"])
def test_errno_round_trip(name: str) -> None:
    code = getattr(errno, name)
    assert errno_value(name) == code
    assert errno_name(code) == name
    assert errno_value(errno_name(code)) == code


def test_errno_name_of_a_code_the_wire_does_not_carry_is_eio() -> None:
    assert errno_name(errno.ECONNREFUSED) == "EIO"
    assert errno_name(999_999) == "EIO"


@pytest.mark.parametrize("name", ["EBOGUS", "ECONNREFUSED", None, b"ENOENT"])
def test_errno_value_of_an_unknown_name_is_eio(name: object) -> None:
    assert errno_value(name) == errno.EIO


def test_errno_value_takes_the_name_before_a_reason() -> None:
    # A stream RESET's reason starts with the name.
    assert errno_value("ENOENT: no such file") == errno.ENOENT
    assert errno_value("  EACCES : nope") == errno.EACCES


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("/", "/"),
        ("/a/b/", "/a/b"),
        ("/a//b", "/a/b"),
        ("//a", "/a"),
        ("///a//b", "/a/b"),
        ("/a/./b/../c", "/a/c"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/a/../..", "/"),
    ],
)
def test_clean_path_normalises(raw: str, clean: str) -> None:
    assert clean_path(raw) == clean


@pytest.mark.parametrize("bad", ["etc/passwd", "", "/a\0b", None])
def test_clean_path_rejects_what_is_not_an_absolute_path(bad: object) -> None:
    with pytest.raises(ProtocolError, match="new must be an absolute path"):
        clean_path(bad, "new")


def test_clean_path_rejects_a_too_long_path() -> None:
    assert clean_path("/" + "a" * 4095) == "/" + "a" * 4095
    with pytest.raises(ProtocolError, match="path is too long"):
        clean_path("/" + "a" * 4096)


def test_attr_wire_round_trip() -> None:
    wire = ATTR.to_wire()
    assert wire == [0o100644, 1, 1000, 1000, 12, 0, 8, 1, 2, 3, 6]
    assert Attr.from_wire(wire) == ATTR


@pytest.mark.parametrize(
    "bad",
    [
        [0] * 10,
        [0] * 12,
        [0] * 10 + [-1],
        [0] * 10 + [True],
        [0] * 10 + ["1"],
        tuple([0] * 11),
    ],
)
def test_attr_from_wire_rejects_malformed(bad: object) -> None:
    with pytest.raises(ProtocolError, match="attributes must be 11 whole numbers"):
        Attr.from_wire(bad)


def test_entries_round_trip_with_inline_data() -> None:
    data = bytes(range(256)) * (INLINE_MAX // 256)
    entries = [Entry("small", ATTR, data), Entry("empty", ATTR, b""), Entry("dir", ATTR)]
    wire = entries_to_wire(entries)
    assert wire[0] == ["small", ATTR.to_wire(), base64.b64encode(data).decode("ascii")]
    assert wire[1] == ["empty", ATTR.to_wire(), ""]
    assert wire[2] == ["dir", ATTR.to_wire()]  # no data: no third item
    assert entries_from_wire(wire) == entries


@pytest.mark.parametrize("name", ["/", "a/b", ".", "..", ""])
def test_entries_from_wire_rejects_bad_names(name: str) -> None:
    with pytest.raises(ProtocolError, match="bad entry name"):
        entries_from_wire([[name, ATTR.to_wire()]])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": 1}, "entries must be a list"),
        ([["a"]], r"an entry must be \[name, attributes\]"),
        ([[1, ATTR.to_wire()]], r"an entry must be \[name, attributes\]"),
        ([["a", ATTR.to_wire(), "", "x"]], r"an entry must be \[name, attributes\]"),
        ([["a", ATTR.to_wire(), 5]], "inline data must be a string"),
        ([["a", ATTR.to_wire(), "not base64!"]], "inline data is not base64"),
        ([["a", [1, 2]]], "attributes must be 11 whole numbers"),
    ],
)
def test_entries_from_wire_rejects_malformed(value: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        entries_from_wire(value)


def test_entries_from_wire_rejects_too_many_entries() -> None:
    with pytest.raises(ProtocolError, match="entries must be a list"):
        entries_from_wire([["a", ATTR.to_wire()]] * 4001)


@pytest.mark.parametrize(
    ("link", "target", "relative"),
    [
        ("/etc/resolv.conf", "/run/x", "../run/x"),
        ("/a", "/b", "b"),
        ("/a/b/c/link", "/x/y", "../../../x/y"),
        ("/etc/localtime", "/usr/share/zoneinfo/UTC", "../usr/share/zoneinfo/UTC"),
        ("/lnk", "/", "."),
        ("/a/lnk", "/", ".."),
        ("/a/lnk", "b/c", "b/c"),
        ("/a/lnk", "../x", "../x"),
    ],
)
def test_relative_link(link: str, target: str, relative: str) -> None:
    assert relative_link(link, target) == relative
