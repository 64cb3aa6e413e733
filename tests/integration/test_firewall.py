"""The firewall layer against real iptables in throw-away network namespaces.

The pytest process never enters a namespace: everything that must run inside one is a
short Python snippet started with ``ip netns exec``. Every namespace is deleted and every
process in it killed when its test ends, pass or fail.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.netfilter import chains_of, host_rules, lines_of
from tests.support.processes import pid_running
from tests.support.waiting import eventually

SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
NS_PREFIX = "nmtest-fw-"
PY = sys.executable
ORIG_PORT = 9999
REDIR_PORT = 18999


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables)"
    if _which("ip") is None:
        return "needs the 'ip' command (Debian package iproute2)"
    if _which("iptables-nft") is None and _which("iptables-legacy") is None:
        return "needs iptables-nft or iptables-legacy (Debian package iptables)"
    return None


_REASON = _skip_reason()

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


def run(
    *argv: str, stdin: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a command on the host (not checked)."""
    return subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=timeout
    )


#: Every namespace these tests made, and every session they made rules for.
MADE: list[str] = []
SESSIONS: set[str] = set()


def _namespaces() -> set[str]:
    return {line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line}


@pytest.fixture(scope="module", autouse=True)
def host_left_clean() -> Iterator[None]:
    """Nothing of these tests may remain on the host: no namespaces, no rules.

    Other test runs may use the host at the same time, so only this module's own
    namespaces and the chains of its own sessions are looked at.
    """
    rules_before = "\n".join(host_rules())
    yield
    left = sorted(set(MADE) & _namespaces())
    assert left == [], f"test network namespaces left behind: {left}"
    ours = chains_of(SESSIONS)
    after = lines_of("\n".join(host_rules()), ours)
    assert after == lines_of(rules_before, ours), "netmirror rules appeared on the host"


# --------------------------------------------------------------------------------------
# Namespaces and processes


@dataclass
class Namespaces:
    """Creates namespaces and the processes in them; removes all of it in cleanup()."""

    names: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def new(self) -> str:
        name = f"{NS_PREFIX}{secrets.token_hex(4)}"
        self.names.append(name)  # registered first: cleanup also covers a half-made one
        MADE.append(name)
        proc = run("ip", "netns", "add", name)
        if proc.returncode != 0:
            pytest.skip(f"cannot create a network namespace: {proc.stderr.strip()}")
        ns_run(name, "ip", "link", "set", "lo", "up")
        return name

    def spawn(self, ns: str, code: str) -> subprocess.Popen[str]:
        """Start a Python snippet in ``ns`` with pipes on stdin/stdout/stderr."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        for name in self.names:
            # Whatever still runs in a test namespace was started by this test (e.g. a
            # guard orphaned by a killed holder): end it by pid.
            for pid in run("ip", "netns", "pids", name).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            run("ip", "netns", "del", name)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    """A factory of throw-away namespaces that are always deleted, even on failure."""
    made = Namespaces()
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def ns(namespaces: Namespaces) -> str:
    """One fresh network namespace with lo up."""
    return namespaces.new()


@pytest.fixture(params=["nft", "legacy"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each iptables backend whose binary is installed."""
    name: str = request.param
    if _which(f"iptables-{name}") is None:
        pytest.skip(f"iptables-{name} is not installed")
    return name


def ns_run(ns: str, *argv: str, timeout: float = 30.0) -> str:
    """Run a command in ``ns``; fail the test if it fails; return stdout."""
    proc = run("ip", "netns", "exec", ns, *argv, timeout=timeout)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


PRELUDE = """\
import json, socket, sys
from netmirror.errors import SessionError
from netmirror.netfilter import (
    AGENT_MARK, Backend, IptablesNat, Redirect, clear_stale, detect_backend, list_sessions,
)
from netmirror.netfilter.guard import Guard, session_alive
"""


def ns_py(ns: str, code: str, **values: object) -> object:
    """Run a snippet in ``ns``; it gets ``values`` as globals and prints one JSON value."""
    assigns = "".join(f"{k} = {v!r}\n" for k, v in values.items())
    out = ns_run(ns, PY, "-c", PRELUDE + assigns + textwrap.dedent(code))
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else None


def save(ns: str, backend: str, family: int = 4) -> str:
    tool = "ip6tables" if family == 6 else "iptables"
    return ns_run(ns, f"{tool}-{backend}-save")


def has_netmirror(ns: str, backend: str) -> bool:
    return any("netmirror" in save(ns, backend, f).lower() for f in (4, 6))


def read_line(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    """Read one stdout line of ``proc`` or fail after ``timeout`` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            pytest.fail(f"no output within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        _out, err = proc.communicate(timeout=10)
        pytest.fail(f"process exited ({proc.returncode}): {err}")
    return line.strip()


def apply(ns: str, backend: str, session: str, port: int = ORIG_PORT, to: int = REDIR_PORT) -> None:
    SESSIONS.add(session)
    ns_py(
        ns,
        """
        nat = IptablesNat(session, backend=Backend(backend))
        nat.apply(nat.plan([Redirect(port, to, 4), Redirect(port, to, 6)]))
        """,
        session=session,
        backend=backend,
        port=port,
        to=to,
    )


def teardown(ns: str, backend: str, session: str) -> None:
    ns_py(
        ns,
        "IptablesNat(session, backend=Backend(backend)).teardown()",
        session=session,
        backend=backend,
    )


# A server on both ports and both families that answers each connection with its name.
SERVER = f"""\
import socket, threading
socks = []
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    for port, tag in (({ORIG_PORT}, b"orig"), ({REDIR_PORT}, b"redir")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(16)
        socks.append((s, tag))

def serve(s, tag):
    while True:
        c, _ = s.accept()
        c.sendall(tag)
        c.close()

for s, tag in socks:
    threading.Thread(target=serve, args=(s, tag), daemon=True).start()
print("ready", flush=True)
import sys
sys.stdin.read()
"""

CLIENT = """
def get(family, host, mark=False):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if mark:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
        s.settimeout(5)
        s.connect((host, port))
        return s.recv(16).decode()

print(json.dumps({
    "v4": get(socket.AF_INET, host4),
    "v4_marked": get(socket.AF_INET, host4, mark=True),
    "v6": get(socket.AF_INET6, host6) if host6 else None,
}))
"""


def connect(ns: str, host4: str = "127.0.0.1", host6: str | None = "::1") -> dict[str, str]:
    result = ns_py(ns, CLIENT, host4=host4, host6=host6, port=ORIG_PORT)
    assert isinstance(result, dict)
    return result


# --------------------------------------------------------------------------------------
# Tests


def test_apply_installs_chain_hooks_and_redirect(ns: str, backend: str) -> None:
    apply(ns, backend, "t1")
    apply(ns, backend, "t1")  # applying again must not duplicate the hooks
    for family in (4, 6):
        text = save(ns, backend, family)
        assert ":NETMIRROR-t1 - [0:0]" in text
        lines = text.splitlines()
        assert lines.count("-A PREROUTING -p tcp -m addrtype --dst-type LOCAL -j NETMIRROR-t1") == 1
        assert lines.count("-A OUTPUT -o lo -p tcp -j NETMIRROR-t1") == 1
        assert "-A NETMIRROR-t1 -m mark --mark 0x4e4d -j RETURN" in lines
        assert (
            f"-A NETMIRROR-t1 -p tcp -m tcp --dport {ORIG_PORT} -m comment --comment"
            f' "netmirror session=t1 port={ORIG_PORT}" -j REDIRECT --to-ports {REDIR_PORT}'
        ) in lines
    sessions = ns_py(
        ns,
        "print(json.dumps({k: sorted(v) for k, v in list_sessions(Backend(backend)).items()}))",
        backend=backend,
    )
    assert sessions == {"t1": [ORIG_PORT]}

    # A new plan replaces the chain content: the old port is gone.
    apply(ns, backend, "t1", port=8080, to=18080)
    text = save(ns, backend)
    assert "--dport 8080" in text
    assert f"--dport {ORIG_PORT}" not in text

    teardown(ns, backend, "t1")
    assert not has_netmirror(ns, backend)


def test_longest_session_name(ns: str, backend: str) -> None:
    session = "a" * 17 + "z"
    apply(ns, backend, session)
    assert f":NETMIRROR-{session} - [0:0]" in save(ns, backend)
    teardown(ns, backend, session)
    assert not has_netmirror(ns, backend)


def test_redirect_on_loopback(namespaces: Namespaces, ns: str, backend: str) -> None:
    server = namespaces.spawn(ns, SERVER)
    assert read_line(server) == "ready"
    assert connect(ns) == {"v4": "orig", "v4_marked": "orig", "v6": "orig"}

    apply(ns, backend, "lo1")
    # The agent's marked sockets still reach the original service.
    assert connect(ns) == {"v4": "redir", "v4_marked": "orig", "v6": "redir"}

    teardown(ns, backend, "lo1")
    assert not has_netmirror(ns, backend)
    assert connect(ns) == {"v4": "orig", "v4_marked": "orig", "v6": "orig"}

    teardown(ns, backend, "lo1")  # twice is fine
    teardown(ns, backend, "never-applied")  # and so is never having applied anything
    assert not has_netmirror(ns, backend)


def test_redirect_from_outside(namespaces: Namespaces, backend: str) -> None:
    target, client = namespaces.new(), namespaces.new()
    ns_run(
        target, "ip", "link", "add", "nm0", "type", "veth", "peer", "name", "nm1", "netns", client
    )
    ns_run(target, "ip", "addr", "add", "10.201.0.1/24", "dev", "nm0")
    ns_run(target, "ip", "link", "set", "nm0", "up")
    ns_run(client, "ip", "addr", "add", "10.201.0.2/24", "dev", "nm1")
    ns_run(client, "ip", "link", "set", "nm1", "up")
    server = namespaces.spawn(target, SERVER)
    assert read_line(server) == "ready"

    assert connect(client, host4="10.201.0.1", host6=None)["v4"] == "orig"
    apply(target, backend, "out1")
    assert connect(client, host4="10.201.0.1", host6=None)["v4"] == "redir"
    teardown(target, backend, "out1")
    assert connect(client, host4="10.201.0.1", host6=None)["v4"] == "orig"


HOLDER = """
guard = Guard.start(session, Backend(backend))
if apply_rules:
    nat = IptablesNat(session, backend=Backend(backend))
    nat.apply(nat.plan([Redirect(9999, 18999, 4), Redirect(9999, 18999, 6)]))
print(json.dumps({"guard": guard.pid}), flush=True)
sys.stdin.read()  # until the test closes stdin (or kills this process)
guard.close()
"""


def start_holder(
    namespaces: Namespaces, ns: str, backend: str, session: str, apply_rules: bool = True
) -> tuple[subprocess.Popen[str], int]:
    """Start a stand-in for the agent that holds a guard; return it and the guard's pid."""
    SESSIONS.add(session)
    assigns = f"session = {session!r}\nbackend = {backend!r}\napply_rules = {apply_rules!r}\n"
    holder = namespaces.spawn(ns, PRELUDE + assigns + HOLDER)
    info = json.loads(read_line(holder))
    return holder, int(info["guard"])


def alive(ns: str, session: str) -> bool:
    result = ns_py(ns, "print(json.dumps(session_alive(session)))", session=session)
    assert isinstance(result, bool)
    return result


def test_guard_cleans_up_when_agent_is_killed(
    namespaces: Namespaces, ns: str, backend: str
) -> None:
    holder, guard_pid = start_holder(namespaces, ns, backend, "g1")
    assert "NETMIRROR-g1" in save(ns, backend)
    assert alive(ns, "g1")
    assert pid_running(guard_pid)

    # `ip netns exec` execs the command, so this pid is the Python holding the guard.
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=10)

    eventually(
        lambda: not has_netmirror(ns, backend),
        2.0,
        lambda: f"the guard left rules: {save(ns, backend)}",
    )
    eventually(lambda: not pid_running(guard_pid), 5.0, "the guard did not exit")
    assert not alive(ns, "g1")


def test_guard_cleans_up_on_close_and_sigterm(
    namespaces: Namespaces, ns: str, backend: str
) -> None:
    holder, _ = start_holder(namespaces, ns, backend, "g2")
    assert has_netmirror(ns, backend)
    _out, err = holder.communicate("", timeout=15)  # EOF: the holder closes its guard
    assert holder.returncode == 0, err
    assert not has_netmirror(ns, backend)
    assert not alive(ns, "g2")

    holder, guard_pid = start_holder(namespaces, ns, backend, "g3")
    os.kill(guard_pid, signal.SIGTERM)
    eventually(lambda: not has_netmirror(ns, backend), 2.0, "SIGTERM: the guard left rules")
    eventually(lambda: not alive(ns, "g3"), 2.0, "SIGTERM: the session is still alive")


REFUSE = """
try:
    Guard.start(session, Backend(backend)).close()
except SessionError as exc:
    print(json.dumps(str(exc)))
else:
    print(json.dumps(None))
"""


def test_second_guard_of_a_session_is_refused(
    namespaces: Namespaces, ns: str, backend: str
) -> None:
    start_holder(namespaces, ns, backend, "dup", apply_rules=False)
    message = ns_py(ns, REFUSE, session="dup", backend=backend)
    assert message == "session 'dup' is already active in this target"
    # Another namespace is another target: the same name is free there.
    other = namespaces.new()
    assert ns_py(other, REFUSE, session="dup", backend=backend) is None
    assert alive(ns, "dup")
    assert not alive(other, "dup")


def test_clear_stale(namespaces: Namespaces, ns: str, backend: str) -> None:
    start_holder(namespaces, ns, backend, "alive1")
    apply(ns, backend, "dead1", port=7000, to=17000)  # no guard: as if it had crashed
    removed = ns_py(
        ns,
        "print(json.dumps(clear_stale(Backend(backend), alive=session_alive)))",
        backend=backend,
    )
    assert removed == ["dead1"]
    sessions = ns_py(
        ns,
        "print(json.dumps({k: sorted(v) for k, v in list_sessions(Backend(backend)).items()}))",
        backend=backend,
    )
    assert sessions == {"alive1": [ORIG_PORT]}
    assert "NETMIRROR-dead1" not in save(ns, backend) + save(ns, backend, 6)


def test_detect_backend(ns: str) -> None:
    if _which("iptables-nft") is None or _which("iptables-legacy") is None:
        pytest.skip("needs both iptables-nft and iptables-legacy")

    def detect() -> object:
        return ns_py(ns, "print(json.dumps(detect_backend().value))")

    assert detect() == "nft"  # nothing in use: the default
    apply(ns, "legacy", "legacy1")
    assert detect() == "legacy"  # only legacy rules: follow them
    apply(ns, "nft", "nft1")
    assert detect() == "nft"  # both: nft wins
    teardown(ns, "legacy", "legacy1")
    teardown(ns, "nft", "nft1")
