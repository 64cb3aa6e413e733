"""The tunnel protocol, free of I/O: bytes in, events and bytes out."""

from netmirror.wire.connection import OPS, Connection, Limits, Role, State
from netmirror.wire.events import (
    CreditGranted,
    DataReceived,
    ErrorReceived,
    Event,
    HelloReceived,
    PongReceived,
    ReplyReceived,
    RequestReceived,
    StatsReported,
    StreamHalfClosed,
    StreamOpened,
    StreamReset,
    SubscribeRequested,
    SubscriptionAnswered,
    UnsubscribeRequested,
    Welcomed,
)
from netmirror.wire.frames import PROTOCOL_VERSION, FrameType

__all__ = [
    "OPS",
    "PROTOCOL_VERSION",
    "Connection",
    "CreditGranted",
    "DataReceived",
    "ErrorReceived",
    "Event",
    "FrameType",
    "HelloReceived",
    "Limits",
    "PongReceived",
    "ReplyReceived",
    "RequestReceived",
    "Role",
    "State",
    "StatsReported",
    "StreamHalfClosed",
    "StreamOpened",
    "StreamReset",
    "SubscribeRequested",
    "SubscriptionAnswered",
    "UnsubscribeRequested",
    "Welcomed",
]
