"""The typed records both sides exchange: STATS bodies and ``netmirror status``."""

from __future__ import annotations

import json

import pytest

from netmirror.wire.stats import (
    AgentReport,
    AgentStatus,
    CaptureStats,
    HttpShareStats,
    HttpStatus,
    MirrorCounters,
    PortReport,
    PortStatus,
    SessionStatus,
    from_json,
    to_json,
)


def test_an_agent_report_survives_the_wire() -> None:
    report = AgentReport(
        ports={
            8080: PortReport(mirror=MirrorCounters(flows=3, gaps=1, dropped=2)),
            9090: PortReport(http=HttpShareStats(matched=5, passed=7, order=1, sessions=["a"])),
        },
        capture=CaptureStats(packets=10, kernel_drops=1),
    )
    body = json.loads(json.dumps(report.to_wire()))
    # Mirror counters at the top of a port's entry, HTTP counters beside them.
    assert body["ports"]["8080"] == {
        "flows": 3,
        "partial": 0,
        "gaps": 1,
        "dropped": 2,
        "no_daemon": 0,
    }
    assert body["ports"]["9090"] == {
        "http": {"matched": 5, "passed": 7, "order": 1, "sessions": ["a"]}
    }
    assert AgentReport.from_wire(body) == report


def test_a_report_without_capture_or_ports() -> None:
    assert AgentReport().to_wire() == {"ports": {}}
    assert AgentReport.from_wire({"ports": {}, "capture": None}) == AgentReport()


def test_a_session_status_survives_the_wire() -> None:
    status = SessionStatus(
        session="s",
        state="ready",
        target="netns/pod",
        daemon_pid=12,
        started=1.5,
        agent=AgentStatus(state="connected", pid=13, backend="nft", addresses=["10.0.0.2/24"]),
        ports=[
            PortStatus(remote=80, mode="steal", local="127.0.0.1:3000", state="active", bytes_in=9),
            PortStatus(
                remote=81,
                mode="steal",
                local="127.0.0.1:3001",
                http=HttpStatus(filter="header ^x: y$", matched=2, sessions=["s", "t"]),
            ),
        ],
    )
    assert from_json(SessionStatus, json.loads(json.dumps(to_json(status)))) == status


def test_unknown_keys_are_ignored_and_missing_ones_take_defaults() -> None:
    got = from_json(MirrorCounters, {"flows": 1, "from_a_newer_agent": [1, 2]})
    assert got == MirrorCounters(flows=1)
    assert from_json(SessionStatus, {}) == SessionStatus()


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"ports": {"8080": {"flows": "3"}}}, "AgentReport.ports[8080].flows"),
        ({"ports": {"x": {}}}, "AgentReport.ports: bad key 'x'"),
        ({"ports": []}, "AgentReport.ports: expected an object"),
        ({"ports": {"1": []}}, "AgentReport.ports[1]: expected an object"),
        ({"capture": {"packets": True}}, "AgentReport.capture.packets: expected int"),
        ({"ports": {"1": {"http": {"sessions": "a"}}}}, "sessions: expected a list"),
        ([], "AgentReport: expected an object"),
    ],
)
def test_a_wrong_type_names_where_it_is(body: object, where: str) -> None:
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        AgentReport.from_wire(body)


def test_records_read_back_with_from_json() -> None:
    with pytest.raises(ValueError, match=r"SessionStatus.ports\[0\].remote: expected int"):
        from_json(SessionStatus, {"ports": [{"remote": "80"}]})


def test_numbers_stay_numbers() -> None:
    assert from_json(SessionStatus, {"started": 3}).started == 3.0
    with pytest.raises(ValueError):
        from_json(SessionStatus, {"started": "soon"})
