"""Valid frame streams to mutate, cheap fresh connections, and the fuzz invariants."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from netmirror.errors import AuthenticationError, ProtocolError
from netmirror.wire import Connection, ErrorReceived, Limits, Role, State
from netmirror.wire.frames import FrameType

from ._support import (
    DST,
    SESSION,
    SRC,
    TOKEN,
    Frame,
    connected,
    credit,
    data,
    hello_body,
    jframe,
    last_error,
    open_frame,
    parse_frames,
    ping,
    welcome_body,
)

#: Small limits so that windows, frame sizes and stream counts are easy to reach.
FUZZ_LIMITS = Limits(
    max_frame_size=1024,
    max_control_size=1024,
    max_streams=6,
    initial_window=3000,
    max_subscriptions=3,
)

HELLO = jframe(FrameType.HELLO, 0, hello_body(window=3000, max_frame=1024))
WELCOME = jframe(FrameType.WELCOME, 0, welcome_body(window=3000, max_frame=1024))


def _open(conn: Connection, count: int) -> None:
    for port in range(80, 80 + count):
        conn.open_stream(port=port, original_dst=DST, client=SRC)
    conn.data_to_send()
    conn.events_received()


def fresh_agent() -> Connection:
    """An agent past the handshake that opened streams 1, 3 and 5, nothing queued."""
    agent = Connection(Role.AGENT, token=TOKEN, session=SESSION, limits=FUZZ_LIMITS)
    agent.receive_data(HELLO)
    _open(agent, 3)
    return agent


def fresh_daemon() -> Connection:
    """A daemon past the handshake that opened streams 2 and 4, nothing queued."""
    daemon = Connection(Role.DAEMON, token=TOKEN, session=SESSION, limits=FUZZ_LIMITS)
    daemon.data_to_send()
    daemon.receive_data(WELCOME)
    _open(daemon, 2)
    return daemon


def new_agent_in_handshake() -> Connection:
    return Connection(Role.AGENT, token=TOKEN, session=SESSION, limits=FUZZ_LIMITS)


def new_daemon_in_handshake() -> Connection:
    daemon = Connection(Role.DAEMON, token=TOKEN, session=SESSION, limits=FUZZ_LIMITS)
    daemon.data_to_send()
    return daemon


def _scenario() -> tuple[bytes, bytes]:
    """A scripted conversation; returns (daemon -> agent, agent -> daemon) after HELLO.

    The agent opens streams 1, 3 and 5 and the daemon 2 and 4, so the bytes are valid
    input for :func:`fresh_agent` and :func:`fresh_daemon`.
    """
    daemon, agent = connected(FUZZ_LIMITS, FUZZ_LIMITS)
    to_agent: list[bytes] = []
    to_daemon: list[bytes] = []

    def a2d() -> None:
        out = agent.data_to_send()
        to_daemon.append(out)
        daemon.receive_data(out)
        daemon.events_received()

    def d2a() -> None:
        out = daemon.data_to_send()
        to_agent.append(out)
        agent.receive_data(out)
        agent.events_received()

    _ = [agent.open_stream(port=p, original_dst=DST, client=SRC) for p in (80, 443)]
    _ = [daemon.open_stream(port=p, original_dst=DST, client=SRC) for p in (81, 444)]
    a2d()
    d2a()
    req = daemon.subscribe(8080, "steal", {"filter": "x"})
    daemon.subscribe(8081, "bogus")
    daemon.ping(42)
    d2a()
    agent.answer(req, 8080, ok=True)
    agent.ping(7)
    agent.send_data(1, b"request one " * 30)
    agent.send_data(3, bytes(range(256)) * 5)
    a2d()
    daemon.send_data(1, b"response " * 200)
    daemon.grant(1, 360)
    daemon.send_data(2, b"x" * 2500)
    daemon.shutdown(2)
    daemon.reset(4, "refused")
    daemon.unsubscribe(8080)
    d2a()
    agent.grant(1, 1000)
    agent.grant(2, 2500)
    agent.send_data(2, b"back" * 10)
    agent.shutdown(1)
    agent.shutdown(2)
    agent.reset(3, "bye")
    agent.answer(req + 2, 8080, ok=True)
    agent.open_stream(port=9000, original_dst=("::1", 0), client=("", 0), info={"k": [1]})
    a2d()
    daemon.send_data(5, b"last")
    daemon.shutdown(5)
    daemon.shutdown(1)
    d2a()
    return b"".join(to_agent), b"".join(to_daemon)


TO_AGENT, TO_DAEMON = _scenario()

#: The handshake plus frames that need no locally opened stream.
AGENT_WITH_HANDSHAKE = b"".join(
    [
        HELLO,
        open_frame(2),
        data(2, b"hello"),
        jframe(FrameType.SUBSCRIBE, 0, {"id": 1, "port": 80, "mode": "mirror", "options": {}}),
        ping(3),
        credit(2, 10),
    ]
)
DAEMON_WITH_HANDSHAKE = b"".join(
    [
        WELCOME,
        open_frame(1),
        data(1, b"hi"),
        jframe(FrameType.SUBSCRIBED, 0, {"id": 1, "port": 80, "ok": False, "error": "no"}),
        ping(3, FrameType.PONG),
    ]
)

#: Name -> (base stream, factory of the connection it is valid for).
BASES: dict[str, tuple[bytes, Callable[[], Connection]]] = {
    "to_agent": (TO_AGENT, fresh_agent),
    "to_daemon": (TO_DAEMON, fresh_daemon),
    "agent_handshake": (AGENT_WITH_HANDSHAKE, new_agent_in_handshake),
    "daemon_handshake": (DAEMON_WITH_HANDSHAKE, new_daemon_in_handshake),
}

#: Every single valid frame of the base streams, with its factory.
FRAME_LIBRARY: list[tuple[Frame, Callable[[], Connection]]] = [
    (frame, factory) for stream, factory in BASES.values() for frame in parse_frames(stream)
]


class Outcome:
    """What feeding one connection did, for statistics."""

    __slots__ = ("accepted", "violations")

    def __init__(self) -> None:
        self.accepted = 0
        self.violations = 0


def feed_checked(conn: Connection, chunks: Iterable[bytes], outcome: Outcome | None = None) -> bool:
    """Feed ``chunks`` to ``conn`` and check the invariants; False once it is closed.

    * only :class:`ProtocolError` may come out of ``receive_data``;
    * after one the tunnel is CLOSED and the output ends with an ERROR frame whose
      code is ``auth`` for an authentication error and ``protocol`` otherwise;
    * unless the peer's own ERROR closed the tunnel first (then we owe it nothing);
    * without one, the state is unchanged except for that peer ERROR.
    """
    peer_error = False
    for chunk in chunks:
        before = conn.state
        try:
            conn.receive_data(chunk)
        except ProtocolError as exc:
            # Any other exception type escapes and fails the test.
            events = conn.events_received()
            peer_error = peer_error or any(isinstance(e, ErrorReceived) for e in events)
            assert conn.state is State.CLOSED, conn.state
            out = conn.data_to_send()
            if before is State.CLOSED:
                assert "closed" in str(exc)
                assert out == b""
            elif not peer_error:
                body = last_error(out)
                expected = "auth" if isinstance(exc, AuthenticationError) else "protocol"
                assert body["code"] == expected, (body, exc)
                assert body["message"] == str(exc)[:1024]
            if outcome is not None:
                outcome.violations += 1
            return False
        events = conn.events_received()
        peer_error = peer_error or any(isinstance(e, ErrorReceived) for e in events)
        if peer_error:
            assert conn.state is State.CLOSED
        else:
            assert conn.state is State.OPEN or before is conn.state is State.HANDSHAKE
    if outcome is not None:
        outcome.accepted += 1
    out = conn.data_to_send()
    if out and not peer_error:
        # Whatever it queued is well-formed frames, and no ERROR unless it failed.
        assert all(f.ftype != FrameType.ERROR for f in parse_frames(out))
    return conn.state is not State.CLOSED


def check_bases() -> None:
    """Each base stream is accepted whole by its factory's connection."""
    for name, (stream, factory) in BASES.items():
        conn = factory()
        conn.receive_data(stream)
        assert conn.state is State.OPEN, name
        assert conn.events_received(), name
