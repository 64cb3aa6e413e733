"""The CLI's commands, and its entry point: the only place that turns errors into exit codes.

The grammar is :mod:`.parser`; a session's life (starting its daemon, stopping it)
is :mod:`.session`; what people see is :mod:`.render`; ``exec``'s command runs
through :mod:`.runner`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netmirror.cli.parser import build_parser
from netmirror.cli.render import port_line, status_lines, status_of
from netmirror.cli.runner import run_command, say_exec
from netmirror.cli.session import (
    clean_stale,
    control,
    live_sessions,
    new_session,
    select_sessions,
    start_daemon,
    stop_session,
)
from netmirror.errors import CommandError, ConfigError, NetmirrorError, SessionError
from netmirror.wire.session import (
    SessionDir,
    list_session_dirs,
    pid_alive,
    pid_start,
)

if TYPE_CHECKING:  # the config models (pydantic) load only for commands that need them
    from netmirror.config import Config

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
CONTROL_TIMEOUT = 3.0


def _err(message: str) -> None:
    sys.stderr.write(f"netmirror: {message}\n")


# --- commands ---------------------------------------------------------------------


def _config(args: argparse.Namespace, **more: Any) -> Config:
    """The session's config: file < NETMIRROR_* variables < flags."""
    from netmirror.config import Overrides, build_config
    from netmirror.config.mirrord import Note

    notes: list[Note] = []
    config = build_config(
        file=Path(args.config) if args.config else None,
        env=os.environ,
        notes=notes,
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
            agent_namespace=args.agent_namespace,
            http_filter=_http_filter(args),
            files=None if args.files is None else args.files == "on",
            files_ro=tuple(args.files_ro or ()),
            files_rw=tuple(args.files_rw or ()),
            files_local=tuple(args.files_local or ()),
            steal_probes=args.steal_probes,
            port_forward=tuple(args.forward or ()),
            **more,
        ),
    )
    for note in notes:
        if note.mapped_to is None:
            _err(f"warning: {note.line()}")
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
    if not config.active_ports() and not config.port_forward:
        raise ConfigError(
            "no ports to take: pass --steal PORT[:LOCAL] or list ports: in the config"
        )
    sdir = new_session(config)
    outcome = start_daemon(sdir, config, debug=args.debug, timeout=args.timeout)
    status = status_of(outcome.get("status", {}))
    ports = ", ".join(port_line(p) for p in status.ports if p.mode != "off")
    print(f"session {sdir.name!r} is up on {status.target}: {ports}")
    print(f"  netmirror status --session {sdir.name}   |   netmirror down --session {sdir.name}")
    return 0


def cmd_port_forward(args: argparse.Namespace) -> int:
    config = _config(args)
    if not config.port_forward:
        raise ConfigError("nothing to forward: pass -L [LHOST:]LPORT:HOST:PORT")
    sdir = new_session(config)
    try:
        start_daemon(sdir, config, debug=args.debug, timeout=args.timeout)
        for forward in config.port_forward:
            print(
                f"forwarding {forward.local_host}:{forward.local_port} -> "
                f"{forward.host}:{forward.port} from {config.target}",
                flush=True,
            )
        print(f"  session {sdir.name!r}; Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while sdir.path.exists() and _daemon_alive(sdir):
                time.sleep(0.5)
    finally:
        stop_session(sdir)
    return 0


def _daemon_alive(sdir: SessionDir) -> bool:
    try:
        record = sdir.read()
    except SessionError:
        return False
    return pid_alive(record.daemon_pid, record.daemon_start)


def cmd_exec(args: argparse.Namespace) -> int:
    from netmirror.config.environment import merge_environment
    from netmirror.netfilter.cgroup import Cgroup, cgroup2_root

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
    if args.incoming:
        overrides["incoming_mode"] = args.incoming
    if args.outgoing_method:
        overrides["outgoing_method"] = args.outgoing_method
    if args.no_outgoing_udp:
        overrides["outgoing_udp"] = False
    config = _config(args, **overrides)
    owner = {"owner_pid": os.getpid(), "owner_start": pid_start(os.getpid()) or 0}
    sdir = new_session(config, extra={"exec": owner})
    # From here on, however this ends, the session ends with it.
    try:
        outcome = start_daemon(sdir, config, debug=args.debug, timeout=args.timeout)
        info = outcome.get("exec", {})
        env = dict(os.environ)
        if "env" in info:
            env = merge_environment(env, info["env"], config.env)
        elif info.get("targetless"):
            pass  # no target, no environment: the local one, as asked
        else:
            _err(
                f"warning: the command gets the local environment only: "
                f"{info.get('env_error', 'the target sent none')}"
            )
        cgroup_path = info.get("cgroup")
        if info.get("proxy_env"):
            # No transparent redirection here: programs that honour proxy variables.
            env.update(info["proxy_env"])
        mounts = None
        files = info.get("files") or {}
        if files.get("root"):
            from netmirror.cli.files import command_plan
            from netmirror.wire.files import ROOT_VARIABLE

            env[ROOT_VARIABLE] = files["root"]
            plan, warnings = command_plan(files)
            for warning in warnings:
                _err(f"warning: {warning}")
            workspace = sdir.path / "ns"
            workspace.mkdir(exist_ok=True)
            mounts = (plan, workspace, str(files["root"]))
        elif config.files.enabled and not info.get("targetless"):
            _err(f"warning: the command sees this machine's files only: {files.get('error')}")
        say_exec(sdir.name, outcome, command, env_pid=info.get("env_pid"))
        return run_command(command, env, Path(cgroup_path) if cgroup_path else None, mounts=mounts)
    finally:
        cgroup = Cgroup.for_session(sdir.name) if cgroup2_root() is not None else None
        if cgroup is not None:
            # Background processes the command left behind go with it.
            cgroup.kill_all()
        stop_session(sdir)


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--env {item!r}: expected NAME=VALUE")
    return key, value


def cmd_down(args: argparse.Namespace) -> int:
    if args.session and not SessionDir(args.session).path.exists():
        print(f"no session named {args.session!r}: nothing to do")
        return 0
    sessions = select_sessions(args, allow_all=True)
    if not sessions:
        print("no sessions running: nothing to do")
        return 0
    if not 0 <= args.drain <= 600:
        raise ConfigError(f"--drain {args.drain:g}: must be between 0 and 600 seconds")
    drain = 0.0 if args.now else args.drain
    for sdir in sessions:
        stop_session(sdir, drain=drain)
        print(f"session {sdir.name!r} is down")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    stale = []
    for sdir in list_session_dirs():
        if clean_stale(sdir):
            stale.append(sdir.name)
    sessions = (
        select_sessions(args, allow_all=True) if args.session else [s for s, _ in live_sessions()]
    )
    answers: list[dict[str, Any]] = []
    for sdir in sessions:
        try:
            answer = control(sdir, "status")["status"]
            if not isinstance(answer, dict):
                raise SessionError(f"session {sdir.name!r} gave a garbled answer")
            answers.append(answer)
        except (SessionError, KeyError) as exc:
            answers.append({"session": sdir.name, "state": "not answering", "error": str(exc)})
    if args.json:
        # The daemon's own records, as it sent them: scripts read these keys.
        print(json.dumps({"sessions": answers, "cleaned_stale": stale}, indent=2))
        return 0
    statuses = [status_of(answer) for answer in answers]
    for name in stale:
        print(f"session {name!r} had ended (its daemon was gone); cleaned up")
    if not statuses:
        print("no sessions running")
        return 0
    for st in statuses:
        print("\n".join(status_lines(st)))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    sessions = select_sessions(args, allow_all=False)
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

    from netmirror.kube.cluster import list_targets

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
    from netmirror.config import json_schema, parse_config

    if args.config_command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    from netmirror.config import read_dialect

    path = Path(args.file)
    data, dialect, notes = read_dialect(path)
    config = parse_config(data, source=path.name)
    if args.config_command == "convert":
        import yaml

        for note in notes:
            if note.mapped_to is None:
                _err(f"warning: {note.line()}")
        sys.stderr.flush()
        print(yaml.safe_dump(config.model_dump(exclude_defaults=True), sort_keys=False), end="")
        return 0
    print(
        f"{path}: ok, {dialect} config ({len(config.ports)} port(s),"
        f" target {config.target or 'not set'})"
    )
    for note in notes:
        print(f"  {note.line()}")
    return 0


def cmd_elsewhere(args: argparse.Namespace) -> int:
    """``agent`` and ``daemon`` are run by the ``netmirror`` executable, not by the CLI."""
    raise CommandError(f"run `netmirror {args.command} ...` as a command of its own", 2)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": cmd_up,
    "port-forward": cmd_port_forward,
    "exec": cmd_exec,
    "ls": cmd_ls,
    "down": cmd_down,
    "status": cmd_status,
    "logs": cmd_logs,
    "config": cmd_config,
    "agent": cmd_elsewhere,
    "daemon": cmd_elsewhere,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = COMMANDS[args.command](args)
        return code
    except NetmirrorError as exc:
        _err(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        return 0
