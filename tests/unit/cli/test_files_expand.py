"""Tests of netmirror.cli.files.expand: the target's paths a files pattern names."""

from __future__ import annotations

from pathlib import Path

import pytest

from netmirror.cli.files import expand


@pytest.fixture
def root(tmp_path: Path) -> str:
    """A target's root whose own name has glob characters, which must not match as such."""
    top = tmp_path / "r[1]*"
    for name in ("etc/app.conf", "etc/db.conf", "etc/hosts", "srv/a/x.yaml", "srv/b/c/y.yaml"):
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_text("")
    return str(top)


@pytest.mark.parametrize(
    ("pattern", "paths"),
    [
        ("/a/**", ["/a"]),
        ("/a/b/", ["/a/b"]),
        ("/**", ["/"]),
        ("/", ["/"]),
        ("/not/there", ["/not/there"]),  # a plain path is kept, whether or not it exists
    ],
)
def test_plain_paths_and_trees(root: str, pattern: str, paths: list[str]) -> None:
    assert expand(root, pattern) == paths


def test_globs_match_in_the_root(root: str) -> None:
    assert expand(root, "/etc/*.conf") == ["/etc/app.conf", "/etc/db.conf"]
    assert expand(root, "/etc/[h]osts") == ["/etc/hosts"]
    assert expand(root, "/srv/?") == ["/srv/a", "/srv/b"]
    assert expand(root, "/srv/**/*.yaml") == ["/srv/a/x.yaml", "/srv/b/c/y.yaml"]
    assert expand(root, "/srv/*/**") == ["/srv/a", "/srv/b"]  # each tree, once


def test_a_glob_that_matches_nothing(root: str) -> None:
    assert expand(root, "/etc/*.yaml") == []
    assert expand(root, "/nowhere/*") == []


def test_globs_against_this_machine_with_an_empty_root(tmp_path: Path) -> None:
    (tmp_path / "one").write_text("")
    (tmp_path / "two").write_text("")
    assert expand("", f"{tmp_path}/*") == [f"{tmp_path}/one", f"{tmp_path}/two"]
