"""Shared helpers for the protocol unit tests: raw frames, handshakes, pumping."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from netmirror.errors import AuthenticationError, ProtocolError
from netmirror.wire import Connection, DataReceived, Event, Limits, Role, State
from netmirror.wire.frames import CREDIT, HEADER, HEADER_SIZE, PING, FrameType

TOKEN = "s3cret-token"
SESSION = "session-1"

#: Smallest limits the protocol accepts; small windows make flow control easy to reach.
SMALL = Limits(
    max_frame_size=1024,
    max_control_size=512,
    max_streams=8,
    initial_window=4096,
    max_subscriptions=4,
)

DST = ("10.0.0.1", 8080)
SRC = ("10.0.0.2", 40000)


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    ftype: int
    stream_id: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        body = json.loads(self.payload)
        assert isinstance(body, dict)
        return body


# --------------------------------------------------------------------- encoding


def raw(ftype: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A frame with any type byte, even an unknown one."""
    return HEADER.pack(ftype, stream_id, len(payload)) + payload


def jframe(ftype: int, stream_id: int, body: Any) -> bytes:
    """A frame whose payload is ``body`` as JSON (need not be an object)."""
    return raw(ftype, stream_id, json.dumps(body).encode())


def data(stream_id: int, payload: bytes) -> bytes:
    return raw(FrameType.DATA, stream_id, payload)


def credit(stream_id: int, amount: int) -> bytes:
    return raw(FrameType.CREDIT, stream_id, CREDIT.pack(amount))


def shutdown(stream_id: int) -> bytes:
    return raw(FrameType.SHUTDOWN, stream_id)


def reset(stream_id: int, reason: bytes = b"") -> bytes:
    return raw(FrameType.RESET, stream_id, reason)


def ping(payload: int, ftype: FrameType = FrameType.PING) -> bytes:
    return raw(ftype, 0, PING.pack(payload))


def open_body(port: Any = 8080, dst: Any = DST, src: Any = SRC, **extra: Any) -> dict[str, Any]:
    return {"port": port, "dst": dst, "src": src, **extra}


def open_frame(stream_id: int, **fields: Any) -> bytes:
    return jframe(FrameType.OPEN, stream_id, open_body(**fields))


def hello_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "version": 1,
        "token": TOKEN,
        "session": SESSION,
        "window": 4096,
        "max_frame": 1024,
    }
    body.update(overrides)
    return body


def welcome_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "version": 1,
        "session": SESSION,
        "window": 4096,
        "max_frame": 1024,
        "info": {},
    }
    body.update(overrides)
    return body


def error_frame(code: str = "boom", message: str = "it broke") -> bytes:
    return jframe(FrameType.ERROR, 0, {"code": code, "message": message})


# --------------------------------------------------------------------- decoding


def parse_frames(buf: bytes) -> list[Frame]:
    """Split a byte string into whole frames; it must hold nothing else."""
    frames: list[Frame] = []
    offset = 0
    while offset < len(buf):
        assert len(buf) - offset >= HEADER_SIZE, "truncated header in output"
        ftype, stream_id, length = HEADER.unpack_from(buf, offset)
        start = offset + HEADER_SIZE
        assert start + length <= len(buf), "truncated payload in output"
        frames.append(Frame(ftype, stream_id, bytes(buf[start : start + length])))
        offset = start + length
    return frames


def single_frame(buf: bytes) -> Frame:
    frames = parse_frames(buf)
    assert len(frames) == 1, frames
    return frames[0]


def last_error(buf: bytes) -> dict[str, Any]:
    """The body of the ERROR frame that must end ``buf``."""
    frames = parse_frames(buf)
    assert frames, "nothing queued; an ERROR frame was expected"
    last = frames[-1]
    assert last.ftype == FrameType.ERROR, last
    assert last.stream_id == 0
    body = last.json()
    assert isinstance(body.get("code"), str)
    assert isinstance(body.get("message"), str)
    return body


# ---------------------------------------------------------------- connections


def new_daemon(limits: Limits | None = None, token: str = TOKEN) -> Connection:
    return Connection(Role.DAEMON, token=token, session=SESSION, limits=limits)


def new_agent(
    limits: Limits | None = None,
    session: str = SESSION,
    info: dict[str, Any] | None = None,
) -> Connection:
    return Connection(Role.AGENT, token=TOKEN, session=session, limits=limits, info=info)


def connected(
    daemon_limits: Limits | None = None,
    agent_limits: Limits | None = None,
    info: dict[str, Any] | None = None,
) -> tuple[Connection, Connection]:
    """A daemon and an agent past the handshake, with nothing queued."""
    daemon = new_daemon(daemon_limits)
    agent = new_agent(agent_limits, info=info)
    agent.receive_data(daemon.data_to_send())
    daemon.receive_data(agent.data_to_send())
    assert agent.state is State.OPEN and daemon.state is State.OPEN
    agent.events_received()
    daemon.events_received()
    assert agent.data_to_send() == b"" and daemon.data_to_send() == b""
    return daemon, agent


def agent_with_hello(limits: Limits | None = None, **hello: Any) -> Connection:
    """An agent that accepted a (daemon-less) HELLO, with nothing queued."""
    agent = new_agent(limits)
    agent.receive_data(jframe(FrameType.HELLO, 0, hello_body(**hello)))
    assert agent.state is State.OPEN
    agent.events_received()
    agent.data_to_send()
    return agent


def daemon_with_welcome(limits: Limits | None = None, **welcome: Any) -> Connection:
    """A daemon that accepted a (agent-less) WELCOME, with nothing queued."""
    daemon = new_daemon(limits)
    daemon.data_to_send()
    daemon.receive_data(jframe(FrameType.WELCOME, 0, welcome_body(**welcome)))
    assert daemon.state is State.OPEN
    daemon.events_received()
    return daemon


def pump(src: Connection, dst: Connection) -> list[Event]:
    """Deliver everything ``src`` queued to ``dst``; returns ``dst``'s events."""
    dst.receive_data(src.data_to_send())
    return dst.events_received()


def stream_bytes(conn: Connection, messages: list[bytes]) -> bytes:
    """Feed ``messages`` one by one to ``conn``; returns the stream bytes it received."""
    got = bytearray()
    for message in messages:
        conn.receive_data(message)
        for event in conn.events_received():
            if isinstance(event, DataReceived):
                got += event.data
    return bytes(got)


def expect_violation(
    conn: Connection,
    buf: bytes,
    match: str | None = None,
    *,
    code: str = "protocol",
) -> ProtocolError:
    """Feed ``buf``: it must raise, close the tunnel and queue an ERROR with ``code``."""
    with pytest.raises(ProtocolError, match=match) as info:
        conn.receive_data(buf)
    assert isinstance(info.value, AuthenticationError) == (code == "auth")
    assert conn.state is State.CLOSED
    body = last_error(conn.data_to_send())
    assert body["code"] == code
    assert body["message"] == str(info.value)[:1024]
    # A closed tunnel takes nothing more.
    with pytest.raises(ProtocolError, match="closed"):
        conn.receive_data(b"")
    return info.value
