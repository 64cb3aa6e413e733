"""Where sessions live on this machine: one directory per session.

``/run/netmirror/<session>/`` for root, ``$XDG_RUNTIME_DIR/netmirror/<session>/``
otherwise. It holds ``session.json`` (what ``up`` asked for and the pids),
``control.sock`` (the daemon's control socket), ``agent.sock`` (the agent's
websocket for local targets) and ``daemon.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from netmirror.errors import SessionError
from netmirror.mounts import table

#: A session name: it becomes part of chain names, cgroup names and paths, so it
#: is short and plain (iptables limits a chain name to 28 characters).
SESSION_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,16}[a-z0-9])?")
#: :data:`SESSION_NAME` in words, for messages.
SESSION_NAME_RULE = "1-18 lowercase letters, digits or '-', not starting or ending with '-'"


def is_session_name(value: object) -> bool:
    """Whether ``value`` is a valid session name."""
    return isinstance(value, str) and SESSION_NAME.fullmatch(value) is not None


def state_root() -> Path:
    """The directory holding every session of this user."""
    override = os.environ.get("NETMIRROR_STATE_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/run/netmirror")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "netmirror"
    return Path(tempfile.gettempdir()) / f"netmirror-{os.getuid()}"


def pid_start(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), None if there is none.

    A pid and its start time name one process: pids are reused, the pair is not.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


def pid_alive(pid: int | None, start: int | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if ``start`` is known, is the same
    process that was recorded, not a later one that reused the pid."""
    if not pid or pid <= 0:
        return False
    now = pid_start(pid)
    if now is None:
        return False
    return start is None or start == 0 or now == start


@dataclass
class SessionRecord:
    """What ``session.json`` holds."""

    name: str
    target: str
    config: dict[str, Any]
    created: float
    daemon_pid: int = 0
    agent_pid: int = 0
    daemon_start: int = 0
    """Start time of ``daemon_pid`` (see :func:`pid_start`)."""
    agent_start: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class SessionDir:
    """Paths and record of one session."""

    def __init__(self, name: str, root: Path | None = None) -> None:
        self.name = name
        self.path = (root or state_root()) / name

    @property
    def record_path(self) -> Path:
        return self.path / "session.json"

    @property
    def control_socket(self) -> Path:
        return self.path / "control.sock"

    @property
    def agent_socket(self) -> Path:
        return self.path / "agent.sock"

    @property
    def log_path(self) -> Path:
        return self.path / "daemon.log"

    def exists(self) -> bool:
        return self.record_path.exists()

    def create(self, record: SessionRecord) -> None:
        """Make the directory (private to this user) and write the record."""
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            self.path.mkdir(mode=0o700)
        except FileExistsError:
            raise SessionError(f"session {self.name!r} already exists") from None
        self.write(record)

    def write(self, record: SessionRecord) -> None:
        """Replace the record atomically."""
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=2))
        tmp.replace(self.record_path)

    def read(self) -> SessionRecord:
        """Load the record; a missing or damaged one is a :class:`SessionError`."""
        try:
            data = json.loads(self.record_path.read_text())
            return SessionRecord(**data)
        except FileNotFoundError:
            raise SessionError(f"no session named {self.name!r}") from None
        except (ValueError, TypeError) as exc:
            raise SessionError(f"session {self.name!r} has a damaged record: {exc}") from None

    def remove(self) -> None:
        """Delete the directory and everything in it, never through a mount point.

        The target's files are mounted in here (``root``): whatever is still mounted
        is left alone (the caller unmounts first), so cleaning up never deletes a
        file of the target, or of whatever else is mounted below.
        """
        try:
            mounted = {m.point for m in table.read()}
        except OSError:
            mounted = set()
        # The mount table holds canonical paths: compare with the canonical one (the
        # state directory may be given relative, or through a symbolic link).
        _remove_tree(Path(os.path.realpath(self.path)), mounted)


def _remove_tree(path: Path, mounted: set[str]) -> None:
    """``rm -r`` that never enters a mount point (``mounted``, or another device)."""
    try:
        top = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISDIR(top.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    if str(path) in mounted or os.path.ismount(path):
        return
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in list(entries):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev == top.st_dev and entry.path not in mounted:
                    _remove_tree(Path(entry.path), mounted)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def list_session_dirs(root: Path | None = None) -> list[SessionDir]:
    """Every session directory, by name."""
    base = root or state_root()
    if not base.is_dir():
        return []
    return [SessionDir(p.name, base) for p in sorted(base.iterdir()) if p.is_dir()]
