"""The target's resolver, in the agent: names resolved as a program in the target would.

:class:`TargetResolver` uses the *target's* resolver configuration
(:class:`ResolverConfig`: its hosts file, nameservers, search list and ndots) from
inside the target's network namespace, and answers the daemon's questions with a
:class:`~netmirror.wire.dns.Answer`. Everything here except
:meth:`ResolverConfig.load` (reads two files) and :meth:`TargetResolver.resolve`
(queries the target's nameservers) is free of I/O.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

from netmirror.wire.dns import MAX_TTL, Answer

log = logging.getLogger(__name__)

# glibc's limits (resolv/resolv.h): MAXNS, RES_MAXNDOTS, RES_MAXRETRANS, RES_MAXRETRY.
_MAXNS = 3
_MAX_NDOTS = 15
_MAX_TIMEOUT = 30
_MAX_ATTEMPTS = 5

_MAX_NAME_TEXT = 1024  # far above any valid (even escaped) name: refuse before parsing

_PROC_ROOT = re.compile(r"^/proc/[0-9]+/root(?=/|$)")


@dataclass(frozen=True)
class ResolverConfig:
    """The target's resolver configuration: its ``resolv.conf`` and ``hosts`` file.

    ``hosts`` maps a lower-cased name without trailing dot to its addresses in file
    order. ``port`` is not in resolv.conf (it has no port syntax); it is the port of
    every nameserver, for tests. The defaults are glibc's for an empty resolv.conf.
    """

    nameservers: tuple[str, ...] = ("127.0.0.1",)
    search: tuple[str, ...] = ()
    ndots: int = 1
    hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    timeout: float = 5.0
    attempts: int = 2
    port: int = 53

    @classmethod
    def from_text(cls, resolv_conf: str, hosts: str = "", *, port: int = 53) -> ResolverConfig:
        """Parse the text of a ``resolv.conf`` and of a ``hosts`` file (pure)."""
        nameservers: list[str] = []
        search: list[str] = []
        ndots, timeout, attempts = 1, 5, 2
        for raw in resolv_conf.splitlines():
            words = _strip_comment(raw).split()
            if not words:
                continue
            keyword, args = words[0], words[1:]
            if keyword == "nameserver" and args:
                if len(nameservers) < _MAXNS and _is_address(args[0]):
                    nameservers.append(args[0])
                elif len(nameservers) < _MAXNS:
                    log.debug("resolv.conf: ignoring nameserver %r", args[0])
            elif keyword in ("search", "domain") and args:
                # The last search or domain line wins (glibc); the domain is one suffix.
                names = args if keyword == "search" else args[:1]
                search = [n.rstrip(".") for n in names if n.rstrip(".")]
            elif keyword == "options":
                for option in args:
                    key, _, value = option.partition(":")
                    if not value.isdigit():
                        continue  # rotate, edns0, single-request... do not apply here
                    number = int(value)
                    if key == "ndots":
                        ndots = min(number, _MAX_NDOTS)
                    elif key == "timeout":
                        timeout = max(1, min(number, _MAX_TIMEOUT))
                    elif key == "attempts":
                        attempts = max(1, min(number, _MAX_ATTEMPTS))
        return cls(
            nameservers=tuple(nameservers) or ("127.0.0.1",),
            search=tuple(search),
            ndots=ndots,
            hosts=parse_hosts(hosts),
            timeout=float(timeout),
            attempts=attempts,
            port=port,
        )

    @classmethod
    def load(cls, etc_dirs: Sequence[Path], *, port: int = 53) -> ResolverConfig:
        """Read ``resolv.conf`` and ``hosts``, each from the first of ``etc_dirs`` that has it.

        ``[Path('/etc/netns/NAME'), Path('/etc')]`` is what ``ip netns exec NAME`` shows
        a program; ``[Path('/proc/PID/root/etc')]`` is a container's own files (an
        absolute symlink there is followed inside the container's root). A missing
        file is an empty one: glibc's defaults apply.
        """
        return cls.from_text(
            _read_first(etc_dirs, "resolv.conf"), _read_first(etc_dirs, "hosts"), port=port
        )


def parse_hosts(text: str) -> dict[str, tuple[str, ...]]:
    """A hosts file as ``{lower-cased name: addresses in file order}`` (pure).

    Comments start with ``#``; a line is an address and one or more names; lines with
    an invalid address are skipped. IPv6 scope ids (``%eth0``) are dropped: an answer
    cannot carry them.
    """
    hosts: dict[str, list[str]] = {}
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        try:
            address = str(ipaddress.ip_address(words[0].split("%", 1)[0]))
        except ValueError:
            continue
        for name in words[1:]:
            key = name.rstrip(".").lower()
            if not key:
                continue
            addresses = hosts.setdefault(key, [])
            if address not in addresses:
                addresses.append(address)
    return {name: tuple(addresses) for name, addresses in hosts.items()}


class TargetResolver:
    """Resolves names the way a program in the target would (hosts file, then DNS).

    Run it inside the target's network namespace: the nameservers are queried from
    there (dnspython's asyncio backend, so it runs under uvloop too). Never raises for
    a bad name or type: the answer says FORMERR, REFUSED (meta types such as ANY or
    AXFR), or SERVFAIL (timeout, no usable nameserver).

    Like dnspython (and musl), the search stops at the first candidate that exists,
    even with no record of the asked type; glibc would go on to the next suffix.
    """

    def __init__(self, config: ResolverConfig) -> None:
        self.config = config
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [ns for ns in config.nameservers if _is_address(ns)]
        resolver.port = config.port
        search: list[dns.name.Name] = []
        for suffix in config.search:
            try:
                search.append(dns.name.from_text(suffix))
            except dns.exception.DNSException:
                log.warning("resolv.conf: ignoring search domain %r", suffix)
        resolver.search = search
        resolver.domain = dns.name.root  # not this machine's domain when search is empty
        resolver.ndots = config.ndots
        resolver.timeout = config.timeout
        resolver.lifetime = config.timeout * config.attempts
        resolver.use_search_by_default = True
        self._resolver = resolver
        self._search = tuple(s.to_text(omit_final_dot=True).lower() for s in search)

    async def resolve(self, name: str, rdtype: str) -> Answer:
        """Answer ``name`` (absolute if it ends with a dot) for type ``rdtype`` (e.g. "A")."""
        qname = _parse_name(name)
        if qname is None:
            return Answer("FORMERR", name=name)
        try:
            qtype = dns.rdatatype.RdataType.make(rdtype)
        except (dns.exception.DNSException, ValueError):
            return Answer("FORMERR", name=name)
        if dns.rdatatype.is_metatype(qtype):
            return Answer("REFUSED", name=name)
        if qtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            answer = self._from_hosts(qname, qtype)
            if answer is not None:
                return answer
        return await self._query(qname, qtype)

    def _from_hosts(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> Answer | None:
        """The hosts file's answer: the name, then (fewer dots than ndots) name.suffix."""
        if not self.config.hosts:
            return None
        base = qname.to_text(omit_final_dot=True).lower()
        candidates = [base]
        if not qname.is_absolute() and base.count(".") < self.config.ndots:
            candidates += [f"{base}.{suffix}" for suffix in self._search]
        want_v6 = qtype == dns.rdatatype.AAAA
        for candidate in candidates:
            addresses = self.config.hosts.get(candidate, ())
            if addresses:
                # The hosts file knows the name: it has the last word, also for the
                # other family (an AAAA question for an IPv4-only entry has no answer).
                # Asking DNS instead would make a program that asks for both wait for
                # nameservers the target may not even have.
                matching = tuple(a for a in addresses if (":" in a) == want_v6)
                return Answer("NOERROR", matching, 0, candidate + ".")
        return None

    async def _query(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> Answer:
        text = qname.to_text()
        try:
            result = await self._resolver.resolve(
                qname, qtype, raise_on_no_answer=False, search=True
            )
        except dns.resolver.NXDOMAIN:
            return Answer("NXDOMAIN", name=text)
        except dns.resolver.NoAnswer:
            return Answer("NOERROR", name=text)
        except dns.resolver.YXDOMAIN:
            return Answer("YXDOMAIN", name=text)
        except (dns.exception.DNSException, OSError) as exc:
            # LifetimeTimeout, NoNameservers (each answered SERVFAIL/REFUSED or failed)...
            log.debug("DNS %s %s: %s", text, dns.rdatatype.to_text(qtype), exc)
            return Answer("SERVFAIL", name=text)
        ttl = max(0, min(result.chaining_result.minimum_ttl, MAX_TTL))
        found = result.qname.to_text()
        if result.rrset is None:
            return Answer("NOERROR", (), ttl, found)
        return Answer("NOERROR", tuple(rd.to_text() for rd in result.rrset), ttl, found)


def _parse_name(text: str) -> dns.name.Name | None:
    """The name to resolve, relative unless it ends with a dot; None if invalid."""
    if len(text) > _MAX_NAME_TEXT:
        return None
    try:
        name = dns.name.from_text(text, origin=None)
        if not name.is_absolute():
            name.concatenate(dns.name.root)  # NameTooLong beyond 253 characters
    except dns.exception.DNSException:  # empty or too long labels, IDNA errors...
        return None
    if len(name) == 0:  # "@" or "": nothing to ask
        return None
    return name


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _strip_comment(line: str) -> str:
    for mark in "#;":
        line = line.split(mark, 1)[0]
    return line


def _read_first(etc_dirs: Iterable[Path], filename: str) -> str:
    """The text of ``filename`` from the first directory that has it, else ""."""
    for etc in etc_dirs:
        path = etc / filename
        try:
            data = _read_in_root(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot read %s (%s); using resolver defaults for it", path, exc)
            return ""
        return data.decode("utf-8", errors="replace")
    return ""


def _read_in_root(path: Path) -> bytes:
    """Read ``path``; under ``/proc/PID/root`` its symlinks stay in that root.

    The kernel resolves a container's ``/etc/resolv.conf -> /run/...`` against the
    reader's root, not the container's: follow the file's own links by hand (links
    in the directories above it are left to the kernel).
    """
    match = _PROC_ROOT.match(str(path))
    if match is None:
        return path.read_bytes()
    root = Path(match.group(0))
    for _ in range(40):  # ELOOP, as the kernel
        if not path.is_symlink():
            return path.read_bytes()
        inner = posixpath.join("/", str(path.parent.relative_to(root)), os.readlink(path))
        path = root / posixpath.normpath(inner).lstrip("/")  # ".." stops at the root
    raise OSError(f"too many levels of symbolic links: {path}")
