"""Tests of netmirror.mounts.plan: which mounts show the target's paths at their own place."""

from __future__ import annotations

from collections.abc import Iterable

from netmirror.mounts.plan import (
    Bind,
    Cover,
    KeepLocal,
    Kind,
    LocalView,
    MakeDir,
    MakeFile,
    Plan,
    plan,
)
from netmirror.mounts.table import Mount

FUSE = "/run/netmirror/s/root"


def view(dirs: Iterable[str], files: Iterable[str] = (), links: dict[str, str] | None = None):
    """A machine with these directories and files; ``links`` maps a path to its realpath."""
    dirs, files, links = {"/", *dirs}, set(files), links or {}

    def kind(path: str) -> Kind | None:
        path = links.get(path, path)
        return "dir" if path in dirs else "file" if path in files else None

    return LocalView(realpath=lambda path: links.get(path, path), kind=kind)


def mnt(point: str, mount_id: int) -> Mount:
    return Mount(mount_id, 1, f"0:{mount_id}", "/", point, "tmpfs", "tmpfs")


MOUNTS = [
    Mount(1, 0, "8:1", "/", "/", "ext4", "/dev/sda1"),
    mnt("/proc", 2),
    mnt("/run", 3),
    mnt("/run/user/1000", 4),
    mnt("/run/user/1000/doc", 5),
    mnt("/run/lock", 6),
]
LOCAL = view(["/etc", "/run", "/run/user", "/var", "/var/lib", "/opt", "/app"], ["/etc/hosts"])


def make(remote: list[tuple[str, Kind]], local: LocalView = LOCAL, **kw) -> Plan:
    return plan(remote, fuse_root=FUSE, local=local, mounts=MOUNTS, **kw)


def test_existing_directory_is_a_single_bind() -> None:
    result = make([("/var/lib", "dir")])
    assert result.steps == [Bind(f"{FUSE}/var/lib", "/var/lib")]
    assert result.placed == ["/var/lib"]
    assert result.warnings == []
    assert not result.chroot


def test_existing_file_binds_onto_its_real_path() -> None:
    local = view(["/etc", "/run"], ["/run/hosts"], links={"/etc/hosts": "/run/hosts"})
    result = make([("/etc/hosts", "file")], local)
    assert result.steps == [Bind(f"{FUSE}/etc/hosts", "/run/hosts")]


def test_missing_path_below_the_root_covers_the_root_and_chroots() -> None:
    result = make([("/data/app", "dir")])
    assert result.steps == [
        Cover("/"),
        MakeDir("/data"),
        MakeDir("/data/app"),
        Bind(f"{FUSE}/data/app", "/data/app"),
    ]
    assert result.chroot
    assert result.placed == ["/data/app"]


def test_missing_path_covers_its_nearest_existing_directory() -> None:
    result = make([("/var/lib/app/state", "dir")])
    assert result.steps == [
        Cover("/var/lib"),
        MakeDir("/var/lib/app"),
        MakeDir("/var/lib/app/state"),
        Bind(f"{FUSE}/var/lib/app/state", "/var/lib/app/state"),
    ]
    assert not result.chroot


def test_missing_path_on_a_submount_covers_its_directory() -> None:
    result = make([("/run/secrets/x", "file")])
    assert result.steps == [
        Cover("/run"),
        MakeDir("/run/secrets"),
        MakeFile("/run/secrets/x"),
        Bind(f"{FUSE}/run/secrets/x", "/run/secrets/x"),
    ]
    assert not result.chroot


def test_missing_file_is_made_last() -> None:
    steps = make([("/opt/a/b/conf.yaml", "file")]).steps
    made = [s for s in steps if isinstance(s, MakeDir | MakeFile)]
    assert made == [MakeDir("/opt/a"), MakeDir("/opt/a/b"), MakeFile("/opt/a/b/conf.yaml")]
    assert steps[-1] == Bind(f"{FUSE}/opt/a/b/conf.yaml", "/opt/a/b/conf.yaml")


def test_the_new_root_holds_only_new_top_level_entries() -> None:
    # /opt is bound back into the new root from this machine: a directory made below
    # it needs a cover of its own, or it would land on this machine's disk.
    result = make([("/data", "dir"), ("/opt/new/x", "file"), ("/srv", "dir"), ("/opt/b/y", "dir")])
    covers = [s for s in result.steps if isinstance(s, Cover)]
    assert covers == [Cover("/"), Cover("/opt")]
    assert MakeDir("/opt/new") in result.steps and MakeFile("/opt/new/x") in result.steps
    assert MakeDir("/data") in result.steps and MakeDir("/opt/b") in result.steps


def test_each_nearest_directory_gets_its_own_cover_outer_first() -> None:
    result = make([("/run/secrets/x", "file"), ("/data", "dir"), ("/var/lib/a/b", "dir")])
    covers = [s for s in result.steps if isinstance(s, Cover)]
    assert covers == [Cover("/"), Cover("/run"), Cover("/var/lib")]
    # Every cover comes before anything is made or bound.
    first_other = next(i for i, s in enumerate(result.steps) if not isinstance(s, Cover))
    assert all(not isinstance(s, Cover) for s in result.steps[first_other:])
    assert result.placed == ["/data", "/run/secrets/x", "/var/lib/a/b"]


def test_kind_mismatch_is_a_warning_and_no_step() -> None:
    result = make([("/etc/hosts", "dir"), ("/opt", "file")])
    assert result.steps == []
    assert result.placed == []
    assert result.warnings == [
        "/opt is a file in the target but a dir here: left as it is",
        "/etc/hosts is a dir in the target but a file here: left as it is",
    ]


def test_a_missing_path_below_a_local_file_is_left_out() -> None:
    result = make([("/etc/hosts/x", "file")])
    assert result.steps == []
    assert result.warnings == ["/etc/hosts/x: /etc/hosts is not a directory here: left out"]


def test_a_path_inside_a_bound_tree_is_skipped() -> None:
    result = make([("/app/config/x.yaml", "file"), ("/app", "dir"), ("/app", "dir")])
    assert result.steps == [Bind(f"{FUSE}/app", "/app")]
    assert result.placed == ["/app"]


def test_keep_local_only_below_a_bound_path() -> None:
    local = view(["/app", "/app/cache", "/home", "/home/me"])
    result = make([("/app", "dir")], local, keep_local=["/app/cache", "/home/me", "/app/missing"])
    assert result.steps == [Bind(f"{FUSE}/app", "/app"), KeepLocal("/app/cache")]
    assert result.warnings == ["/app/missing (local) does not exist on this machine: left out"]


def test_a_link_that_leads_nowhere_is_never_made_or_mounted_through() -> None:
    # /etc/resolv.conf -> ../run/systemd/resolve/stub-resolv.conf, with nothing there.
    dangling = view(["/etc", "/run"])
    kind = dangling.kind
    local = LocalView(
        realpath=dangling.realpath,
        kind=lambda p: "other" if p == "/etc/resolv.conf" else kind(p),
    )
    result = make([("/etc/resolv.conf", "file")], local)
    assert result.steps == []
    assert result.warnings == [
        "/etc/resolv.conf is a file in the target but a link that leads nowhere here: left as it is"
    ]
