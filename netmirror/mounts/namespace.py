"""Making a :class:`~netmirror.mounts.plan.Plan` real, in a new mount namespace.

:func:`enter` runs in the command's process before it executes the command
(``subprocess``'s ``preexec_fn``): it unshares the mount namespace, makes every
mount of this machine a slave (so nothing done here reaches this machine, while its
own later mounts still show), and makes the plan's mounts. The namespace, and
every mount in it, ends with the last process of the command: nothing is left to
clean up, whatever way the command ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat

from netmirror.mounts.plan import Bind, Cover, KeepLocal, MakeDir, MakeFile, Plan

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


class MountError(OSError):
    """A mount call failed; the message names the call."""


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise MountError(code, f"{what}: {os.strerror(code)}")


def unshare_mounts() -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            os.fsencode(source) if source is not None else None,
            os.fsencode(target),
            os.fsencode(fstype) if fstype is not None else None,
            ctypes.c_ulong(flags),
            os.fsencode(data) if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def detach(target: str) -> None:
    """Lazy unmount (``umount -l``)."""
    _check(_libc.umount2(os.fsencode(target), MNT_DETACH), f"umount {target}")


def _bind_back(source: str, target: str) -> list[str]:
    """Put ``source`` (an entry of a covered directory) at ``target`` in its cover; a
    warning for an entry that could not be put back (the command sees it empty)."""
    try:
        st = os.lstat(source)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(source), target)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(target, stat.S_IMODE(st.st_mode))
            mount(source, target, None, MS_BIND | MS_REC)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            mount(source, target, None, MS_BIND)
    except FileNotFoundError:
        return []  # gone since the listing
    except OSError as exc:
        return [f"{target.rsplit('/', 1)[-1]}: could not be put back: {exc}"]
    return []


def detach_below(path: str) -> list[str]:
    """Lazily unmount everything mounted at or below ``path`` (deepest first); what was."""
    from netmirror.mounts import table

    try:
        points = [m.point for m in table.read() if table.is_under(m.point, path) and path != "/"]
    except OSError:
        return []
    done = []
    for point in sorted(set(points), key=len, reverse=True):
        with contextlib.suppress(OSError):
            detach(point)
            done.append(point)
    return done


def enter(plan: Plan, *, workspace: str, fuse_root: str = "") -> list[str]:
    """Unshare, and make ``plan``'s mounts; returns warnings for mounts that failed.

    ``workspace`` is an empty directory for the namespace's tmpfs (for a new root,
    the root itself); it is covered only inside the namespace.
    Both it and ``fuse_root`` (where the plan's sources are) are held open first and
    reached through their descriptors, so a remote tree mounted over their own
    place (the target's ``/run``, say) does not hide them.
    """
    warnings: list[str] = []
    cwd = os.getcwd()
    unshare_mounts()
    mount(None, "/", None, MS_REC | MS_SLAVE)
    # This machine's own files under remote trees, held before anything covers them.
    kept = {
        step.path: os.open(step.path, os.O_PATH | os.O_CLOEXEC)
        for step in plan.steps
        if isinstance(step, KeepLocal)
    }
    sources = ""
    if fuse_root:
        sources = f"/proc/self/fd/{os.open(fuse_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)}"
    prefix = ""
    space = workspace
    if any(isinstance(step, Cover) for step in plan.steps):
        mount("netmirror", workspace, "tmpfs", 0, "mode=0700")
        space = f"/proc/self/fd/{os.open(workspace, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)}"
    for step in plan.steps:
        if isinstance(step, Cover):
            if step.point == "/":
                # The new root: a directory of the namespace's tmpfs in which each of
                # this machine's top-level entries is bound back.
                new_root = f"{space}/root"
                os.mkdir(new_root)
                top = workspace.strip("/").split("/", 1)[0]
                for name in sorted(os.listdir("/"), key=lambda n: n != top):
                    warnings += _bind_back(f"/{name}", f"{new_root}/{name}")
                # Held: the workspace's own path may be covered by what comes next.
                root_fd = os.open(new_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                prefix = f"/proc/self/fd/{root_fd}"
                continue
            where = prefix + step.point
            held = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                st = os.fstat(held)
                # The cover looks like the directory it covers: its mode and owner.
                options = f"mode={stat.S_IMODE(st.st_mode):o},uid={st.st_uid},gid={st.st_gid}"
                mount("netmirror", where, "tmpfs", 0, options)
                for name in os.listdir(held):
                    warnings += _bind_back(f"/proc/self/fd/{held}/{name}", f"{where}/{name}")
            finally:
                os.close(held)
        elif isinstance(step, MakeDir):
            # Never through a symbolic link: a new entry is made in the cover's tmpfs
            # (one that appeared since the plan is used if it is a real directory).
            try:
                os.mkdir(prefix + step.path, 0o755)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(prefix + step.path).st_mode):
                    raise
        elif isinstance(step, MakeFile):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(prefix + step.path, flags, 0o644))
        elif isinstance(step, Bind):
            source = step.source
            if fuse_root and (source == fuse_root or source.startswith(fuse_root + "/")):
                source = sources + source[len(fuse_root) :]
            try:
                mount(source, prefix + step.target, None, MS_BIND)
            except OSError as exc:
                warnings.append(f"{step.target}: {exc}")
        elif isinstance(step, KeepLocal):
            try:
                source = f"/proc/self/fd/{kept[step.path]}"
                mount(source, prefix + step.path, None, MS_BIND | MS_REC)
            except OSError as exc:
                warnings.append(f"{step.path} (local): {exc}")
    for fd in kept.values():
        os.close(fd)
    if prefix:
        os.chdir(prefix)
        os.chroot(".")
        # The copy of the workspace that came in with the reattached mounts.
        with contextlib.suppress(OSError):
            detach(workspace)
    if os.path.isdir(cwd):
        os.chdir(cwd)
    return warnings
