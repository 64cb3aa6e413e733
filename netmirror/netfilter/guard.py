"""A process that removes a session's rules when the agent dies, however it dies.

The agent starts the guard after it entered the target's network namespace, so the
guard lives there too. The guard:

1. binds the abstract unix socket ``"\\0netmirror/<session>"``. Abstract sockets belong to
   the network namespace, so the bound name both marks the session alive in the target
   (:func:`session_alive`) and refuses a second session of the same name there;
2. writes ``ready`` on stdout;
3. reads stdin until EOF. The agent holds the only write end of that pipe, and the kernel
   closes it when the agent exits, even on SIGKILL or an OOM kill;
4. tears the session's rules down, then releases the socket name and exits.

SIGTERM, SIGINT and SIGHUP also lead to step 4. The guard runs in its own session
(process group) so signals meant for the agent's group do not kill it before it cleaned.

Run: ``python -m netmirror.netfilter.guard --session S --backend nft|legacy``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

from netmirror.errors import FirewallError, SessionError
from netmirror.netfilter.iptables import Backend, IptablesNat, validate_session

if TYPE_CHECKING:
    from netmirror.netfilter.outgoing import OutgoingFirewall

__all__ = ["EXIT_IN_USE", "Guard", "main", "session_alive", "socket_address"]

log = logging.getLogger(__name__)

#: Exit status of the guard when the session is already active in the namespace.
EXIT_IN_USE = 3

_READY = b"ready\n"


#: What a guard removes: a session's steal rules (in a target), or its outgoing rules
#: (on the developer's machine, for ``netmirror exec``).
KINDS = ("steal", "outgoing")


def socket_address(session: str, kind: str = "steal") -> str:
    """Return the abstract unix socket address of ``session`` (leading NUL included)."""
    prefix = "\0netmirror/" if kind == "steal" else f"\0netmirror-{kind}/"
    return prefix + validate_session(session)


def _firewall(session: str, backend: Backend, kind: str) -> IptablesNat | OutgoingFirewall:
    if kind == "outgoing":
        from netmirror.netfilter.outgoing import OutgoingFirewall

        return OutgoingFirewall(session, backend=backend)
    return IptablesNat(session, backend=backend)


def session_alive(session: str, *, timeout: float = 1.0, kind: str = "steal") -> bool:
    """True if a guard of ``session`` runs in the current network namespace."""
    address = socket_address(session, kind)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except (TimeoutError, BlockingIOError):
            # Bound but not answering (e.g. a full backlog): only a live process can hold
            # the name, so the session is alive.
            return True
        return True


# --------------------------------------------------------------------------------------
# The guard process


def _serve(sock: socket.socket, wakeup: int) -> str:
    """Wait until stdin reaches EOF or a signal arrives; return why we stopped."""
    # poll() rather than epoll: epoll refuses regular files and /dev/null as stdin, which
    # must simply read as EOF (a guard nobody holds cleans up at once).
    with selectors.PollSelector() as sel:
        sel.register(0, selectors.EVENT_READ, "stdin")
        sel.register(sock, selectors.EVENT_READ, "socket")
        sel.register(wakeup, selectors.EVENT_READ, "signal")
        while True:
            for key, _ in sel.select():
                if key.data == "signal":
                    return "signal"
                if key.data == "socket":
                    # session_alive() probes only connect; accept and drop so the
                    # backlog never fills up.
                    with contextlib.suppress(OSError):
                        conn, _addr = sock.accept()
                        conn.close()
                    continue
                try:
                    data = os.read(0, 4096)
                except OSError as exc:
                    log.debug("reading stdin: %s", exc)
                    return "stdin error"
                if not data:
                    return "stdin closed"
                # Anything the agent writes is ignored; only the EOF matters.


def _say(text: str) -> None:
    """Write a line to stderr; the reader may be gone, which must not stop the cleanup."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the guard process; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m netmirror.netfilter.guard",
        description="Remove a netmirror session's iptables rules when stdin closes.",
    )
    parser.add_argument("--session", required=True)
    parser.add_argument("--backend", required=True, choices=[b.value for b in Backend])
    parser.add_argument("--kind", default="steal", choices=KINDS)
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="netmirror guard: %(message)s",
    )
    session: str = args.session
    backend = Backend(args.backend)
    try:
        address = socket_address(session, args.kind)
    except ValueError as exc:
        _say(str(exc))
        return 2

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            _say(f"session {session!r} is already active in this target")
            return EXIT_IN_USE
        _say(f"cannot bind the guard socket of session {session!r}: {exc.strerror or exc}")
        return 1
    sock.listen(16)

    # Signals wake the select loop through this pipe instead of raising in arbitrary
    # places, so the teardown below always runs from a known state.
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _note_signal)

    status = 0
    try:
        try:
            os.write(1, _READY)
        except OSError as exc:
            # The agent is already gone; it may still have applied rules, so clean up.
            log.debug("writing ready: %s", exc)
        else:
            reason = _serve(sock, rfd)
            log.debug("stopping: %s", reason)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        try:
            _firewall(session, backend, args.kind).teardown()
        except FirewallError as exc:
            _say(f"cleanup of session {session!r} failed: {exc}")
            status = 1
        # Released only now: while the rules exist, the name must stay taken, otherwise
        # a new session of the same name could apply rules this teardown then removes.
        sock.close()
        os.close(rfd)
        os.close(wfd)
    return status


def _note_signal(signum: int, frame: FrameType | None) -> None:
    # Nothing to do here: the wakeup fd already woke the select loop.
    log.debug("received signal %s", signum)


# --------------------------------------------------------------------------------------
# The agent's handle


class Guard:
    """The agent's handle on a running guard process (see the module docstring)."""

    def __init__(self, session: str, process: subprocess.Popen[bytes]) -> None:
        self._session = session
        self._process = process
        self._closed = False

    @property
    def session(self) -> str:
        """The guarded session."""
        return self._session

    @property
    def pid(self) -> int:
        """Process id of the guard."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the guard has exited, else None."""
        return self._process.poll()

    @classmethod
    def start(
        cls, session: str, backend: Backend, *, timeout: float = 5.0, kind: str = "steal"
    ) -> Guard:
        """Start a guard for ``session`` in the current network namespace.

        Returns once the guard reported ``ready``. Raises SessionError if the session is
        already active in this namespace or the guard fails to start in ``timeout``.
        """
        validate_session(session)
        env = dict(os.environ)
        # The guard must import this very netmirror, even when it is not installed.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "netmirror.netfilter.guard",
                "--session",
                session,
                "--backend",
                backend.value,
                "--kind",
                kind,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            # Own session: a signal to the agent's process group must not take the guard
            # down with it before it removed the rules.
            start_new_session=True,
        )
        guard = cls(session, process)
        try:
            guard._wait_ready(timeout)
        except BaseException:
            guard._kill()
            raise
        return guard

    def _wait_ready(self, timeout: float) -> None:
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    raise SessionError(
                        f"guard of session {self._session!r} did not start within {timeout:g}s"
                    )
                chunk = os.read(fd, 256)
                if not chunk:
                    raise SessionError(self._failure_message())
                buf += chunk
        if buf != _READY:
            raise SessionError(
                f"guard of session {self._session!r} said {buf.decode(errors='replace')!r}"
                " instead of ready"
            )

    def _failure_message(self) -> str:
        """One line explaining why the guard exited before ready."""
        try:
            code = self._process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = None
        err = b""
        if code is not None and self._process.stderr is not None:
            err = self._process.stderr.read()
        for line in err.decode(errors="replace").splitlines():
            if line.strip():
                return line.strip()
        return f"guard of session {self._session!r} exited with status {code}"

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.communicate(timeout=5.0)
        self._closed = True

    def close(self, timeout: float = 5.0) -> None:
        """Close the guard's stdin so it removes the rules, and wait for it to exit.

        Kills it after ``timeout`` seconds. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        try:
            # communicate() closes stdin, which is the guard's signal to clean up, and
            # drains its stderr so it cannot block on a full pipe meanwhile.
            _out, err = self._process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "guard of session %s did not exit in %ss; killing it", self._session, timeout
            )
            self._kill()
            return
        for line in err.decode(errors="replace").splitlines():
            if line.strip():
                log.warning("guard of session %s: %s", self._session, line.strip())
        if self._process.returncode != 0:
            log.warning(
                "guard of session %s exited with status %s", self._session, self._process.returncode
            )

    def __enter__(self) -> Guard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
