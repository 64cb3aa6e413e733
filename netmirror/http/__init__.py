"""HTTP-filtered steal: only the requests that match a session's filter leave the target.

:mod:`~netmirror.http.filters` decides which requests a session takes;
:mod:`~netmirror.http.relay` is the sans-I/O core that relays one client connection,
request by request, to the target's own server or to a session.
"""

from netmirror.http.filters import HttpFilter, RequestHead, describe_filter
from netmirror.http.relay import (
    BAD_GATEWAY,
    BAD_REQUEST,
    ORIGINAL,
    Action,
    Close,
    Connect,
    Pipe,
    Relay,
    Release,
    ToClient,
    ToUpstream,
)

__all__ = [
    "BAD_GATEWAY",
    "BAD_REQUEST",
    "ORIGINAL",
    "Action",
    "Close",
    "Connect",
    "HttpFilter",
    "Pipe",
    "Relay",
    "Release",
    "RequestHead",
    "ToClient",
    "ToUpstream",
    "describe_filter",
]
