"""`netmirror exec`: a local command reaches what only the target reaches, as the target.

The world: the sandbox "pod" namespace, and behind it a "db" namespace that only
the pod can reach (the pod does not forward, so this host cannot). The pod's own
resolver files (/etc/netns/<pod>/hosts and resolv.conf) name the db; a real DNS
server in the db answers names under the pod's search domain. A process in the
pod carries the environment the command should see.

The outgoing rules of ``exec`` live in this host's own tables, which other test
runs share: session names carry the sandbox's name, and the checks look only at
the chains of this test's sessions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netmirror.netfilter.cgroup import CGROUP_PREFIX, cgroup2_root
from tests.integration.conftest import SERVERS, Env, free_port, wait_ready
from tests.support.netfilter import chains_of, host_lines
from tests.support.waiting import eventually, read_line

SEARCH = "shop.svc.cluster.local"
CLIENT = """
import os, sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())
"""


@dataclass
class Private:
    db_ip: str
    http_port: int
    netns: str
    # Addresses of the db this host has no usable route to (the pod has): behind a
    # blackhole route, behind a throw route (no route at all), behind an unreachable
    # IPv6 route (as with no IPv6 default route).
    blackholed: str = ""
    unrouted: str = ""
    unreachable6: str = ""
    any_port: int = 8001  # the http server on every address of the db
    udp_echo: int = 7007
    syslog_log: Path | None = None


def session_name(env: Env, n: int) -> str:
    """This test's session ``n``: named after the sandbox, so no other run has it."""
    return f"x{n}-{env.sandbox.name}"


def _host_outgoing_rules(session: str) -> str:
    """This host's outgoing rules and routing rules of ``session``, nobody else's."""
    from netmirror.netfilter.routing import SessionRoutes

    lines = host_lines(chains_of([session], ("NMOUT-", "NMUDP-", "NMREP-")))
    if SessionRoutes(session).installed():
        lines.append(f"routing rules of mark {SessionRoutes(session).mark:#x}")
    return "\n".join(lines)


def _remove_outgoing_rules(sessions: list[str]) -> None:
    """Take away what a failed test left in the host's tables (only its own chains)."""
    from netmirror.netfilter.iptables import Backend
    from netmirror.netfilter.outgoing import OutgoingFirewall

    for name in sessions:
        if _host_outgoing_rules(name):
            for backend in Backend:
                with contextlib.suppress(Exception):
                    OutgoingFirewall(name, backend=backend).teardown()


def _our_cgroups(session: str) -> list[Path]:
    root = cgroup2_root()
    if root is None:
        return []
    return [p for p in root.glob(CGROUP_PREFIX + session + "*") if p.is_dir()]


@pytest.fixture
def private(env: Env) -> Iterator[Private]:
    if cgroup2_root() is None:
        pytest.skip("netmirror exec needs a cgroup v2 hierarchy")
    box = env.sandbox
    db_ns = f"nmdb-{box.name}"
    pod_ip = f"172.31.{box.index}.1"
    db_ip = f"172.31.{box.index}.2"
    etc = Path("/etc/netns") / box.netns
    procs: list[subprocess.Popen[bytes]] = []
    blackholed = f"172.30.{box.index}.2"
    unrouted = f"172.29.{box.index}.2"
    unreachable6 = f"fd7e:{box.index}::2"
    host_routes = [
        ["ip", "route", "add", "blackhole", f"172.30.{box.index}.0/24"],
        ["ip", "route", "add", "throw", f"172.29.{box.index}.0/24"],
        ["ip", "-6", "route", "add", "unreachable", f"fd7e:{box.index}::/64"],
    ]
    syslog_log = Path(f"/tmp/nm-syslog-{box.name}.log")

    def sh(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    # Normally the env fixture's `down --all` removes the outgoing rules; if a test
    # failed so badly that they stayed, they go here.
    sessions = [session_name(env, n) for n in range(1, 5)]
    try:
        # The target's main process first: the lowest pid of the pod, read for its env.
        app = box.popen(
            "env",
            "-i",
            "PATH=/usr/bin:/bin",
            "HOME=/srv/app",
            "ORDERS_URL=http://orders:8000/",
            "APP_MODE=staging",
            "SECRET_TOKEN=from-the-pod",
            "sleep",
            "600",
        )
        procs.append(app)
        sh("ip", "netns", "add", db_ns)
        sh("ip", "-n", box.netns, "link", "add", "db0", "type", "veth", "peer", "name", "db1")
        sh("ip", "-n", box.netns, "link", "set", "db1", "netns", db_ns)
        sh("ip", "-n", box.netns, "addr", "add", f"{pod_ip}/24", "dev", "db0")
        sh("ip", "-n", box.netns, "link", "set", "db0", "up")
        sh("ip", "-n", db_ns, "addr", "add", f"{db_ip}/24", "dev", "db1")
        sh("ip", "-n", db_ns, "link", "set", "db1", "up")
        sh("ip", "-n", db_ns, "link", "set", "lo", "up")
        # This host knows the way (through the pod), but the pod does not forward:
        # without netmirror the db is out of reach, with no route error to hide that.
        sh("ip", "route", "add", f"172.31.{box.index}.0/24", "via", box.pod_ip)
        # More addresses of the db, which the pod reaches on its link and this host
        # cannot reach at all: connect() fails here before any rule could act.
        for address in (f"{blackholed}/24", f"{unrouted}/24"):
            sh("ip", "-n", db_ns, "addr", "add", address, "dev", "db1")
        sh("ip", "-n", db_ns, "addr", "add", f"{unreachable6}/64", "dev", "db1", "nodad")
        sh("ip", "-n", box.netns, "addr", "add", f"fd7e:{box.index}::1/64", "dev", "db0", "nodad")
        for net in (f"172.30.{box.index}.0/24", f"172.29.{box.index}.0/24"):
            sh("ip", "-n", box.netns, "route", "add", net, "dev", "db0")
        for argv in host_routes:
            sh(*argv)
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"search {SEARCH}\nnameserver {db_ip}\noptions ndots:5\n")
        http_port = 8000
        (etc / "hosts").write_text(
            f"127.0.0.1 localhost\n{db_ip} orders-db.internal\n{db_ip} orders-log.internal\n"
        )
        # An answer larger than any UDP answer may be: 120 A records (about 2 KB).
        big = "|".join(f"10.77.{n // 250}.{n % 250 + 1}" for n in range(120))
        syslog_log.unlink(missing_ok=True)
        for kind, port, host, text in (
            ("http", http_port, db_ip, "orders from the db\n"),
            ("http", 8001, "::", "orders from the db\n"),
            ("dns", 53, db_ip, f"orders.{SEARCH}={db_ip},big.{SEARCH}={big}"),
            ("udp-echo", 7007, "::", ""),
            ("udp-sink", 514, "::", ""),
        ):
            argv = [sys.executable, str(SERVERS), kind, "--port", str(port), "--host", host]
            if kind == "udp-sink":
                argv += ["--log", str(syslog_log)]
            proc = subprocess.Popen(
                ["ip", "netns", "exec", db_ns, *argv, "--text", text],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            procs.append(proc)
            wait_ready(proc, f"{kind} server in the db")
        yield Private(
            db_ip=db_ip,
            http_port=http_port,
            netns=db_ns,
            blackholed=blackholed,
            unrouted=unrouted,
            unreachable6=unreachable6,
            syslog_log=syslog_log,
        )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for argv in host_routes:
            subprocess.run([*argv[:-3], "del", *argv[-2:]], capture_output=True, check=False)
        syslog_log.unlink(missing_ok=True)
        subprocess.run(["ip", "netns", "del", db_ns], capture_output=True, check=False)
        shutil.rmtree(etc, ignore_errors=True)
        _remove_outgoing_rules(sessions)


def _exec(
    env: Env, *args: str, n: int = 1, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    name = session_name(env, n)
    return env.netmirror(
        "exec", "--target", env.sandbox.target, "--session", name, *args, timeout=timeout
    )


def _assert_clean(env: Env, session: str) -> None:
    eventually(
        lambda: not _host_outgoing_rules(session) and not _our_cgroups(session),
        10,
        lambda: (
            f"left behind: rules {_host_outgoing_rules(session)!r}, cgroups {_our_cgroups(session)}"
        ),
        interval=0.1,
    )


def test_outside_netmirror_the_db_is_out_of_reach(env: Env, private: Private) -> None:
    # The premise of the other tests: from this host, the db does not answer.
    res = subprocess.run(
        ["curl", "-sS", "-m", "2", f"http://{private.db_ip}:{private.http_port}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode != 0


def test_command_reaches_the_targets_services_by_its_names(env: Env, private: Private) -> None:
    local_port = free_port()
    env.server("http", local_port, in_pod=False, text="from this machine\n")
    script = (
        # A name only the pod's hosts file knows.
        f"curl -sS -m 5 http://orders-db.internal:{private.http_port}/; "
        # A name only the pod's DNS server knows, under the pod's search domain.
        f"curl -sS -m 5 http://orders:{private.http_port}/; "
        # The same from Python, with the URL from the pod's environment.
        f'{sys.executable} -c "$CLIENT" "$ORDERS_URL"; '
        # Loopback stays on this machine.
        f"curl -sS -m 5 http://127.0.0.1:{local_port}/; "
        'echo "mode=$APP_MODE secret=${SECRET_TOKEN:-unset} home=$HOME"; '
        "exit 3"
    )
    run_env = env.env | {"CLIENT": CLIENT, "HOME": "/root"}
    res = env.netmirror(
        "exec",
        "--target",
        env.sandbox.target,
        "--session",
        session_name(env, 1),
        "--env-exclude",
        "SECRET_*",
        "--",
        "sh",
        "-c",
        script,
        env=run_env,
        timeout=90,
    )
    assert res.returncode == 3, res.stderr
    lines = res.stdout.splitlines()
    assert lines == [
        "orders from the db",
        "orders from the db",
        "orders from the db",
        "from this machine",
        # APP_MODE from the pod; SECRET_TOKEN excluded; HOME is local by default.
        "mode=staging secret=unset home=/root",
    ], res.stderr
    assert "running sh -c" in res.stderr
    _assert_clean(env, session_name(env, 1))


def test_interrupted_exec_leaves_nothing(env: Env, private: Private) -> None:
    # While the command runs, a port of the pod is stolen for this machine too.
    env.server("http", 8080, in_pod=True, text="the pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="stolen for the command\n")
    marker = f"netmirror-exec-bg-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "netmirror",
            "exec",
            "--target",
            env.sandbox.target,
            "--session",
            session_name(env, 2),
            "--steal",
            f"8080:{local}",
            "--",
            "sh",
            "-c",
            # A background child that would outlive the command, then wait.
            f"sh -c 'exec -a {marker} sleep 300' & echo started; sleep 300",
        ],
        env=env.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert read_line(proc.stdout, 60, "the command did not start") == "started"
        assert _our_cgroups(session_name(env, 2)), "the command is not in its cgroup"
        assert _host_outgoing_rules(session_name(env, 2)) != ""
        url = f"http://{env.sandbox.pod_ip}:8080/"
        got = subprocess.run(["curl", "-sS", "-m", "5", url], capture_output=True, text=True)
        assert got.stdout == "stolen for the command\n"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    # sh dies of the forwarded SIGINT: 128 + 2, as a shell would report it.
    assert code == 130, proc.stderr.read() if proc.stderr else ""
    leftover = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False)
    assert leftover.stdout == "", "the command's background child survived"
    _assert_clean(env, session_name(env, 2))
    got = subprocess.run(["curl", "-sS", "-m", "5", url], capture_output=True, text=True)
    assert got.stdout == "the pod\n"


def test_killed_exec_is_cleaned_up_by_its_daemon(env: Env, private: Private) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "netmirror",
            "exec",
            "--target",
            env.sandbox.target,
            "--session",
            session_name(env, 3),
            "--",
            "sh",
            "-c",
            "echo started; sleep 300",
        ],
        env=env.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert read_line(proc.stdout, 60, "the command did not start") == "started"
    finally:
        proc.kill()  # no chance to clean up: the daemon notices its owner is gone
        proc.wait()
    _assert_clean(env, session_name(env, 3))
    eventually(
        lambda: env.our_processes() == [],
        15,
        lambda: f"netmirror processes still running: {env.our_processes()}",
        interval=0.1,
    )


def test_missing_command_is_one_line_and_127(env: Env, private: Private) -> None:
    res = _exec(env, "--", "no-such-command-here")
    assert res.returncode == 127
    assert (
        res.stderr.strip().splitlines()[-1] == "netmirror: command not found: no-such-command-here"
    )
    _assert_clean(env, session_name(env, 1))


def test_proxy_method_for_programs_that_honour_proxy_variables(env: Env, private: Private) -> None:
    # Where the transparent method is impossible (no root, no cgroup v2), the
    # command gets ALL_PROXY (SOCKS5, names resolved by the target) and HTTP_PROXY.
    script = (
        f"curl -sS -m 5 http://orders-db.internal:{private.http_port}/; "
        f'{sys.executable} -c "$CLIENT" http://orders:{private.http_port}/; '
        'echo "$ALL_PROXY" | cut -d: -f1'
    )
    res = env.netmirror(
        "exec",
        "--target",
        env.sandbox.target,
        "--session",
        session_name(env, 4),
        "--outgoing-method",
        "proxy",
        "--",
        "sh",
        "-c",
        script,
        env=env.env | {"CLIENT": CLIENT},
        timeout=90,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["orders from the db", "orders from the db", "socks5h"]
    assert "ALL_PROXY/HTTP_PROXY" in res.stderr
    _assert_clean(env, session_name(env, 4))


def _get(url: str) -> str:
    res = subprocess.run(["curl", "-sS", "-m", "3", url], capture_output=True, text=True)
    return res.stdout or res.stderr


@pytest.mark.parametrize("mode", ["steal", "mirror"])
def test_the_ports_the_command_listens_on_are_taken_and_given_back(
    env: Env, tmp_path: Path, mode: str
) -> None:
    if cgroup2_root() is None:
        pytest.skip("netmirror exec needs a cgroup v2 hierarchy")
    pod_port = 8080
    env.server("http", pod_port, in_pod=True, text="pod\n")
    local = free_port()
    config = tmp_path / "nm.yaml"
    config.write_text(f"incoming:\n  mode: {mode}\n  port_mapping:\n    {local}: {pod_port}\n")
    log = tmp_path / "local.log"
    # The command: a server that starts a moment later, and stops when told (a line
    # on its stdin) while the command goes on.
    kind = "http --text local" if mode == "steal" else f"sink --log {log}"
    # And a port the pod does not serve (a debugger's, say): reported, left alone.
    extra = free_port()
    script = (
        f"sleep 1; {sys.executable} {SERVERS} {kind} --port {local} --host 127.0.0.1"
        f" & server=$!; {sys.executable} {SERVERS} echo --port {extra} --host 127.0.0.1 &"
        " read line; kill $server; sleep 60"
    )
    name = session_name(env, 1)
    argv = [sys.executable, "-m", "netmirror", "exec", "--target", env.sandbox.target]
    argv += ["--session", name, "-c", str(config), "--", "sh", "-c", script]
    proc = subprocess.Popen(
        argv, env=env.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    env.procs.append(proc)
    url = f"http://{env.sandbox.pod_ip}:{pod_port}/"
    try:

        def taken() -> bool:
            out = env.netmirror("status", "--json", "--session", name).stdout
            sessions = json.loads(out).get("sessions", []) if out else []
            ports = sessions[0].get("ports", []) if sessions else []
            return any(p["remote"] == pod_port and p["state"] == "active" for p in ports)

        eventually(taken, 15, "the port the command listens on was not taken", interval=0.2)

        def unserved() -> list[dict[str, int]]:
            out = env.netmirror("status", "--json", "--session", name).stdout
            return list(json.loads(out)["sessions"][0].get("unserved", []))

        eventually(lambda: unserved() != [], 5, "the unserved port was not reported")
        time.sleep(1.2)  # two more looks at the command's ports: still once, still alone
        steal = mode == "steal"
        assert unserved() == [{"remote": extra, "local": extra, "taken": steal}]
        text = env.netmirror("status", "--session", name).stdout
        what = "stolen anyway" if steal else "left alone"
        assert text.count(f"the target does not serve it ({what})") == 1, text
        st = json.loads(env.netmirror("status", "--json", "--session", name).stdout)
        # A copy of nothing is pointless; a steal still gets connections to the pod.
        assert (extra in [p["remote"] for p in st["sessions"][0]["ports"]]) == steal
        if mode == "steal":
            assert _get(url) == "local"
        else:
            assert _get(url) == "pod\n"  # the pod answers; the command gets a copy
            eventually(lambda: log.exists() and log.read_text().strip() != "", 5, "no copy")
        assert proc.stdin is not None
        proc.stdin.write(b"stop\n")
        proc.stdin.flush()
        eventually(lambda: not taken(), 5, "the port was not given back", interval=0.2)
        assert _get(url) == "pod\n"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def test_port_forward_reaches_a_pod_only_service_by_a_pod_only_name(
    env: Env, private: Private
) -> None:
    local = free_port()
    name = session_name(env, 1)
    argv = [sys.executable, "-m", "netmirror", "port-forward", "--target", env.sandbox.target]
    argv += ["--session", name, "-L", f"{local}:orders-db.internal:{private.http_port}"]
    proc = subprocess.Popen(argv, env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    env.procs.append(proc)
    assert proc.stdout is not None
    first = read_line(proc.stdout, 30, "the port-forward did not start")
    assert first.startswith(f"forwarding 127.0.0.1:{local} -> orders-db.internal:"), first
    # From this machine, by a name only the pod's hosts file knows.
    assert _get(f"http://127.0.0.1:{local}/") == "orders from the db\n"
    assert _get(f"http://127.0.0.1:{local}/") == "orders from the db\n"
    st = json.loads(env.netmirror("status", "--json", "--session", name, check=True).stdout)
    (forward,) = st["sessions"][0]["forwards"]
    assert forward["to"] == f"orders-db.internal:{private.http_port}"
    assert forward["connections_total"] == 2
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert env.netmirror("status", "--json").stdout.count(name) == 0


UNROUTABLE_CLIENT = """
import sys, urllib.request
for url in sys.argv[1:]:
    try:
        print(url, urllib.request.urlopen(url, timeout=5).read().decode().strip())
    except OSError as exc:
        print(url, "failed:", exc)
"""


def _urls(private: Private) -> list[str]:
    return [
        f"http://{private.blackholed}:{private.any_port}/",
        f"http://{private.unrouted}:{private.any_port}/",
        f"http://[{private.unreachable6}]:{private.any_port}/",
    ]


def test_exec_reaches_addresses_this_machine_has_no_route_to(env: Env, private: Private) -> None:
    from netmirror.netfilter.routing import SessionRoutes

    # Without netmirror, connect() fails here at once: EINVAL behind the blackhole,
    # ENETUNREACH with no route and behind the unreachable IPv6 route.
    outside = subprocess.run(
        [sys.executable, "-c", UNROUTABLE_CLIENT, *_urls(private)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert outside.stdout.count("failed:") == 3, outside.stdout
    host_routes_before = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    res = _exec(env, "--", sys.executable, "-c", UNROUTABLE_CLIENT, *_urls(private))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"{u} orders from the db" for u in _urls(private)]
    # The host's own routing is as it was, and the command's rules are gone.
    assert subprocess.run(["ip", "route"], capture_output=True, text=True).stdout == (
        host_routes_before
    )
    assert not SessionRoutes(session_name(env, 1)).installed()
    _assert_clean(env, session_name(env, 1))


UDP_CLIENT = """
import logging, logging.handlers, socket, sys
echo_port, v6 = int(sys.argv[1]), sys.argv[2]
# A connected socket, by a name only the pod resolves: the answer comes back to it.
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.settimeout(5)
c.connect(("orders-db.internal", echo_port))
for n in range(3):
    c.send(b"ping %d" % n)
    print(c.recv(500).decode())
# An unconnected IPv6 socket, to an address this machine cannot route.
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"hello", (v6, echo_port))
data, source = u.recvfrom(500)
print(source[0], source[1], data.decode())
# A syslog sender (UDP to port 514): nothing comes back.
logger = logging.getLogger("app")
logger.addHandler(logging.handlers.SysLogHandler(address=("orders-log.internal", 514)))
logger.warning("order 42 shipped")
"""


def test_udp_leaves_from_the_target_and_answers_come_back(env: Env, private: Private) -> None:
    box = env.sandbox
    res = _exec(
        env, "--", sys.executable, "-c", UDP_CLIENT, str(private.udp_echo), private.unreachable6
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    # The echo server saw the pod's address: the datagrams left from the pod.
    pod_side = f"172.31.{box.index}.1"
    assert len(lines) == 4, res.stdout
    sources = {line.split(": ", 1)[0] for line in lines[:3]}
    assert len(sources) == 1 and next(iter(sources)).startswith(f"from {pod_side}:"), lines
    assert [line.split(": ", 1)[1] for line in lines[:3]] == ["ping 0", "ping 1", "ping 2"]
    address, port, text = lines[3].split(" ", 2)
    assert (address, port) == (private.unreachable6, str(private.udp_echo)), lines[3]
    assert text.startswith(f"from fd7e:{box.index}::1:") and text.endswith(": hello"), lines[3]
    assert private.syslog_log is not None
    eventually(
        lambda: (
            private.syslog_log is not None
            and private.syslog_log.exists()
            and "order 42 shipped" in private.syslog_log.read_text()
        ),
        10,
        "the syslog line did not arrive",
        interval=0.1,
    )
    assert private.syslog_log.read_text().startswith(pod_side + " ")
    _assert_clean(env, session_name(env, 1))


def test_large_dns_answers_over_tcp_and_after_truncation(env: Env, private: Private) -> None:
    if shutil.which("dig") is None:
        pytest.skip("dig is not installed (Debian package bind9-dnsutils)")
    name = f"big.{SEARCH}"
    script = (
        # UDP first: the answer is too large, so it is truncated and dig asks over TCP.
        f"dig +short +tries=1 +time=5 {name} A; echo ---; "
        f"dig +short +tcp +tries=1 +time=5 {name} A; echo ---; "
        # Without EDNS the limit is 512 bytes; dig says it retries, and gets it all.
        f"dig +noedns +tries=1 +time=5 {name} A"
    )
    res = _exec(env, "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    udp, tcp, plain = res.stdout.split("---\n")
    expected = sorted(f"10.77.{n // 250}.{n % 250 + 1}" for n in range(120))
    assert sorted(udp.split()) == expected
    assert sorted(tcp.split()) == expected
    assert "Truncated, retrying in TCP mode" in plain, plain
    assert plain.count("\tIN\tA\t10.77.") == 120, plain
    _assert_clean(env, session_name(env, 1))


def test_machines_around_still_reach_the_commands_own_servers(env: Env, private: Private) -> None:
    # The command's sockets carry the session's mark; the answers of a server it
    # runs (its SYN-ACK first) must still go out on the real link, not into lo.
    box = env.sandbox
    port = free_port()
    script = (
        f"{sys.executable} {SERVERS} echo --port {port} --host 0.0.0.0 & server=$!; sleep 1; "
        f"echo from-the-pod | ip netns exec {box.netns} "
        f"socat -t 3 - TCP:{box.host_ip}:{port},connect-timeout=5; kill $server"
    )
    res = _exec(env, "--incoming", "off", "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1:] == ["from-the-pod"], res.stderr
    _assert_clean(env, session_name(env, 1))
