"""The target's root as a FUSE file system on this machine (pyfuse3, on the daemon's loop).

Inodes are this side's numbers for the target's paths. Attributes and listings
are kept for :data:`CACHE_TTL` (the kernel keeps them as long), so a file that
changes in the target shows its new contents within a second; a listing brings
the attributes of every entry (readdirplus) and the contents of small files, so
walking a directory of small files costs one round trip per directory.
Sequential reads fetch ahead in growing ranges, with the next range on its way
while the program consumes the current one.

Writes go to the target only under the paths the user made writable; anywhere
else they fail with EROFS, as on a read-only mount.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import functools
import itertools
import logging
import os
import posixpath
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3

from netmirror.daemon.files.remote import RemoteError, RemoteFiles
from netmirror.wire.files import (
    MAY_EXEC,
    MAY_READ,
    MAY_WRITE,
    Attr,
    Entry,
    child_path,
    entries_from_wire,
    relative_link,
)

log = logging.getLogger(__name__)

#: How long attributes, listings and small files are trusted (here and in the kernel).
CACHE_TTL = 0.5
#: The first range a sequential reader fetches, and the largest it grows to.
READ_FIRST = 256 * 1024
READ_MAX = 4 * 1024 * 1024
#: What a read that does not follow the previous one fetches at least.
READ_RANDOM = 64 * 1024


def under(path: str, patterns: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``patterns`` or inside one (``/a/**`` is the tree
    ``/a``; a pattern with ``*``, ``?`` or ``[`` matches ``path`` or one of its parents)."""
    for pattern in patterns:
        if pattern.endswith("/**"):
            pattern = pattern[:-3] or "/"
        if not _GLOB.intersection(pattern):
            if path == pattern or path.startswith(pattern.rstrip("/") + "/"):
                return True
            continue
        current = path
        while True:
            if fnmatch.fnmatchcase(current, pattern):
                return True
            if current == "/":
                break
            current = posixpath.dirname(current)
    return False


_GLOB = frozenset("*?[")


@dataclass
class _Cached:
    attr: Attr
    until: float
    data: bytes | None = None


@dataclass
class _Reader:
    """An open file: its path, and the ranges fetched or being fetched."""

    path: str
    writable: bool
    data: bytes | None = None  # the whole file, when it came with its listing
    ranges: dict[int, tuple[int, asyncio.Task[bytes]]] = field(default_factory=dict)
    size: int = READ_FIRST // 2  # doubled by the first read, at offset 0
    last_end: int = 0


class TargetFS(pyfuse3.Operations):
    """pyfuse3 operations over :class:`RemoteFiles`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        remote: RemoteFiles,
        *,
        writable: Iterable[str] = (),
        spawn: Callable[[Any, str], asyncio.Task[Any]] | None = None,
    ) -> None:
        super().__init__()
        self.remote = remote
        self.writable = tuple(writable)
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: "/"}
        self._inodes: dict[str, int] = {"/": pyfuse3.ROOT_INODE}
        self._next_inode = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._cache: dict[str, _Cached] = {}
        self._handles: dict[int, _Reader] = {}
        self._dirs: dict[int, list[tuple[str, Attr]]] = {}
        self._dir_paths: dict[int, str] = {}
        self._versions: dict[int, tuple[int, int, int]] = {}
        self._next_handle = itertools.count(1)
        self._spawn = spawn or (lambda coro, name: asyncio.ensure_future(coro))
        self.requests = 0

    # --- inodes and attributes ----------------------------------------------------------

    def _inode(self, path: str) -> int:
        inode = self._inodes.get(path)
        if inode is None:
            inode = next(self._next_inode)
            self._inodes[path] = inode
            self._paths[inode] = path
        return inode

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _entry(self, path: str, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._inode(path)
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_size = attr.size
        entry.st_rdev = attr.rdev
        entry.st_blocks = attr.blocks
        entry.st_blksize = 128 * 1024
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        entry.attr_timeout = CACHE_TTL
        entry.entry_timeout = CACHE_TTL
        return entry

    def _remember(self, path: str, attr: Attr, data: bytes | None = None) -> None:
        self._cache[path] = _Cached(attr, time.monotonic() + CACHE_TTL, data)

    def _forget_path(self, path: str) -> None:
        self._cache.pop(path, None)
        parent = path.rpartition("/")[0] or "/"
        self._cache.pop(parent, None)

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        self.requests += 1
        try:
            return await self.remote.call(op, args)
        except RemoteError as exc:
            raise pyfuse3.FUSEError(exc.code) from None

    async def _attr(self, path: str) -> Attr:
        cached = self._cache.get(path)
        if cached is not None and cached.until > time.monotonic():
            return cached.attr
        result = await self._call("fs.stat", path=path)
        attr = Attr.from_wire(result.get("attr"))
        self._remember(path, attr)
        return attr

    def _check_writable(self, path: str) -> None:
        if not under(path, self.writable):
            raise pyfuse3.FUSEError(errno.EROFS)

    # --- lookups -----------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._path(parent_inode)
        if not (await self._attr(parent)).access & MAY_EXEC:
            raise pyfuse3.FUSEError(errno.EACCES)
        path = child_path(parent, os.fsdecode(name))
        return self._entry(path, await self._attr(path))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        return self._entry(path, await self._attr(path))

    async def forget(self, inode_list: Iterable[tuple[int, int]]) -> None:
        pass  # inodes stay: a path keeps its number for the life of the mount

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        path = self._path(inode)
        attr = await self._attr(path)
        want = (MAY_READ if mode & os.R_OK else 0) | (MAY_EXEC if mode & os.X_OK else 0)
        if mode & os.W_OK:
            if not under(path, self.writable):
                raise pyfuse3.FUSEError(errno.EROFS)
            want |= MAY_WRITE
        return attr.access & want == want

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        path = self._path(inode)
        result = await self._call("fs.readlink", path=path)
        return os.fsencode(relative_link(path, str(result.get("target", ""))))

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    # --- directories -------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        entries: list[Entry] = []
        while True:  # one page after another, for a large directory
            result = await self._call("fs.list", path=path, start=len(entries))
            page = entries_from_wire(result.get("entries"))
            entries += page
            if not result.get("more") or not page:
                break
        listing = []
        for entry in entries:
            child = child_path(path, entry.name)
            self._remember(child, entry.attr, entry.data)
            listing.append((entry.name, entry.attr))
        handle = next(self._next_handle)
        self._dirs[handle] = listing
        self._dir_paths[handle] = path
        return handle

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._dirs.get(fh, [])
        parent = self._dir_paths.get(fh, "/")
        for index in range(start_id, len(listing)):
            name, attr = listing[index]
            entry = self._entry(child_path(parent, name), attr)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
        self._dir_paths.pop(fh, None)

    # --- file contents -----------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        path = self._path(inode)
        cached = self._cache.get(path)
        fresh = cached is not None and cached.until > time.monotonic()
        attr = cached.attr if fresh and cached is not None else await self._attr(path)
        accmode = flags & os.O_ACCMODE
        writing = accmode in (os.O_WRONLY, os.O_RDWR) or bool(flags & os.O_TRUNC)
        if writing:
            self._check_writable(path)
            if not attr.access & MAY_WRITE:
                raise pyfuse3.FUSEError(errno.EACCES)
        if accmode in (os.O_RDONLY, os.O_RDWR) and not attr.access & MAY_READ:
            raise pyfuse3.FUSEError(errno.EACCES)
        if stat.S_ISDIR(attr.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:
            await self._call("fs.setattr", path=path, size=0)
            self._forget_path(path)
        data = cached.data if fresh and cached is not None and not writing else None
        handle = next(self._next_handle)
        self._handles[handle] = _Reader(path, writing, data)
        info = pyfuse3.FileInfo(fh=handle)
        # The kernel may keep what it cached of this file only if the file has not
        # changed since (same size, mtime and ctime as when it was opened last);
        # attributes are at most CACHE_TTL old, so a change shows within a second.
        version = (attr.size, attr.mtime_ns, attr.ctime_ns)
        info.keep_cache = not writing and self._versions.get(inode) == version
        self._versions[inode] = version
        return info

    async def read(self, fh: int, off: int, size: int) -> bytes:
        reader = self._handles.get(fh)
        if reader is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if reader.data is not None:
            return reader.data[off : off + size]
        sequential = off == reader.last_end
        reader.last_end = off + size
        # Sequential readers get growing ranges; a read elsewhere fetches about what it
        # asks (a database's random reads must not pull megabytes each).
        reader.size = min(reader.size * 2, READ_MAX) if sequential else max(READ_RANDOM, size)
        out = bytearray()
        pos, end = off, off + size
        while pos < end:
            start, length, task = self._range_at(reader, pos)
            try:
                chunk = await task
            except RemoteError as exc:
                reader.ranges.pop(start, None)
                raise pyfuse3.FUSEError(exc.code) from None
            piece = chunk[pos - start : end - start]
            out += piece
            pos += len(piece)
            if len(chunk) < length and pos >= start + len(chunk):
                # The end of the file, as it was: read it again next time, for a file
                # that grows (tail -f); nothing is fetched ahead past it.
                reader.ranges.pop(start, None)
                for later in [s for s in reader.ranges if s > start]:
                    reader.ranges.pop(later)
                return bytes(out)
        # What lies behind the reader is not read again. A range still on its way may
        # be awaited by another read of this file: only finished ones are dropped.
        for start in [s for s, (n, t) in reader.ranges.items() if s + n <= off and t.done()]:
            reader.ranges.pop(start)
        if sequential:
            ahead = max((s + n for s, (n, _) in reader.ranges.items()), default=off + size)
            if ahead - (off + size) < reader.size:
                self._range_at(reader, ahead)
        return bytes(out)

    def _range_at(self, reader: _Reader, pos: int) -> tuple[int, int, asyncio.Task[bytes]]:
        """The range holding ``pos``, fetched or on its way; a new one if there is none."""
        for start, (length, task) in reader.ranges.items():
            if start <= pos < start + length:
                return start, length, task
        length = reader.size
        task = self._spawn(self.remote.read(reader.path, pos, length), f"read {reader.path}")
        reader.ranges[pos] = (length, task)
        self.requests += 1
        return pos, length, task

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        reader = self._handles.get(fh)
        if reader is None or not reader.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        # What was fetched is stale now; reads still waiting for it get it as it was.
        reader.ranges.clear()
        try:
            written = await self.remote.write(reader.path, off, bytes(buf))
            self._versions.pop(self._inodes.get(reader.path, 0), None)
        except RemoteError as exc:
            raise pyfuse3.FUSEError(exc.code) from None
        self._forget_path(reader.path)
        return written

    async def release(self, fh: int) -> None:
        reader = self._handles.pop(fh, None)
        if reader is not None:
            for _, task in reader.ranges.values():
                task.cancel()

    async def flush(self, fh: int) -> None:
        # Writes reach the target when they are made: nothing to flush. ENOSYS tells
        # the kernel so once, and it stops asking on every close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    # --- changes (writable paths only) ---------------------------------------------------

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = child_path(self._path(parent_inode), os.fsdecode(name))
        self._check_writable(path)
        result = await self._call(
            "fs.create", path=path, mode=mode & 0o7777, exclusive=bool(flags & os.O_EXCL)
        )
        attr = Attr.from_wire(result.get("attr"))
        self._forget_path(path)
        if flags & os.O_TRUNC and attr.size:
            attr = Attr.from_wire((await self._call("fs.setattr", path=path, size=0))["attr"])
        self._remember(path, attr)
        handle = next(self._next_handle)
        self._handles[handle] = _Reader(path, True)
        return pyfuse3.FileInfo(fh=handle), self._entry(path, attr)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = child_path(self._path(parent_inode), os.fsdecode(name))
        self._check_writable(path)
        attr = Attr.from_wire((await self._call("fs.mkdir", path=path, mode=mode & 0o7777))["attr"])
        self._forget_path(path)
        self._remember(path, attr)
        return self._entry(path, attr)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = child_path(self._path(parent_inode), os.fsdecode(name))
        self._check_writable(path)
        await self._call("fs.unlink", path=path)
        self._forget_path(path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = child_path(self._path(parent_inode), os.fsdecode(name))
        self._check_writable(path)
        await self._call("fs.rmdir", path=path)
        self._forget_path(path)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old = child_path(self._path(parent_inode_old), os.fsdecode(name_old))
        new = child_path(self._path(parent_inode_new), os.fsdecode(name_new))
        self._check_writable(old)
        self._check_writable(new)
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE / NOREPLACE: not carried
        await self._call("fs.rename", path=old, new=new)
        self._forget_path(old)
        self._forget_path(new)
        self._moved(old, new)

    def _moved(self, old: str, new: str) -> None:
        """Inodes and open files follow a rename: everything at or below ``old`` is now
        at the same place below ``new`` (what was at ``new`` is gone)."""
        for path in [p for p in self._inodes if p == new or p.startswith(new + "/")]:
            self._paths.pop(self._inodes.pop(path), None)
        prefix = old + "/"
        for path in [p for p in self._inodes if p == old or p.startswith(prefix)]:
            inode = self._inodes.pop(path)
            moved = new + path[len(old) :]
            self._inodes[moved] = inode
            self._paths[inode] = moved
            self._cache.pop(path, None)
        for reader in self._handles.values():
            if reader.path == old or reader.path.startswith(prefix):
                reader.path = new + reader.path[len(old) :]
        for handle, path in self._dir_paths.items():
            if path == old or path.startswith(prefix):
                self._dir_paths[handle] = new + path[len(old) :]

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        args: dict[str, Any] = {}
        if fields.update_mode:
            args["mode"] = attr.st_mode & 0o7777
        if fields.update_size:
            args["size"] = attr.st_size
        if fields.update_atime or fields.update_mtime:
            current = await self._attr(path)
            args["times"] = [
                attr.st_atime_ns if fields.update_atime else current.atime_ns,
                attr.st_mtime_ns if fields.update_mtime else current.mtime_ns,
            ]
        if not args:  # chown and the like: not carried to the target
            if fields.update_uid or fields.update_gid:
                raise pyfuse3.FUSEError(errno.EPERM)
            return self._entry(path, await self._attr(path))
        self._check_writable(path)
        result = await self._call("fs.setattr", path=path, **args)
        new = Attr.from_wire(result.get("attr"))
        self._forget_path(path)
        self._remember(path, new)
        return self._entry(path, new)


def _answered(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, failing only with :class:`pyfuse3.FUSEError`: pyfuse3 never answers
    the kernel for any other exception, and the program that asked would wait forever
    (even SIGKILL cannot end a process stuck in a FUSE request)."""

    @functools.wraps(method)
    async def answered(self: TargetFS, *args: Any) -> Any:
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            raise
        except RemoteError as exc:
            raise pyfuse3.FUSEError(exc.code) from None
        except (asyncio.CancelledError, Exception) as exc:
            log.warning("the file operation %s failed: %r", name, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return answered


for _name in (
    "lookup",
    "getattr",
    "forget",
    "access",
    "readlink",
    "statfs",
    "opendir",
    "readdir",
    "releasedir",
    "open",
    "read",
    "write",
    "release",
    "flush",
    "fsync",
    "create",
    "mkdir",
    "unlink",
    "rmdir",
    "rename",
    "setattr",
):
    setattr(TargetFS, _name, _answered(_name, getattr(TargetFS, _name)))
