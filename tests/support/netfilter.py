"""Picking one session's rules out of ``iptables-save`` output.

Tables on the host are shared with every other run on the machine; a test checks
only the chains of its own sessions (``NETMIRROR-<session>``, ``NMOUT-<session>``,
see netmirror.netfilter), never that a whole table is empty.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable

PREFIXES = ("NETMIRROR-", "NMOUT-", "NMUDP-", "NMREP-")
SAVE_TOOLS = (
    "iptables-nft-save",
    "ip6tables-nft-save",
    "iptables-legacy-save",
    "ip6tables-legacy-save",
)


def chains_of(sessions: Iterable[str], prefixes: Iterable[str] = PREFIXES) -> set[str]:
    return {prefix + session for prefix in prefixes for session in sessions}


def lines_of(text: str, chains: set[str]) -> list[str]:
    """Lines of ``iptables-save`` output that define, fill or jump to one of ``chains``.

    A chain matches as a whole word: ``NMOUT-x1`` is not ``NMOUT-x10``.
    """
    out = []
    for line in text.splitlines():
        words = line.split()
        if any(word.lstrip(":") in chains for word in words):
            out.append(line)
    return out


def host_rules() -> list[str]:
    """Every rule line of the host, each prefixed with the tool that printed it."""
    out = []
    for tool in SAVE_TOOLS:
        path = shutil.which(tool) or shutil.which(tool, path="/usr/local/sbin:/usr/sbin:/sbin")
        if path is None:
            continue
        # No -t: the legacy tool would create the table it is asked about.
        res = subprocess.run([path], capture_output=True, text=True, check=False)
        out += [f"{tool}: {line}" for line in res.stdout.splitlines()]
    return out


def host_lines(chains: set[str]) -> list[str]:
    """The host's rules (every backend and family installed) about ``chains``."""
    return lines_of("\n".join(host_rules()), chains)
