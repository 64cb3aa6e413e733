"""A DNS answer as it travels from the agent to the daemon.

Names travel between daemon and agent as text without the trailing dot (the root
is ``"."``), so a client's ``redis`` is searched with the target's search list,
exactly as a program inside the target would see it. A name that does end with a
dot is absolute and is not searched. The agent answers with :class:`Answer`, as
JSON in a REPLY frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.rcode

MAX_TTL = 2**31 - 1  # RFC 2181, section 8


@dataclass(frozen=True)
class Answer:
    """The agent's answer to one question, as it travels back to the daemon.

    ``rcode`` is a DNS rcode name (``"NOERROR"``, ``"NXDOMAIN"``, ``"SERVFAIL"``,
    ``"REFUSED"``...). ``records`` are the rdata of the answer in text form, all of
    the question's type (``"10.0.0.5"``; for MX ``"10 mail.example."``); a CNAME
    chain is already followed. ``name`` is the fully qualified name that answered
    (after the search list), for logs.
    """

    rcode: str
    records: tuple[str, ...] = ()
    ttl: int = 0
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "rcode": self.rcode,
            "records": list(self.records),
            "ttl": self.ttl,
            "name": self.name,
        }

    @classmethod
    def from_json(cls, obj: object) -> Answer:
        """The inverse of :meth:`to_json`; raises ValueError for anything else."""
        if not isinstance(obj, dict):
            raise ValueError(f"DNS answer: expected an object, got {type(obj).__name__}")
        unknown = set(obj) - {"rcode", "records", "ttl", "name"}
        if unknown:
            raise ValueError(f"DNS answer: unknown keys {sorted(map(str, unknown))}")
        rcode = obj.get("rcode")
        if not isinstance(rcode, str) or not is_basic_rcode(rcode):
            raise ValueError(f"DNS answer: rcode must be a DNS rcode name, got {rcode!r}")
        records = obj.get("records", [])
        if not isinstance(records, list | tuple) or not all(isinstance(r, str) for r in records):
            raise ValueError("DNS answer: records must be a list of strings")
        ttl = obj.get("ttl", 0)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= MAX_TTL:
            raise ValueError(f"DNS answer: ttl must be an integer in 0..{MAX_TTL}, got {ttl!r}")
        name = obj.get("name", "")
        if not isinstance(name, str):
            raise ValueError(f"DNS answer: name must be a string, got {type(name).__name__}")
        return cls(rcode=rcode.upper(), records=tuple(records), ttl=ttl, name=name)


def is_basic_rcode(text: str) -> bool:
    """A rcode name that fits the header without EDNS (NOERROR ... NOTZONE)."""
    try:
        return dns.rcode.from_text(text) < 16
    except dns.exception.DNSException:
        return False
