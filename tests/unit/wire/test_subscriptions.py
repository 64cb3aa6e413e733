"""SUBSCRIBE / UNSUBSCRIBE from the daemon and the agent's SUBSCRIBED answers."""

from __future__ import annotations

from typing import Any

import pytest

from netmirror.errors import ProtocolError
from netmirror.wire import (
    Limits,
    State,
    SubscribeRequested,
    SubscriptionAnswered,
    UnsubscribeRequested,
)
from netmirror.wire.frames import FrameType

from ._support import (
    connected,
    expect_violation,
    jframe,
    parse_frames,
    pump,
    single_frame,
)


def sub(request_id: Any, port: Any = 8080, mode: Any = "steal", **extra: Any) -> bytes:
    return jframe(FrameType.SUBSCRIBE, 0, {"id": request_id, "port": port, "mode": mode, **extra})


def unsub(request_id: Any, port: Any = 8080) -> bytes:
    return jframe(FrameType.UNSUBSCRIBE, 0, {"id": request_id, "port": port})


def answered(request_id: Any, port: Any = 8080, ok: Any = True, **extra: Any) -> bytes:
    return jframe(FrameType.SUBSCRIBED, 0, {"id": request_id, "port": port, "ok": ok, **extra})


# ----------------------------------------------------------------- round trip


def test_subscribe_answer_unsubscribe_round_trip() -> None:
    daemon, agent = connected()
    rid = daemon.subscribe(8080, "steal", {"filter": "GET /"})
    out = daemon.data_to_send()
    frame = single_frame(out)
    assert frame.ftype == FrameType.SUBSCRIBE and frame.stream_id == 0
    assert frame.json() == {
        "id": rid,
        "port": 8080,
        "mode": "steal",
        "options": {"filter": "GET /"},
    }
    agent.receive_data(out)
    assert agent.events_received() == [SubscribeRequested(rid, 8080, "steal", {"filter": "GET /"})]
    assert agent.data_to_send() == b""  # no automatic answer

    agent.answer(rid, 8080, ok=True)
    out = agent.data_to_send()
    assert single_frame(out).json() == {"id": rid, "port": 8080, "ok": True, "error": ""}
    daemon.receive_data(out)
    assert daemon.events_received() == [SubscriptionAnswered(rid, 8080, True, "")]

    rid2 = daemon.unsubscribe(8080)
    assert rid2 > rid
    out = daemon.data_to_send()
    assert single_frame(out).json() == {"id": rid2, "port": 8080}
    agent.receive_data(out)
    assert agent.events_received() == [UnsubscribeRequested(rid2, 8080)]
    agent.answer(rid2, 8080, ok=True)
    assert pump(agent, daemon) == [SubscriptionAnswered(rid2, 8080, True, "")]


def test_mirror_mode_and_default_options() -> None:
    daemon, agent = connected()
    rid = daemon.subscribe(53, "mirror")
    assert pump(daemon, agent) == [SubscribeRequested(rid, 53, "mirror", {})]


def test_request_ids_increase() -> None:
    daemon, _agent = connected()
    ids = [daemon.subscribe(1000 + i, "steal") for i in range(3)] + [daemon.unsubscribe(1000)]
    assert ids == sorted(set(ids))
    assert len(parse_frames(daemon.data_to_send())) == 4


def test_answer_with_an_error() -> None:
    daemon, agent = connected()
    rid = daemon.subscribe(80, "steal")
    pump(daemon, agent)
    agent.answer(rid, 80, ok=False, error="port 80 is taken by session x")
    assert pump(agent, daemon) == [
        SubscriptionAnswered(rid, 80, False, "port 80 is taken by session x")
    ]


def test_answer_error_is_truncated() -> None:
    daemon, agent = connected()
    rid = daemon.subscribe(80, "steal")
    pump(daemon, agent)
    agent.answer(rid, 80, ok=False, error="e" * 5000)
    (event,) = pump(agent, daemon)
    assert event == SubscriptionAnswered(rid, 80, False, "e" * 1024)


def test_subscribed_without_error_field() -> None:
    daemon, _agent = connected()
    daemon.receive_data(answered(1, ok=True))
    assert daemon.events_received() == [SubscriptionAnswered(1, 8080, True, "")]


def test_many_subscriptions_in_one_chunk() -> None:
    daemon, agent = connected()
    ids = [daemon.subscribe(p, "steal") for p in (80, 443, 8080)]
    events = pump(daemon, agent)
    assert [(e.request_id, e.port) for e in events if isinstance(e, SubscribeRequested)] == list(
        zip(ids, (80, 443, 8080), strict=True)
    )


# ---------------------------------------------------------------- unknown mode


@pytest.mark.parametrize("mode", ["copy", "", "STEAL", "steal ", "x" * 100])
def test_unknown_mode_is_answered_without_event(mode: str) -> None:
    daemon, agent = connected()
    rid = daemon.subscribe(8080, mode)
    pump(daemon, agent)
    assert agent.events_received() == []
    assert agent.state is State.OPEN
    out = agent.data_to_send()
    body = single_frame(out).json()
    assert body["id"] == rid and body["port"] == 8080 and body["ok"] is False
    assert "unknown mode" in body["error"]
    assert len(body["error"]) < 60  # the mode is clipped in the message
    daemon.receive_data(out)
    (event,) = daemon.events_received()
    assert isinstance(event, SubscriptionAnswered)
    assert (event.request_id, event.port, event.ok) == (rid, 8080, False)
    # The refused request is not pending: its id may come again.
    agent.receive_data(sub(rid, mode="steal"))
    assert agent.events_received() == [SubscribeRequested(rid, 8080, "steal", {})]


# ------------------------------------------------------------ max_subscriptions


def test_max_subscriptions_counts_pending_requests() -> None:
    daemon, agent = connected(agent_limits=Limits(max_subscriptions=2))
    r1 = daemon.subscribe(1, "steal")
    r2 = daemon.subscribe(2, "steal")
    r3 = daemon.subscribe(3, "mirror")
    events = pump(daemon, agent)
    assert [e.request_id for e in events if isinstance(e, SubscribeRequested)] == [r1, r2]
    answers = pump(agent, daemon)
    assert len(answers) == 1
    (refusal,) = answers
    assert isinstance(refusal, SubscriptionAnswered)
    assert (refusal.request_id, refusal.port, refusal.ok) == (r3, 3, False)
    assert refusal.error == "too many subscriptions (limit 2)"


def test_max_subscriptions_counts_granted_ports() -> None:
    daemon, agent = connected(agent_limits=Limits(max_subscriptions=2))
    for port in (1, 2):
        rid = daemon.subscribe(port, "steal")
        pump(daemon, agent)
        agent.answer(rid, port, ok=True)
        pump(agent, daemon)
    rid = daemon.subscribe(3, "steal")
    assert pump(daemon, agent) == []
    assert pump(agent, daemon) == [
        SubscriptionAnswered(rid, 3, False, "too many subscriptions (limit 2)")
    ]


def test_refused_subscription_frees_its_slot() -> None:
    daemon, agent = connected(agent_limits=Limits(max_subscriptions=1))
    rid = daemon.subscribe(1, "steal")
    pump(daemon, agent)
    agent.answer(rid, 1, ok=False, error="no")
    pump(agent, daemon)
    rid = daemon.subscribe(2, "steal")
    assert pump(daemon, agent) == [SubscribeRequested(rid, 2, "steal", {})]


def test_unsubscribe_frees_its_slot() -> None:
    daemon, agent = connected(agent_limits=Limits(max_subscriptions=1))
    rid = daemon.subscribe(1, "steal")
    pump(daemon, agent)
    agent.answer(rid, 1, ok=True)
    rid = daemon.unsubscribe(1)
    assert pump(daemon, agent) == [UnsubscribeRequested(rid, 1)]
    agent.answer(rid, 1, ok=True)
    rid = daemon.subscribe(2, "steal")
    assert pump(daemon, agent) == [SubscribeRequested(rid, 2, "steal", {})]


def test_failed_unsubscribe_keeps_its_slot() -> None:
    daemon, agent = connected(agent_limits=Limits(max_subscriptions=1))
    rid = daemon.subscribe(1, "steal")
    pump(daemon, agent)
    agent.answer(rid, 1, ok=True)
    rid = daemon.unsubscribe(1)
    pump(daemon, agent)
    agent.answer(rid, 1, ok=False, error="could not remove the rules")
    rid = daemon.subscribe(2, "steal")
    # Port 1 is still taken: a second port exceeds the limit of one.
    assert pump(daemon, agent) == []


# ------------------------------------------------------------ wrong direction


def test_subscribe_sent_to_the_daemon_is_an_error() -> None:
    daemon, _agent = connected()
    expect_violation(daemon, sub(1), "SUBSCRIBE may only be sent to the agent")


def test_unsubscribe_sent_to_the_daemon_is_an_error() -> None:
    daemon, _agent = connected()
    expect_violation(daemon, unsub(1), "UNSUBSCRIBE may only be sent to the agent")


def test_subscribed_sent_to_the_agent_is_an_error() -> None:
    _daemon, agent = connected()
    expect_violation(agent, answered(1), "SUBSCRIBED may only be sent to the daemon")


def test_local_role_checks() -> None:
    daemon, agent = connected()
    with pytest.raises(ProtocolError, match="only the daemon"):
        agent.subscribe(80, "steal")
    with pytest.raises(ProtocolError, match="only the daemon"):
        agent.unsubscribe(80)
    with pytest.raises(ProtocolError, match="only the agent"):
        daemon.answer(1, 80, ok=True)
    assert agent.data_to_send() == daemon.data_to_send() == b""
    assert agent.state is daemon.state is State.OPEN


@pytest.mark.parametrize(
    ("frame", "to"),
    [
        (jframe(FrameType.SUBSCRIBE, 2, {"id": 1, "port": 80, "mode": "steal"}), "agent"),
        (jframe(FrameType.UNSUBSCRIBE, 1, {"id": 1, "port": 80}), "agent"),
        (jframe(FrameType.SUBSCRIBED, 3, {"id": 1, "port": 80, "ok": True}), "daemon"),
    ],
)
def test_control_frames_on_a_stream(frame: bytes, to: str) -> None:
    daemon, agent = connected()
    expect_violation(agent if to == "agent" else daemon, frame, "on stream")


# ------------------------------------------------------------ request ids


def test_duplicate_pending_subscribe_id() -> None:
    _daemon, agent = connected()
    agent.receive_data(sub(7, port=80))
    assert agent.events_received() == [SubscribeRequested(7, 80, "steal", {})]
    expect_violation(agent, sub(7, port=81), "request id 7 is already in use")
    assert agent.events_received() == []


def test_duplicate_pending_unsubscribe_id() -> None:
    _daemon, agent = connected()
    agent.receive_data(unsub(9))
    expect_violation(agent, unsub(9), "request id 9 is already in use")


def test_unsubscribe_reusing_a_pending_subscribe_id() -> None:
    _daemon, agent = connected()
    agent.receive_data(sub(4))
    expect_violation(agent, unsub(4), "already in use")


def test_duplicate_id_with_unknown_mode_is_still_an_error() -> None:
    _daemon, agent = connected()
    agent.receive_data(sub(4))
    expect_violation(agent, sub(4, mode="bogus"), "already in use")


def test_answered_id_may_be_reused() -> None:
    _daemon, agent = connected()
    agent.receive_data(sub(5))
    agent.answer(5, 8080, ok=True)
    agent.receive_data(unsub(5))
    assert agent.events_received() == [
        SubscribeRequested(5, 8080, "steal", {}),
        UnsubscribeRequested(5, 8080),
    ]
    assert agent.state is State.OPEN


# ------------------------------------------------------------ malformed bodies


@pytest.mark.parametrize(
    "frame",
    [
        sub(True),
        sub("1"),
        sub(None),
        sub(1.5),
        sub(1, port=0),
        sub(1, port=65536),
        sub(1, port=True),
        sub(1, port="80"),
        sub(1, mode=1),
        sub(1, mode=None),
        sub(1, options=[]),
        sub(1, options="x"),
        jframe(FrameType.SUBSCRIBE, 0, [1, 80, "steal"]),
        jframe(FrameType.SUBSCRIBE, 0, {"port": 80, "mode": "steal"}),
        unsub(False),
        unsub(1, port=-1),
        unsub(1, port=None),
    ],
)
def test_malformed_requests(frame: bytes) -> None:
    _daemon, agent = connected()
    expect_violation(agent, frame, "malformed")
    assert agent.events_received() == []


@pytest.mark.parametrize(
    "frame",
    [
        answered(True),
        answered("1"),
        answered(1, port=0),
        answered(1, port=False),
        answered(1, ok=1),
        answered(1, ok="yes"),
        answered(1, ok=None),
        answered(1, error=None),
        answered(1, error=["x"]),
        jframe(FrameType.SUBSCRIBED, 0, None),
    ],
)
def test_malformed_answers(frame: bytes) -> None:
    daemon, _agent = connected()
    expect_violation(daemon, frame, "malformed")
    assert daemon.events_received() == []


def test_stats_flow_from_agent_to_daemon_only() -> None:
    from netmirror.errors import ProtocolError
    from netmirror.wire import StatsReported

    daemon, agent = connected()
    agent.report_stats({"capture": {"packets": 3}})
    daemon.receive_data(agent.data_to_send())
    assert daemon.events_received() == [StatsReported({"capture": {"packets": 3}})]
    with pytest.raises(ProtocolError):
        daemon.report_stats({})
