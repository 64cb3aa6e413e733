"""Tests of netmirror.config: the model, its one-line errors, file loading and layering."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from netmirror.config import (
    DEFAULT_ENV_EXCLUDE,
    AgentConfig,
    Config,
    EnvConfig,
    OutgoingConfig,
    Overrides,
    PortConfig,
    build_config,
    dump_example,
    format_validation_error,
    json_schema,
    load_file,
    parse_config,
    parse_port_spec,
)
from netmirror.errors import ConfigError, NetmirrorError

NO_FLAGS = Overrides()


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in tmp_path so relative file names, as users type them, appear in messages."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(name: str, text: str) -> Path:
    """Write ``text`` to ``name`` in the current directory and return the relative path."""
    path = Path(name)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(data: Any, *, source: str | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source=source)
    return str(caught.value)


# ------------------------------------------------------------------------ model


def test_defaults() -> None:
    config = Config()
    assert config.target is None
    assert config.session is None
    assert config.ports == []
    assert config.agent == AgentConfig()
    assert config.agent.image == "ghcr.io/netmirror/agent:0.1.0"
    assert config.agent.ttl == 5.0
    assert config.agent.ready_timeout == 30.0
    port = PortConfig(remote=80)
    assert (port.mode, port.local, port.local_host) == ("steal", None, "127.0.0.1")


def test_local_port_defaults_to_remote() -> None:
    assert PortConfig(remote=80).local_port == 80
    assert PortConfig(remote=80, local=3000).local_port == 3000


def test_active_ports_skips_off() -> None:
    config = Config(
        ports=[
            PortConfig(remote=80),
            PortConfig(remote=81, mode="off"),
            PortConfig(remote=82, mode="mirror"),
        ]
    )
    assert [port.remote for port in config.active_ports()] == [80, 82]


def test_models_are_frozen() -> None:
    config = Config()
    with pytest.raises(ValidationError):
        config.target = "netns/x"


def test_config_error_is_a_netmirror_error() -> None:
    assert issubclass(ConfigError, NetmirrorError)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"ports": [{"remote": 80}, {"remote": 81, "mode": "stael"}]},
            "ports[1].mode: 'stael' is not one of steal, mirror, off",
        ),
        ({"ports": [{"remote": 70000}]}, "ports[0].remote: 70000 is not a port (1-65535)"),
        ({"ports": [{"remote": 0}]}, "ports[0].remote: 0 is not a port (1-65535)"),
        (
            {"ports": [{"remote": 80, "local": 65536}]},
            "ports[0].local: 65536 is not a port (1-65535)",
        ),
        (
            {"ports": [{"remote": 80, "lcoal": 3000}]},
            "ports[0].lcoal: unknown key "
            "(expected one of remote, mode, local, local_host, mirror, http_filter)",
        ),
        ({"ports": [{"mode": "steal"}]}, "ports[0]: missing key 'remote'"),
        ({"agent": {"ttl": "abc"}}, "agent.ttl: 'abc' is not a number"),
        (
            {"session": "My Session"},
            "session: 'My Session' must be 1-18 lowercase letters, digits or '-', "
            "not starting or ending with '-'",
        ),
        (
            {"ports": [{"remote": 80}, {"remote": 8080}, {"remote": 8080}]},
            "ports[2].remote: 8080 is listed twice",
        ),
        (
            {"tagret": "netns/x"},
            "tagret: unknown key (expected one of target, session, ports, agent, pcap, "
            "kubernetes, env, outgoing, files, port_forward, incoming, steal_probes)",
        ),
        (
            {"agent": {"imgae": "x"}},
            "agent.imgae: unknown key "
            "(expected one of image, ttl, ready_timeout, mode, namespace, port)",
        ),
        ({"agent": {"ttl": 0}}, "agent.ttl: 0 must be greater than 0"),
        (
            {"agent": {"namespace": "Agents_NS"}},
            "agent.namespace: 'Agents_NS' is not a namespace name (lower case letters, digits "
            "and '-', at most 63)",
        ),
        ({"agent": {"ttl": 3601}}, "agent.ttl: 3601 must be at most 3600"),
        ({"agent": {"ttl": float("inf")}}, "agent.ttl: inf is not a finite number"),
        ({"agent": {"ready_timeout": -1}}, "agent.ready_timeout: -1 must be greater than 0"),
        ({"agent": {"image": ""}}, "agent.image: '' must not be empty"),
        ({"ports": [{"remote": "http"}]}, "ports[0].remote: 'http' is not an integer"),
        ({"ports": [{"remote": 80.5}]}, "ports[0].remote: 80.5 is not a whole number"),
        ({"ports": [{"remote": True}]}, "ports[0].remote: True is not a port (1-65535)"),
        ({"agent": {"ttl": True}}, "agent.ttl: True is not a number"),
        ({"ports": {"remote": 80}}, "ports: {'remote': 80} is not a list"),
        ({"ports": [80]}, "ports[0]: 80 is not a mapping"),
        ({"agent": []}, "agent: [] is not a mapping"),
        ({"target": 5}, "target: 5 is not a string"),
        (
            {"target": "mypod"},
            "target: 'mypod' must look like KIND/NAME, e.g. netns/NAME, pid/PID or pod/NAME, "
            "or be targetless",
        ),
        ({5: "x"}, "key 5 is not a string"),
        (
            {"ports": [{"remote": 80, "local_host": ""}]},
            "ports[0].local_host: '' must not be empty",
        ),
        (
            {"ports": [{"remote": 80, "local_host": "   "}]},
            "ports[0].local_host: '   ' must not be empty",
        ),
        (
            {"ports": [{"remote": 80, "local_host": "my host"}]},
            "ports[0].local_host: 'my host' must not contain spaces",
        ),
        (
            {"ports": [{"remote": 80, "local_host": "localhost:3000"}]},
            "ports[0].local_host: 'localhost:3000' must not include a port "
            "(give the port as 'local')",
        ),
        (
            {"ports": [{"remote": 80, "local_host": "127.0.0.1:3000"}]},
            "ports[0].local_host: '127.0.0.1:3000' must not include a port "
            "(give the port as 'local')",
        ),
        (
            {"ports": [{"remote": 80, "local_host": "not/a/host"}]},
            "ports[0].local_host: 'not/a/host' is not an IP address or host name",
        ),
        # Keys that are not plain names are quoted, so the path stays one unambiguous line.
        (
            {"ports": [{"remote": 80, "odd key\n": 1}]},
            "ports[0]['odd key\\n']: unknown key "
            "(expected one of remote, mode, local, local_host, mirror, http_filter)",
        ),
    ],
)
def test_model_error_messages(data: dict[Any, Any], message: str) -> None:
    assert config_error(data) == message
    assert config_error(data, source="config.yaml") == f"config.yaml: {message}"


def test_format_validation_error_counts_the_other_errors() -> None:
    data = {"session": "UPPER", "agent": {"ttl": "abc", "ready_timeout": 0}}
    with pytest.raises(ValidationError) as caught:
        Config.model_validate(data)
    assert format_validation_error(caught.value, source=None) == (
        "session: 'UPPER' must be 1-18 lowercase letters, digits or '-', "
        "not starting or ending with '-' (and 2 more)"
    )


def test_format_validation_error_works_on_a_single_model() -> None:
    with pytest.raises(ValidationError) as caught:
        PortConfig.model_validate({"remote": 80, "lcoal": 1})
    assert format_validation_error(caught.value, source="x") == (
        "x: lcoal: unknown key "
        "(expected one of remote, mode, local, local_host, mirror, http_filter)"
    )


def test_long_values_are_shortened() -> None:
    message = config_error({"session": "x" * 500})
    assert len(message) < 200
    assert "..." in message


@pytest.mark.parametrize("session", ["a", "demo", "a-b", "0", "abcdefghijklmnopqr", "a1-2b"])
def test_valid_sessions(session: str) -> None:
    assert Config(session=session).session == session


@pytest.mark.parametrize(
    "session", ["", "-a", "a-", "A", "a_b", "abcdefghijklmnopqrs", "a b", "a\n", "ä"]
)
def test_invalid_sessions(session: str) -> None:
    assert "must be 1-18 lowercase letters" in config_error({"session": session})


@pytest.mark.parametrize("target", ["netns/demo", "pid/1234", "pod/web-0", "pod/ns/web"])
def test_valid_targets(target: str) -> None:
    assert Config(target=target).target == target


@pytest.mark.parametrize("target", ["", "demo", "/x", "pod/", "Pod/x", "pod/a b", "1/x"])
def test_invalid_targets(target: str) -> None:
    assert "must look like KIND/NAME" in config_error({"target": target})


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "::1", "fe80::1%eth0", "localhost", "db.example.com.", "my_app"]
)
def test_valid_local_hosts(host: str) -> None:
    assert PortConfig(remote=80, local_host=host).local_host == host


# ------------------------------------------------------------------- files


def test_load_yaml(in_tmp: Path) -> None:
    path = write(
        "config.yaml",
        "target: netns/demo\nports:\n  - remote: 80\n    local: 8080\n  - remote: 443\n",
    )
    assert load_file(path) == {
        "target": "netns/demo",
        "ports": [{"remote": 80, "local": 8080}, {"remote": 443}],
    }


def test_load_yml_and_unknown_extensions_as_yaml(in_tmp: Path) -> None:
    assert load_file(write("a.yml", "session: x\n")) == {"session": "x"}
    assert load_file(write("netmirror.conf", "session: x\n")) == {"session": "x"}
    assert load_file(write("noext", "session: x\n")) == {"session": "x"}


def test_load_toml(in_tmp: Path) -> None:
    path = write(
        "config.toml",
        'target = "pid/42"\n\n[[ports]]\nremote = 80\nmode = "mirror"\n\n[agent]\nttl = 5\n',
    )
    data = load_file(path)
    assert data == {
        "target": "pid/42",
        "ports": [{"remote": 80, "mode": "mirror"}],
        "agent": {"ttl": 5},
    }
    config = parse_config(data)
    assert config.ports[0].mode == "mirror"
    assert config.agent.ttl == 5.0


def test_load_json(in_tmp: Path) -> None:
    path = write("config.json", '{"ports": [{"remote": 80, "local_host": "::1"}]}')
    assert parse_config(load_file(path)).ports[0].local_host == "::1"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("config.yaml", ""),
        ("config.yaml", "\n\n"),
        ("config.yaml", "# nothing here\n"),
        ("config.yaml", "~\n"),
        ("config.toml", ""),
        ("config.toml", "# nothing here\n"),
        ("config.json", ""),
        ("config.json", " \n"),
    ],
)
def test_empty_files_are_empty_configs(in_tmp: Path, name: str, text: str) -> None:
    assert load_file(write(name, text)) == {}


def test_utf8_byte_order_mark_is_accepted(in_tmp: Path) -> None:
    Path("config.yaml").write_bytes(b"\xef\xbb\xbfsession: x\n")
    assert load_file(Path("config.yaml")) == {"session": "x"}


def test_missing_file(in_tmp: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config\.yaml: no such file$"):
        load_file(Path("config.yaml"))


def test_directory_is_not_a_file(in_tmp: Path) -> None:
    Path("config.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"^config\.yaml: is a directory, not a file$"):
        load_file(Path("config.yaml"))


def test_not_utf8(in_tmp: Path) -> None:
    Path("config.yaml").write_bytes(b"session: \xff\n")
    with pytest.raises(ConfigError) as caught:
        load_file(Path("config.yaml"))
    assert str(caught.value) == "config.yaml: not UTF-8 text (byte 0xff at offset 9)"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "config.yaml",
            "ports:\n  - remote: 80\n    mode: : steal\n",
            "config.yaml: invalid YAML at line 3, column 11: mapping values are not allowed here",
        ),
        (
            "config.yaml",
            "ports: [80\n",
            "config.yaml: invalid YAML at line 2, column 1: while parsing a flow sequence: "
            "expected ',' or ']', but got '<stream end>'",
        ),
        (
            "config.yaml",
            "session: a\nsession: b\n",
            "config.yaml: invalid YAML at line 2, column 1: duplicate key 'session'",
        ),
        (
            "config.yaml",
            "session: \x07\n",
            "config.yaml: invalid YAML at line 1, column 10: unacceptable character #x0007: "
            "special characters are not allowed",
        ),
        (
            "config.yaml",
            "target: !!python/name:os.system\n",
            "config.yaml: invalid YAML at line 1, column 9: could not determine a constructor "
            "for the tag 'tag:yaml.org,2002:python/name:os.system'",
        ),
        (
            "config.yaml",
            "when: 2024-13-01\n",
            "config.yaml: invalid YAML: month must be in 1..12",
        ),
        (
            "config.toml",
            "target = \nsession = 'x'\n",
            "config.toml: invalid TOML at line 1, column 10: Invalid value",
        ),
        (
            "config.json",
            '{\n  "target": }\n',
            "config.json: invalid JSON at line 2, column 13: Expecting value",
        ),
        ("config.yaml", "- 80\n", "config.yaml: the top level must be a mapping, not list"),
        ("config.yaml", "hello\n", "config.yaml: the top level must be a mapping, not string"),
        ("config.json", "[1, 2]", "config.json: the top level must be a mapping, not list"),
        ("config.json", "3", "config.json: the top level must be a mapping, not integer"),
    ],
)
def test_load_errors(in_tmp: Path, name: str, text: str, message: str) -> None:
    path = write(name, text)
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    assert str(caught.value) == message


def test_yaml_merge_keys_are_not_duplicates(in_tmp: Path) -> None:
    path = write(
        "config.yaml",
        "defaults: &web {remote: 80, mode: mirror}\nport:\n  <<: *web\n  mode: steal\n",
    )
    assert load_file(path)["port"] == {"remote": 80, "mode": "steal"}


def test_unquoted_yaml_off_means_off(in_tmp: Path) -> None:
    # PyYAML reads `off` as false; users should not have to know that.
    path = write("config.yaml", "ports:\n  - remote: 80\n    mode: off\n")
    config = build_config(file=path, env={}, flags=NO_FLAGS)
    assert config.ports[0].mode == "off"
    assert config.active_ports() == []


def test_file_errors_name_the_file(in_tmp: Path) -> None:
    path = write("config.yaml", "ports:\n  - remote: 80\n  - remote: 81\n    mode: stael\n")
    with pytest.raises(ConfigError) as caught:
        build_config(file=path, env={}, flags=NO_FLAGS)
    assert (
        str(caught.value) == "config.yaml: ports[1].mode: 'stael' is not one of steal, mirror, off"
    )


def test_duplicate_ports_in_a_file(in_tmp: Path) -> None:
    path = write("config.toml", "[[ports]]\nremote = 8080\n\n[[ports]]\nremote = 8080\n")
    with pytest.raises(ConfigError) as caught:
        build_config(file=path, env={}, flags=NO_FLAGS)
    assert str(caught.value) == "config.toml: ports[1].remote: 8080 is listed twice"


# --------------------------------------------------------------- port specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("80", (80, None)), ("80:3000", (80, 3000)), ("1:65535", (1, 65535)), ("0080", (80, None))],
)
def test_parse_port_spec(spec: str, expected: tuple[int, int | None]) -> None:
    assert parse_port_spec(spec, flag="--steal") == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("abc", "--steal: 'abc' is not REMOTE[:LOCAL]"),
        ("", "--steal: '' is not REMOTE[:LOCAL]"),
        ("80:", "--steal: '80:' is not REMOTE[:LOCAL]"),
        (":80", "--steal: ':80' is not REMOTE[:LOCAL]"),
        ("80:90:100", "--steal: '80:90:100' is not REMOTE[:LOCAL]"),
        (" 80", "--steal: ' 80' is not REMOTE[:LOCAL]"),
        ("-80", "--steal: '-80' is not REMOTE[:LOCAL]"),
        ("80\n", "--steal: '80\\n' is not REMOTE[:LOCAL]"),
        ("\u0668\u0660", "--steal: '\u0668\u0660' is not REMOTE[:LOCAL]"),  # Arabic-Indic 80
        ("0", "--steal: 0 is not a port (1-65535)"),
        ("70000", "--steal: 70000 is not a port (1-65535)"),
        ("80:70000", "--steal: 70000 is not a port (1-65535)"),
        ("9" * 5000, "--steal: 9999999999... is not a port (1-65535)"),
    ],
)
def test_parse_port_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_port_spec(spec, flag="--steal")
    assert str(caught.value) == message


# -------------------------------------------------------------- layering


def test_no_file_no_env_no_flags_is_the_default() -> None:
    assert build_config(file=None, env={}, flags=NO_FLAGS) == Config()


def test_precedence_file_then_env_then_flags(in_tmp: Path) -> None:
    path = write(
        "config.yaml",
        "target: netns/file\nsession: file\nagent:\n  image: file:1\n  ttl: 1\n",
    )
    from_file = build_config(file=path, env={}, flags=NO_FLAGS)
    assert (from_file.target, from_file.session, from_file.agent.image, from_file.agent.ttl) == (
        "netns/file",
        "file",
        "file:1",
        1.0,
    )

    env = {
        "NETMIRROR_TARGET": "netns/env",
        "NETMIRROR_SESSION": "env",
        "NETMIRROR_AGENT_IMAGE": "env:1",
        "NETMIRROR_AGENT_TTL": "2.5",
    }
    from_env = build_config(file=path, env=env, flags=NO_FLAGS)
    assert (from_env.target, from_env.session, from_env.agent.image, from_env.agent.ttl) == (
        "netns/env",
        "env",
        "env:1",
        2.5,
    )

    flags = Overrides(target="pod/flag", session="flag", agent_image="flag:1")
    from_flags = build_config(file=path, env=env, flags=flags)
    assert (from_flags.target, from_flags.session, from_flags.agent.image) == (
        "pod/flag",
        "flag",
        "flag:1",
    )
    # No flag for the ttl: the environment still wins over the file.
    assert from_flags.agent.ttl == 2.5


def test_empty_environment_variables_are_unset(in_tmp: Path) -> None:
    path = write("config.yaml", "target: netns/file\n")
    config = build_config(file=path, env={"NETMIRROR_TARGET": ""}, flags=NO_FLAGS)
    assert config.target == "netns/file"


def test_unrelated_environment_is_ignored() -> None:
    env = {"PATH": "/bin", "NETMIRROR_SOMETHING_ELSE": "x"}
    assert build_config(file=None, env=env, flags=NO_FLAGS) == Config()


def test_flags_override_a_file_port(in_tmp: Path) -> None:
    path = write(
        "config.yaml",
        "ports:\n"
        "  - remote: 80\n    mode: mirror\n    local: 4000\n    local_host: devbox\n"
        "  - remote: 81\n    local: 4001\n"
        "  - remote: 82\n    mode: 'off'\n",
    )
    flags = Overrides(steal=["80"], mirror=["81:5001", "90:9000"])
    config = build_config(file=path, env={}, flags=flags)
    assert config.ports == [
        # No LOCAL on the flag: the file's local and local_host stay.
        PortConfig(remote=80, mode="steal", local=4000, local_host="devbox"),
        PortConfig(remote=81, mode="mirror", local=5001),
        # Not mentioned on a flag: untouched.
        PortConfig(remote=82, mode="off"),
        # Not in the file: added after the file's ports.
        PortConfig(remote=90, mode="mirror", local=9000),
    ]


def test_flags_can_turn_on_a_port_that_is_off(in_tmp: Path) -> None:
    path = write("config.yaml", "ports:\n  - remote: 80\n    mode: 'off'\n")
    config = build_config(file=path, env={}, flags=Overrides(mirror=["80"]))
    assert [(port.remote, port.mode) for port in config.active_ports()] == [(80, "mirror")]


def test_flag_ports_without_a_file() -> None:
    config = build_config(file=None, env={}, flags=Overrides(steal=["80:3000"], mirror=["81"]))
    assert config.ports == [
        PortConfig(remote=80, mode="steal", local=3000),
        PortConfig(remote=81, mode="mirror"),
    ]


def test_an_invalid_file_fails_even_if_overridden(in_tmp: Path) -> None:
    path = write("config.yaml", "target: nope\n")
    with pytest.raises(ConfigError) as caught:
        build_config(file=path, env={"NETMIRROR_TARGET": "netns/x"}, flags=NO_FLAGS)
    assert str(caught.value).startswith("config.yaml: target: 'nope' must look like KIND/NAME")


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({"NETMIRROR_AGENT_TTL": "abc"}, NO_FLAGS, "NETMIRROR_AGENT_TTL: 'abc' is not a number"),
        ({"NETMIRROR_AGENT_TTL": "0"}, NO_FLAGS, "NETMIRROR_AGENT_TTL: '0' must be greater than 0"),
        (
            {"NETMIRROR_AGENT_TTL": "7200"},
            NO_FLAGS,
            "NETMIRROR_AGENT_TTL: '7200' must be at most 3600",
        ),
        (
            {"NETMIRROR_TARGET": "web"},
            NO_FLAGS,
            "NETMIRROR_TARGET: 'web' must look like KIND/NAME, "
            "e.g. netns/NAME, pid/PID or pod/NAME, or be targetless",
        ),
        (
            {"NETMIRROR_SESSION": "My Session"},
            NO_FLAGS,
            "NETMIRROR_SESSION: 'My Session' must be 1-18 lowercase letters, digits or '-', "
            "not starting or ending with '-'",
        ),
        (
            {"NETMIRROR_AGENT_IMAGE": "a b"},
            NO_FLAGS,
            "NETMIRROR_AGENT_IMAGE: 'a b' must not contain spaces",
        ),
        (
            {"NETMIRROR_TARGET": "web", "NETMIRROR_SESSION": "-x"},
            NO_FLAGS,
            "NETMIRROR_TARGET: 'web' must look like KIND/NAME, e.g. netns/NAME, pid/PID or "
            "pod/NAME, or be targetless (and 1 more)",
        ),
        ({}, Overrides(steal=["abc"]), "--steal: 'abc' is not REMOTE[:LOCAL]"),
        ({}, Overrides(mirror=["80:0"]), "--mirror: 0 is not a port (1-65535)"),
        ({}, Overrides(steal=["80", "80:3000"]), "--steal: 80 is listed twice"),
        ({}, Overrides(steal=["80"], mirror=["80"]), "--mirror: 80 is also given to --steal"),
        (
            {},
            Overrides(target="web"),
            "--target: 'web' must look like KIND/NAME, e.g. netns/NAME, pid/PID or pod/NAME, "
            "or be targetless",
        ),
        (
            {},
            Overrides(session="A"),
            "--session: 'A' must be 1-18 lowercase letters, digits or '-', "
            "not starting or ending with '-'",
        ),
        ({}, Overrides(agent_image=""), "--agent-image: '' must not be empty"),
        # The flag wins, so its value is the one that is wrong.
        (
            {"NETMIRROR_TARGET": "netns/ok"},
            Overrides(target="bad"),
            "--target: 'bad' must look like KIND/NAME, e.g. netns/NAME, pid/PID or pod/NAME, "
            "or be targetless",
        ),
    ],
)
def test_environment_and_flag_errors_name_their_source(
    env: dict[str, str], flags: Overrides, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(file=None, env=env, flags=flags)
    assert str(caught.value) == message


# ------------------------------------------------- netmirror exec: env, outgoing


def test_exec_defaults() -> None:
    config = Config()
    assert config.env == EnvConfig()
    assert config.env.include == ["*"]
    assert config.env.exclude == list(DEFAULT_ENV_EXCLUDE)
    assert config.env.override == {}
    assert config.outgoing == OutgoingConfig()
    assert config.outgoing.enabled is True
    assert config.outgoing.include == ["0.0.0.0/0", "::/0"]
    assert config.outgoing.exclude == []
    assert config.outgoing.dns is True


def test_default_env_exclude() -> None:
    # What describes this machine or the shell stays local by default.
    for name in ("PATH", "HOME", "HOSTNAME", "PWD", "SHELL", "TERM", "USER", "LD_*"):
        assert name in DEFAULT_ENV_EXCLUDE
    # Services read the Kubernetes service variables: they come from the target.
    assert not any(pattern.startswith("KUBERNETES") for pattern in DEFAULT_ENV_EXCLUDE)


def test_default_lists_are_not_shared() -> None:
    assert EnvConfig().exclude is not EnvConfig().exclude
    assert OutgoingConfig().include is not OutgoingConfig().include


def test_exec_sections_from_a_file(in_tmp: Path) -> None:
    path = write(
        "config.yaml",
        "env:\n"
        "  include: ['APP_*', 'DB_?']\n"
        "  exclude: [APP_DEBUG]\n"
        "  override: {PORT: 8080, MODE: dev, EMPTY: ''}\n"
        "outgoing:\n"
        "  enabled: false\n"
        "  include: [10.0.0.0/8, 'fd00::/8']\n"
        "  exclude: [10.1.2.3]\n"
        "  dns: no\n",
    )
    config = build_config(file=path, env={}, flags=NO_FLAGS)
    assert config.env == EnvConfig(
        include=["APP_*", "DB_?"],
        exclude=["APP_DEBUG"],
        # YAML reads 8080 as a number; it is meant as the text.
        override={"PORT": "8080", "MODE": "dev", "EMPTY": ""},
    )
    assert config.outgoing == OutgoingConfig(
        enabled=False, include=["10.0.0.0/8", "fd00::/8"], exclude=["10.1.2.3"], dns=False
    )


def test_exec_sections_survive_a_json_round_trip() -> None:
    config = Config(
        env=EnvConfig(include=["A*"], override={"X": "1"}),
        outgoing=OutgoingConfig(exclude=["10.0.0.0/8"]),
    )
    assert parse_config(json.loads(json.dumps(config.model_dump(mode="json")))) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"outgoing": {"exclude": ["10.0.0.0/8", "10.0.0.0/33"]}},
            "outgoing.exclude[1]: '10.0.0.0/33' is not an IP network",
        ),
        (
            {"outgoing": {"include": ["0.0.0.0/0", "example.com"]}},
            "outgoing.include[1]: 'example.com' is not an IP network",
        ),
        ({"outgoing": {"include": [""]}}, "outgoing.include[0]: '' is not an IP network"),
        (
            {"outgoing": {"exclude": [" 10.0.0.0/8"]}},
            "outgoing.exclude[0]: ' 10.0.0.0/8' is not an IP network",
        ),
        ({"outgoing": {"exclude": [10]}}, "outgoing.exclude[0]: 10 is not a string"),
        ({"outgoing": {"exclude": "10.0.0.0/8"}}, "outgoing.exclude: '10.0.0.0/8' is not a list"),
        ({"outgoing": {"enabled": "maybe"}}, "outgoing.enabled: 'maybe' is not true or false"),
        ({"outgoing": {"dns": []}}, "outgoing.dns: [] is not true or false"),
        (
            {"outgoing": {"exlude": []}},
            "outgoing.exlude: unknown key "
            "(expected one of enabled, include, exclude, dns, udp, method)",
        ),
        ({"env": {"include": ["*", ""]}}, "env.include[1]: '' must not be empty"),
        ({"env": {"exclude": [""]}}, "env.exclude[0]: '' must not be empty"),
        ({"env": {"exclude": "PATH"}}, "env.exclude: 'PATH' is not a list"),
        (
            {"env": {"override": {"A=B": "x"}}},
            "env.override: 'A=B' is not an environment variable name "
            "(it must not be empty or contain '=' or NUL)",
        ),
        (
            {"env": {"override": {"": "x"}}},
            "env.override: '' is not an environment variable name "
            "(it must not be empty or contain '=' or NUL)",
        ),
        (
            {"env": {"override": {"OK": "1", "A\0B": "x", "=": "y"}}},
            "env.override: 'A\\x00B' is not an environment variable name "
            "(it must not be empty or contain '=' or NUL) (and 1 more)",
        ),
        (
            {"env": {"override": {"A": "x\0y"}}},
            "env.override.A: 'x\\x00y' must not contain a NUL character",
        ),
        (
            {"env": {"override": {"DEBUG": True}}},
            "env.override.DEBUG: True is not a string "
            "(quote it: YAML reads yes/no/on/off as booleans)",
        ),
        ({"env": {"override": {"V": 1.10}}}, "env.override.V: 1.1 is not a string"),
        ({"env": {"override": {"V": None}}}, "env.override.V: None is not a string"),
        ({"env": {"override": {1: "x"}}}, "env.override: key 1 is not a string"),
        ({"env": {"override": {"[key]": 1.5}}}, "env.override['[key]']: 1.5 is not a string"),
        ({"env": {"override": ["A=B"]}}, "env.override: ['A=B'] is not a mapping"),
        (
            {"env": {"overide": {}}},
            "env.overide: unknown key (expected one of include, exclude, override)",
        ),
    ],
)
def test_exec_error_messages(data: dict[Any, Any], message: str) -> None:
    assert config_error(data) == message
    assert config_error(data, source="config.yaml") == f"config.yaml: {message}"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.1.2.3", True),
        ("93.184.216.34", True),
        ("2001:db8::1", True),
        ("fe80::1%eth0", True),
        # Loopback and "this machine" never leave it.
        ("127.0.0.1", False),
        ("127.255.0.9", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
    ],
)
def test_outgoing_matches_by_default(address: str, expected: bool) -> None:
    assert OutgoingConfig().matches(address) is expected


def test_outgoing_matches_include_and_exclude() -> None:
    outgoing = OutgoingConfig(
        include=["10.0.0.0/8", "fd00::/8", "192.168.1.7"],
        exclude=["10.96.0.0/12", "10.1.2.3/32", "fd00:1::/32"],
    )
    assert outgoing.matches("10.0.0.1")
    assert outgoing.matches("10.1.2.4")
    assert outgoing.matches("192.168.1.7")
    assert outgoing.matches("fd00::5")
    # An IPv4-mapped IPv6 address is its IPv4 address.
    assert outgoing.matches("::ffff:10.0.0.1")
    assert not outgoing.matches("::ffff:10.1.2.3")
    assert not outgoing.matches("10.1.2.3")
    assert not outgoing.matches("10.100.0.1")  # in 10.96.0.0/12
    assert not outgoing.matches("fd00:1::5")
    assert not outgoing.matches("192.168.1.8")
    assert not outgoing.matches("8.8.8.8")
    assert not outgoing.matches("2001:db8::1")


def test_outgoing_matches_accepts_host_bits_and_never_loopback() -> None:
    # strict=False: 10.1.2.3/8 means 10.0.0.0/8, as people often write it.
    outgoing = OutgoingConfig(include=["10.1.2.3/8", "127.0.0.0/8", "::1/128"])
    assert outgoing.matches("10.200.0.1")
    assert not outgoing.matches("127.0.0.1")
    assert not outgoing.matches("::1")


def test_outgoing_matches_ignores_enabled() -> None:
    assert OutgoingConfig(enabled=False).matches("10.0.0.1")


def test_outgoing_matches_with_nothing_included() -> None:
    assert not OutgoingConfig(include=[]).matches("10.0.0.1")


@pytest.mark.parametrize("address", ["", "example.com", "10.0.0.0/8", "300.1.1.1"])
def test_outgoing_matches_rejects_non_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        OutgoingConfig().matches(address)


def test_exec_overrides(in_tmp: Path) -> None:
    path = write(
        "config.yaml",
        "env:\n"
        "  include: ['APP_*']\n"
        "  exclude: [APP_SECRET]\n"
        "  override: {A: file, B: file}\n"
        "outgoing:\n"
        "  exclude: [10.0.0.0/8]\n",
    )
    assert build_config(file=path, env={}, flags=NO_FLAGS).env.include == ["APP_*"]
    flags = Overrides(
        env_include=("DB_*", "APP_*"),
        env_exclude=("APP_TOKEN", "DB_PASSWORD"),
        env_override={"B": "flag", "C": "flag"},
        outgoing=False,
        outgoing_exclude=("192.168.0.0/16",),
    )
    config = build_config(file=path, env={}, flags=flags)
    # env_include replaces, the exclude lists are appended to, override is merged.
    assert config.env == EnvConfig(
        include=["DB_*", "APP_*"],
        exclude=["APP_SECRET", "APP_TOKEN", "DB_PASSWORD"],
        override={"A": "file", "B": "flag", "C": "flag"},
    )
    assert config.outgoing == OutgoingConfig(
        enabled=False, exclude=["10.0.0.0/8", "192.168.0.0/16"]
    )


def test_exec_overrides_without_a_file() -> None:
    flags = Overrides(env_exclude=["AWS_*"], outgoing_exclude=["::/0"], env_include=[])
    config = build_config(file=None, env={}, flags=flags)
    assert config.env.exclude == [*DEFAULT_ENV_EXCLUDE, "AWS_*"]
    assert config.env.include == []  # an empty include takes nothing from the target
    assert config.outgoing.exclude == ["::/0"]
    assert build_config(file=None, env={}, flags=Overrides(outgoing=True)).outgoing.enabled


def test_exec_overrides_leave_the_file_alone_when_not_given(in_tmp: Path) -> None:
    text = "env:\n  include: [X]\n  override: {A: '1'}\noutgoing:\n  enabled: false\n"
    path = write("config.yaml", text)
    assert build_config(file=path, env={}, flags=NO_FLAGS) == parse_config(yaml.safe_load(text))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            Overrides(outgoing_exclude=["10.0.0.0/8", "10.0.0.0/33"]),
            "outgoing.exclude: '10.0.0.0/33' is not an IP network",
        ),
        (Overrides(env_exclude=[""]), "env.exclude: '' must not be empty"),
        (Overrides(env_include=["*", ""]), "env.include: '' must not be empty"),
        (
            Overrides(env_override={"A=B": "x"}),
            "env.override: 'A=B' is not an environment variable name "
            "(it must not be empty or contain '=' or NUL)",
        ),
        (
            Overrides(env_override={"": "x"}),
            "env.override: '' is not an environment variable name "
            "(it must not be empty or contain '=' or NUL)",
        ),
        (
            Overrides(env_override={"A": "x\0"}),
            "env.override.A: 'x\\x00' must not contain a NUL character",
        ),
    ],
)
def test_exec_override_errors_name_the_key(flags: Overrides, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(file=None, env={}, flags=flags)
    assert str(caught.value) == message


def test_exec_override_errors_do_not_blame_the_file(in_tmp: Path) -> None:
    path = write("config.yaml", "outgoing:\n  exclude: [10.0.0.0/8, 10.1.0.0/16]\n")
    with pytest.raises(ConfigError) as caught:
        build_config(file=path, env={}, flags=Overrides(outgoing_exclude=["bad"]))
    # No index: it would count the file's two items.
    assert str(caught.value) == "outgoing.exclude: 'bad' is not an IP network"


# -------------------------------------------------------- schema and example


def test_json_schema() -> None:
    schema = json_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "netmirror configuration"
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert list(schema["properties"]) == [
        "target",
        "session",
        "ports",
        "agent",
        "pcap",
        "kubernetes",
        "env",
        "outgoing",
        "files",
        "port_forward",
        "incoming",
        "steal_probes",
    ]
    port = schema["$defs"]["PortConfig"]
    assert list(port["properties"]) == [
        "remote",
        "mode",
        "local",
        "local_host",
        "mirror",
        "http_filter",
    ]
    assert port["required"] == ["remote"]
    assert port["properties"]["remote"]["minimum"] == 1
    assert port["properties"]["remote"]["maximum"] == 65535
    assert port["properties"]["mode"]["enum"] == ["steal", "mirror", "off"]
    agent = schema["$defs"]["AgentConfig"]
    assert list(agent["properties"]) == [
        "image",
        "ttl",
        "ready_timeout",
        "mode",
        "namespace",
        "port",
    ]
    assert agent["properties"]["ttl"]["exclusiveMinimum"] == 0
    assert agent["properties"]["ttl"]["maximum"] == 3600
    env = schema["$defs"]["EnvConfig"]
    assert list(env["properties"]) == ["include", "exclude", "override"]
    assert env["properties"]["include"]["items"] == {"type": "string"}
    assert env["properties"]["override"]["additionalProperties"] == {"type": ["string", "integer"]}
    assert "PYTHONHOME" in env["properties"]["exclude"]["description"]
    outgoing = schema["$defs"]["OutgoingConfig"]
    assert list(outgoing["properties"]) == ["enabled", "include", "exclude", "dns", "udp", "method"]
    assert outgoing["properties"]["method"]["enum"] == ["auto", "transparent", "proxy"]
    assert outgoing["properties"]["enabled"]["type"] == "boolean"
    assert outgoing["properties"]["enabled"]["default"] is True
    assert "127.0.0.0/8" in outgoing["properties"]["exclude"]["description"]
    for section in ("env", "outgoing"):
        assert "netmirror exec" in schema["properties"][section]["description"]
    # Every field is documented, which is what makes the schema useful in editors.
    for properties in (
        schema["properties"],
        port["properties"],
        agent["properties"],
        env["properties"],
        outgoing["properties"],
    ):
        for name, spec in properties.items():
            assert spec.get("description"), name


def test_dump_example_is_a_valid_config(in_tmp: Path) -> None:
    text = dump_example()
    path = write("example.yaml", text)
    config = build_config(file=path, env={}, flags=NO_FLAGS)
    assert config.target == "netns/demo"
    assert config.session == "demo"
    assert [(port.remote, port.mode) for port in config.ports] == [
        (80, "steal"),
        (9090, "mirror"),
        (5432, "off"),
    ]
    assert config.ports[0].local_port == 8080
    assert config.agent == AgentConfig()
    assert all(len(line) <= 100 for line in text.splitlines())
    assert config.env == EnvConfig(override={"LOG_LEVEL": "debug"})
    assert config.outgoing == OutgoingConfig(exclude=["192.168.0.0/16"])
    for model in (Config, PortConfig, AgentConfig, EnvConfig, OutgoingConfig):
        for name in model.model_fields:
            assert f"{name}:" in text, name


# ------------------------------------------------------------------ fuzzing


@pytest.fixture(scope="module")
def fuzz_dir() -> Iterator[Path]:
    # Hypothesis runs many examples per test call; a function-scoped tmp_path would
    # be shared between them anyway, so a module-level directory is more honest.
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def assert_config_error_or_success(
    path: Path, text: str, env: dict[str, str], flags: Overrides
) -> None:
    path.write_text(text, encoding="utf-8")
    try:
        load_file(path)
        config = build_config(file=path, env=env, flags=flags)
    except ConfigError as err:
        message = str(err)
        assert message
        assert "\n" not in message
        assert len(message.splitlines()) == 1, message
    else:
        assert isinstance(config, Config)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_random_text_gives_config_error_or_config(fuzz_dir: Path, text: str) -> None:
    assert_config_error_or_success(fuzz_dir / "config.yaml", text, {}, NO_FLAGS)


KEYS = st.sampled_from(
    [
        "target",
        "session",
        "ports",
        "agent",
        "remote",
        "mode",
        "local",
        "local_host",
        "image",
        "ttl",
        "ready_timeout",
        "env",
        "outgoing",
        "include",
        "exclude",
        "override",
        "enabled",
        "dns",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["steal", "mirror", "off", "netns/x", "pod/a", "demo", "127.0.0.1", "80"])
    | st.sampled_from(["*", "LD_*", "10.0.0.0/8", "::/0", "10.0.0.0/33", "A=B", "a\0b"])
    | st.integers(min_value=0, max_value=70000)
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(KEYS | st.text(max_size=8) | st.integers(), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    document=DOCUMENTS,
    env=st.dictionaries(
        st.sampled_from(
            [
                "NETMIRROR_TARGET",
                "NETMIRROR_SESSION",
                "NETMIRROR_AGENT_IMAGE",
                "NETMIRROR_AGENT_TTL",
            ]
        ),
        st.text(max_size=12) | st.sampled_from(["netns/x", "demo", "2.5", "nan", "-1"]),
    ),
    steal=st.lists(
        st.text(max_size=8) | st.sampled_from(["80", "81:3000", "0", "80:"]), max_size=3
    ),
    mirror=st.lists(st.text(max_size=8) | st.sampled_from(["80", "82", "90:9000"]), max_size=3),
)
def test_random_documents_give_config_error_or_config(
    fuzz_dir: Path, document: Any, env: dict[str, str], steal: list[str], mirror: list[str]
) -> None:
    # Structured documents get past the YAML parser, so they exercise the model and
    # the layering far more than random text does.
    text = yaml.safe_dump({"ports": document} if isinstance(document, list) else document)
    flags = Overrides(steal=steal, mirror=mirror)
    assert_config_error_or_success(fuzz_dir / "config.yaml", text, env, flags)


# ------------------------------------------------------------------ http filters


@pytest.mark.parametrize(
    ("port", "message"),
    [
        (
            {"remote": 80, "http_filter": {"header": "x-dev: ("}},
            "ports[0].http_filter.header: 'x-dev: (' is not a valid regular expression "
            "(missing ), unterminated subpattern at position 7)",
        ),
        (
            {"remote": 80, "http_filter": {"any_of": [{"path": "/"}, {"method": 5}]}},
            "ports[0].http_filter.any_of[1].method: must be a string",
        ),
        (
            {"remote": 80, "http_filter": {"heder": "x"}},
            "ports[0].http_filter: unknown key 'heder' "
            "(expected one of header, path, method, any_of, all_of)",
        ),
        (
            {"remote": 80, "http_filter": {}},
            "ports[0].http_filter: empty filter (give header, path, method, any_of or all_of)",
        ),
        (
            {"remote": 80, "mode": "mirror", "http_filter": {"path": "^/"}},
            "ports[0].http_filter: applies to mode steal, not mirror",
        ),
    ],
)
def test_http_filter_errors_name_the_key(port: dict[str, Any], message: str) -> None:
    assert config_error({"ports": [port]}) == message


def test_http_filter_flags_apply_to_steal_ports() -> None:
    config = build_config(
        file=None,
        env={},
        flags=Overrides(steal=("80:3000",), http_filter={"header": "^x-dev: a$"}),
    )
    assert config.ports[0].http_filter == {"header": "^x-dev: a$"}
    with pytest.raises(ConfigError) as err:
        build_config(file=None, env={}, flags=Overrides(steal=("80",), http_filter={"path": "("}))
    assert str(err.value).startswith("--http-path: '(' is not a valid regular expression")
