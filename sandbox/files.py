"""A target with files of its own: a process in the sandbox's network namespace whose
root is an overlay of this machine's root with a tmpfs on top, in a mount namespace of
its own (as a container has). Nothing of it reaches this machine's disk, and it all
goes with the process.

It holds what a service in a pod finds: a "ConfigMap" directory and a "Secret" file
under ``/app``, a service-account token under ``/var/run/secrets/...`` (its own
tmpfs, like the projected volume), a 100 MB file and 1,000 small files under
``/data``, a file its user may not read, and a directory its user owns. It runs as
``uid``/``gid`` 1000, not root.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

USER = 1000
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
BIG = 100 * 1024 * 1024
SMALL = 1000

_SETUP = r"""
import os, subprocess, sys
def sh(*argv):
    subprocess.run(argv, check=True)
big, small, user, token_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
w = "/mnt"  # covered here only: this is a mount namespace of our own
sh("mount", "--make-rprivate", "/")
sh("mount", "-t", "tmpfs", "-o", "size=2g", "nmtarget", w)
for d in ("u", "w", "root"):
    os.mkdir(f"{w}/{d}")
layers = f"lowerdir=/,upperdir={w}/u,workdir={w}/w"
sh("mount", "-t", "overlay", "nmtarget", "-o", layers, f"{w}/root")
for d in ("proc", "dev", "sys"):
    sh("mount", "--rbind", f"/{d}", f"{w}/root/{d}")
os.chdir(f"{w}/root")
os.chroot(".")
os.makedirs("/app/config", exist_ok=True)
with open("/app/config/app.yaml", "w") as f:
    f.write("color: blue\n")
with open("/app/config/features.json", "w") as f:
    f.write('{"new_checkout": true}\n')
with open("/app/secret.env", "w") as f:
    f.write("API_KEY=target-secret\n")
os.chmod("/app/secret.env", 0o640)
os.chown("/app/secret.env", 0, user)
with open("/app/root-only", "w") as f:
    f.write("not for the service\n")
os.chmod("/app/root-only", 0o600)
os.makedirs(token_dir, exist_ok=True)
real = os.path.realpath(token_dir)
sh("mount", "-t", "tmpfs", "-o", "size=1m", "nmtoken", real)
with open(f"{real}/token", "w") as f:
    f.write("eyJ-target-token\n")
with open(f"{real}/namespace", "w") as f:
    f.write("shop\n")
with open("/etc/hostname", "w") as f:
    f.write("web-7d9f-target\n")
with open("/etc/hosts", "a") as f:
    f.write("10.9.9.9 db.target.internal\n")
os.makedirs("/data/small", exist_ok=True)
with open("/data/big", "wb") as f:
    block = os.urandom(1 << 20)
    for i in range(big // len(block)):
        f.write(block[:-8] + i.to_bytes(8, "big"))
for i in range(small):
    with open(f"/data/small/f{i:04d}", "w") as f:
        f.write(f"small file {i}\n" * 8)
os.makedirs("/data/uploads", exist_ok=True)
os.chown("/data/uploads", user, user)
with open("/data/uploads/existing.txt", "w") as f:
    f.write("uploaded before\n")
os.chown("/data/uploads/existing.txt", user, user)
os.setgroups([])
os.setgid(user)
os.setuid(user)
os.chdir("/app")
sys.stdout.write("ready\n")
sys.stdout.flush()
os.execvp("sleep", ["sleep", "infinity"])
"""


class FilesTarget:
    """The process; ``spec`` is its netmirror target (``pid/PID``)."""

    def __init__(self, netns: str, *, big: int = BIG, small: int = SMALL) -> None:
        self.netns = netns
        self.big = big
        self.small = small
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def spec(self) -> str:
        return f"pid/{self.pid}"

    @property
    def root(self) -> Path:
        """Its root, as this machine reaches it."""
        return Path(f"/proc/{self.pid}/root")

    def start(self, timeout: float = 60) -> FilesTarget:
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private"]
        argv += [sys.executable, "-c", _SETUP, str(self.big), str(self.small), str(USER), TOKEN_DIR]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        try:
            line = _read_line(self.proc, timeout)
        except BaseException:
            self.stop()
            raise
        if line != b"ready\n":
            self.stop()
            raise RuntimeError(f"the files target did not start (it said {line!r})")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> FilesTarget:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"the files target said nothing in {timeout} s")
    return proc.stdout.readline()
