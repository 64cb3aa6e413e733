"""What a stream carries: named in its OPEN frame's ``info["kind"]``.

Either side opens streams (the agent for stolen and mirrored connections and
for captured packets, the daemon for the outgoing connections of an ``exec``
command), and each side answers a stream by its kind with an exhaustive
``match`` over :class:`StreamKind`: a new kind is a type error until both sides
handle it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class StreamKind(enum.Enum):
    """The kinds of stream, by who opens them and what the other side does."""

    STOLEN = "stolen"
    """Agent -> daemon: a connection to a stolen port; the local process answers it."""
    MIRROR = "mirror"
    """Agent -> daemon: a copy of a connection's client bytes; answers are dropped."""
    PCAP = "pcap"
    """Agent -> daemon: captured packets as pcap records, for ``--pcap``."""
    CONNECT = "connect"
    """Daemon -> agent: an outgoing connection of the exec command, made in the target."""
    FILE_READ = "file-read"
    """Daemon -> agent: a range of one of the target's files (``path``, ``offset``, ``length``)."""
    UDP = "udp"
    """Daemon -> agent: the exec command's UDP from one socket; the agent sends it from
    a socket of its own in the target and carries the answers back (records of
    :mod:`netmirror.wire.datagrams`)."""
    FILE_WRITE = "file-write"
    """Daemon -> agent: bytes to write at ``offset`` of one of the target's files."""


def stream_info(kind: StreamKind, **more: Any) -> dict[str, Any]:
    """The ``info`` of an OPEN frame for a stream of ``kind`` (``more`` adds details)."""
    return {"kind": kind.value, **more}


def stream_kind(info: Mapping[str, Any]) -> StreamKind | None:
    """The kind an OPEN frame names; None for a kind this version does not know."""
    value = info.get("kind")
    if value is None:
        # Streams opened without a kind: a copy says how it was mirrored.
        return StreamKind.MIRROR if info.get("mirror") else StreamKind.STOLEN
    try:
        return StreamKind(value)
    except ValueError:
        return None
