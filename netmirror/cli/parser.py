"""The command line's grammar: every command, option and its help."""

from __future__ import annotations

import argparse
from typing import NoReturn

from netmirror import __version__


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"netmirror: {message} (see {self.prog} --help)\n")


def _session_args(parser: argparse.ArgumentParser) -> None:
    """Target, ports and agent options, shared by up and exec."""
    parser.add_argument(
        "--config",
        "-c",
        "-f",
        metavar="FILE",
        help="YAML, TOML or JSON config file: netmirror's, or a mirrord config",
    )
    parser.add_argument(
        "--target",
        "-t",
        help="what to attach to: pod/NAME, deployment/NAME, statefulset/NAME (any of them "
        "with /container/C), targetless (Kubernetes: an agent pod of its own, for outgoing "
        "traffic, DNS and port-forward), netns/NAME (a network namespace) or pid/PID (a "
        "process's)",
    )
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
    parser.add_argument(
        "--agent-namespace",
        metavar="NS",
        help="Kubernetes: run job-mode agents in namespace NS (one labelled privileged for "
        "netmirror: manifests/agent-namespace.yaml), for targets whose namespace enforces "
        "Pod Security baseline or restricted",
    )
    parser.add_argument("-n", "--namespace", help="Kubernetes namespace of the target")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--timeout", type=float, help="seconds to wait until ready")
    parser.add_argument(
        "-L",
        "--forward",
        action="append",
        metavar="[LHOST:]LPORT:HOST:PORT",
        help="a local port that reaches HOST:PORT as the target reaches it; HOST may be a "
        "name the target resolves (repeatable)",
    )
    parser.add_argument(
        "--steal-probes",
        action="store_true",
        default=None,
        help="Kubernetes: steal the kubelet's health probes of stolen ports too "
        "(default: they stay with the target)",
    )
    parser.add_argument(
        "--files",
        choices=["on", "off"],
        help="the target's files: its root at $NETMIRROR_ROOT, its volumes at their paths "
        "(default on)",
    )
    parser.add_argument(
        "--files-ro",
        action="append",
        metavar="PATH",
        help="show the target's PATH at its own path, read-only (repeatable)",
    )
    parser.add_argument(
        "--files-rw",
        action="append",
        metavar="PATH",
        help="show the target's PATH at its own path; changes go to the target (repeatable)",
    )
    parser.add_argument(
        "--files-local",
        action="append",
        metavar="PATH",
        help="keep this machine's PATH inside a tree taken from the target (repeatable)",
    )


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

    forward = sub.add_parser(
        "port-forward",
        help="reach hosts and ports as the target reaches them, from local ports, until Ctrl-C",
        usage="netmirror port-forward --target TARGET -L [LHOST:]LPORT:HOST:PORT ...",
    )
    _session_args(forward)

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
        "--incoming",
        choices=["mirror", "steal", "off"],
        help="with no --steal/--mirror: what happens to the target's ports with the numbers "
        "the command listens on (default mirror)",
    )
    run.add_argument(
        "--no-outgoing",
        action="store_true",
        help="leave the command's outgoing traffic and DNS alone",
    )
    run.add_argument(
        "--no-outgoing-udp",
        action="store_true",
        help="send only the command's TCP and DNS through the target; its other UDP stays here",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    ls = sub.add_parser("ls", help="Kubernetes targets you can use, with their ports")
    ls.add_argument("-n", "--namespace")
    ls.add_argument("--context")
    ls.add_argument("--json", action="store_true")

    down = sub.add_parser("down", help="stop a session and remove every rule")
    down.add_argument("--session", "-s")
    down.add_argument("--all", action="store_true", help="stop every session")
    down.add_argument(
        "--drain",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="stolen connections still open may finish for this long (new ones go to the "
        "target at once); then they are reset (default 5)",
    )
    down.add_argument(
        "--now", action="store_true", help="reset the stolen connections at once (no drain)"
    )

    status = sub.add_parser("status", help="sessions, ports and counters")
    status.add_argument("--session", "-s")
    status.add_argument("--json", action="store_true")
    status.set_defaults(all=False)

    logs_p = sub.add_parser("logs", help="show a session's log")
    logs_p.add_argument("--session", "-s")
    logs_p.add_argument("-f", "--follow", action="store_true")

    cfg = sub.add_parser("config", help="check a config file or print its JSON Schema")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = cfg_sub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    cfg_sub.add_parser("schema", help="print the JSON Schema of the config file")
    convert = cfg_sub.add_parser(
        "convert", help="print the netmirror config (YAML) that a mirrord config becomes"
    )
    convert.add_argument("file", metavar="FILE")

    # Run by `netmirror` itself (netmirror.main) before this parser is reached; listed
    # here so that --help names them.
    sub.add_parser("agent", help="run the agent (inside the target; started for you)")
    sub.add_parser("daemon")  # started by `up`; not for people
    return parser
