"""The target's files, served to the daemon: from the target's root, as its user would.

Every path is resolved inside the target's root (``/proc/PID/root``) with
``openat2(RESOLVE_IN_ROOT)``: an absolute symbolic link in the target leads to the
target's file, never to the agent's. What the target's user may do (read, write,
search) is decided here from the file's mode and the user's ids and capabilities
(:func:`access_of`), so a file the target's user cannot read is EACCES for the
daemon too, whatever the agent itself may read.

The metadata operations are blocking calls on a thread; contents move on
streams (:class:`ReadSender`, :class:`WriteReceiver`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import stat
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netmirror.errors import ProtocolError
from netmirror.mounts import table
from netmirror.tunnel import Tunnel
from netmirror.wire.files import (
    FILE_OPS,
    INLINE_MAX,
    INLINE_TOTAL,
    MAX_LIST,
    MAX_READ,
    MAY_EXEC,
    MAY_READ,
    MAY_WRITE,
    Attr,
    Entry,
    clean_path,
    entries_to_wire,
    errno_name,
)
from netmirror.wire.stats import PortStats

log = logging.getLogger(__name__)

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the unification)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_OPEN_HOW = struct.Struct("QQQ")
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# Capabilities that bypass file permission checks (linux/capability.h).
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3

# Paths of the target's mount table that are not files a service reads.
_SKIP_MOUNTS = ("/proc", "/sys", "/dev")


class FileError(Exception):
    """A file operation failed with an errno the daemon passes on."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or os.strerror(code))
        self.code = code

    @property
    def name(self) -> str:
        return errno_name(self.code)


def openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """``openat2(2)`` with the path resolved inside ``dirfd`` as if it were ``/``."""
    how = ctypes.create_string_buffer(
        _OPEN_HOW.pack(flags | os.O_CLOEXEC, mode, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    )
    fd = _syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        how,
        ctypes.c_size_t(_OPEN_HOW.size),
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return int(fd)


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who the target's files are checked for: its file-system ids and capabilities."""

    uid: int
    gid: int
    groups: frozenset[int]
    caps: int

    @classmethod
    def of_process(cls, pid: int | str, proc: Path = Path("/proc")) -> Credentials:
        fields: dict[str, list[str]] = {}
        for line in (proc / str(pid) / "status").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.split()
        uids, gids = fields.get("Uid", ["0"] * 4), fields.get("Gid", ["0"] * 4)
        return cls(
            uid=int(uids[3] if len(uids) > 3 else uids[0]),
            gid=int(gids[3] if len(gids) > 3 else gids[0]),
            groups=frozenset(int(g) for g in fields.get("Groups", [])),
            caps=int(fields.get("CapEff", ["0"])[0], 16),
        )

    def has(self, cap: int) -> bool:
        return bool(self.caps >> cap & 1)


def access_of(st_mode: int, st_uid: int, st_gid: int, creds: Credentials) -> int:
    """MAY_READ | MAY_WRITE | MAY_EXEC: what ``creds`` may do with a file, as the kernel decides.

    The owner's bits apply to the owner, the group's to its members, the others'
    to everyone else; CAP_DAC_OVERRIDE allows reading and writing anything and
    executing what has an execute bit (and searching any directory);
    CAP_DAC_READ_SEARCH allows reading anything and searching directories.
    """
    if creds.uid == st_uid:
        bits = st_mode >> 6 & 7
    elif st_gid == creds.gid or st_gid in creds.groups:
        bits = st_mode >> 3 & 7
    else:
        bits = st_mode & 7
    is_dir = stat.S_ISDIR(st_mode)
    if creds.has(CAP_DAC_OVERRIDE):
        bits |= MAY_READ | MAY_WRITE
        if is_dir or st_mode & 0o111:
            bits |= MAY_EXEC
    if creds.has(CAP_DAC_READ_SEARCH):
        bits |= MAY_READ
        if is_dir:
            bits |= MAY_EXEC
    return bits


class TargetFiles:
    """Blocking file operations inside the target's root, for the target's user."""

    def __init__(self, root: str, creds: Credentials, *, pid: int | None = None) -> None:
        self.root = root
        self.creds = creds
        self.pid = pid
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    @classmethod
    def of_process(cls, pid: int | None) -> TargetFiles:
        """The root and the user of process ``pid``."""
        if pid is None:
            # Never the agent's own root in its place: that is not the target's.
            raise FileError(errno.ENOENT, "the target has no process whose files to serve")
        return cls(f"/proc/{pid}/root", Credentials.of_process(pid), pid=pid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.root_fd)

    # --- resolution -------------------------------------------------------------------

    def _open(self, path: str, flags: int, mode: int = 0) -> int:
        self._search(path)
        try:
            return openat2(self.root_fd, path, flags, mode)
        except OSError as exc:
            raise FileError(exc.errno or errno.EIO) from None

    def _search(self, path: str) -> None:
        """EACCES unless the target's user may search every directory above ``path``."""
        parent = path.rpartition("/")[0]
        current = ""
        for name in ["", *[n for n in parent.split("/") if n]]:
            current = f"{current}/{name}" if name else "/"
            try:
                fd = openat2(self.root_fd, current, os.O_PATH)
            except OSError as exc:
                raise FileError(exc.errno or errno.EIO) from None
            try:
                self._may(os.fstat(fd), MAY_EXEC)
            finally:
                os.close(fd)
            current = current.rstrip("/")

    def _parent(self, path: str) -> tuple[int, str]:
        """An fd of the directory holding ``path``, and the entry's name (caller closes)."""
        if path == "/":
            raise FileError(errno.EBUSY, "the root has no parent")
        parent, _, name = path.rpartition("/")
        fd = self._open(parent or "/", os.O_RDONLY | os.O_DIRECTORY)
        return fd, name

    def _attr(self, st: os.stat_result) -> Attr:
        return Attr(
            mode=st.st_mode,
            nlink=st.st_nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            rdev=st.st_rdev,
            blocks=st.st_blocks,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            access=access_of(st.st_mode, st.st_uid, st.st_gid, self.creds),
        )

    def _may(self, st: os.stat_result, want: int) -> None:
        if access_of(st.st_mode, st.st_uid, st.st_gid, self.creds) & want != want:
            raise FileError(errno.EACCES)

    def _in_parent(self, path: str, want: int) -> tuple[int, str]:
        """The parent's fd, once the target's user may ``want`` in it (search at least)."""
        fd, name = self._parent(path)
        try:
            self._may(os.fstat(fd), want | MAY_EXEC)
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    @staticmethod
    def _call(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except OSError as exc:
            raise FileError(exc.errno or errno.EIO) from None

    # --- operations -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The root's owner and the target's own mounts (from its mount table)."""
        mounts: list[list[str]] = []
        if self.pid is not None:
            with contextlib.suppress(OSError):
                mounts = target_mounts((Path("/proc") / str(self.pid) / "mountinfo").read_text())
        return {"pid": self.pid, "uid": self.creds.uid, "gid": self.creds.gid, "mounts": mounts}

    def stat(self, path: str) -> Attr:
        if path == "/":
            return self._attr(os.fstat(self.root_fd))
        fd, name = self._in_parent(path, 0)
        try:
            return self._attr(self._call(lambda: os.stat(name, dir_fd=fd, follow_symlinks=False)))
        finally:
            os.close(fd)

    def list(self, path: str, start: int = 0) -> tuple[list[Entry], bool]:
        """Entries ``start``.. of a directory (at most :data:`MAX_LIST`, in name order),
        and whether more follow."""
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._may(os.fstat(fd), MAY_READ)
            every = sorted(self._call(lambda: os.listdir(fd)))
            names = every[start : start + MAX_LIST]
            more = start + MAX_LIST < len(every)
            entries: list[Entry] = []
            inline = 0
            may_search = access_of(*_mode_uid_gid(os.fstat(fd)), self.creds) & MAY_EXEC
            for name in names:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue  # gone since the listing
                attr = self._attr(st)
                data = None
                if (
                    may_search
                    and stat.S_ISREG(st.st_mode)
                    and st.st_size <= INLINE_MAX
                    and inline + st.st_size <= INLINE_TOTAL
                    and attr.access & MAY_READ
                ):
                    data = _read_small(fd, name, st.st_size)
                    if data is not None:
                        inline += len(data)
                entries.append(Entry(name, attr, data))
            return entries, more
        finally:
            os.close(fd)

    def readlink(self, path: str) -> str:
        fd, name = self._in_parent(path, 0)
        try:
            return str(self._call(lambda: os.readlink(name, dir_fd=fd)))
        finally:
            os.close(fd)

    def read(self, path: str, offset: int, length: int) -> bytes:
        fd = self._open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            self._may(st, MAY_READ)
            if stat.S_ISDIR(st.st_mode):
                raise FileError(errno.EISDIR)
            return bytes(self._call(lambda: os.pread(fd, min(length, MAX_READ), offset)))
        finally:
            os.close(fd)

    def write(self, path: str, offset: int, data: bytes) -> int:
        fd = self._open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            # Each write opens the file again: a file made read-only by its creator
            # (git's objects, mode 0444) is still written through the descriptor it was
            # created with. Its owner may do so (it could chmod the file anyway).
            if st.st_uid != self.creds.uid:
                self._may(st, MAY_WRITE)
            return int(self._call(lambda: os.pwrite(fd, data, offset)))
        finally:
            os.close(fd)

    def create(self, path: str, mode: int, *, exclusive: bool) -> Attr:
        fd, name = self._in_parent(path, MAY_WRITE)
        try:
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                file_fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, mode & 0o7777, dir_fd=fd)
            except FileExistsError:
                if exclusive:
                    raise FileError(errno.EEXIST) from None
                # Someone's file already: opened as it is, if the target's user may write it.
                file_fd = self._call(lambda: os.open(name, flags, dir_fd=fd))
                try:
                    st = os.fstat(file_fd)
                    self._may(st, MAY_WRITE)
                    return self._attr(st)
                finally:
                    os.close(file_fd)
            except OSError as exc:
                raise FileError(exc.errno or errno.EIO) from None
            try:
                self._own(file_fd)
                return self._attr(os.fstat(file_fd))
            finally:
                os.close(file_fd)
        finally:
            os.close(fd)

    def mkdir(self, path: str, mode: int) -> Attr:
        fd, name = self._in_parent(path, MAY_WRITE)
        try:
            self._call(lambda: os.mkdir(name, mode & 0o7777, dir_fd=fd))
            new = self._call(
                lambda: os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            )
            try:
                self._own(new)
                return self._attr(os.fstat(new))
            finally:
                os.close(new)
        finally:
            os.close(fd)

    def _sticky(self, dir_fd: int, name: str) -> None:
        """In a sticky directory (/tmp), only a file's owner or the directory's removes it."""
        st = os.fstat(dir_fd)
        if not st.st_mode & stat.S_ISVTX or self.creds.has(CAP_FOWNER):
            return
        entry = self._call(lambda: os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
        if self.creds.uid not in (st.st_uid, entry.st_uid):
            raise FileError(errno.EPERM)

    def unlink(self, path: str, *, directory: bool) -> None:
        fd, name = self._in_parent(path, MAY_WRITE)
        try:
            self._sticky(fd, name)
            if directory:
                self._call(lambda: os.rmdir(name, dir_fd=fd))
            else:
                self._call(lambda: os.unlink(name, dir_fd=fd))
        finally:
            os.close(fd)

    def rename(self, old: str, new: str) -> None:
        old_fd, old_name = self._in_parent(old, MAY_WRITE)
        try:
            self._sticky(old_fd, old_name)
            new_fd, new_name = self._in_parent(new, MAY_WRITE)
            try:
                if _exists(new_fd, new_name):  # what is replaced is removed: same rule
                    self._sticky(new_fd, new_name)
                self._call(
                    lambda: os.rename(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
                )
            finally:
                os.close(new_fd)
        finally:
            os.close(old_fd)

    def setattr(
        self,
        path: str,
        *,
        mode: int | None,
        size: int | None,
        times: tuple[int, int] | None,
    ) -> Attr:
        flags = os.O_WRONLY if size is not None else os.O_PATH
        fd = self._open(path, flags | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            owner = st.st_uid == self.creds.uid or self.creds.has(CAP_FOWNER)
            if mode is not None:
                if not owner:
                    raise FileError(errno.EPERM)
                self._call(lambda: os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777))
            if size is not None:
                self._may(st, MAY_WRITE)
                self._call(lambda: os.ftruncate(fd, size))
            if times is not None:
                if not owner:
                    self._may(st, MAY_WRITE)
                self._call(lambda: os.utime(f"/proc/self/fd/{fd}", ns=times))
            return self._attr(os.fstat(fd))
        finally:
            os.close(fd)

    def _own(self, fd: int) -> None:
        """A new file belongs to the target's user, as if the target had made it."""
        with contextlib.suppress(OSError):  # the agent may lack CAP_CHOWN
            os.fchown(fd, self.creds.uid, self.creds.gid)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _mode_uid_gid(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_mode, st.st_uid, st.st_gid


def _read_small(dirfd: int, name: str, size: int) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
    except OSError:
        return None
    try:
        data = os.pread(fd, size + 1, 0)
        return data if len(data) == size else None  # it changed meanwhile: read it later
    except OSError:
        return None
    finally:
        os.close(fd)


def target_mounts(mountinfo: str) -> list[list[str]]:
    """The mounts of a mount table (``/proc/PID/mountinfo``) that can hold files a
    service reads, as ``[mount point, device, root]``: not the root, not ``/proc``,
    ``/sys`` or ``/dev``."""
    mounts: list[list[str]] = []
    for mount in table.parse(mountinfo):
        point = mount.point
        if point == "/" or any(table.is_under(point, p) for p in _SKIP_MOUNTS):
            continue
        mounts.append([point, mount.device, mount.root])
    return mounts


def request_path(args: dict[str, Any], name: str = "path") -> str:
    return clean_path(args.get(name), name)


def serve_request(files: TargetFiles, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """One ``fs.*`` request (blocking); a file error is the result ``{"errno": NAME}``."""
    try:
        if op == "fs.info":
            return files.info()
        if op not in FILE_OPS:
            raise FileError(errno.ENOTSUP, f"unknown file operation {op!r}")
        path = request_path(args)
        if op == "fs.stat":
            return {"attr": files.stat(path).to_wire()}
        if op == "fs.list":
            entries, more = files.list(path, _int(args, "start", 0))
            return {"entries": entries_to_wire(entries), "more": more}
        if op == "fs.readlink":
            return {"target": files.readlink(path)}
        if op == "fs.create":
            mode = _int(args, "mode", 0o644)
            attr = files.create(path, mode, exclusive=bool(args.get("exclusive")))
            return {"attr": attr.to_wire()}
        if op == "fs.mkdir":
            return {"attr": files.mkdir(path, _int(args, "mode", 0o755)).to_wire()}
        if op == "fs.unlink":
            files.unlink(path, directory=False)
            return {}
        if op == "fs.rmdir":
            files.unlink(path, directory=True)
            return {}
        if op == "fs.rename":
            files.rename(path, request_path(args, "new"))
            return {}
        if op == "fs.setattr":
            times = args.get("times")
            if times is not None and (
                not isinstance(times, list)
                or len(times) != 2
                or not all(type(t) is int for t in times)
            ):
                raise FileError(errno.EINVAL, "times must be [atime_ns, mtime_ns]")
            attr = files.setattr(
                path,
                mode=_int(args, "mode", None),
                size=_int(args, "size", None),
                times=(times[0], times[1]) if times is not None else None,
            )
            return {"attr": attr.to_wire()}
    except FileError as exc:
        return {"errno": exc.name}
    raise FileError(errno.ENOTSUP, f"unknown file operation {op!r}")


def _int(args: dict[str, Any], name: str, default: int | None) -> Any:
    value = args.get(name, default)
    if value is not None and (type(value) is not int or value < 0):
        raise FileError(errno.EINVAL, f"{name} must be a whole number")
    return value


# --- contents, on streams ---------------------------------------------------------------


class ReadSender:
    """A ``file-read`` stream: one range of a file, sent as the window allows."""

    def __init__(self, send: Callable[[int, bytes], int], stream_id: int, stats: PortStats):
        self.stream_id = stream_id
        self.stats = stats
        self._send = send
        self._data = memoryview(b"")
        self.done = asyncio.Event()

    def start(self, data: bytes) -> None:
        self._data = memoryview(data)
        self.on_credit()

    def on_credit(self) -> None:
        if self._data:
            sent = self._send(self.stream_id, bytes(self._data))
            self._data = self._data[sent:]
            self.stats.bytes_out += sent
        if not self._data:
            self.done.set()

    def on_data(self, data: bytes | memoryview) -> None:
        pass  # the daemon sends nothing on a read stream

    def on_half_closed(self) -> None:
        pass

    def on_reset(self, reason: str) -> None:
        self._data = memoryview(b"")
        self.done.set()

    def pause_for_output(self) -> None:
        pass

    def resume_after_output(self) -> None:
        pass


class WriteReceiver:
    """A ``file-write`` stream: the bytes to write, gathered until the daemon is done."""

    def __init__(self, grant: Callable[[int, int], None], stream_id: int, stats: PortStats):
        self.stream_id = stream_id
        self.stats = stats
        self._grant = grant
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def on_data(self, data: bytes | memoryview) -> None:
        self.chunks.append(bytes(data))
        self.size += len(data)
        self.stats.bytes_in += len(data)
        if self.size > MAX_READ:
            if not self.complete.done():
                self.complete.set_result(False)
            return
        self._grant(self.stream_id, len(data))

    def on_credit(self) -> None:
        pass

    def on_half_closed(self) -> None:
        if not self.complete.done():
            self.complete.set_result(True)

    def on_reset(self, reason: str) -> None:
        if not self.complete.done():
            self.complete.set_result(False)

    def pause_for_output(self) -> None:
        pass

    def resume_after_output(self) -> None:
        pass


class FileService:
    """The agent's side of the target's files: requests and content streams."""

    def __init__(self, find_pid: Callable[[], int | None]) -> None:
        self._find_pid = find_pid
        self._files: TargetFiles | None = None
        self.stats = PortStats()

    def _target(self) -> TargetFiles:
        files = self._files
        if files is not None and (files.pid is None or os.path.exists(f"/proc/{files.pid}")):
            return files
        if files is not None:  # the target's process is gone: find its successor
            files.close()
        pid = self._find_pid()
        try:
            self._files = TargetFiles.of_process(pid)
        except OSError as exc:
            raise FileError(
                exc.errno or errno.EIO, f"cannot open the target's root: {exc}"
            ) from None
        return self._files

    def close(self) -> None:
        if self._files is not None:
            self._files.close()
            self._files = None

    async def request(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            try:
                return serve_request(self._target(), op, args)
            except FileError as exc:
                return {"errno": exc.name}

        return await asyncio.to_thread(run)

    async def serve_read(self, tunnel: Tunnel, stream_id: int, info: dict[str, Any]) -> None:
        """Send one range of a file on ``stream_id``, then close the stream."""
        conn = tunnel.conn
        try:
            path = clean_path(info.get("path"))
            offset, length = _int(info, "offset", 0), _int(info, "length", 0)
            data = await asyncio.to_thread(lambda: self._target().read(path, offset, length))
        except (FileError, ValueError, ProtocolError) as exc:
            conn.reset(stream_id, _reason(exc))
            tunnel.kick()
            return
        sender = ReadSender(conn.send_data, stream_id, self.stats)
        tunnel.attach(sender)
        try:
            sender.start(data)
            tunnel.kick()
            await sender.done.wait()
            conn.shutdown(stream_id)
            tunnel.kick()
        finally:
            tunnel.forget(sender)

    def open_write(
        self, tunnel: Tunnel, stream_id: int, info: dict[str, Any]
    ) -> Coroutine[Any, Any, None]:
        """Take the bytes of ``stream_id`` from now on (its DATA may follow in the same
        message as its OPEN); the coroutine writes them and answers how many it wrote."""
        receiver = WriteReceiver(tunnel.conn.grant, stream_id, self.stats)
        tunnel.attach(receiver)
        return self._write(tunnel, receiver, info)

    async def _write(self, tunnel: Tunnel, receiver: WriteReceiver, info: dict[str, Any]) -> None:
        conn, stream_id = tunnel.conn, receiver.stream_id
        try:
            try:
                path = clean_path(info.get("path"))
                offset = _int(info, "offset", 0)
            except (FileError, ProtocolError) as exc:
                conn.reset(stream_id, _reason(exc))
                return
            if not await receiver.complete:
                conn.reset(stream_id, "EIO: the write was cut short")
                return
            data = b"".join(receiver.chunks)
            try:
                written = await asyncio.to_thread(lambda: self._target().write(path, offset, data))
            except FileError as exc:
                conn.reset(stream_id, _reason(exc))
                return
            conn.send_data(stream_id, b'{"written":%d}' % written)
            conn.shutdown(stream_id)
        finally:
            tunnel.forget(receiver)
            tunnel.kick()


def _reason(exc: Exception) -> str:
    if isinstance(exc, FileError):
        return f"{exc.name}: {exc}"
    return f"EINVAL: {exc}"
