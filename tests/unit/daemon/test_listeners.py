"""The ports an exec command listens on: /proc's socket tables, parsed."""

from __future__ import annotations

import os
import socket

from netmirror.daemon.listeners import descendants, listening_ports, parse_listeners

TABLE = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0
   1: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0 100 0 0 10 0
"""  # noqa: E501 - as the kernel writes it


def test_only_listening_sockets_are_read() -> None:
    assert parse_listeners(TABLE) == {4242: 8080, 99: 22}
    assert parse_listeners("header only\n") == {}
    assert parse_listeners("h\n garbage line\n") == {}


def test_this_process_listening_is_seen() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert sock.getsockname()[1] not in listening_ports({os.getpid()})
        sock.listen()
        assert sock.getsockname()[1] in listening_ports({os.getpid()})
    assert listening_ports(set()) == set()


def test_descendants_include_the_root() -> None:
    assert os.getpid() in descendants(os.getpid())
    assert os.getpid() in descendants(os.getppid())
