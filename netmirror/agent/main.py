"""``netmirror agent``: start-up in the target, then the agent's event loop.

Start-up is synchronous and happens before the event loop: read the token, enter
the namespace, pick the iptables backend, start the guard (which undoes our rules
even if this process is killed), clear stale chains of dead sessions, describe
the namespace with pyroute2 (which does not run under uvloop). Then
:class:`~netmirror.agent.agent.Agent` serves on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from netmirror import __version__, logs
from netmirror.agent.agent import FEATURES, TARGETLESS_FEATURES, Agent
from netmirror.agent.options import AgentOptions
from netmirror.errors import ConfigError, NetmirrorError
from netmirror.netfilter import (
    Backend,
    Guard,
    IptablesNat,
    clear_stale,
    detect_backend,
    session_alive,
)
from netmirror.netfilter.mesh import find_mesh
from netmirror.tasks import keep_heap_mapped, raise_fd_limit
from netmirror.wire.connection import token_sha256

log = logging.getLogger(__name__)


def describe_namespace() -> dict[str, Any]:
    """Interfaces and addresses of the current namespace (pyroute2, before the loop)."""
    from pyroute2 import IPRoute

    addresses: list[str] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in ipr.get_addr():
            ifname = names.get(addr["index"], "?")
            if ifname != "lo":
                addresses.append(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']} ({ifname})")
    return {"interfaces": sorted(n for n in names.values() if n), "addresses": addresses}


def enter_namespace(path: Path) -> None:
    """Move this process into the network namespace at ``path``."""
    from pyroute2 import netns

    try:
        # flags=0: never create a namespace that is not there.
        netns.setns(str(path), flags=0)
    except OSError as exc:
        raise NetmirrorError(
            f"cannot enter the network namespace {path}: {exc.strerror or exc}"
        ) from None


def tcp_listener(where: str) -> socket.socket:
    """A listening TCP socket for ``HOST:PORT``."""
    host, _, port = where.rpartition(":")
    try:
        sock = socket.create_server((host or "127.0.0.1", int(port)), reuse_port=False)
    except (OSError, ValueError) as exc:
        raise NetmirrorError(f"cannot listen on {where}: {exc}") from None
    sock.setblocking(False)
    return sock


def find_container_pid(container_id: str, proc: Path = Path("/proc")) -> int:
    """The lowest pid whose cgroup names the container (its init), from a host-pid view.

    ``container_id`` may carry the runtime prefix of the pod status
    (``containerd://abc...``); the bare id is searched for.
    """
    bare = container_id.rsplit("://", 1)[-1]
    if len(bare) < 12 or not bare.isalnum():
        raise NetmirrorError(f"{container_id!r} is not a container id")
    found: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if bare in (entry / "cgroup").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    if not found:
        raise NetmirrorError(f"no process of container {bare[:12]} on this node (is hostPID set?)")
    return min(found)


def run(options: AgentOptions) -> int:
    """Entry point of ``netmirror agent``; returns the exit code."""
    guard: Guard | None = None
    firewall: IptablesNat | None = None
    listen_sock: socket.socket | None = None
    raise_fd_limit()
    keep_heap_mapped()
    try:
        kind, _, where = options.listen.partition(":")
        if kind == "tcp":
            # Bound before entering the target: in job mode the port-forward reaches
            # the agent's own pod, not the target's namespace.
            listen_sock = tcp_listener(where)
        elif kind != "unix":
            raise NetmirrorError(f"--listen {options.listen!r} is not unix:PATH or tcp:HOST:PORT")
        netns = options.netns
        if options.container_id:
            pid = find_container_pid(options.container_id)
            netns = Path(f"/proc/{pid}/ns/net")
            options = dataclasses.replace(options, target_pid=pid)
        if netns is not None:
            enter_namespace(netns)
        info = describe_namespace()
        info.update(pid=os.getpid(), version=__version__)
        if options.targetless:
            # A pod of its own: nothing to steal, so no iptables and no guard.
            backend = Backend.NFT
            info.update(backend="", features=list(TARGETLESS_FEATURES), mesh=None, targetless=True)
        else:
            backend = detect_backend()
            mesh = find_mesh()
            if mesh is not None:
                log.info("found %s", mesh.describe())
            # Behind a known mesh's sidecar: steal the plaintext hop it makes to the app.
            firewall = IptablesNat(
                options.session, backend=backend, behind_mesh=mesh is not None and mesh.known
            )
            firewall.teardown()  # leftovers of an earlier agent of this session
            guard = Guard.start(options.session, backend)
            cleared = clear_stale(backend, alive=session_alive)
            if cleared:
                log.info("cleared stale rules of dead sessions: %s", ", ".join(cleared))
            info.update(
                backend=backend.name.lower(),
                features=list(FEATURES),
                mesh=mesh.to_json() if mesh is not None else None,
            )
    except NetmirrorError as exc:
        log.error("%s", exc)
        sys.stdout.write(json.dumps({"error": str(exc)}) + "\n")
        sys.stdout.flush()
        if guard is not None:
            guard.close()
        return 1
    agent_firewall = firewall
    ready = {"ready": True, **info}
    try:
        import uvloop

        # pyroute2 stays off this loop: it ran above, before the loop started.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            agent = Agent(options, backend=backend, firewall=agent_firewall, info=info)
            runner.run(agent.run(ready, listen_sock=listen_sock))
    finally:
        if agent_firewall is not None:
            agent_firewall.teardown()
        if guard is not None:
            guard.close()
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"netmirror: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The options of ``netmirror agent``."""
    agent = _Parser(
        prog="netmirror agent",
        description="Run the agent (inside the target; started for you by up and exec).",
    )
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
    agent.add_argument(
        "--in-container",
        action="store_true",
        help="the agent runs in a container of its own: what it starts ends with it",
    )
    agent.add_argument(
        "--targetless",
        action="store_true",
        help="a pod of its own: outgoing connections, DNS and forwards only (no rules)",
    )
    agent.add_argument("--debug", action="store_true", help="verbose logs")
    return agent


def _token_digest(args: argparse.Namespace) -> bytes:
    """SHA-256 of the session token, from whichever source the options name."""
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
    return digest


def main(argv: Sequence[str] | None = None, *, debug: bool = False) -> int:
    """``netmirror agent ARGS``; returns the exit code (errors: :mod:`netmirror.main`)."""
    args = build_parser().parse_args(argv)
    debug = debug or args.debug
    logs.setup(session=args.session, role="agent", debug=debug)
    options = AgentOptions(
        session=args.session,
        listen=args.listen,
        token_digest=_token_digest(args),
        ttl=args.ttl,
        netns=Path(args.netns) if args.netns else None,
        container_id=args.container_id,
        target_pid=args.target_pid,
        debug=debug,
        in_container=args.in_container,
        targetless=args.targetless,
    )
    return run(options)
