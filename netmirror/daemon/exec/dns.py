"""The daemon's half of ``netmirror exec`` DNS: local datagrams in, the agent's answers out.

The command's DNS queries (UDP port 53) are redirected to a small UDP server in the
daemon. Each datagram becomes a :class:`Query` (:func:`parse_query`); its name and
type go over the tunnel; the agent's :class:`~netmirror.wire.dns.Answer` comes back
and :func:`build_response` turns it into the datagram for the local client. Pure:
no sockets here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from netmirror.wire.dns import MAX_TTL, Answer, is_basic_rcode

log = logging.getLogger(__name__)

_UDP_PAYLOAD = 1232  # the EDNS payload we advertise (DNS flag day 2020)


@dataclass(frozen=True)
class Query:
    """One question from the local client, ready to be sent to the agent.

    ``name`` is the question's name without the trailing dot (``"."`` for the root),
    with the case the client used; ``rdtype`` its type name (``"A"``, ``"TYPE65280"``);
    ``wire`` the datagram, for :func:`build_response` and :func:`servfail`.
    """

    id: int
    name: str
    rdtype: str
    wire: bytes


def parse_query(wire: bytes) -> Query | bytes | None:
    """A datagram from the local client: a question, an error to send back, or nothing.

    Returns:

    - a :class:`Query` for a standard query with one question of class IN: ask the
      agent, then send :func:`build_response`;
    - ``bytes``, a complete response to send back as is without asking the agent:
      FORMERR (not exactly one question), NOTIMP (opcode other than QUERY), REFUSED
      (a class other than IN, or a meta type such as ANY or AXFR), BADVERS (EDNS
      version other than 0);
    - ``None`` for a datagram to drop: not parseable as a DNS message, or a response
      (answering responses could make two servers bounce packets forever).

    Never raises.
    """
    try:
        message = dns.message.from_wire(wire)
    except Exception:  # dnspython raises many kinds of errors for garbage
        return None
    if message.flags & dns.flags.QR:
        return None
    if message.edns > 0:
        return _error(message, dns.rcode.BADVERS)
    if message.opcode() != dns.opcode.QUERY:
        return _error(message, dns.rcode.NOTIMP)
    if len(message.question) != 1:
        return _error(message, dns.rcode.FORMERR, keep_question=False)
    question = message.question[0]
    if question.rdclass != dns.rdataclass.IN or dns.rdatatype.is_metatype(question.rdtype):
        return _error(message, dns.rcode.REFUSED)
    return Query(
        id=message.id,
        name=question.name.to_text(omit_final_dot=True),
        rdtype=dns.rdatatype.to_text(question.rdtype),
        wire=wire,
    )


def build_response(query: Query, answer: Answer, *, max_size: int | None = None) -> bytes:
    """The response to ``query`` carrying the agent's ``answer``.

    Same id and question, RA set, EDNS echoed if the query had it, the records owned
    by the question's name (the client asked ``redis``, it gets ``redis A 10.0.0.5``
    even though the target found ``redis.shop.svc.cluster.local``). A response too
    big for 512 bytes, or the query's EDNS payload, is the header and question with
    TC set, so the client retries over TCP. An answer whose records are not valid for
    the question's type (it came over the network) gives SERVFAIL. ``max_size``
    replaces that limit (65535 over TCP, where nothing is truncated).
    """
    message = dns.message.from_wire(query.wire)
    response = dns.message.make_response(
        message, recursion_available=True, our_payload=_UDP_PAYLOAD
    )
    if not is_basic_rcode(answer.rcode):
        log.warning("DNS %s: the agent's rcode %r is not usable", query.name, answer.rcode)
        return servfail(query)
    rcode = dns.rcode.from_text(answer.rcode)
    response.set_rcode(rcode)
    if answer.records and rcode == dns.rcode.NOERROR:
        question = message.question[0]
        try:
            rdatas = [
                dns.rdata.from_text(
                    question.rdclass, question.rdtype, text, dns.name.root, relativize=False
                )
                for text in answer.records
            ]
        except Exception as exc:  # dns.exception.SyntaxError, ValueError...: bad input
            log.warning("DNS %s %s: bad record from the agent: %s", query.name, query.rdtype, exc)
            return servfail(query)
        ttl = max(0, min(answer.ttl, MAX_TTL))
        response.answer.append(dns.rrset.from_rdata_list(question.name, ttl, rdatas))
    return _to_wire(response, message, max_size)


def servfail(query: Query) -> bytes:
    """A SERVFAIL response to ``query`` (the agent is unreachable or failed)."""
    return _error(dns.message.from_wire(query.wire), dns.rcode.SERVFAIL)


def _error(
    message: dns.message.Message, rcode: dns.rcode.Rcode, *, keep_question: bool = True
) -> bytes:
    response = dns.message.make_response(
        message, recursion_available=True, our_payload=_UDP_PAYLOAD
    )
    response.set_rcode(rcode)
    if not keep_question:
        response.question = []
    return _to_wire(response, message)


def _to_wire(
    response: dns.message.Message, query: dns.message.Message, max_size: int | None = None
) -> bytes:
    if max_size is None:
        max_size = query.payload if query.edns >= 0 else 512  # to_wire keeps it in 512..65535
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        response.answer = []
        response.authority = []
        response.additional = []
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=max_size)
