"""Who may take a port of a target next to whom: one policy for the CLI and the agent.

A port is held whole by one session (steal or mirror), or shared by any number of
sessions that each steal only the HTTP requests matching their filter (through
the port's HTTP router). The CLI checks the sessions it knows of before it starts
anything; the agent checks again against the rules it finds in the target's
namespace, which other machines' sessions may have made. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    """A session's hold on a port."""

    session: str
    filtered: bool = False
    """An HTTP-filtered steal: such claims share the port with each other."""
    router: bool = False
    """The port's HTTP router, seen in its rules: it stands for filtered sessions."""


@dataclass(frozen=True)
class Conflict:
    """Why a claim cannot be granted: the claim in its way, and a one-line reason."""

    holder: Claim
    reason: str


def port_conflict(port: int, new: Claim, held: Iterable[Claim]) -> Conflict | None:
    """The first claim of ``held`` that ``new`` cannot stand beside, or None.

    Claims of ``new.session`` itself never conflict (a session asking again, or
    reconnecting, keeps its port).
    """
    for claim in held:
        if claim.session == new.session or (new.filtered and claim.filtered):
            continue
        if claim.filtered:
            who = (
                "sessions that steal only some HTTP requests"
                if claim.router
                else f"HTTP-filtered session {claim.session!r}"
            )
            reason = (
                f"port {port} is shared by {who}; a whole-port steal would take their "
                "requests too (steal with an HTTP filter)"
            )
        elif new.filtered:
            reason = (
                f"port {port} is stolen whole by session {claim.session!r}; "
                "an HTTP-filtered steal cannot share it"
            )
        else:
            reason = f"port {port} is already taken by session {claim.session!r}"
        return Conflict(claim, reason)
    return None
