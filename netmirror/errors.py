"""The one exception tree of netmirror.

Every error a user can meet derives from :class:`NetmirrorError`; its message is a
single line meant for people. Only the CLI turns these into exit codes.
"""

from __future__ import annotations


class NetmirrorError(Exception):
    """Base of every netmirror error; ``str(err)`` is a one-line message."""

    exit_code: int = 1


class ConfigError(NetmirrorError):
    """A configuration file, variable or flag is invalid; the message names the key."""

    exit_code = 2


class TargetError(NetmirrorError):
    """The target cannot be found or entered."""


class FirewallError(NetmirrorError):
    """Packet filter rules could not be planned, applied or removed."""


class PortInUseError(NetmirrorError):
    """A port is already taken by another netmirror session in the same target."""


class SessionError(NetmirrorError):
    """A session does not exist, already exists, or is not answering."""


class AgentError(NetmirrorError):
    """The agent could not be started or reached, or it refused a request."""


class ProtocolError(NetmirrorError):
    """The peer sent bytes that break the tunnel protocol; the tunnel is closed."""


class AuthenticationError(ProtocolError):
    """The peer did not present the session token."""


class CommandError(NetmirrorError):
    """``netmirror exec`` could not start the command (exit codes as in a shell)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
