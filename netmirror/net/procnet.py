"""The kernel's TCP socket tables (``/proc/net/tcp`` and ``tcp6``): who listens on what.

Read in the network namespace of the reading process: the daemon reads its own
(the ports a local command listens on), the agent the target's (the ports the
target serves).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["listening_here", "parse_listeners"]

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


def parse_listeners(text: str) -> dict[int, int]:
    """Listening sockets in a ``/proc/net/tcp`` or ``tcp6`` table: inode -> port. Pure."""
    found: dict[int, int] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        _address, _, port = fields[1].rpartition(":")
        try:
            found[int(fields[9])] = int(port, 16)
        except ValueError:
            continue
    return found


def listening_here(proc_net: Path = Path("/proc/self/net")) -> set[int]:
    """The TCP ports something listens on in this network namespace (IPv4 and IPv6)."""
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            ports.update(parse_listeners((proc_net / table).read_text()).values())
        except OSError:
            continue
    return ports
