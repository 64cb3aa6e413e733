"""The ``netmirror`` command. The only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from netmirror import __version__
from netmirror.errors import CommandError, ConfigError, NetmirrorError, SessionError
from netmirror.protocol.connection import token_sha256
from netmirror.state import (
    SessionDir,
    SessionRecord,
    list_session_dirs,
    pid_alive,
    pid_start,
)

if TYPE_CHECKING:  # the config models (pydantic) load only for commands that need them
    from netmirror.config import Config

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
CONTROL_TIMEOUT = 3.0


# --- small helpers --------------------------------------------------------------


def _err(message: str) -> None:
    sys.stderr.write(f"netmirror: {message}\n")


def control(sdir: SessionDir, command: str, *, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
    """One request on a session's control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(sdir.control_socket))
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise SessionError(f"session {sdir.name!r} is not answering ({exc})") from None
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError:
        raise SessionError(f"session {sdir.name!r} gave a garbled answer") from None
    return answer


def _kill(pid: int, start: int = 0, *, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; returns once the pid is gone.

    ``start`` (recorded start time) makes sure a reused pid is left alone.
    """
    if not pid_alive(pid, start):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while pid_alive(pid) and time.monotonic() < deadline + 2:
            time.sleep(0.05)


def clean_stale(sdir: SessionDir) -> bool:
    """Remove a session whose daemon is gone; True if it was stale."""
    try:
        record = sdir.read()
    except SessionError:
        if sdir.control_socket.exists() or sdir.record_path.exists():
            return False
        sdir.remove()
        return True
    if pid_alive(record.daemon_pid, record.daemon_start) or (
        record.daemon_pid == 0 and time.time() - record.created < 60
    ):
        return False
    # The agent removes its rules when it exits; its guard does if it is killed.
    _kill(record.agent_pid, record.agent_start)
    sdir.remove()
    return True


def _live_sessions() -> list[tuple[SessionDir, SessionRecord]]:
    live = []
    for sdir in list_session_dirs():
        if clean_stale(sdir):
            continue
        with contextlib.suppress(SessionError):
            live.append((sdir, sdir.read()))
    return live


def _default_session_name(target: str, taken: set[str]) -> str:
    raw = target.rsplit("/", 1)[-1].lower()
    base = "".join(c if c.isalnum() else "-" for c in raw).strip("-")[:15].strip("-") or "session"
    name, n = base, 2
    while name in taken:
        name = f"{base}-{n}"
        n += 1
    return name


# --- commands ---------------------------------------------------------------------


def _config(args: argparse.Namespace, **more: Any) -> Config:
    """The session's config: file < NETMIRROR_* variables < flags."""
    from netmirror.config import Overrides, build_config

    config = build_config(
        file=Path(args.config) if args.config else None,
        env=os.environ,
        flags=Overrides(
            target=args.target,
            session=args.session,
            steal=args.steal or (),
            mirror=args.mirror or (),
            agent_image=args.agent_image,
            mirror_method=args.mirror_method,
            pcap=args.pcap,
            namespace=args.namespace,
            context=args.context,
            agent_mode=args.agent_mode,
            http_filter=_http_filter(args),
            **more,
        ),
    )
    if config.pcap is not None:
        # The daemon runs elsewhere (cwd /): a relative path means the user's cwd.
        absolute = str(Path(config.pcap.path).expanduser().resolve())
        config = config.model_copy(
            update={"pcap": config.pcap.model_copy(update={"path": absolute})}
        )
    if not config.target:
        raise ConfigError("no target: pass --target KIND/NAME (e.g. netns/pod1) or set target:")
    return config


def _http_filter(args: argparse.Namespace) -> dict[str, str] | None:
    """The filter of --http-header/--http-path/--http-method, for the --steal ports."""
    found = {
        key: value
        for key, value in (
            ("header", args.http_header),
            ("path", args.http_path),
            ("method", args.http_method),
        )
        if value
    }
    if found and not args.steal:
        raise ConfigError("--http-header/--http-path/--http-method apply to --steal ports")
    return found or None


def cmd_up(args: argparse.Namespace) -> int:
    config = _config(args)
    if not config.active_ports():
        raise ConfigError(
            "no ports to take: pass --steal PORT[:LOCAL] or list ports: in the config"
        )
    sdir = _new_session(config)
    outcome = _start_daemon(sdir, config, debug=args.debug, timeout=args.timeout)
    status = outcome.get("status", {})
    ports = ", ".join(
        f"{p['mode']} {p['remote']} -> {p['local']}"
        for p in status.get("ports", [])
        if p["mode"] != "off"
    )
    print(f"session {sdir.name!r} is up on {status.get('target')}: {ports}")
    print(f"  netmirror status --session {sdir.name}   |   netmirror down --session {sdir.name}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from netmirror.environment import merge_environment
    from netmirror.outgoing import Cgroup, cgroup2_root

    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("no command to run: netmirror exec --target KIND/NAME -- COMMAND [ARGS]")
    overrides: dict[str, Any] = {
        "env_exclude": tuple(args.env_exclude or ()),
        "outgoing_exclude": tuple(args.outgoing_exclude or ()),
    }
    if args.env_include:
        overrides["env_include"] = tuple(args.env_include)
    if args.env_set:
        overrides["env_override"] = dict(_key_value(item) for item in args.env_set)
    if args.no_outgoing:
        overrides["outgoing"] = False
    if args.outgoing_method:
        overrides["outgoing_method"] = args.outgoing_method
    config = _config(args, **overrides)
    owner = {"owner_pid": os.getpid(), "owner_start": pid_start(os.getpid()) or 0}
    sdir = _new_session(config, extra={"exec": owner})
    # From here on, however this ends, the session ends with it.
    try:
        outcome = _start_daemon(sdir, config, debug=args.debug, timeout=args.timeout)
        info = outcome.get("exec", {})
        env = dict(os.environ)
        if "env" in info:
            env = merge_environment(env, info["env"], config.env)
        else:
            _err(
                f"warning: the command gets the local environment only: "
                f"{info.get('env_error', 'the target sent none')}"
            )
        cgroup_path = info.get("cgroup")
        if info.get("proxy_env"):
            # No transparent redirection here: programs that honour proxy variables.
            env.update(info["proxy_env"])
        _say_exec(sdir.name, outcome, command, env_pid=info.get("env_pid"))
        return _run_command(command, env, Path(cgroup_path) if cgroup_path else None)
    finally:
        cgroup = Cgroup.for_session(sdir.name) if cgroup2_root() is not None else None
        if cgroup is not None:
            # Background processes the command left behind go with it.
            cgroup.kill_all()
        _stop_session(sdir)


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--env {item!r}: expected NAME=VALUE")
    return key, value


def _say_exec(session: str, outcome: dict[str, Any], command: list[str], env_pid: Any) -> None:
    status = outcome.get("status", {})
    parts = [f"{p['mode']} {p['remote']} -> {p['local']}" for p in status.get("ports", [])]
    if outcome.get("exec", {}).get("cgroup"):
        parts.append("outgoing TCP and DNS through the target")
    elif outcome.get("exec", {}).get("proxy_env"):
        parts.append("outgoing through the target for programs that use ALL_PROXY/HTTP_PROXY")
    if env_pid:
        parts.append(f"environment of its process {env_pid}")
    where = status.get("target")
    sys.stderr.write(
        f"netmirror: running {shlex.join(command)} as if in {where} "
        f"(session {session}: {'; '.join(parts) or 'nothing to take'})\n"
    )
    sys.stderr.flush()


def _run_command(command: list[str], env: dict[str, str], cgroup: Path | None) -> int:
    """Run the command in ``cgroup``; its exit status (128+N for signal N) is ours."""
    procs_file = str(cgroup / "cgroup.procs") if cgroup is not None else None

    def join_cgroup() -> None:
        if procs_file is not None:
            with open(procs_file, "w") as procs:
                procs.write(str(os.getpid()))

    try:
        proc = subprocess.Popen(command, env=env, preexec_fn=join_cgroup)
    except FileNotFoundError:
        raise CommandError(f"command not found: {command[0]}", 127) from None
    except PermissionError:
        raise CommandError(f"cannot run {command[0]}: permission denied", 126) from None

    def forward(signum: int, frame: Any) -> None:
        # Ctrl-C on a terminal reaches the command directly (same process group).
        if signum == signal.SIGINT and sys.stdin.isatty():
            return
        # Like a terminal's Ctrl-C, the signal goes to the whole tree: every process
        # of the command's cgroup (a shell waits for its child before it reacts).
        pids = [proc.pid]
        if procs_file is not None:
            with contextlib.suppress(OSError, ValueError):
                pids = [int(pid) for pid in Path(procs_file).read_text().split()] or pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in signals}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


def _new_session(config: Config, extra: dict[str, Any] | None = None) -> SessionDir:
    """Check the ports are free and create the session's directory."""
    assert config.target is not None
    live = _live_sessions()
    for sdir, record in live:
        if record.target != config.target:
            continue
        # Sessions that steal only filtered HTTP requests may share a port.
        theirs = {
            p["remote"]
            for p in record.config.get("ports", [])
            if p.get("mode") != "off" and not (p.get("http_filter") and p.get("mode") == "steal")
        }
        shared = {
            p["remote"]
            for p in record.config.get("ports", [])
            if p.get("http_filter") and p.get("mode") == "steal"
        }
        for port in config.active_ports():
            if port.remote in shared and port.http_filter is None:
                raise SessionError(
                    f"port {port.remote} of {config.target} is shared by HTTP-filtered session "
                    f"{sdir.name!r}; a whole-port steal would take its requests"
                )
            if port.remote in theirs:
                raise SessionError(
                    f"port {port.remote} of {config.target} is already taken by session "
                    f"{sdir.name!r} (netmirror down --session {sdir.name})"
                )
    taken = {sdir.name for sdir, _ in live}
    name = config.session or _default_session_name(config.target, taken)
    if name in taken:
        raise SessionError(f"session {name!r} is already running (netmirror down --session {name})")
    sdir = SessionDir(name)
    if sdir.path.exists():
        sdir.remove()  # an empty or damaged left-over, not live (checked above)
    sdir.create(
        SessionRecord(
            name=name,
            target=config.target,
            config=config.model_dump(mode="json"),
            created=time.time(),
            extra=extra or {},
        )
    )
    return sdir


def _start_daemon(
    sdir: SessionDir, config: Config, *, debug: bool, timeout: float | None
) -> dict[str, Any]:
    """Start the session's daemon and wait until it is ready; returns its ready message."""
    read_fd, write_fd = os.pipe()
    cmd = [
        sys.executable,
        "-m",
        "netmirror",
        "daemon",
        "--session",
        sdir.name,
        "--ready-fd",
        str(write_fd),
    ]
    if debug:
        cmd.insert(3, "--debug")  # a global option: before the subcommand
    with open(sdir.log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    limit = timeout or (config.agent.ready_timeout + 30)
    tty = sys.stderr.isatty()
    text = "starting the daemon"
    buffer = b""
    outcome: dict[str, Any] | None = None
    started = time.monotonic()
    frame = 0
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while outcome is None:
                elapsed = time.monotonic() - started
                if elapsed > limit:
                    outcome = {"error": f"not ready after {limit:.0f}s (last step: {text})"}
                    break
                if tty:
                    sys.stderr.write(
                        f"\r\x1b[K{SPINNER[frame % len(SPINNER)]} {text} ({elapsed:.1f}s)"
                    )
                    sys.stderr.flush()
                    frame += 1
                ready, _, _ = select.select([pipe], [], [], 0.1)
                if not ready:
                    continue
                chunk = pipe.read(65536)
                if not chunk:
                    code = proc.wait()
                    outcome = {
                        "error": f"the daemon exited with code {code} before it was ready"
                        f" (log: {sdir.log_path})"
                    }
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    with contextlib.suppress(ValueError):
                        message = json.loads(line)
                        if "progress" in message:
                            text = str(message["progress"])
                            if not tty:
                                sys.stderr.write(f"... {text}\n")
                        elif "error" in message or "ready" in message:
                            outcome = message
    except KeyboardInterrupt:
        outcome = {"error": "interrupted"}
    finally:
        if tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
    if "error" in outcome:
        _kill(proc.pid)
        with contextlib.suppress(SessionError):
            record = sdir.read()
            _kill(record.agent_pid, record.agent_start)
        sdir.remove()
        raise SessionError(str(outcome["error"]))
    return outcome


def _select(args: argparse.Namespace, *, allow_all: bool) -> list[SessionDir]:
    live = [sdir for sdir, _ in _live_sessions()]
    if getattr(args, "all", False) and allow_all:
        return live
    if args.session:
        sdir = SessionDir(args.session)
        if not sdir.path.exists():
            raise SessionError(f"no session named {args.session!r}")
        return [sdir]
    if len(live) > 1:
        names = ", ".join(s.name for s in live)
        raise SessionError(
            f"several sessions are running ({names}): name one with --session"
            + (" or use --all" if allow_all else "")
        )
    return live


def cmd_down(args: argparse.Namespace) -> int:
    if args.session and not SessionDir(args.session).path.exists():
        print(f"no session named {args.session!r}: nothing to do")
        return 0
    sessions = _select(args, allow_all=True)
    if not sessions:
        print("no sessions running: nothing to do")
        return 0
    for sdir in sessions:
        _stop_session(sdir)
        print(f"session {sdir.name!r} is down")
    return 0


def _stop_session(sdir: SessionDir) -> None:
    """Ask the daemon to end the session, wait for it, kill what is left."""
    try:
        record = sdir.read()
    except SessionError:
        sdir.remove()
        return
    try:
        control(sdir, "down")
        deadline = time.monotonic() + 15
        while pid_alive(record.daemon_pid, record.daemon_start) and time.monotonic() < deadline:
            time.sleep(0.05)
    except SessionError:
        pass
    _kill(record.daemon_pid, record.daemon_start)
    _kill(record.agent_pid, record.agent_start)
    sdir.remove()


def _format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def cmd_status(args: argparse.Namespace) -> int:
    stale = []
    for sdir in list_session_dirs():
        if clean_stale(sdir):
            stale.append(sdir.name)
    sessions = _select(args, allow_all=True) if args.session else [s for s, _ in _live_sessions()]
    statuses: list[dict[str, Any]] = []
    for sdir in sessions:
        try:
            statuses.append(control(sdir, "status")["status"])
        except (SessionError, KeyError) as exc:
            statuses.append({"session": sdir.name, "state": "not answering", "error": str(exc)})
    if args.json:
        print(json.dumps({"sessions": statuses, "cleaned_stale": stale}, indent=2))
        return 0
    for name in stale:
        print(f"session {name!r} had ended (its daemon was gone); cleaned up")
    if not statuses:
        print("no sessions running")
        return 0
    for st in statuses:
        agent = st.get("agent", {})
        print(
            f"session {st['session']}  target {st.get('target', '?')}  state {st['state']}"
            f"  daemon pid {st.get('daemon_pid', '?')}"
        )
        if agent:
            extra = f", {agent['backend']} rules" if agent.get("backend") else ""
            print(f"  agent: {agent.get('state')} (pid {agent.get('pid', '?')}{extra})")
        ports = st.get("ports", [])
        if ports:
            print(
                f"  {'PORT':>6}  {'MODE':<7} {'LOCAL':<22} {'STATE':<8} {'CONNS':>11}"
                f" {'IN':>10} {'OUT':>10} {'ERRORS':>6}"
            )
        for p in ports:
            conns = f"{p.get('connections_total', 0)}/{p.get('connections_open', 0)}"
            b_in = _format_bytes(p.get("bytes_in", 0))
            b_out = _format_bytes(p.get("bytes_out", 0))
            print(
                f"  {p['remote']:>6}  {p['mode']:<7} {p['local']:<22} {p['state']:<8} {conns:>11}"
                f" {b_in:>10} {b_out:>10} {p.get('errors', 0):>6}"
            )
            http = p.get("http")
            if http:
                print(
                    f"          HTTP filter {http.get('filter')}: {http.get('matched', 0)} "
                    f"requests matched, {http.get('passed', 0)} passed to the target "
                    f"(place {http.get('order', '?')} of {len(http.get('sessions', [])) or '?'})"
                )
            mirror = p.get("mirror")
            if mirror:
                print(
                    f"          {p.get('method')}: {mirror.get('flows', 0)} copied, "
                    f"{mirror.get('partial', 0)} partial, {mirror.get('gaps', 0)} gaps, "
                    f"{mirror.get('dropped', 0)} dropped (fell behind)"
                )
            if p.get("last_error"):
                print(f"          last error: {p['last_error']}")
        if ports:
            print("  (CONNS is total/open; IN is client to local, OUT local to client)")
        capture = st.get("capture")
        if capture:
            print(
                f"  capture: {capture['packets']} packets, {capture['kernel_drops']} dropped by "
                f"the kernel, {capture['truncated']} truncated"
            )
        pcap = st.get("pcap")
        if pcap:
            print(
                f"  pcap: {pcap['path']} ({_format_bytes(pcap['bytes'])}, {pcap['records']} "
                f"packets, {pcap['state']})"
            )
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    sessions = _select(args, allow_all=False)
    if not sessions:
        raise SessionError("no sessions running")
    sdir = sessions[0]
    try:
        fh = open(sdir.log_path, "rb")
    except FileNotFoundError:
        raise SessionError(f"session {sdir.name!r} has no log") from None
    with fh:
        sys.stdout.buffer.write(fh.read())
        sys.stdout.flush()
        if not args.follow:
            return 0
        try:
            while sdir.path.exists():
                chunk = fh.read()
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                else:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    import asyncio

    from netmirror.kube.target import list_targets

    result = asyncio.run(list_targets(namespace=args.namespace, context=args.context))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"namespace {result['namespace']}")
    if not result["targets"]:
        print("  no pods, deployments or statefulsets")
    for t in result["targets"]:
        ports = ", ".join(t["ports"]) or "-"
        print(f"  {t['target']:<48} ready {t['ready']:<8} ports {ports}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from netmirror.config import json_schema, load_file, parse_config

    if args.config_command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    path = Path(args.file)
    config = parse_config(load_file(path), source=path.name)
    print(f"{path}: ok ({len(config.ports)} port(s), target {config.target or 'not set'})")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from netmirror import agent, logs

    logs.setup(session=args.session, role="agent", debug=args.debug)
    digest: bytes | None = None
    if args.token_sha256:
        try:
            digest = bytes.fromhex(args.token_sha256)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError("--token-sha256: expected 64 hexadecimal digits")
    else:
        if args.token_stdin:
            token = sys.stdin.readline().strip()
        elif args.token_file:
            token = Path(args.token_file).read_text().strip()
        else:
            token = os.environ.pop("NETMIRROR_TOKEN", "")
        if token:
            digest = token_sha256(token)
    if not digest:
        raise ConfigError(
            "the agent needs a token (--token-stdin, --token-file, --token-sha256 or "
            "NETMIRROR_TOKEN)"
        )
    options = agent.AgentOptions(
        session=args.session,
        listen=args.listen,
        token_digest=digest,
        ttl=args.ttl,
        netns=Path(args.netns) if args.netns else None,
        container_id=args.container_id,
        target_pid=args.target_pid,
        debug=args.debug,
    )
    return agent.run(options)


def cmd_daemon(args: argparse.Namespace) -> int:
    from netmirror import daemon

    return daemon.run(args.session, ready_fd=args.ready_fd, debug=args.debug)


# --- parser -----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"netmirror: {message} (see {self.prog} --help)\n")


def _session_args(parser: argparse.ArgumentParser) -> None:
    """Target, ports and agent options, shared by up and exec."""
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML, TOML or JSON config file")
    parser.add_argument("--target", "-t", help="netns/NAME or pid/PID")
    parser.add_argument(
        "--steal",
        action="append",
        metavar="REMOTE[:LOCAL]",
        help="answer connections to REMOTE with 127.0.0.1:LOCAL (repeatable)",
    )
    parser.add_argument(
        "--mirror",
        action="append",
        metavar="REMOTE[:LOCAL]",
        help="send a copy of REMOTE's traffic to 127.0.0.1:LOCAL (repeatable)",
    )
    parser.add_argument(
        "--mirror-method",
        choices=["capture", "passthrough"],
        help="how --mirror ports are copied (default capture: packet capture, nothing in "
        "the traffic path; passthrough: relayed through the agent)",
    )
    parser.add_argument("--pcap", metavar="FILE", help="save the mirrored ports' packets here")
    parser.add_argument(
        "--http-header",
        metavar="REGEX",
        help="steal only the HTTP requests with a header line matching REGEX "
        "(e.g. '^x-dev: feature-42$'; names in lower case); others reach the target",
    )
    parser.add_argument(
        "--http-path", metavar="REGEX", help="steal only requests whose path matches REGEX"
    )
    parser.add_argument("--http-method", metavar="METHOD", help="steal only this method")
    parser.add_argument("--session", "-s", help="session name (default: from the target)")
    parser.add_argument("--agent-image", help="agent container image (Kubernetes targets)")
    parser.add_argument(
        "--agent-mode",
        choices=["ephemeral", "job"],
        help="Kubernetes: ephemeral container in the pod (default) or a job pod on its node",
    )
    parser.add_argument("-n", "--namespace", help="Kubernetes namespace of the target")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--timeout", type=float, help="seconds to wait until ready")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="netmirror",
        description="Steal or mirror the TCP traffic of a target into a local process.",
    )
    parser.add_argument("--version", action="version", version=f"netmirror {__version__}")
    parser.add_argument("--debug", action="store_true", help="verbose logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start a session: steal or mirror ports of a target")
    _session_args(up)
    up.set_defaults(func=cmd_up)

    run = sub.add_parser(
        "exec",
        help="run a local command as if inside the target: its environment, outgoing "
        "TCP and DNS (and --steal/--mirror ports while it runs)",
        usage="netmirror exec [options] -- COMMAND [ARGS...]",
    )
    _session_args(run)
    run.add_argument(
        "--env-exclude",
        action="append",
        metavar="PATTERN",
        help="keep the local value of variables matching PATTERN (glob, repeatable)",
    )
    run.add_argument(
        "--env-include",
        action="append",
        metavar="PATTERN",
        help="take only the target's variables matching PATTERN (glob, repeatable)",
    )
    run.add_argument(
        "--env", dest="env_set", action="append", metavar="NAME=VALUE", help="set a variable"
    )
    run.add_argument(
        "--outgoing-exclude",
        action="append",
        metavar="CIDR",
        help="connections to this network stay local (repeatable; loopback always does)",
    )
    run.add_argument(
        "--outgoing-method",
        choices=["auto", "transparent", "proxy"],
        help="transparent: iptables rules for the command's cgroup (root, cgroup v2); "
        "proxy: ALL_PROXY/HTTP(S)_PROXY variables; auto (default): transparent if possible",
    )
    run.add_argument(
        "--no-outgoing",
        action="store_true",
        help="leave the command's outgoing traffic and DNS alone",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_exec)

    ls = sub.add_parser("ls", help="Kubernetes targets you can use, with their ports")
    ls.add_argument("-n", "--namespace")
    ls.add_argument("--context")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    down = sub.add_parser("down", help="stop a session and remove every rule")
    down.add_argument("--session", "-s")
    down.add_argument("--all", action="store_true", help="stop every session")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="sessions, ports and counters")
    status.add_argument("--session", "-s")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status, all=False)

    logs_p = sub.add_parser("logs", help="show a session's log")
    logs_p.add_argument("--session", "-s")
    logs_p.add_argument("-f", "--follow", action="store_true")
    logs_p.set_defaults(func=cmd_logs)

    cfg = sub.add_parser("config", help="check a config file or print its JSON Schema")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = cfg_sub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    cfg_sub.add_parser("schema", help="print the JSON Schema of the config file")
    cfg.set_defaults(func=cmd_config)

    agent = sub.add_parser("agent", help="run the agent (inside the target; started for you)")
    agent.add_argument("--session", required=True)
    agent.add_argument(
        "--listen",
        default="tcp:127.0.0.1:47070",
        help="unix:PATH or tcp:HOST:PORT for the daemon's websocket",
    )
    agent.add_argument("--netns", help="network namespace file to enter first")
    agent.add_argument(
        "--ttl",
        type=float,
        default=5.0,
        help="seconds to keep the rules while no daemon is connected",
    )
    agent.add_argument("--token-stdin", action="store_true", help="read the token from stdin")
    agent.add_argument("--token-file", help="read the token from a file")
    agent.add_argument("--token-sha256", help="accept the token whose SHA-256 is this (hex)")
    agent.add_argument(
        "--container-id", help="enter this container's network namespace (needs hostPID)"
    )
    agent.add_argument(
        "--target-pid", type=int, help="the target's main process (environment, resolver)"
    )
    agent.set_defaults(func=cmd_agent)

    daemon = sub.add_parser("daemon")  # started by `up`; not for people
    daemon.add_argument("--session", required=True)
    daemon.add_argument("--ready-fd", type=int)
    daemon.set_defaults(func=cmd_daemon)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except NetmirrorError as exc:
        _err(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        return 0
