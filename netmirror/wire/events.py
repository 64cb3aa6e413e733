"""Events that :class:`~netmirror.wire.connection.Connection` reports.

Names are in the past tense: each says what the peer did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """(agent) The daemon authenticated; the tunnel is open."""

    session: str
    version: int


@dataclass(frozen=True, slots=True)
class Welcomed:
    """(daemon) The agent accepted the hello; the tunnel is open."""

    session: str
    version: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SubscribeRequested:
    """(agent) The daemon asks to take ``port`` in ``mode``."""

    request_id: int
    port: int
    mode: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class UnsubscribeRequested:
    """(agent) The daemon gives ``port`` back."""

    request_id: int
    port: int


@dataclass(frozen=True, slots=True)
class SubscriptionAnswered:
    """(daemon) The agent's answer to a subscribe or unsubscribe."""

    request_id: int
    port: int
    ok: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream: a connection it accepted (or wants made)."""

    stream_id: int
    port: int
    original_dst: tuple[str, int]
    client: tuple[str, int]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes of a stream; grant them back with ``Connection.grant`` once consumed.

    Large payloads are a read-only view into the received message, not a copy.
    """

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamHalfClosed:
    """The peer will send no more data on the stream (TCP FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted the stream."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class CreditGranted:
    """The peer may take ``amount`` more bytes; ``window`` is the new send window."""

    stream_id: int
    amount: int
    window: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """Answer to one of our pings."""

    payload: int


@dataclass(frozen=True, slots=True)
class StatsReported:
    """(daemon) Counters the agent keeps (capture, mirror copies), as a JSON object."""

    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """The peer reported a fatal error; it closes the tunnel next."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """The daemon asked the agent for something (see :data:`~netmirror.wire.OPS`)."""

    request_id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """The agent answered a request: ``result`` if ``ok``, else ``error``."""

    request_id: int
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


Event = (
    HelloReceived
    | Welcomed
    | SubscribeRequested
    | UnsubscribeRequested
    | SubscriptionAnswered
    | StreamOpened
    | DataReceived
    | StreamHalfClosed
    | StreamReset
    | CreditGranted
    | PongReceived
    | StatsReported
    | ErrorReceived
    | RequestReceived
    | ReplyReceived
)
