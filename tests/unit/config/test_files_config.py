"""Tests of the ``files`` section of the configuration: keys, errors and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from netmirror.config import Config, Overrides, build_config, parse_config
from netmirror.config.model import FilesConfig
from netmirror.errors import ConfigError


def error_of(data: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="config.yaml")
    return str(caught.value)


def test_defaults() -> None:
    assert Config().files == FilesConfig()
    files = FilesConfig()
    assert (files.enabled, files.read_only, files.read_write, files.local) == (True, [], [], [])
    assert files.timeout == 5.0


def test_every_key() -> None:
    config = parse_config(
        {
            "files": {
                "enabled": False,
                "read_only": ["/app/config/**", "/etc/*.conf"],
                "read_write": ["/data"],
                "local": ["/app/config/local.yaml"],
                "timeout": 30,
            }
        }
    )
    assert config.files == FilesConfig(
        enabled=False,
        read_only=["/app/config/**", "/etc/*.conf"],
        read_write=["/data"],
        local=["/app/config/local.yaml"],
        timeout=30.0,
    )


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"read_only": ["/ok", "etc/hosts"]},
            "files.read_only[1]: 'etc/hosts' must be an absolute path "
            "(a glob such as /app/config/** is allowed)",
        ),
        ({"read_only": ["/"]}, "files.read_only[0]: '/' must name a path below /"),
        ({"read_write": ["/**"]}, "files.read_write[0]: '/**' must name a path below /"),
        ({"local": ["/a\0b"]}, "files.local[0]: '/a\\x00b' must name a path below /"),
        ({"timeout": 0}, "files.timeout: 0 must be greater than 0"),
        ({"timeout": 301}, "files.timeout: 301 must be at most 300"),
        ({"enabled": "maybe"}, "files.enabled: 'maybe' is not true or false"),
        (
            {"readonly": []},
            "files.readonly: unknown key "
            "(expected one of enabled, read_only, read_write, local, timeout)",
        ),
    ],
)
def test_errors_name_the_key(files: dict[str, object], message: str) -> None:
    assert error_of({"files": files}) == f"config.yaml: {message}"


def test_flags_append_to_the_files_lists(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("files:\n  read_only: [/etc/app]\n  read_write: [/data]\n  local: [/x/y]\n")
    flags = Overrides(
        files=False, files_ro=["/srv/**"], files_rw=["/tmp/w"], files_local=["/srv/cache"]
    )
    files = build_config(file=path, env={}, flags=flags).files
    assert files.enabled is False
    assert files.read_only == ["/etc/app", "/srv/**"]
    assert files.read_write == ["/data", "/tmp/w"]
    assert files.local == ["/x/y", "/srv/cache"]
    assert build_config(file=path, env={}, flags=Overrides()).files.enabled is True


def test_a_bad_flag_value_names_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(file=None, env={}, flags=Overrides(files_rw=["/ok", "relative"]))
    assert str(caught.value) == (
        "files.read_write: 'relative' must be an absolute path "
        "(a glob such as /app/config/** is allowed)"
    )


def test_a_bad_file_value_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "netmirror.toml"
    path.write_text('[files]\nread_only = ["/"]\n')
    with pytest.raises(ConfigError) as caught:
        build_config(file=path, env={}, flags=Overrides())
    assert str(caught.value) == f"{path}: files.read_only[0]: '/' must name a path below /"
