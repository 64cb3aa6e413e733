"""One port the agent has taken for the session, in whichever mode."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from netmirror.netfilter import Redirect
from netmirror.wire.stats import MirrorCounters, PortStats

if TYPE_CHECKING:  # loaded on first use: a plain steal needs no HTTP parsing
    from netmirror.agent.share import HttpShare


@dataclass
class Subscription:
    """One taken port: its listening sockets, its rule's targets and counters."""

    port: int
    mode: str
    method: str = ""
    """For mirror: capture or passthrough."""
    servers: dict[int, asyncio.AbstractServer] = field(default_factory=dict)
    to_ports: dict[int, int] = field(default_factory=dict)
    stats: PortStats = field(default_factory=PortStats)
    counters: MirrorCounters = field(default_factory=MirrorCounters)
    http: HttpShare | None = None
    """For a steal of only the HTTP requests that match a filter."""
    keep_from: tuple[str, ...] = ()
    """Source addresses whose connections stay with the target (the kubelet's probes)."""
    draining: bool = False
    """The session is ending: new connections go to the target's own server (relayed
    here, so the rule, and the live connections' NAT, stay as they are)."""

    def redirects(self) -> list[Redirect]:
        """The REDIRECT rules this subscription needs (none for capture or HTTP)."""
        return [
            Redirect(
                self.port,
                to_port,
                family,
                tuple(a for a in self.keep_from if (":" in a) == (family == 6)),
            )
            for family, to_port in self.to_ports.items()
        ]

    async def close(self) -> None:
        """Stop listening and leave the HTTP router of the port, if registered."""
        for server in self.servers.values():
            server.close()
        if self.http is not None:
            share, self.http = self.http, None
            await share.close()
