"""REQUEST / REPLY: the daemon asks the agent to resolve a name or read the environment."""

from __future__ import annotations

import pytest

from netmirror.wire import Limits, ReplyReceived, RequestReceived, State
from netmirror.wire.frames import FrameType

from ._support import connected, expect_violation, jframe, pump, single_frame


def test_request_reply_round_trip() -> None:
    daemon, agent = connected()
    rid = daemon.request("resolve", {"name": "redis", "type": "A"})
    out = daemon.data_to_send()
    frame = single_frame(out)
    assert frame.ftype == FrameType.REQUEST and frame.stream_id == 0
    assert frame.json() == {"id": rid, "op": "resolve", "args": {"name": "redis", "type": "A"}}
    agent.receive_data(out)
    assert agent.events_received() == [
        RequestReceived(rid, "resolve", {"name": "redis", "type": "A"})
    ]
    agent.reply(rid, {"rcode": "NOERROR", "records": ["10.0.0.5"]})
    assert pump(agent, daemon) == [
        ReplyReceived(rid, True, {"rcode": "NOERROR", "records": ["10.0.0.5"]})
    ]
    # Answering twice sends nothing the second time.
    agent.reply(rid, {})
    assert agent.data_to_send() == b""


def test_error_reply() -> None:
    daemon, agent = connected()
    rid = daemon.request("environ")
    pump(daemon, agent)
    agent.reply(rid, error="no process to read")
    assert pump(agent, daemon) == [ReplyReceived(rid, False, {}, "no process to read")]


def test_unknown_op_is_answered_not_fatal() -> None:
    daemon, agent = connected()
    rid = daemon.request("environ")
    daemon.data_to_send()
    agent.receive_data(jframe(FrameType.REQUEST, 0, {"id": rid, "op": "format-disk"}))
    assert agent.events_received() == []
    assert agent.state is State.OPEN
    daemon.receive_data(agent.data_to_send())
    (event,) = daemon.events_received()
    assert isinstance(event, ReplyReceived) and not event.ok
    assert "unknown request 'format-disk'" in event.error


def test_daemon_refuses_unknown_op_locally() -> None:
    daemon, _ = connected()
    with pytest.raises(ValueError, match="unknown request"):
        daemon.request("format-disk")


def test_too_many_requests_are_refused() -> None:
    daemon, agent = connected(agent_limits=Limits(max_requests=2))
    ids = [daemon.request("environ") for _ in range(3)]
    events = pump(daemon, agent)
    assert [e.request_id for e in events if isinstance(e, RequestReceived)] == ids[:2]
    replies = pump(agent, daemon)
    assert replies == [ReplyReceived(ids[2], False, {}, "too many requests (limit 2)")]
    # Once one is answered, there is room again.
    agent.reply(ids[0], {})
    pump(agent, daemon)
    rid = daemon.request("environ")
    assert pump(daemon, agent) == [RequestReceived(rid, "environ", {})]


def test_large_reply_within_the_reply_limit() -> None:
    daemon, agent = connected()
    rid = daemon.request("environ")
    pump(daemon, agent)
    env = {f"VAR_{i}": "x" * 100 for i in range(1000)}  # ~110 KB: beyond a control frame
    agent.reply(rid, {"env": env})
    (event,) = pump(agent, daemon)
    assert isinstance(event, ReplyReceived) and event.result["env"] == env


def test_reply_too_large_becomes_an_error() -> None:
    daemon, agent = connected(agent_limits=Limits(max_reply_size=4096))
    rid = daemon.request("environ")
    pump(daemon, agent)
    agent.reply(rid, {"env": {"BIG": "x" * 10000}})
    assert pump(agent, daemon) == [ReplyReceived(rid, False, {}, "the answer is too large to send")]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"op": "environ"}, "'id' must be int"),
        ({"id": "1", "op": "environ"}, "'id' must be int"),
        ({"id": 1, "op": 5}, "'op' must be str"),
        ({"id": 1, "op": "environ", "args": []}, "args must be an object"),
    ],
)
def test_malformed_requests_close_the_tunnel(body: dict[str, object], match: str) -> None:
    _, agent = connected()
    expect_violation(agent, jframe(FrameType.REQUEST, 0, body), match)


def test_reused_request_id_is_a_violation() -> None:
    daemon, agent = connected()
    daemon.request("environ")
    pump(daemon, agent)
    expect_violation(
        agent, jframe(FrameType.REQUEST, 0, {"id": 1, "op": "environ"}), "already in use"
    )


def test_reply_to_nothing_is_a_violation() -> None:
    daemon, _ = connected()
    expect_violation(daemon, jframe(FrameType.REPLY, 0, {"id": 9, "ok": True}), "not pending")


def test_requests_only_go_one_way() -> None:
    daemon, agent = connected()
    with pytest.raises(Exception, match="only the daemon"):
        agent.request("environ")
    expect_violation(
        daemon, jframe(FrameType.REQUEST, 0, {"id": 1, "op": "environ"}), "only be sent to"
    )
    expect_violation(agent, jframe(FrameType.REPLY, 0, {"id": 1, "ok": True}), "only be sent to")


def test_reply_over_the_limit_is_a_violation() -> None:
    daemon, _ = connected(daemon_limits=Limits(max_reply_size=1024))
    daemon.request("environ")
    daemon.data_to_send()
    big = jframe(FrameType.REPLY, 0, {"id": 1, "ok": True, "result": {"x": "y" * 2000}})
    expect_violation(daemon, big, "exceeds the limit of 1024")
