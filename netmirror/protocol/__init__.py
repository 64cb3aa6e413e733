"""The tunnel protocol, free of I/O: bytes in, events and bytes out."""

from netmirror.protocol.connection import Connection, Limits, Role, State
from netmirror.protocol.events import (
    CreditGranted,
    DataReceived,
    ErrorReceived,
    Event,
    HelloReceived,
    PongReceived,
    StatsReported,
    StreamHalfClosed,
    StreamOpened,
    StreamReset,
    SubscribeRequested,
    SubscriptionAnswered,
    UnsubscribeRequested,
    Welcomed,
)
from netmirror.protocol.frames import PROTOCOL_VERSION, FrameType

__all__ = [
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
