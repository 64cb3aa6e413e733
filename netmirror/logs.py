"""Logging set-up: one format, the session name on every line."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)-7s [%(session)s %(role)s] %(name)s: %(message)s"


class _SessionFilter(logging.Filter):
    def __init__(self, session: str, role: str) -> None:
        super().__init__()
        self.session = session
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.session = self.session
        record.role = self.role
        return True


def setup(*, session: str, role: str, stream: TextIO | None = None, debug: bool = False) -> None:
    """Send every record to ``stream`` (default stderr), tagged with session and role."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_SessionFilter(session, role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # aiohttp logs every access at INFO; the tunnel is one long request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # pyroute2 dumps every netlink message at DEBUG: far too much for --debug.
    logging.getLogger("pyroute2").setLevel(logging.INFO)
