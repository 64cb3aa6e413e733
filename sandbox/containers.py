"""Real containers for the sandbox: a private podman that touches nothing of the host's.

Each :class:`Podman` has its own storage, run directory and ``containers.conf``
(runc; no network unless a container asks to join one; ulimits this machine
allows), all under one temporary directory that :meth:`Podman.close` removes with
every container and image in it. Containers join network namespaces the caller
made (``--network ns:PATH`` or ``container:NAME``), never podman's bridge, which
would change the host's iptables.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

#: Above some 32k processes runc cannot set the limit on this kind of machine, though
#: it is below the hard limit.
NPROC_CAP = 32768


def containers_conf(path: Path) -> Path:
    """Write a containers.conf for this machine at ``path``; returns it.

    crun cannot run on a hybrid cgroup hierarchy, podman's default network is a CNI
    bridge that rewrites the host's iptables, and its default ulimits are above the
    hard limits of a sandboxed machine, which makes every container fail to start.
    """

    def limit(kind: int, cap: int) -> int:
        hard = resource.getrlimit(kind)[1]
        return cap if hard == resource.RLIM_INFINITY else min(hard, cap)

    nofile = limit(resource.RLIMIT_NOFILE, 1 << 20)
    nproc = limit(resource.RLIMIT_NPROC, NPROC_CAP)
    path.write_text(
        "[containers]\n"
        'netns = "none"\n'
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    )
    return path


def missing_tools() -> list[str]:
    """The commands a private podman needs that this machine lacks."""
    return [tool for tool in ("podman", "runc") if shutil.which(tool) is None]


class PodmanError(Exception):
    """A podman command failed; the message is its error output."""


class Podman:
    """A podman of our own, for the life of this object."""

    def __init__(self, *, driver: str = "overlay") -> None:
        # Short: podman refuses a run root of more than 50 characters.
        self.dir = Path(tempfile.mkdtemp(prefix="nm-pod-"))
        self.conf = containers_conf(self.dir / "containers.conf")
        self.base = [
            "podman",
            "--root",
            str(self.dir / "storage"),
            "--runroot",
            str(self.dir / "run"),
            "--storage-driver",
            driver,
            "--tmpdir",
            str(self.dir / "tmp"),
        ]
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self.names: list[str] = []

    def __enter__(self) -> Podman:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """``podman ARGS``; its stdout. Raises :class:`PodmanError` on failure."""
        result = subprocess.run(
            [*self.base, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise PodmanError(f"podman {args[0]}: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def load(self, archive: Path) -> str:
        """Load a docker-archive; returns the image reference it carries."""
        out = self.run("load", "-q", "-i", str(archive), timeout=300)
        # "Loaded image: localhost/netmirror/agent:0.1.0" (or "Loaded image(s): ...")
        return out.strip().rsplit(" ", 1)[-1].split(",")[0]

    def start(
        self,
        name: str,
        image: str,
        *args: str,
        options: Sequence[str] = (),
        entrypoint: str | None = None,
    ) -> str:
        """Start a detached container; returns its full id. It is removed by :meth:`close`."""
        self.names.append(name)
        extra = ["--entrypoint", entrypoint] if entrypoint else []
        out = self.run("run", "-d", "--name", name, *options, *extra, image, *args)
        return out.strip().splitlines()[-1]

    def popen(
        self,
        name: str,
        image: str,
        *args: str,
        options: Sequence[str] = (),
        stdout: int | object = subprocess.DEVNULL,
        stderr: int | object = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Run a container in the foreground as a child process (``podman run --rm``)."""
        self.names.append(name)
        return subprocess.Popen(
            [*self.base, "run", "--rm", "--name", name, *options, image, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,  # type: ignore[arg-type]
            stderr=stderr,  # type: ignore[arg-type]
        )

    def inspect(self, name: str) -> dict[str, object]:
        """``podman inspect NAME``, the container's record."""
        records = json.loads(self.run("inspect", "--type", "container", name))
        record: dict[str, object] = records[0]
        return record

    def pid(self, name: str) -> int:
        """The host pid of a running container's first process."""
        state = self.inspect(name)["State"]
        assert isinstance(state, dict)
        return int(state["Pid"])

    def remove(self, name: str) -> None:
        """Stop and remove a container (nothing if it is gone)."""
        self.run("rm", "-f", "-t", "2", name, check=False, timeout=60)

    def close(self) -> None:
        """Remove every container and image, and the storage with them."""
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.run("rm", "-a", "-f", "-t", "2", check=False, timeout=120)
            self.run("rmi", "-a", "-f", check=False, timeout=120)
            self.run("system", "reset", "-f", check=False, timeout=120)
        # An overlay mount left by a killed container would keep the directory busy.
        with contextlib.suppress(OSError):
            mounts = Path("/proc/self/mountinfo").read_text().splitlines()
            for line in mounts:
                point = line.split()[4]
                if point.startswith(str(self.dir)):
                    subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
