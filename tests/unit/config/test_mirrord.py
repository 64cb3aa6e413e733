"""mirrord config files read as netmirror's: no I/O but the files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netmirror.config import Overrides, build_config, parse_config
from netmirror.config.mirrord import Note, convert, is_mirrord


def test_the_example_users_keep() -> None:
    data = {"target": "deployment/client", "feature": {"network": {"incoming": "steal"}}}
    assert is_mirrord(data)
    out, notes = convert(data)
    assert out["target"] == "deployment/client"
    # No ports named: exec applies the mode to the ports the command listens on.
    assert out["incoming"] == {"mode": "steal"}
    assert all(n.mapped_to is not None for n in notes)


def test_netmirrors_own_configs_are_not_mirrords() -> None:
    assert not is_mirrord({"target": "pod/web", "ports": [{"remote": 8080}]})
    assert not is_mirrord({})
    assert is_mirrord({"target": {"path": "pod/web", "namespace": "shop"}})


def test_incoming_ports_mapping_ignore_and_http_filter() -> None:
    out, notes = convert(
        {
            "target": {"path": "deployment/web", "namespace": "shop"},
            "feature": {
                "network": {
                    "incoming": {
                        "mode": "steal",
                        "ports": [8080, 9090],
                        "ignore_ports": [9090],
                        "port_mapping": [[3000, 8080]],
                        "http_filter": {
                            "any_of": [{"header": "^x-dev: me$"}, {"path": "^/me/"}],
                            "ports": [8080],
                        },
                    }
                }
            },
        }
    )
    assert out["target"] == "deployment/web"
    assert out["kubernetes"] == {"namespace": "shop"}
    assert out["ports"] == [
        {
            "remote": 8080,
            "mode": "steal",
            "local": 3000,
            "http_filter": {"any_of": [{"header": "^x-dev: me$"}, {"path": "^/me/"}]},
        }
    ]
    assert all(n.mapped_to is not None for n in notes)
    config = parse_config(out, source="mirrord.json")
    assert config.ports[0].local == 3000 and config.ports[0].http_filter is not None


def test_outgoing_dns_env_fs_agent_and_unknown_keys() -> None:
    out, notes = convert(
        {
            "target": "web-1",
            "feature": {
                "network": {
                    "outgoing": {"tcp": True, "udp": True, "filter": {"local": ["10.1.0.0/16"]}},
                    "dns": {"enabled": False},
                },
                "env": {"include": "APP_*;DB_URL", "unset": ["SECRET"], "env_file": ".env"},
                "fs": {"mode": "read", "read_write": ["/data/.*", "\\.log$"]},
                "hostname": True,
            },
            "agent": {
                "image": "reg/agent:1",
                "ttl": 30,
                "ephemeral": False,
                "namespace": "mirrord-agents",
            },
            "kube_context": "staging",
            "telemetry": False,
        }
    )
    assert out["target"] == "pod/web-1"
    assert out["outgoing"] == {
        "enabled": True,
        "udp": True,
        "exclude": ["10.1.0.0/16"],
        "dns": False,
    }
    assert out["env"] == {"include": ["APP_*", "DB_URL"], "exclude": ["SECRET"]}
    assert out["files"] == {"enabled": True, "read_write": ["/data/**"]}
    assert out["agent"] == {
        "image": "reg/agent:1",
        "ttl": 30,
        "mode": "job",
        "namespace": "mirrord-agents",
    }
    assert out["kubernetes"] == {"context": "staging"}
    ignored = {n.key for n in notes if n.mapped_to is None}
    assert ignored == {
        "feature.env.env_file",
        "feature.fs.read_write",  # the regex that names no path
        "feature.hostname",
        "telemetry",
    }
    parse_config(out, source="mirrord.json")  # valid as netmirror's


def test_a_mirrord_file_builds_a_config_with_its_notes(tmp_path: Path) -> None:
    path = tmp_path / "mirrord.json"
    path.write_text(
        json.dumps(
            {
                "target": "netns/box",
                "feature": {"network": {"incoming": {"mode": "mirror", "ports": [80]}}},
                "pause": True,
            }
        )
    )
    notes: list[Note] = []
    config = build_config(file=path, env={}, flags=Overrides(), notes=notes)
    assert config.target == "netns/box"
    assert [(p.remote, p.mode) for p in config.ports] == [(80, "mirror")]
    assert [n.line() for n in notes if n.mapped_to is None] == [
        "mirrord key 'pause' ignored: netmirror has no equivalent"
    ]


@pytest.mark.parametrize("bad", [{"feature": 3}, {"feature": {"network": {"incoming": 5}}}])
def test_odd_values_are_ignored_with_a_note_not_a_crash(bad: dict[str, object]) -> None:
    _out, notes = convert(bad)
    assert notes and all(n.mapped_to is None for n in notes)


def test_wrong_shapes_are_notes_never_errors() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=12,
    )
    keys = st.sampled_from(
        ["ports", "port_mapping", "ignore_ports", "http_filter", "mode", "outgoing", "env"]
    )

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(keys, json_values, max_size=4), json_values, json_values)
    def check(incoming: dict[str, object], env: object, agent: object) -> None:
        convert(
            {
                "target": "deployment/web",
                "feature": {"network": {"incoming": incoming, "outgoing": env}, "env": env},
                "agent": agent,
                "kube_context": agent,
            }
        )

    check()


def test_strings_where_lists_belong_are_not_read_letter_by_letter() -> None:
    out, notes = convert(
        {
            "feature": {
                "network": {"incoming": {"mode": "steal", "ports": [80], "ignore_ports": "80"}},
                "env": {"unset": "B", "exclude": "A"},
            }
        }
    )
    assert out["ports"] == [{"remote": 80, "mode": "steal"}]  # the bad ignore_ports is a note
    assert "feature.network.incoming.ignore_ports" in {n.key for n in notes if n.mapped_to is None}
    assert out["env"]["exclude"] == ["B", "A"] or out["env"]["exclude"] == ["A", "B"]
