"""The target's files on the wire: operations, attributes and errors (sans-I/O).

The daemon asks for metadata with REQUEST frames (``fs.*`` operations, each with a
``path`` inside the target's root) and moves file contents on streams, with the
streams' own flow control: a ``file-read`` stream carries the bytes of one range
from the agent, a ``file-write`` stream carries bytes to write to the agent, which
answers with one JSON DATA frame before it closes the stream.

A failed operation is answered with ``{"errno": "ENOENT"}`` (an errno *name*, the
same on both ends whatever their C library) in the result or, on a stream, with a
RESET whose reason starts with the name. The daemon gives the error to the local
program as it is, so a missing file is ENOENT there as in the target.
"""

from __future__ import annotations

import base64
import binascii
import errno
import posixpath
from dataclasses import dataclass
from typing import Any

from netmirror.errors import ProtocolError

#: Metadata operations (REQUEST ops); contents move on streams.
FILE_OPS = (
    "fs.info",
    "fs.stat",
    "fs.list",
    "fs.readlink",
    "fs.create",
    "fs.mkdir",
    "fs.unlink",
    "fs.rmdir",
    "fs.rename",
    "fs.setattr",
)

#: The target's files every command sees at their own path when they exist there.
STANDARD_PATHS = ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname")
#: The variable that tells the command where the target's root is mounted.
ROOT_VARIABLE = "NETMIRROR_ROOT"

#: The largest range one ``file-read`` stream carries.
MAX_READ = 8 * 1024 * 1024
#: The largest piece of a file a directory listing carries inline (small files are
#: read with their listing, so reading a directory of them costs one round trip).
INLINE_MAX = 4096
#: The most inline bytes one listing carries in all.
INLINE_TOTAL = 256 * 1024
#: Entries of one page of a directory listing at most (a page is one REPLY; a larger
#: directory takes several).
MAX_LIST = 2000

#: Access bits in :attr:`Attr.access`: what the target's user may do.
MAY_READ, MAY_WRITE, MAY_EXEC = 4, 2, 1

# errno names both ends know; anything else becomes EIO.
_KNOWN = {
    name: getattr(errno, name)
    for name in (
        "ENOENT",
        "EACCES",
        "EPERM",
        "EROFS",
        "EIO",
        "EEXIST",
        "ENOTDIR",
        "EISDIR",
        "ENOTEMPTY",
        "EINVAL",
        "ENAMETOOLONG",
        "ELOOP",
        "ENOSPC",
        "EXDEV",
        "EBUSY",
        "EFBIG",
        "ETXTBSY",
        "EMFILE",
        "ENFILE",
        "EOVERFLOW",
        "ENOTSUP",
        "EDQUOT",
    )
}


def errno_name(code: int) -> str:
    """The wire name of an errno value (EIO for one the wire does not carry)."""
    name = errno.errorcode.get(code, "EIO")
    return name if name in _KNOWN else "EIO"


def errno_value(name: object) -> int:
    """The local errno value of a wire name (EIO for an unknown one)."""
    if isinstance(name, str):
        return int(_KNOWN.get(name.split(":", 1)[0].strip(), errno.EIO))
    return errno.EIO


def clean_path(value: object, what: str = "path") -> str:
    """A path inside the target's root: absolute, normalised, no NUL.

    ``..`` is resolved textually (it cannot climb above ``/``); the agent resolves
    symbolic links inside the root as well, so no path leaves it.
    """
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ProtocolError(f"malformed file request: {what} must be an absolute path")
    if len(value) > 4096:
        raise ProtocolError(f"malformed file request: {what} is too long")
    path = posixpath.normpath(value)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path


def child_path(parent: str, name: str) -> str:
    """``parent/name`` for a directory entry name."""
    return f"{parent.rstrip('/')}/{name}"


@dataclass(frozen=True, slots=True)
class Attr:
    """What ``lstat`` says of a file in the target, and what the target may do with it."""

    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    access: int
    """MAY_READ | MAY_WRITE | MAY_EXEC for the target's user."""

    def to_wire(self) -> list[int]:
        return [
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.size,
            self.rdev,
            self.blocks,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.access,
        ]

    @classmethod
    def from_wire(cls, value: Any) -> Attr:
        if (
            not isinstance(value, list)
            or len(value) != 11
            or not all(type(v) is int for v in value)
            # Times (7, 8, 9) may be before 1970; nothing else is negative.
            or any(v < 0 for i, v in enumerate(value) if i not in (7, 8, 9))
        ):
            raise ProtocolError("malformed file reply: attributes must be 11 whole numbers")
        return cls(*value)


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a directory listing; ``data`` is the whole file when it is small."""

    name: str
    attr: Attr
    data: bytes | None = None


def entries_to_wire(entries: list[Entry]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for entry in entries:
        item: list[Any] = [entry.name, entry.attr.to_wire()]
        if entry.data is not None:
            item.append(base64.b64encode(entry.data).decode("ascii"))
        out.append(item)
    return out


def entries_from_wire(value: Any) -> list[Entry]:
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise ProtocolError("malformed file reply: entries must be a list")
    out = []
    for item in value:
        if not isinstance(item, list) or len(item) not in (2, 3) or not isinstance(item[0], str):
            raise ProtocolError("malformed file reply: an entry must be [name, attributes]")
        name = item[0]
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ProtocolError("malformed file reply: bad entry name")
        data = None
        if len(item) == 3:
            if not isinstance(item[2], str):
                raise ProtocolError("malformed file reply: inline data must be a string")
            try:
                data = base64.b64decode(item[2], validate=True)
            except (binascii.Error, ValueError):
                raise ProtocolError("malformed file reply: inline data is not base64") from None
        out.append(Entry(name, Attr.from_wire(item[1]), data))
    return out


def relative_link(link_path: str, target: str) -> str:
    """An absolute symbolic link made relative to the root it lives in.

    The kernel follows a link's text on the machine that reads it: ``/etc/x ->
    /run/y`` read through the mount would lead to this machine's ``/run/y``. Made
    relative (``../run/y``), it leads to the target's ``/run/y`` under the mount,
    and, where a subtree is mounted at its own path, to the same path as the
    absolute text would.
    """
    if not target.startswith("/"):
        return target
    depth = posixpath.dirname(link_path).strip("/").count("/") + (
        1 if posixpath.dirname(link_path).strip("/") else 0
    )
    rest = target.lstrip("/")
    return "/".join([".."] * depth + ([rest] if rest else [])) or "."
