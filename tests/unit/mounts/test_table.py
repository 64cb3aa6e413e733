"""Tests of netmirror.mounts.table: parsing mountinfo and the mounts below a path."""

from __future__ import annotations

from netmirror.mounts.table import Mount, is_under, mounts_under, parse, unescape

MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:22 / /sys rw,nosuid shared:2 - sysfs sysfs rw
25 22 0:5 / /dev rw,nosuid shared:3 - devtmpfs udev rw,size=8000k
27 22 0:24 / /run rw,nosuid,nodev shared:5 master:1 propagate_from:2 - tmpfs tmpfs rw
28 27 0:25 / /run/user/1000 rw,nosuid - tmpfs tmpfs rw,uid=1000
29 22 8:17 /volumes/data /mnt/my\040data rw shared:7 - ext4 /dev/disk\040one rw
30 28 0:26 / /run/user/1000/gvfs rw - fuse.gvfsd-fuse gvfsd-fuse rw
31 27 0:27 / /run/lock rw - tmpfs tmpfs rw
this line is not a mount
x 22 0:28 / /bad rw - tmpfs tmpfs rw
32 22 0:29 / /nodash rw shared:9 tmpfs tmpfs rw
"""


def mount(point: str, mount_id: int = 99) -> Mount:
    return Mount(mount_id, 1, "0:1", "/", point, "tmpfs", "tmpfs")


def test_parse_fields_and_order() -> None:
    mounts = parse(MOUNTINFO)
    assert [m.mount_id for m in mounts] == [22, 23, 24, 25, 27, 28, 29, 30, 31]
    assert mounts[0] == Mount(22, 1, "8:1", "/", "/", "ext4", "/dev/sda1")
    # Several optional fields before the "-" do not shift the file system type.
    assert mounts[4] == Mount(27, 22, "0:24", "/", "/run", "tmpfs", "tmpfs")
    assert mounts[7].fstype == "fuse.gvfsd-fuse"


def test_parse_unescapes_octal_in_paths() -> None:
    volume = next(m for m in parse(MOUNTINFO) if m.mount_id == 29)
    assert volume.point == "/mnt/my data"
    assert volume.root == "/volumes/data"
    assert volume.source == "/dev/disk one"
    assert unescape(r"a\011b\012c\134d") == "a\tb\nc\\d"


def test_parse_skips_malformed_lines() -> None:
    points = [m.point for m in parse(MOUNTINFO)]
    assert "/bad" not in points and "/nodash" not in points
    assert parse("") == []


def test_is_under() -> None:
    assert is_under("/run/x", "/run")
    assert is_under("/run", "/run")
    assert is_under("/anything", "/")
    assert not is_under("/runner", "/run")
    assert not is_under("/", "/run")


def test_mounts_under_gives_only_the_topmost_mounts_below() -> None:
    mounts = parse(MOUNTINFO)
    assert [m.point for m in mounts_under(mounts, "/run")] == ["/run/lock", "/run/user/1000"]
    assert [m.point for m in mounts_under(mounts, "/run/user")] == ["/run/user/1000"]
    assert mounts_under(mounts, "/mnt/my data") == []


def test_mounts_under_the_root() -> None:
    points = [m.point for m in mounts_under(parse(MOUNTINFO), "/")]
    assert points == ["/proc", "/sys", "/dev", "/run", "/mnt/my data"]


def test_mounts_under_does_not_match_a_name_prefix() -> None:
    mounts = [mount("/"), mount("/run"), mount("/runner"), mount("/run/x")]
    assert [m.point for m in mounts_under(mounts, "/run")] == ["/run/x"]


def test_mounts_under_a_point_mounted_twice_gives_the_last_mount() -> None:
    mounts = [mount("/"), mount("/srv", 1), mount("/srv/a", 2), mount("/srv", 3)]
    assert mounts_under(mounts, "/") == [mount("/srv", 3)]
