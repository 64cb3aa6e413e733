"""The cgroup of a ``netmirror exec`` command: what the outgoing rules match on.

The daemon creates it, the CLI starts the command inside it, and the outgoing
rules (:mod:`netmirror.netfilter.outgoing`) redirect the TCP and DNS of every
process in it. Ending the session kills what is left in it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from netmirror.errors import NetmirrorError

log = logging.getLogger(__name__)

CGROUP_PREFIX = "netmirror-"


def cgroup2_root(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or its ``unified``)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "... mount-point options - fstype source super-options"
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            if len(fields) >= 5:
                return Path(fields[4].replace("\\040", " "))
    return None


class Cgroup:
    """A cgroup v2 group holding the command and all its children."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.path = root / name

    @classmethod
    def for_session(cls, session: str) -> Cgroup:
        root = cgroup2_root()
        if root is None:
            raise NetmirrorError(
                "netmirror exec needs the cgroup v2 hierarchy mounted (e.g. at "
                "/sys/fs/cgroup) to send only the command's traffic to the target; "
                "use --no-outgoing to run without that"
            )
        return cls(root, CGROUP_PREFIX + session)

    @property
    def relative(self) -> str:
        """The path iptables' cgroup match takes: relative to the v2 root."""
        return "/" + str(self.path.relative_to(self.root))

    def create(self) -> None:
        """A fresh group: one a killed session left is removed first (with what it
        held, the socket-marking program among it)."""
        if self.path.exists():
            self.remove()
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as exc:
            raise NetmirrorError(
                f"cannot create the cgroup {self.path}: {exc.strerror or exc}"
            ) from None

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process left in the group, and wait until it is empty."""
        kill_file = self.path / "cgroup.kill"
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
            else:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                log.warning("processes %s of %s do not die", pids, self.path)
                return
            time.sleep(0.02)

    def remove(self) -> None:
        """Remove the group; processes still in it are killed first."""
        if not self.path.exists():
            return
        self.kill_all()
        try:
            self.path.rmdir()
        except OSError as exc:
            log.warning("cannot remove the cgroup %s: %s", self.path, exc.strerror or exc)
