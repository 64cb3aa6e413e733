"""Steal TCP ports of the current network namespace with iptables ``nat`` REDIRECT rules.

Every session owns one chain, ``NETMIRROR-<session>``, in the ``nat`` table of both
IPv4 and IPv6. Two hook rules jump into it:

* ``PREROUTING -p tcp -m addrtype --dst-type LOCAL`` for traffic from outside, and
* ``OUTPUT -o lo -p tcp`` for the target's own connections to itself.

The chain's content is replaced atomically with ``iptables-restore --noflush``, so the
set of stolen ports can change without a window where a port is not redirected.

The agent's own sockets carry :data:`AGENT_MARK` (``SO_MARK``) and the first rule of the
chain returns early for them, so the agent can still reach the original service.

Everything here acts on the network namespace of the calling process; the agent enters
the target's namespace before it uses this module.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from netmirror.errors import FirewallError
from netmirror.wire.session import SESSION_NAME_RULE, is_session_name

__all__ = [
    "AGENT_MARK",
    "CHAIN_PREFIX",
    "Backend",
    "IptablesNat",
    "NatPlan",
    "Redirect",
    "chain_name",
    "clear_stale",
    "detect_backend",
    "list_sessions",
    "parse_sessions",
    "render_chain",
    "tables_in_use",
    "validate_session",
]

log = logging.getLogger(__name__)

#: ``SO_MARK`` value of the agent's own sockets; packets carrying it are never redirected.
AGENT_MARK = 0x4E4D

#: Every chain netmirror creates starts with this.
CHAIN_PREFIX = "NETMIRROR-"

# iptables refuses chain names of XT_EXTENSION_MAXNAMELEN (29) characters or more.
_MAX_CHAIN_LEN = 28

# Seconds to wait for the xtables lock. A bounded wait (instead of a bare -w, which waits
# forever) keeps the guard process from hanging behind a stuck iptables elsewhere.
_LOCK_WAIT = ("-w", "10")

# Upper bound for one iptables invocation; it only matters if the binary itself hangs.
_RUN_TIMEOUT = 30.0

# The binaries live in sbin directories, which are not always on PATH (e.g. when the
# agent runs with a minimal environment), so these are searched as well.
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"

_FAMILIES = (4, 6)

# The hook rules, without the action (-I/-C/-D) and the chain they live in.
_HOOKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("PREROUTING", ("-p", "tcp", "-m", "addrtype", "--dst-type", "LOCAL")),
    ("OUTPUT", ("-o", "lo", "-p", "tcp")),
)


class Backend(enum.Enum):
    """Which iptables implementation to drive: the nf_tables one or the legacy one.

    The two keep separate rule sets in the kernel; the rules must go to the one the
    target already uses, otherwise they may be evaluated in a surprising order.
    """

    NFT = "nft"
    LEGACY = "legacy"

    def binary(self, family: int, kind: str = "") -> str:
        """Return the binary name, e.g. ``ip6tables-nft-restore`` for ``(6, "restore")``.

        ``kind`` is ``""``, ``"save"`` or ``"restore"``.
        """
        _check_family(family)
        base = "ip6tables" if family == 6 else "iptables"
        suffix = f"-{kind}" if kind else ""
        return f"{base}-{self.value}{suffix}"

    def iptables(self, family: int) -> str:
        """Name of the ``iptables``/``ip6tables`` binary of this backend."""
        return self.binary(family)

    def save(self, family: int) -> str:
        """Name of the ``*-save`` binary of this backend."""
        return self.binary(family, "save")

    def restore(self, family: int) -> str:
        """Name of the ``*-restore`` binary of this backend."""
        return self.binary(family, "restore")

    def find(self, family: int, kind: str = "") -> str | None:
        """Return the absolute path of a binary of this backend, or None if absent."""
        return _which(self.binary(family, kind))


@dataclass(frozen=True)
class Redirect:
    """Redirect TCP connections to ``port`` towards local ``to_port``, for IPv``family``."""

    port: int
    to_port: int
    family: int  # 4 or 6
    keep_from: tuple[str, ...] = ()
    """Source addresses whose connections are not redirected (the kubelet's probes)."""

    def __post_init__(self) -> None:
        for name in ("port", "to_port"):
            value = getattr(self, name)
            # bool is an int subclass; True as a port is a bug, not port 1.
            if type(value) is not int or not 1 <= value <= 65535:
                raise ValueError(f"{name} must be an integer in 1..65535, not {value!r}")
        _check_family(self.family)
        for address in self.keep_from:
            if ipaddress.ip_address(address).version != self.family:  # ValueError if bad
                raise ValueError(f"{address} is not an IPv{self.family} address")


@dataclass(frozen=True)
class NatPlan:
    """What :meth:`IptablesNat.apply` will install, computed without touching the system.

    ``texts`` maps each address family (4, 6) to the exact input of
    ``iptables-restore --noflush`` / ``ip6tables-restore --noflush``.
    """

    session: str
    chain: str
    redirects: tuple[Redirect, ...]
    texts: Mapping[int, str] = field(hash=False)

    def text(self, family: int) -> str:
        """Return the restore input of ``family``; KeyError if the plan has none."""
        return self.texts[family]

    @property
    def families(self) -> tuple[int, ...]:
        """The address families this plan covers, ascending."""
        return tuple(sorted(self.texts))


def validate_session(session: str) -> str:
    """Return ``session`` unchanged if it is a valid session name, else raise ValueError."""
    if not is_session_name(session):
        raise ValueError(f"invalid session name {session!r}: use {SESSION_NAME_RULE}")
    return session


def router_session(port: int) -> str:
    """The steal-chain session name of the HTTP router of ``port``."""
    return f"http-{port}"


def chain_name(session: str) -> str:
    """Return the iptables chain of ``session``: ``"NETMIRROR-" + session``.

    Raises ValueError for an invalid session name.
    """
    chain = CHAIN_PREFIX + validate_session(session)
    # The session pattern caps the length; this guards against the pattern being loosened.
    if len(chain) > _MAX_CHAIN_LEN:
        raise ValueError(f"chain name {chain!r} is longer than {_MAX_CHAIN_LEN} characters")
    return chain


def render_chain(session: str, redirects: Iterable[Redirect]) -> str:
    """Return ``iptables-restore --noflush`` input that (re)defines the session's chain.

    Pure function. All redirects are emitted regardless of their family; callers select
    the family beforehand. Declaring ``:CHAIN - [0:0]`` makes restore flush the chain
    first, so the new content replaces the old one in one transaction.
    """
    chain = chain_name(session)
    lines = [
        "*nat",
        f":{chain} - [0:0]",
        f"-A {chain} -m mark --mark {AGENT_MARK:#x} -j RETURN",
    ]
    for r in redirects:
        for address in r.keep_from:
            lines.append(
                f"-A {chain} -s {address} -p tcp -m tcp --dport {r.port}"
                f' -m comment --comment "netmirror session={session} port={r.port} kept"'
                " -j RETURN"
            )
        lines.append(
            f"-A {chain} -p tcp -m tcp --dport {r.port}"
            f' -m comment --comment "netmirror session={session} port={r.port}"'
            f" -j REDIRECT --to-ports {r.to_port}"
        )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Parsing iptables-save output (pure functions)


@dataclass(frozen=True)
class _Table:
    """One ``*table`` section of iptables-save output."""

    name: str
    chains: dict[str, str]  # chain -> policy ("-" for user-defined chains)
    rules: list[tuple[str, tuple[str, ...]]]  # (chain, args after "-A chain")


def _parse_save(text: str) -> dict[str, _Table]:
    """Split iptables-save output into its tables; unknown lines are ignored."""
    tables: dict[str, _Table] = {}
    current: _Table | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], _Table(line[1:], {}, []))
        elif current is None:
            continue
        elif line == "COMMIT":
            current = None
        elif line.startswith(":"):
            parts = line[1:].split()
            if parts:
                current.chains[parts[0]] = parts[1] if len(parts) > 1 else "-"
        elif line.startswith("-A "):
            try:
                words = shlex.split(line)
            except ValueError:
                # An unbalanced quote in a comment written by someone else; the rough
                # split is still good enough to find chains, jumps and ports.
                words = line.split()
            if len(words) >= 2:
                current.rules.append((words[1], tuple(words[2:])))
    return tables


def _jump_target(args: Sequence[str]) -> str | None:
    """Return the chain a rule jumps or goes to, if any."""
    for i, word in enumerate(args[:-1]):
        if word in ("-j", "--jump", "-g", "--goto"):
            return args[i + 1]
    return None


def _dport(args: Sequence[str]) -> int | None:
    """Return the single destination port a rule matches, if it has one."""
    for i, word in enumerate(args[:-1]):
        if word in ("--dport", "--destination-port"):
            value = args[i + 1]
            return int(value) if value.isdigit() else None
    return None


def parse_sessions(save_text: str) -> dict[str, set[int]]:
    """Map each ``NETMIRROR-<session>`` chain of the nat table to its redirected ports.

    Pure function over ``iptables-save`` output (any tables; only ``nat`` is read).
    Chains whose suffix is not a valid session name are not netmirror's and are skipped.
    """
    nat = _parse_save(save_text).get("nat")
    if nat is None:
        return {}
    sessions: dict[str, set[int]] = {}
    for chain in nat.chains:
        session = _session_of(chain)
        if session is not None:
            sessions[session] = set()
    for chain, args in nat.rules:
        session = _session_of(chain)
        if session is None:
            continue
        ports = sessions.setdefault(session, set())
        port = _dport(args)
        if port is not None:
            ports.add(port)
    return sessions


def tables_in_use(save_text: str) -> bool:
    """True if iptables-save output holds any rule or user-defined chain.

    Empty tables with only built-in chains do not count: merely listing a legacy table
    creates it, so its existence says nothing about who manages the firewall.
    """
    for table in _parse_save(save_text).values():
        if table.rules:
            return True
        if any(policy == "-" for policy in table.chains.values()):
            return True
    return False


def _session_of(chain: str) -> str | None:
    if not chain.startswith(CHAIN_PREFIX):
        return None
    session = chain[len(CHAIN_PREFIX) :]
    return session if is_session_name(session) else None


def _references(
    save_text: str, chain: str, table: str = "nat"
) -> tuple[bool, list[tuple[str, tuple[str, ...]]]]:
    """Return (chain declared?, rules elsewhere in ``table`` that jump to ``chain``)."""
    nat = _parse_save(save_text).get(table)
    if nat is None:
        return False, []
    refs = [(src, args) for src, args in nat.rules if src != chain and _jump_target(args) == chain]
    return chain in nat.chains, refs


# --------------------------------------------------------------------------------------
# Running the tools


def _check_family(family: int) -> None:
    if family not in _FAMILIES:
        raise ValueError(f"address family must be 4 or 6, not {family!r}")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN_PATH)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _run(argv: Sequence[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one tool; only failures to run it at all raise (as FirewallError)."""
    log.debug("running %s", argv)
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=_RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise FirewallError(f"{argv[0]} did not finish within {_RUN_TIMEOUT:g}s") from exc
    except OSError as exc:
        raise FirewallError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    if proc.returncode != 0:
        log.debug("%s exited %s: %s", argv[0], proc.returncode, _first_line(proc.stderr))
    return proc


def _failure(what: str, proc: subprocess.CompletedProcess[str]) -> FirewallError:
    detail = _first_line(proc.stderr) or _first_line(proc.stdout) or f"exit {proc.returncode}"
    return FirewallError(f"{what}: {detail}")


def _save(backend: Backend, family: int) -> str | None:
    """Return iptables-save output of ``family``, or None if the tool is absent or fails.

    No ``-t nat``: asking the legacy tool for a table instantiates it in the namespace,
    while a plain save only reads the tables that already exist.
    """
    path = backend.find(family, "save")
    if path is None:
        log.debug("%s not found", backend.save(family))
        return None
    proc = _run([path])
    if proc.returncode != 0:
        return None
    return proc.stdout


def _in_use(backend: Backend) -> bool:
    return any(tables_in_use(_save(backend, f) or "") for f in _FAMILIES)


def detect_backend() -> Backend:
    """Pick the iptables backend the current network namespace already uses.

    LEGACY if legacy tables hold rules or chains and nf_tables holds none; otherwise NFT
    if its binary exists, else LEGACY. Raises FirewallError if neither is installed.
    """
    has_nft = Backend.NFT.find(4) is not None
    has_legacy = Backend.LEGACY.find(4) is not None
    if not has_nft and not has_legacy:
        raise FirewallError(
            "neither iptables-nft nor iptables-legacy is installed;"
            " install the Debian package 'iptables'"
        )
    if not has_nft:
        return Backend.LEGACY
    if has_legacy and _in_use(Backend.LEGACY) and not _in_use(Backend.NFT):
        return Backend.LEGACY
    return Backend.NFT


def list_sessions(backend: Backend) -> dict[str, set[int]]:
    """Map each netmirror session with a chain in this namespace to its redirected ports.

    IPv4 and IPv6 are merged. Raises FirewallError if the IPv4 rules cannot be read;
    IPv6 is skipped when it cannot be read.
    """
    path = backend.find(4, "save")
    if path is None:
        raise FirewallError(f"{backend.save(4)} not found; install the Debian package 'iptables'")
    proc = _run([path])
    if proc.returncode != 0:
        raise _failure(f"{backend.save(4)} failed", proc)
    sessions = parse_sessions(proc.stdout)
    for session, ports in parse_sessions(_save(backend, 6) or "").items():
        sessions.setdefault(session, set()).update(ports)
    return sessions


def clear_stale(backend: Backend, *, alive: Callable[[str], bool]) -> list[str]:
    """Tear down the chain of every session for which ``alive(session)`` is False.

    Typically ``alive`` is :func:`netmirror.netfilter.guard.session_alive`. Returns the
    names of the sessions removed, sorted.
    """
    stale = sorted(s for s in list_sessions(backend) if not alive(s))
    for session in stale:
        log.info("removing rules of stale session %s", session)
        IptablesNat(session, backend=backend).teardown()
    return stale


# --------------------------------------------------------------------------------------
# The firewall


class IptablesNat:
    """The nat REDIRECT rules of one session in the current network namespace."""

    #: The table the session's chain and its hooks live in.
    TABLE = "nat"

    def __init__(
        self,
        session: str,
        *,
        backend: Backend,
        families: Sequence[int] = _FAMILIES,
        behind_mesh: bool = False,
    ) -> None:
        """``behind_mesh``: a sidecar mesh redirects incoming connections here (see
        :mod:`netmirror.netfilter.mesh`): the PREROUTING hook goes after the mesh's
        rules, and only the OUTPUT hook (first) sees the proxy's plaintext connections."""
        self._session = session
        self._behind_mesh = behind_mesh
        self._chain = chain_name(session)
        self._backend = backend
        for family in families:
            _check_family(family)
        self._families = tuple(sorted(set(families)))
        if not self._families:
            raise ValueError("at least one address family is needed")
        # Whether IPv6 nat works here is probed once; it does not change while we run.
        self._usable: dict[int, bool] = {}

    @property
    def session(self) -> str:
        """The session name."""
        return self._session

    @property
    def chain(self) -> str:
        """The session's chain, ``NETMIRROR-<session>``."""
        return self._chain

    @property
    def backend(self) -> Backend:
        """The iptables backend the rules go to."""
        return self._backend

    @property
    def families(self) -> tuple[int, ...]:
        """The address families this session manages, ascending."""
        return self._families

    def plan(self, redirects: Iterable[Redirect]) -> NatPlan:
        """Compute the chain content for ``redirects``; pure, touches nothing.

        Every managed family gets a chain even without redirects, so ports can be added
        later by applying a new plan. Raises FirewallError for a redirect of an
        unmanaged family or two different targets for the same port.
        """
        by_key: dict[tuple[int, int], Redirect] = {}
        for r in redirects:
            if r.family not in self._families:
                raise FirewallError(
                    f"cannot redirect IPv{r.family} port {r.port}:"
                    f" session {self._session!r} manages only"
                    f" {', '.join(f'IPv{f}' for f in self._families)}"
                )
            previous = by_key.setdefault((r.family, r.port), r)
            if previous.to_port != r.to_port:
                raise FirewallError(
                    f"IPv{r.family} port {r.port} cannot be redirected both to"
                    f" {previous.to_port} and {r.to_port}"
                )
        ordered = tuple(by_key[k] for k in sorted(by_key))
        texts = {
            family: render_chain(self._session, (r for r in ordered if r.family == family))
            for family in self._families
        }
        return NatPlan(
            session=self._session,
            chain=self._chain,
            redirects=ordered,
            texts=MappingProxyType(texts),
        )

    def apply(self, plan: NatPlan) -> None:
        """Install ``plan``: replace the chain content atomically, then ensure the hooks.

        The chain is written first (restore creates it if needed) so a hook never jumps
        to a chain that does not exist yet. IPv6 is skipped when unusable here.
        Raises FirewallError with the tool's first stderr line on failure.
        """
        if plan.chain != self._chain:
            raise FirewallError(f"plan for chain {plan.chain} given to session {self._session!r}")
        for family in plan.families:
            if family not in self._families:
                raise FirewallError(f"plan covers IPv{family}, not managed by this session")
            if not self._family_usable(family):
                continue
            self._restore(family, plan.text(family))
            self._ensure_hooks(family)

    def teardown(self) -> None:
        """Remove the hooks and the chain of both families; idempotent.

        Absent rules, chains, tables or IPv6 tools are not errors. Raises FirewallError
        only if something that exists could not be removed.
        """
        errors: list[str] = []
        for family in self._families:
            try:
                self._teardown_family(family)
            except FirewallError as exc:
                # Keep going: the other family's rules must go even if this one is stuck.
                errors.append(str(exc))
        if errors:
            raise FirewallError("; ".join(errors))

    # ---- internals -------------------------------------------------------------------

    def _tool(self, family: int, kind: str = "") -> str:
        path = self._backend.find(family, kind)
        if path is None:
            raise FirewallError(
                f"{self._backend.binary(family, kind)} not found;"
                " install the Debian package 'iptables'"
            )
        return path

    def _family_usable(self, family: int) -> bool:
        """IPv4 is required; IPv6 is used only if its tools and nat table work here."""
        if family == 4:
            return True
        if family not in self._usable:
            self._usable[family] = self._probe(family)
        return self._usable[family]

    def _probe(self, family: int) -> bool:
        for kind in ("", "restore"):
            if self._backend.find(family, kind) is None:
                log.debug("IPv%s skipped: %s not found", family, self._backend.binary(family, kind))
                return False
        proc = _run([self._tool(family), *_LOCK_WAIT, "-t", "nat", "-S", "PREROUTING"])
        if proc.returncode != 0:
            log.debug("IPv%s skipped: nat table unusable: %s", family, _first_line(proc.stderr))
            return False
        return True

    def _restore(self, family: int, text: str) -> None:
        restore = self._tool(family, "restore")
        proc = _run([restore, *_LOCK_WAIT, "--noflush"], stdin=text)
        if proc.returncode != 0:
            raise _failure(f"{self._backend.restore(family)} of chain {self._chain} failed", proc)

    def _hook_rules(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The rules that jump into the chain: (built-in chain, match)."""
        return _HOOKS

    def _ensure_hooks(self, family: int) -> None:
        tool = self._tool(family)
        for hook_chain, match in self._hook_rules():
            spec = (hook_chain, *match, "-j", self._chain)
            check = _run([tool, *_LOCK_WAIT, "-t", self.TABLE, "-C", *spec])
            if check.returncode == 0:
                continue
            if self._behind_mesh and hook_chain == "PREROUTING":
                # After the mesh's own jump: what it redirects to its proxy comes back
                # over lo (the OUTPUT hook); what it lets through comes here.
                where: tuple[str, ...] = ("-A", hook_chain)
            else:
                where = ("-I", hook_chain, "1")
            insert = _run([tool, *_LOCK_WAIT, "-t", self.TABLE, *where, *spec[1:]])
            if insert.returncode != 0:
                raise _failure(
                    f"{self._backend.iptables(family)} could not hook {self._chain}"
                    f" into {hook_chain}",
                    insert,
                )

    def _teardown_family(self, family: int) -> None:
        tool = self._backend.find(family)
        if tool is None:
            log.debug(
                "IPv%s teardown skipped: %s not found", family, self._backend.iptables(family)
            )
            return
        last_error = ""
        # Each round deletes what the previous save showed, then looks again; a few rounds
        # cover rules added concurrently. Working from the save output (instead of only
        # deleting our own hook spec until -D fails) also removes hooks someone copied
        # with a different match, which would otherwise keep -X from succeeding.
        for _ in range(5):
            text = _save(self._backend, family)
            if text is None:
                log.debug("IPv%s teardown skipped: rules cannot be read", family)
                return
            declared, refs = _references(text, self._chain, self.TABLE)
            if not declared and not refs:
                return
            for src, args in refs:
                proc = _run([tool, *_LOCK_WAIT, "-t", self.TABLE, "-D", src, *args])
                if proc.returncode != 0:
                    last_error = _first_line(proc.stderr)
            if declared:
                for action in ("-F", "-X"):
                    proc = _run([tool, *_LOCK_WAIT, "-t", self.TABLE, action, self._chain])
                    if proc.returncode != 0:
                        last_error = _first_line(proc.stderr)
        reason = last_error or "it keeps coming back"
        raise FirewallError(f"could not remove IPv{family} chain {self._chain}: {reason}")
