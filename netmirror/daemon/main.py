"""``netmirror daemon``: the session's background process, started by ``up`` and ``exec``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from netmirror.daemon.daemon import run


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"netmirror: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None, *, debug: bool = False) -> int:
    """``netmirror daemon --session S [--ready-fd FD]``; returns the exit code."""
    parser = _Parser(prog="netmirror daemon")
    parser.add_argument("--session", required=True)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    return run(args.session, ready_fd=args.ready_fd, debug=debug or args.debug)
