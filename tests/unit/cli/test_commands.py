"""The CLI's commands that need no namespace: config, and status/down with no sessions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netmirror.cli.commands import main
from netmirror.wire.session import SessionDir, SessionRecord


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("NETMIRROR_STATE_DIR", str(path))
    return path


def test_config_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "nm.yaml"
    cfg.write_text("target: netns/pod1\nports:\n  - remote: 80\n    local: 3000\n")
    assert main(["config", "check", str(cfg)]) == 0
    assert "ok, netmirror config (1 port(s), target netns/pod1)" in capsys.readouterr().out


def test_config_check_and_convert_a_mirrord_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "mirrord.json"
    cfg.write_text(
        '{"target": "deployment/client", "telemetry": false,'
        ' "feature": {"network": {"incoming": {"mode": "steal", "ports": [8080]}}}}'
    )
    assert main(["config", "check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "ok, mirrord config (1 port(s), target deployment/client)" in out
    assert "mirrord key 'feature.network.incoming.mode' -> ports[].mode" in out
    assert "mirrord key 'telemetry' ignored: netmirror has no equivalent" in out
    assert main(["config", "convert", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "target: deployment/client\nports:\n- remote: 8080\n"
    assert captured.err == (
        "netmirror: warning: mirrord key 'telemetry' ignored: netmirror has no equivalent\n"
    )


def test_config_check_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "nm.yaml"
    cfg.write_text("ports:\n  - remote: 80\n  - remote: 81\n    mode: stael\n")
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err == "netmirror: nm.yaml: ports[1].mode: 'stael' is not one of steal, mirror, off\n"


def test_config_schema_is_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "netmirror configuration"
    assert {"target", "ports", "session", "agent"} <= set(schema["properties"])


def test_up_without_target_or_ports(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--steal", "80"]) == 2
    assert "no target" in capsys.readouterr().err
    assert main(["up", "--target", "netns/x"]) == 2
    assert "no ports to take" in capsys.readouterr().err


def test_down_and_status_with_nothing_running(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["down"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["down", "--session", "nope"]) == 0
    assert main(["status"]) == 0
    assert "no sessions running" in capsys.readouterr().out
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"sessions": [], "cleaned_stale": []}


def test_status_cleans_a_session_whose_daemon_is_gone(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sdir = SessionDir("ghost", state_dir)
    # pid 2**22+1 is above the kernel's pid_max default range: never alive.
    sdir.create(
        SessionRecord(name="ghost", target="netns/x", config={}, created=0, daemon_pid=2**22 + 1)
    )
    assert main(["status"]) == 0
    assert "session 'ghost' had ended" in capsys.readouterr().out
    assert not sdir.path.exists()


def test_logs_without_sessions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["logs"]) == 1
    assert capsys.readouterr().err == "netmirror: no sessions running\n"
