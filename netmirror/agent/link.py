"""What the parts of the agent share, instead of a reference to the whole agent.

A mirror or a bridge needs two things of the agent: the tunnel to the daemon that
is attached now (there may be none, and it changes when the daemon reconnects),
and a way to start tasks the agent owns and stops at shutdown. :class:`Link`
carries exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netmirror.tasks import TaskSet
from netmirror.tunnel import Tunnel


@dataclass
class Link:
    """The current tunnel (None while no daemon is attached) and the agent's tasks."""

    tasks: TaskSet = field(default_factory=lambda: TaskSet("agent"))
    tunnel: Tunnel | None = None
