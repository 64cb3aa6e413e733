"""Tests of netmirror.config.environment: reading /proc/PID/environ and merging environments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netmirror.agent.target_process import parse_environ
from netmirror.config import EnvConfig
from netmirror.config.environment import merge_environment

# ---------------------------------------------------------------- parse_environ


def test_parse_environ() -> None:
    assert parse_environ(b"A=1\0B=two words\0C=\0") == {"A": "1", "B": "two words", "C": ""}


def test_parse_environ_empty() -> None:
    assert parse_environ(b"") == {}
    assert parse_environ(b"\0\0") == {}


def test_parse_environ_keeps_a_last_entry_without_nul() -> None:
    assert parse_environ(b"A=1\0B=2") == {"A": "1", "B": "2"}


def test_parse_environ_splits_at_the_first_equals_sign() -> None:
    assert parse_environ(b"URL=http://x/?a=b&c=d\0EQ==\0") == {
        "URL": "http://x/?a=b&c=d",
        "EQ": "=",
    }


def test_parse_environ_skips_entries_without_a_name_or_equals_sign() -> None:
    assert parse_environ(b"garbage\0=nameless\0A=1\0\0=\0") == {"A": "1"}


def test_parse_environ_first_duplicate_wins() -> None:
    # getenv() and os.environ both see the first entry.
    assert parse_environ(b"A=first\0A=second\0") == {"A": "first"}


def test_parse_environ_keeps_newlines_and_odd_characters() -> None:
    assert parse_environ(b"CERT=-----BEGIN\nxyz\n-----END\n\0T=\t \r\0") == {
        "CERT": "-----BEGIN\nxyz\n-----END\n",
        "T": "\t \r",
    }


def test_parse_environ_decodes_utf8() -> None:
    assert parse_environ("GRUSS=grüße\0ÄNAME=x\0".encode()) == {"GRUSS": "grüße", "ÄNAME": "x"}


def test_parse_environ_is_safe_with_bytes_that_are_not_text() -> None:
    raw = b"BIN=\xff\xfe\x80\0K\xff=v\0"
    environ = parse_environ(raw)
    assert set(environ) == {"BIN", os.fsdecode(b"K\xff")}
    # surrogateescape: the original bytes come back.
    assert os.fsencode(environ["BIN"]) == b"\xff\xfe\x80"
    assert b"\0".join(os.fsencode(f"{k}={v}") for k, v in environ.items()) + b"\0" == raw


def test_parse_environ_reads_our_own_proc_file() -> None:
    path = Path("/proc/self/environ")
    if not path.exists():
        pytest.skip("no /proc")
    # /proc/self/environ is the environment at exec time; os.environ started from it.
    environ = parse_environ(path.read_bytes())
    assert environ
    assert all("=" not in name and "\0" not in name for name in environ)


@given(
    st.dictionaries(
        st.text(min_size=1).filter(lambda s: "=" not in s and "\0" not in s),
        st.text().filter(lambda s: "\0" not in s),
    )
)
def test_parse_environ_round_trip(environ: dict[str, str]) -> None:
    raw = b"".join(os.fsencode(f"{k}={v}") + b"\0" for k, v in environ.items())
    assert parse_environ(raw) == environ


# ----------------------------------------------------------- merge_environment


LOCAL = {"PATH": "/usr/local/bin:/usr/bin", "HOME": "/home/me", "LANG": "C.UTF-8", "ONLY": "l"}
REMOTE = {
    "PATH": "/app/bin",
    "HOME": "/root",
    "HOSTNAME": "web-0",
    "LANG": "en_US.UTF-8",
    "DATABASE_URL": "postgres://db/app",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "LD_PRELOAD": "/lib/evil.so",
    "_": "/usr/bin/python",
}


def test_default_merge_takes_the_service_config_and_keeps_the_machine() -> None:
    merged = merge_environment(LOCAL, REMOTE, EnvConfig())
    assert merged == {
        # Excluded by default: the local values stay (or stay unset).
        "PATH": "/usr/local/bin:/usr/bin",
        "HOME": "/home/me",
        # Taken from the target.
        "LANG": "en_US.UTF-8",
        "DATABASE_URL": "postgres://db/app",
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        # Only local: untouched.
        "ONLY": "l",
    }


def test_merge_include_globs() -> None:
    cfg = EnvConfig(include=["DATABASE_*", "LAN?"], exclude=[])
    merged = merge_environment(LOCAL, REMOTE, cfg)
    assert merged == {**LOCAL, "DATABASE_URL": "postgres://db/app", "LANG": "en_US.UTF-8"}


def test_merge_globs_are_case_sensitive() -> None:
    cfg = EnvConfig(include=["database_*"], exclude=[])
    assert merge_environment(LOCAL, REMOTE, cfg) == LOCAL


def test_merge_character_classes() -> None:
    cfg = EnvConfig(include=["[DL]*"], exclude=["LD_*"])
    merged = merge_environment({}, REMOTE, cfg)
    assert merged == {"DATABASE_URL": "postgres://db/app", "LANG": "en_US.UTF-8"}


def test_merge_exclude_wins_over_include() -> None:
    cfg = EnvConfig(include=["*"], exclude=["KUBERNETES_*", "DATABASE_URL"])
    merged = merge_environment({"DATABASE_URL": "sqlite://"}, REMOTE, cfg)
    assert merged["DATABASE_URL"] == "sqlite://"
    assert "KUBERNETES_SERVICE_HOST" not in merged
    assert merged["PATH"] == "/app/bin"  # exclude replaced, so PATH is not excluded


def test_merge_empty_include_takes_nothing() -> None:
    assert merge_environment(LOCAL, REMOTE, EnvConfig(include=[])) == LOCAL


def test_merge_override_wins_over_everything() -> None:
    cfg = EnvConfig(override={"DATABASE_URL": "postgres://localhost/app", "PATH": "/x", "NEW": ""})
    merged = merge_environment(LOCAL, REMOTE, cfg)
    assert merged["DATABASE_URL"] == "postgres://localhost/app"  # over the target
    assert merged["PATH"] == "/x"  # over the local value of an excluded name
    assert merged["NEW"] == ""  # in neither


def test_merge_is_pure() -> None:
    local, remote = dict(LOCAL), dict(REMOTE)
    cfg = EnvConfig(override={"A": "1"})
    merged = merge_environment(local, remote, cfg)
    assert (local, remote, cfg) == (LOCAL, REMOTE, EnvConfig(override={"A": "1"}))
    assert merged is not local
    assert merge_environment(local, remote, cfg) == merged


def test_merge_of_nothing() -> None:
    assert merge_environment({}, {}, EnvConfig()) == {}
