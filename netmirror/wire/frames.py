"""Wire format of the tunnel: frames on a byte stream.

The tunnel is a byte stream carried in binary websocket messages; message
boundaries mean nothing, so a frame may span messages and a message may hold many
frames. Each frame is a 9-byte header followed by its payload::

    type: u8 | stream id: u32 | payload length: u32 | payload

Control frames (hello, subscriptions, stream opening, errors) carry a JSON object;
the data path (DATA, CREDIT, SHUTDOWN, RESET, PING, PONG) is binary.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

from netmirror.errors import ProtocolError

#: Version of the tunnel protocol spoken by this build.
PROTOCOL_VERSION = 1

HEADER = struct.Struct("!BII")
HEADER_SIZE = HEADER.size
CREDIT = struct.Struct("!I")
PING = struct.Struct("!Q")

#: Largest window a stream may have (as in HTTP/2).
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**32 - 1


class FrameType(enum.IntEnum):
    """Frame types; the comment says who may send it."""

    HELLO = 1  # daemon -> agent, first frame: version, token, window
    WELCOME = 2  # agent -> daemon, answer to HELLO
    SUBSCRIBE = 3  # daemon -> agent: take a port in a mode
    SUBSCRIBED = 4  # agent -> daemon: result of SUBSCRIBE / UNSUBSCRIBE
    UNSUBSCRIBE = 5  # daemon -> agent: give a port back
    OPEN = 6  # either side: a new stream, JSON metadata
    DATA = 7  # either side: stream bytes
    SHUTDOWN = 8  # either side: no more DATA from me on this stream
    RESET = 9  # either side: abort the stream, UTF-8 reason
    CREDIT = 10  # either side: u32 more bytes the peer may send on a stream
    PING = 11  # either side: u64 opaque
    PONG = 12  # answer to PING with the same u64
    ERROR = 13  # either side: fatal, JSON {code, message}; the tunnel closes
    STATS = 14  # agent -> daemon: JSON counters only the agent knows (capture, copies)
    REQUEST = 15  # daemon -> agent: JSON {id, op, args}: resolve a name, read the environment
    REPLY = 16  # agent -> daemon: JSON {id, ok, result | error}


#: Frames whose payload is JSON and bounded by the control size limit.
JSON_FRAMES = frozenset(
    {
        FrameType.HELLO,
        FrameType.WELCOME,
        FrameType.SUBSCRIBE,
        FrameType.SUBSCRIBED,
        FrameType.UNSUBSCRIBE,
        FrameType.OPEN,
        FrameType.ERROR,
        FrameType.STATS,
        FrameType.REQUEST,
        FrameType.REPLY,
    }
)


def encode_header(ftype: FrameType, stream_id: int, length: int) -> bytes:
    """Pack a frame header."""
    return HEADER.pack(ftype, stream_id, length)


def encode_json(ftype: FrameType, stream_id: int, body: dict[str, Any]) -> bytes:
    """A whole frame with a compact JSON payload."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    return HEADER.pack(ftype, stream_id, len(payload)) + payload


def decode_json(ftype: FrameType, payload: bytes) -> dict[str, Any]:
    """Parse a JSON payload into an object, or raise :class:`ProtocolError`."""
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed {ftype.name} frame: not JSON ({exc})") from None
    except RecursionError:
        raise ProtocolError(f"malformed {ftype.name} frame: JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"malformed {ftype.name} frame: not a JSON object")
    return body


def field(body: dict[str, Any], name: str, kind: type, ftype: FrameType) -> Any:
    """Fetch a typed field of a JSON frame, or raise :class:`ProtocolError`."""
    value = body.get(name)
    # bool is an int subclass; a port of `true` is still wrong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        # The type's name, not a repr: a hostile value may be huge or nested deeply.
        raise ProtocolError(
            f"malformed {ftype.name} frame: {name!r} must be {kind.__name__}, "
            f"not {type(value).__name__}"
        )
    return value


def port_field(
    body: dict[str, Any], name: str, ftype: FrameType, *, allow_zero: bool = False
) -> int:
    """A TCP port field (1-65535, or 0 where a frame may name no port)."""
    value: int = field(body, name, int, ftype)
    if not (0 if allow_zero else 1) <= value < 65536:
        raise ProtocolError(f"malformed {ftype.name} frame: {name} {value} is not a port")
    return value


def address_field(body: dict[str, Any], name: str, ftype: FrameType) -> tuple[str, int]:
    """A ``[host, port]`` pair (port 0 allowed for unknown)."""
    value = body.get(name)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
        or isinstance(value[1], bool)
        or not 0 <= value[1] < 65536
    ):
        raise ProtocolError(f"malformed {ftype.name} frame: {name} must be [host, port]")
    return (value[0], value[1])
