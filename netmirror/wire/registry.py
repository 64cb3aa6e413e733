"""Where agents and the HTTP router of a port find each other, in the target.

The router binds :func:`registry_address`; each agent connects there, sends one
JSON line ``{"session", "filter", "socket"}`` and keeps the connection open (that
connection *is* the registration; EOF ends it). The router routes a session's
requests to :func:`session_address`, where that session's agent listens. Both are
abstract unix sockets (a leading NUL): nothing on disk to clean up.
"""

from __future__ import annotations

#: Exit status of a router that finds another router already serving its port.
EXIT_IN_USE = 3
#: Seconds a router stays after its last registration left, then gives the port back.
ROUTER_LINGER = 1.0


def registry_address(port: int) -> str:
    """Where agents register for ``port`` (abstract unix socket, leading NUL)."""
    return f"\0netmirror-http/{port}"


def session_address(port: int, session: str) -> str:
    """Where the agent of ``session`` takes the requests routed to it."""
    return f"\0netmirror-http/{port}/{session}"


def router_listening(port: int, proc_net_unix: str = "/proc/net/unix") -> bool:
    """Whether a router of ``port`` still holds its registry in this network namespace.

    Read from ``/proc/net/unix`` (abstract names show with a leading ``@``), so that
    asking does not itself look like a registration to the router.
    """
    name = "@" + registry_address(port)[1:]
    try:
        with open(proc_net_unix) as table:
            return any(line.rstrip("\n").endswith(" " + name) for line in table)
    except OSError:
        return False
