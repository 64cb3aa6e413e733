"""Tests of netmirror.agent.files: permissions, credentials and file operations in a root.

The tests run as root against a temporary directory used as the target's root, with
the credentials of an ordinary user: what that user may not do must be refused by the
agent's own checks, since the kernel would allow the agent anything.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netmirror.agent.files import (
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    Credentials,
    FileError,
    TargetFiles,
    access_of,
    serve_request,
    target_mounts,
)
from netmirror.errors import ProtocolError
from netmirror.wire.files import INLINE_MAX, INLINE_TOTAL, Attr, entries_from_wire

UID, GID = 1000, 1000
USER = Credentials(UID, GID, frozenset({50}), 0)
FILE, DIR = stat.S_IFREG, stat.S_IFDIR

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as others")


def caps(*numbers: int) -> int:
    return sum(1 << n for n in numbers)


# ------------------------------------------------------------------ access_of


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "expected"),
    [
        (FILE | 0o640, UID, 0, 6),  # owner
        (FILE | 0o640, 0, GID, 4),  # primary group
        (FILE | 0o640, 0, 50, 4),  # supplementary group
        (FILE | 0o751, 0, 0, 1),  # other
        (FILE | 0o077, UID, GID, 0),  # the owner's bits apply to the owner, even if fewer
        (FILE | 0o707, 0, GID, 0),  # likewise the group's to a member
    ],
)
def test_access_of_mode_bits(mode: int, uid: int, gid: int, expected: int) -> None:
    assert access_of(mode, uid, gid, USER) == expected


def test_access_of_cap_dac_override() -> None:
    creds = Credentials(UID, GID, frozenset(), caps(CAP_DAC_OVERRIDE))
    assert access_of(FILE | 0o000, 0, 0, creds) == 6  # read and write, no exec bit at all
    assert access_of(FILE | 0o100, 0, 0, creds) == 7  # exec, since someone may
    assert access_of(DIR | 0o000, 0, 0, creds) == 7  # any directory searched


def test_access_of_cap_dac_read_search() -> None:
    creds = Credentials(UID, GID, frozenset(), caps(CAP_DAC_READ_SEARCH))
    assert access_of(FILE | 0o000, 0, 0, creds) == 4
    assert access_of(FILE | 0o100, 0, 0, creds) == 4  # no exec, no write
    assert access_of(DIR | 0o000, 0, 0, creds) == 5


# ----------------------------------------------------------------- credentials


def test_credentials_of_process_reads_fs_ids_groups_and_caps(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "status").write_text(
        "Name:\tapp\nUmask:\t0022\n"
        "Uid:\t1000\t1001\t1002\t1003\nGid:\t2000\t2001\t2002\t2003\n"
        "FDSize:\t64\nGroups:\t4 24 27 \nCapInh:\t0000000000000000\n"
        "CapEff:\t0000000000000006\nCapBnd:\t000001ffffffffff\n"
    )
    creds = Credentials.of_process(42, proc=tmp_path)
    assert creds == Credentials(1003, 2003, frozenset({4, 24, 27}), 6)
    assert creds.has(CAP_DAC_OVERRIDE) and creds.has(CAP_DAC_READ_SEARCH)
    assert not creds.has(0)


def test_credentials_of_process_without_groups(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "status").write_text("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n")
    assert Credentials.of_process("7", proc=tmp_path) == Credentials(0, 0, frozenset(), 0)


def test_target_mounts_skips_root_proc_sys_and_dev() -> None:
    mountinfo = (
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "2 1 0:2 / /proc rw - proc proc rw\n"
        "3 1 0:3 / /sys rw - sysfs sysfs rw\n"
        "4 1 0:4 / /dev rw - tmpfs tmpfs rw\n"
        "5 4 0:5 / /dev/shm rw - tmpfs shm rw\n"
        "6 1 8:1 /var/lib/kubelet/pods/x/etc-hosts /etc/hosts rw - ext4 /dev/sda1 rw\n"
        "7 1 0:6 / /var/run/secrets/token rw shared:3 - tmpfs tmpfs rw\n"
        "8 1 0:7 / /devices rw - tmpfs tmpfs rw\n"
    )
    assert target_mounts(mountinfo) == [
        ["/etc/hosts", "8:1", "/var/lib/kubelet/pods/x/etc-hosts"],
        ["/var/run/secrets/token", "0:6", "/"],
        ["/devices", "0:7", "/"],
    ]


# ---------------------------------------------------------------- TargetFiles


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A target's root: root-owned system files, and a home the user owns."""
    tmp_path.chmod(0o755)  # pytest makes it 0700
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("target's passwd\n")
    (tmp_path / "etc" / "shadow").write_text("secret\n")
    (tmp_path / "etc" / "shadow").chmod(0o600)
    (tmp_path / "etc" / "big").write_bytes(b"x" * (INLINE_MAX + 1))
    (tmp_path / "etc" / "sub").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes").write_text("0123456789")
    (home / "full").mkdir()
    (home / "full" / "f").write_text("")
    for path in (home, home / "notes", home / "full"):
        os.chown(path, UID, GID)
    (tmp_path / "link").symlink_to("/")
    (tmp_path / "pw").symlink_to("/etc/passwd")
    (tmp_path / "up").symlink_to("../../../../../etc")
    return tmp_path


@pytest.fixture
def files(root: Path) -> Iterator[TargetFiles]:
    target = TargetFiles(str(root), USER)
    yield target
    target.close()


def req(files: TargetFiles, op: str, **args: Any) -> dict[str, Any]:
    return serve_request(files, op, args)


def attr(result: dict[str, Any]) -> Attr:
    return Attr.from_wire(result["attr"])


def test_stat(files: TargetFiles, root: Path) -> None:
    got = attr(req(files, "fs.stat", path="/etc/passwd"))
    st = os.lstat(root / "etc" / "passwd")
    assert (got.mode, got.size, got.uid, got.mtime_ns) == (st.st_mode, 16, 0, st.st_mtime_ns)
    assert got.access == 4  # root's 0644 file: the user may read only
    assert stat.S_ISDIR(attr(req(files, "fs.stat", path="/")).mode)
    assert stat.S_ISLNK(attr(req(files, "fs.stat", path="/pw")).mode)  # not followed


def test_errors_are_errno_names(files: TargetFiles) -> None:
    assert req(files, "fs.stat", path="/nope") == {"errno": "ENOENT"}
    assert req(files, "fs.list", path="/etc/passwd") == {"errno": "ENOTDIR"}
    assert req(files, "fs.readlink", path="/etc/passwd") == {"errno": "EINVAL"}
    assert req(files, "fs.unlink", path="/") == {"errno": "EBUSY"}
    assert req(files, "fs.rmdir", path="/home/full") == {"errno": "ENOTEMPTY"}
    assert req(files, "fs.rename", path="/home/notes", new="/nope/x") == {"errno": "ENOENT"}


def test_list_inlines_small_readable_files(files: TargetFiles) -> None:
    entries = {e.name: e for e in entries_from_wire(req(files, "fs.list", path="/etc")["entries"])}
    assert set(entries) == {"passwd", "shadow", "big", "sub"}
    assert entries["passwd"].data == b"target's passwd\n"
    assert entries["big"].data is None  # larger than INLINE_MAX
    assert entries["big"].attr.size == INLINE_MAX + 1
    assert entries["shadow"].data is None  # the user may not read it
    assert entries["shadow"].attr.access == 0
    assert entries["sub"].data is None and stat.S_ISDIR(entries["sub"].attr.mode)


def test_list_inlines_at_most_inline_total(files: TargetFiles, root: Path) -> None:
    many = root / "many"
    many.mkdir()
    count = INLINE_TOTAL // INLINE_MAX + 5
    for index in range(count):
        (many / f"f{index}").write_bytes(b"y" * INLINE_MAX)
    entries, _more = files.list("/many")
    inline = [e for e in entries if e.data is not None]
    assert len(entries) == count
    assert sum(len(e.data or b"") for e in inline) <= INLINE_TOTAL
    assert len(inline) == INLINE_TOTAL // INLINE_MAX


def test_list_of_an_unreadable_directory_is_eacces(files: TargetFiles, root: Path) -> None:
    (root / "etc" / "sub").chmod(0o711)
    assert req(files, "fs.list", path="/etc/sub") == {"errno": "EACCES"}


def test_readlink(files: TargetFiles) -> None:
    assert req(files, "fs.readlink", path="/pw") == {"target": "/etc/passwd"}
    assert req(files, "fs.readlink", path="/link") == {"target": "/"}


def test_read(files: TargetFiles) -> None:
    assert files.read("/home/notes", 0, 100) == b"0123456789"
    assert files.read("/home/notes", 3, 4) == b"3456"
    assert files.read("/home/notes", 50, 4) == b""
    with pytest.raises(FileError) as caught:
        files.read("/home", 0, 1)
    assert caught.value.name == "EISDIR"


def test_read_refused_to_the_targets_user(files: TargetFiles) -> None:
    with pytest.raises(FileError) as caught:
        files.read("/etc/shadow", 0, 100)
    assert caught.value.code == errno.EACCES
    allowed = TargetFiles(files.root, Credentials(UID, GID, frozenset(), caps(2)))
    try:
        assert allowed.read("/etc/shadow", 0, 100) == b"secret\n"  # CAP_DAC_READ_SEARCH
    finally:
        allowed.close()


def test_symlinks_resolve_inside_the_root(files: TargetFiles) -> None:
    assert os.path.exists("/etc/passwd")  # this machine's, which must not be read
    assert files.read("/link/etc/passwd", 0, 100) == b"target's passwd\n"
    assert files.read("/up/passwd", 0, 100) == b"target's passwd\n"
    assert files.read("/link/link/link/etc/passwd", 0, 100) == b"target's passwd\n"
    assert req(files, "fs.stat", path="/../../etc/passwd")["attr"][4] == 16
    assert {e.name for e in files.list("/link/etc")[0]} == {"passwd", "shadow", "big", "sub"}
    with pytest.raises(FileError) as caught:
        files.read("/pw", 0, 100)  # the last component is never followed
    assert caught.value.name == "ELOOP"


def test_write(files: TargetFiles, root: Path) -> None:
    assert files.write("/home/notes", 2, b"ab") == 2
    assert (root / "home" / "notes").read_bytes() == b"01ab456789"
    with pytest.raises(FileError) as caught:
        files.write("/etc/passwd", 0, b"x")
    assert caught.value.name == "EACCES"
    assert (root / "etc" / "passwd").read_text() == "target's passwd\n"


def test_create_and_mkdir_belong_to_the_user(files: TargetFiles, root: Path) -> None:
    made = attr(req(files, "fs.create", path="/home/new", mode=0o640, exclusive=True))
    assert (made.uid, made.gid, stat.S_IMODE(made.mode), made.size) == (UID, GID, 0o640, 0)
    assert (root / "home" / "new").stat().st_uid == UID
    assert req(files, "fs.create", path="/home/new", exclusive=True) == {"errno": "EEXIST"}
    folder = attr(req(files, "fs.mkdir", path="/home/dir", mode=0o700))
    assert stat.S_ISDIR(folder.mode) and folder.uid == UID and folder.access == 7
    assert req(files, "fs.mkdir", path="/home/dir") == {"errno": "EEXIST"}


def test_changes_in_a_directory_the_user_may_not_write(files: TargetFiles, root: Path) -> None:
    refused = {"errno": "EACCES"}
    assert req(files, "fs.create", path="/etc/new", mode=0o644) == refused
    assert req(files, "fs.mkdir", path="/etc/newdir", mode=0o755) == refused
    assert req(files, "fs.unlink", path="/etc/passwd") == refused
    assert req(files, "fs.rename", path="/etc/passwd", new="/home/passwd") == refused
    assert req(files, "fs.rename", path="/home/notes", new="/etc/notes") == refused
    assert sorted(os.listdir(root / "etc")) == ["big", "passwd", "shadow", "sub"]


def test_unlink_rmdir_rename(files: TargetFiles, root: Path) -> None:
    home = root / "home"
    assert req(files, "fs.rename", path="/home/notes", new="/home/renamed") == {}
    assert (home / "renamed").read_text() == "0123456789" and not (home / "notes").exists()
    assert req(files, "fs.unlink", path="/home/renamed") == {}
    assert not (home / "renamed").exists()
    assert req(files, "fs.unlink", path="/home/renamed") == {"errno": "ENOENT"}
    (home / "empty").mkdir()
    assert req(files, "fs.unlink", path="/home/empty") == {"errno": "EISDIR"}
    assert req(files, "fs.rmdir", path="/home/empty") == {}
    assert not (home / "empty").exists()


def test_setattr(files: TargetFiles, root: Path) -> None:
    notes = root / "home" / "notes"
    got = attr(req(files, "fs.setattr", path="/home/notes", mode=0o600))
    assert stat.S_IMODE(got.mode) == 0o600 == stat.S_IMODE(notes.stat().st_mode)
    got = attr(req(files, "fs.setattr", path="/home/notes", size=4))
    assert got.size == 4 and notes.read_bytes() == b"0123"
    times = [1_000_000_000, 2_000_000_000]
    got = attr(req(files, "fs.setattr", path="/home/notes", times=times))
    assert (got.atime_ns, got.mtime_ns) == tuple(times) == (notes.stat().st_atime_ns, got.mtime_ns)


def test_setattr_refused(files: TargetFiles, root: Path) -> None:
    assert req(files, "fs.setattr", path="/etc/passwd", mode=0o666) == {"errno": "EPERM"}
    assert req(files, "fs.setattr", path="/etc/passwd", size=0) == {"errno": "EACCES"}
    assert req(files, "fs.setattr", path="/etc/passwd", times=[1, 2]) == {"errno": "EACCES"}
    assert stat.S_IMODE((root / "etc" / "passwd").stat().st_mode) == 0o644
    assert (root / "etc" / "passwd").read_text() == "target's passwd\n"


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("fs.setattr", {"path": "/home/notes", "times": [1]}),
        ("fs.setattr", {"path": "/home/notes", "times": [1, 2.5]}),
        ("fs.setattr", {"path": "/home/notes", "mode": -1}),
        ("fs.create", {"path": "/home/x", "mode": "644"}),
        ("fs.mkdir", {"path": "/home/x", "mode": True}),
    ],
)
def test_bad_numbers_are_einval(files: TargetFiles, op: str, args: dict[str, Any]) -> None:
    assert serve_request(files, op, args) == {"errno": "EINVAL"}
    assert not os.path.exists(files.root + "/home/x")


@pytest.mark.parametrize(
    "args",
    [{}, {"path": "etc/passwd"}, {"path": "/etc/\0"}, {"path": 5}],
)
def test_bad_paths_are_protocol_errors(files: TargetFiles, args: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="must be an absolute path"):
        serve_request(files, "fs.stat", args)


def test_rename_with_a_bad_new_path_is_a_protocol_error(files: TargetFiles) -> None:
    with pytest.raises(ProtocolError, match="new must be an absolute path"):
        req(files, "fs.rename", path="/home/notes", new="notes2")
    assert os.path.exists(files.root + "/home/notes")


def test_unknown_operation_and_info(files: TargetFiles) -> None:
    assert req(files, "fs.chown", path="/home/notes") == {"errno": "ENOTSUP"}
    assert req(files, "fs.info") == {"pid": None, "uid": UID, "gid": GID, "mounts": []}


# ------------------------------------------------- an existing file, an unsearchable directory


def test_create_of_an_existing_file_keeps_its_owner(files: TargetFiles, root: Path) -> None:
    tmp = root / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    (tmp / "roots").write_text("secret\n")
    (tmp / "roots").chmod(0o600)
    result = req(files, "fs.create", path="/tmp/roots", mode=0o644, exclusive=False)
    assert (tmp / "roots").stat().st_uid == 0
    assert result == {"errno": "EACCES"}


def test_a_file_below_an_unsearchable_directory_is_refused(files: TargetFiles, root: Path) -> None:
    (root / "etc" / "sub" / "f").write_text("hidden\n")
    (root / "etc").chmod(0o700)
    with pytest.raises(FileError) as caught:
        files.read("/etc/sub/f", 0, 100)
    assert caught.value.name == "EACCES"


# ------------------------------------------------- sticky renames, own files, pages, no process


def test_a_rename_over_someone_elses_file_in_a_sticky_directory_is_refused(
    files: TargetFiles, root: Path
) -> None:
    tmp = root / "tmp"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    (tmp / "rootfile").write_text("root's\n")
    (tmp / "mine").write_text("mine\n")
    os.chown(tmp / "mine", UID, GID)
    assert req(files, "fs.rename", path="/tmp/mine", new="/tmp/rootfile") == {"errno": "EPERM"}
    assert (tmp / "rootfile").read_text() == "root's\n"


def test_the_owner_writes_its_read_only_file_it_just_made(files: TargetFiles, root: Path) -> None:
    assert "attr" in req(files, "fs.create", path="/home/obj", mode=0o444, exclusive=True)
    assert files.write("/home/obj", 0, b"blob") == 4
    assert (root / "home" / "obj").read_bytes() == b"blob"


def test_a_large_directory_is_listed_in_pages(files: TargetFiles, root: Path) -> None:
    many = root / "home" / "lots"
    many.mkdir()
    for i in range(4500):
        (many / f"f{i:05d}").touch()
    names: list[str] = []
    more = True
    while more:
        page = req(files, "fs.list", path="/home/lots", start=len(names))
        names += [item[0] for item in page["entries"]]
        more = page["more"]
    assert names == sorted(f"f{i:05d}" for i in range(4500))


def test_without_a_process_there_are_no_files_rather_than_the_agents_own() -> None:
    with pytest.raises(FileError) as caught:
        TargetFiles.of_process(None)
    assert caught.value.name == "ENOENT"
