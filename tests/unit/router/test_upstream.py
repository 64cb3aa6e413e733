"""An idle upstream connection is reused only while both of its sides are open."""

from __future__ import annotations

from netmirror.router.http1 import ORIGINAL
from netmirror.router.router import Upstream


class Transport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        raise AssertionError("nothing is written to an idle upstream")

    def close(self) -> None:
        self.closing = True


def test_an_idle_upstream_the_server_closed_is_not_reused() -> None:
    up = Upstream(ORIGINAL, ("127.0.0.1", 80))
    transport = Transport()
    up.connection_made(transport)  # type: ignore[arg-type]
    assert up.reusable
    # The server closes its side while the connection waits for the client's next
    # request: the connection_lost that follows comes later.
    assert up.eof_received() is False
    assert not up.reusable


def test_an_upstream_being_closed_is_not_reused() -> None:
    up = Upstream(ORIGINAL, ("127.0.0.1", 80))
    transport = Transport()
    up.connection_made(transport)  # type: ignore[arg-type]
    transport.closing = True
    assert not up.reusable
