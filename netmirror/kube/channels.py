"""Sans-I/O codec of the Kubernetes pod port-forward websocket (``v4.channel.k8s.io``).

Every binary websocket message starts with one channel byte. For the i-th requested
port, channel ``2*i`` carries data and channel ``2*i + 1`` carries error text. The
first message the server sends on each channel holds only the port number, as a
little-endian uint16; later data messages are raw bytes and later error messages are
UTF-8 text. The client sends data as the data channel byte followed by the payload.

:class:`PortForwardChannels` handles one port (channels 0 and 1): feed it every
message the server sends and it returns what happened, or raises
:class:`~netmirror.errors.ProtocolError` when the server breaks the framing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netmirror.errors import ProtocolError

#: The websocket subprotocol of the binary channel framing.
SUBPROTOCOL = "v4.channel.k8s.io"
#: Channel of the first port's bytes, in both directions.
DATA_CHANNEL = 0
#: Channel of the first port's error texts (server to client only).
ERROR_CHANNEL = 1

_PORT = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class PortAnnounced:
    """The server opened ``channel`` for ``port`` (the first message on each channel)."""

    channel: int
    port: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes the pod side of the connection sent."""

    data: bytes


@dataclass(frozen=True, slots=True)
class RemoteError:
    """The server reported an error, e.g. the connection inside the pod was refused."""

    text: str


#: What :meth:`PortForwardChannels.feed` can report.
Event = PortAnnounced | DataReceived | RemoteError


class PortForwardChannels:
    """Decoder and encoder of the channels of ONE forwarded port (channels 0 and 1)."""

    def __init__(self, port: int) -> None:
        """Expect the server to announce ``port`` (the one in the ``ports`` query)."""
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, not {port}")
        self.port = port
        self._announced: set[int] = set()

    @property
    def data_announced(self) -> bool:
        """Whether the data channel's port announcement has arrived."""
        return DATA_CHANNEL in self._announced

    @property
    def error_announced(self) -> bool:
        """Whether the error channel's port announcement has arrived."""
        return ERROR_CHANNEL in self._announced

    def feed(self, message: bytes) -> list[Event]:
        """Decode one binary message from the server.

        Returns the events it carries (an empty data or error message carries none).
        Raises :class:`ProtocolError` on an empty message, an unknown channel, a first
        message on a channel that is not exactly the 2-byte port, an announced port
        other than the requested one, or data before the data channel's announcement.
        """
        if not message:
            raise ProtocolError("port-forward: empty websocket message (no channel byte)")
        channel = message[0]
        if channel not in (DATA_CHANNEL, ERROR_CHANNEL):
            raise ProtocolError(f"port-forward: message on unknown channel {channel}")
        body = bytes(message[1:])
        if channel not in self._announced:
            if len(body) != _PORT.size:
                hint = " (data before the port announcement?)" if channel == DATA_CHANNEL else ""
                raise ProtocolError(
                    f"port-forward: first message on channel {channel} has {len(body)} "
                    f"bytes, not the {_PORT.size}-byte port number{hint}"
                )
            (port,) = _PORT.unpack(body)
            if port != self.port:
                raise ProtocolError(
                    f"port-forward: channel {channel} announced port {port}, expected {self.port}"
                )
            self._announced.add(channel)
            return [PortAnnounced(channel, port)]
        if not body:
            return []
        if channel == DATA_CHANNEL:
            return [DataReceived(body)]
        return [RemoteError(body.decode("utf-8", errors="replace"))]

    def encode_data(self, payload: bytes) -> bytes:
        """Frame ``payload`` as one client-to-server data message."""
        return bytes((DATA_CHANNEL,)) + payload
