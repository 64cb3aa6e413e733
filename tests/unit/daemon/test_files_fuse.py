"""The FUSE operations of the target's files, against a remote in memory (no mount)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from typing import Any

import pyfuse3
import pytest

from netmirror.daemon.files.fuse import TargetFS, _Reader, under
from netmirror.daemon.files.remote import RemoteError
from netmirror.errors import ProtocolError
from netmirror.wire.files import Attr


def attr(mode: int, size: int = 0, mtime: int = 1) -> list[int]:
    return Attr(mode, 1, 0, 0, size, 0, 0, mtime, mtime, mtime, 7).to_wire()


class Remote:
    """A target with files in a dict; reads can be held back per offset."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.reads: list[tuple[int, int]] = []
        self.slow: dict[int, asyncio.Event] = {}
        self.fail_with: Exception | None = None

    async def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if self.fail_with is not None:
            raise self.fail_with
        path = args["path"]
        if op == "fs.stat":
            if path == "/" or any(p.startswith(path.rstrip("/") + "/") for p in self.files):
                return {"attr": attr(stat.S_IFDIR | 0o755)}
            if path not in self.files:
                raise RemoteError(errno.ENOENT)
            return {"attr": attr(stat.S_IFREG | 0o644, len(self.files[path]))}
        raise AssertionError(op)

    async def read(self, path: str, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        if offset in self.slow:
            await self.slow[offset].wait()
        return self.files[path][offset : offset + length]


async def opened(fs: TargetFS, path: str) -> int:
    entry = await fs.lookup(pyfuse3.ROOT_INODE, path.lstrip("/").encode(), None)
    info = await fs.open(entry.st_ino, os.O_RDONLY, None)
    return int(info.fh)


def test_writable_patterns() -> None:
    assert under("/data/up/x", ["/data/up"]) and under("/data/up", ["/data/up/**"])
    assert not under("/data/upper", ["/data/up"])
    assert under("/var/db/main.db", ["/var/db/*.db"])
    assert under("/var/db/main.db-journal/x", ["/var/db/*-journal"])
    assert not under("/var/db/main.txt", ["/var/db/*.db"])


async def test_a_failure_that_is_no_errno_is_eio_never_a_hang() -> None:
    remote = Remote({"/f": b"x"})
    fs = TargetFS(remote)  # type: ignore[arg-type]
    remote.fail_with = ProtocolError("malformed file reply")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.getattr(pyfuse3.ROOT_INODE, None)
    assert caught.value.errno == errno.EIO


async def test_concurrent_reads_of_one_range_all_get_their_bytes() -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    remote = Remote({"/f": data})
    fs = TargetFS(remote)  # type: ignore[arg-type]
    fh = await opened(fs, "/f")
    gate = asyncio.Event()
    remote.slow[0] = gate
    # The kernel's read-ahead: several reads in flight, the first range slow.
    reads = [asyncio.ensure_future(fs.read(fh, off, 131072)) for off in (0, 131072)]
    await asyncio.sleep(0.01)
    later = await asyncio.wait_for(fs.read(fh, 262144, 131072), 2)
    assert later == data[262144 : 262144 + 131072]
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*reads), 2) == [
        data[:131072],
        data[131072:262144],
    ]


async def test_a_file_that_grows_is_read_again_past_its_old_end() -> None:
    remote = Remote({"/log": b"line1\n"})
    fs = TargetFS(remote)  # type: ignore[arg-type]
    fh = await opened(fs, "/log")
    assert await fs.read(fh, 0, 4096) == b"line1\n"
    for _ in range(5):  # whatever the read left running runs now, before the file grows
        await asyncio.sleep(0)
    remote.files["/log"] += b"line2\n"
    assert await fs.read(fh, 6, 4096) == b"line2\n"


async def test_a_write_does_not_fail_a_read_in_flight() -> None:
    remote = Remote({"/db": bytes(1024 * 1024)})

    async def write(path: str, offset: int, data: bytes) -> int:
        return len(data)

    remote.write = write  # type: ignore[attr-defined]
    fs = TargetFS(remote, writable=["/db"])  # type: ignore[arg-type]
    entry = await fs.lookup(pyfuse3.ROOT_INODE, b"db", None)
    fh = int((await fs.open(entry.st_ino, os.O_RDWR, None)).fh)
    gate = asyncio.Event()
    remote.slow[0] = gate
    reading = asyncio.ensure_future(fs.read(fh, 0, 4096))
    await asyncio.sleep(0.01)
    assert await fs.write(fh, 50000, b"x" * 10) == 10
    gate.set()
    assert await asyncio.wait_for(reading, 2) == bytes(4096)


async def test_random_reads_fetch_about_what_they_ask() -> None:
    remote = Remote({"/db": bytes(8 * 1024 * 1024)})
    fs = TargetFS(remote)  # type: ignore[arg-type]
    fh = await opened(fs, "/db")
    await fs.read(fh, 5 * 1024 * 1024, 4096)
    assert remote.reads[-1] == (5 * 1024 * 1024, 64 * 1024)


def test_a_rename_moves_inodes_below_and_open_files() -> None:
    fs = TargetFS(Remote({}))  # type: ignore[arg-type]
    inode = fs._inode("/d/sub/f")
    fs._handles[1] = _Reader("/d/sub/f", writable=True)
    fs._handles[2] = _Reader("/d2", writable=False)
    stale = fs._inode("/e/sub")
    fs._moved("/d", "/e")
    assert fs._paths[inode] == "/e/sub/f" and fs._inodes["/e/sub/f"] == inode
    assert "/d/sub/f" not in fs._inodes and stale not in fs._paths
    assert fs._handles[1].path == "/e/sub/f" and fs._handles[2].path == "/d2"
