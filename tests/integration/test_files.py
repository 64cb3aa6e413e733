"""The target's files: a local command reads (and where allowed writes) them at their paths.

The target is a process in the sandbox's namespace with a root of its own
(:mod:`sandbox.files`): an overlay of this machine's root, so its paths
(``/app``, ``/var/run/secrets/...``, ``/data``) do not exist on this machine. Real
programs (cat, sh, Python, dd) read and write through the real FUSE mount; the
checks look at the target's own files, at this machine's mount table and at its
FUSE connections.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.files import TOKEN_DIR, FilesTarget
from tests.integration.conftest import Env
from tests.support.waiting import eventually, read_line

BIG = 16 * 1024 * 1024


#: The test whose mounts the helpers below look at (only this test's, by its state dir).
_STATE: list[Path] = []


def fuse_mounts() -> list[str]:
    """This test's netmirror FUSE mounts in this machine's mount table."""
    (state,) = _STATE
    with open("/proc/self/mountinfo") as fh:
        return [
            line
            for line in fh
            if " fuse.netmirror " in line and line.split()[4].startswith(f"{state}/")
        ]


def connections_of(lines: list[str]) -> set[str]:
    """The FUSE connections (in /sys/fs/fuse/connections) of those mounts."""
    return {line.split()[2].split(":")[1] for line in lines}


def fuse_connections() -> set[str]:
    """The kernel's FUSE connections, from a fusectl of a mount namespace of our own
    (this machine may not have it mounted; we do not mount it here)."""
    res = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            "mount -t fusectl fusectl /sys/fs/fuse/connections && ls /sys/fs/fuse/connections",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot list the FUSE connections: {res.stderr.strip()}")
    return set(res.stdout.split())


@pytest.fixture
def target(env: Env) -> Iterator[FilesTarget]:
    _STATE[:] = [env.state_dir]
    try:
        with FilesTarget(env.sandbox.netns, big=BIG, small=1000) as files_target:
            yield files_target
        # After the session ends nothing of this test's is mounted.
        eventually(lambda: not fuse_mounts(), 5, lambda: f"mounts left behind: {fuse_mounts()}")
    finally:
        _STATE.clear()


def run_exec(
    env: Env, target: FilesTarget, script: str, *flags: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return env.netmirror(
        "exec",
        "--target",
        target.spec,
        "--no-outgoing",
        *flags,
        "--",
        "sh",
        "-c",
        script,
        timeout=timeout,
    )


def test_the_command_reads_the_targets_files_at_their_paths(env: Env, target: FilesTarget) -> None:
    res = run_exec(
        env,
        target,
        f"cat /app/config/app.yaml {TOKEN_DIR}/token /etc/hostname; grep db.target /etc/hosts;"
        'cat "$NETMIRROR_ROOT/app/config/features.json";'
        "python3 -c 'import json; print(json.load(open(\"/app/config/features.json\")))';"
        "ls /app/config | sort | tr '\\n' ' '",
        "--files-ro",
        "/app/config/**",
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:4] == [
        "color: blue",
        "eyJ-target-token",
        "web-7d9f-target",
        "10.9.9.9 db.target.internal",
    ]
    assert lines[4] == '{"new_checkout": true}'
    assert lines[5] == "{'new_checkout': True}"
    assert lines[6].split() == ["app.yaml", "features.json"]
    # This machine has none of those paths, and its own /etc/hostname is untouched.
    assert not Path("/app").exists() and not Path(TOKEN_DIR).exists()
    assert Path("/etc/hostname").read_text() != "web-7d9f-target\n"


def test_other_processes_see_nothing_while_the_command_runs(env: Env, target: FilesTarget) -> None:
    proc = start_exec(env, target, "cat /app/config/app.yaml; exec sleep 30")
    try:
        assert read_line(proc.stdout, 30, "the first read") == "color: blue"
        assert not Path("/app").exists()
        assert not Path(TOKEN_DIR).exists()
        # The root is there for everyone who asks for it, and read-only.
        roots = [line.split()[4] for line in fuse_mounts()]
        assert len(roots) == 1
        assert Path(roots[0], "app/config/app.yaml").read_text() == "color: blue\n"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def start_exec(
    env: Env, target: FilesTarget, script: str, *flags: str, stderr: int = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """``netmirror exec ... --files-ro /app/config -- sh -c SCRIPT``, left running; its
    stdin and stdout are pipes."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "netmirror",
            "exec",
            *flags,
            "--target",
            target.spec,
            "--no-outgoing",
            "--files-ro",
            "/app/config",
            "--",
            "sh",
            "-c",
            script,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env.env,
    )
    env.procs.append(proc)
    return proc


def test_large_and_many_small_files_arrive_whole(env: Env, target: FilesTarget) -> None:
    want = hashlib.sha256((target.root / "data/big").read_bytes()).hexdigest()
    res = run_exec(
        env,
        target,
        "sha256sum /data/big | cut -d' ' -f1; cat /data/small/* | wc -l; ls /data/small | wc -l",
        "--files-ro",
        "/data",
    )
    assert res.returncode == 0, res.stderr
    digest, lines, count = res.stdout.split()
    assert digest == want
    assert (int(lines), int(count)) == (8 * 1000, 1000)


def test_a_file_changed_in_the_target_shows_within_a_second(env: Env, target: FilesTarget) -> None:
    config = target.root / "app/config/app.yaml"
    script = (
        "cat /app/config/app.yaml; read go; start=$(date +%s%N);"
        "while ! grep -q green /app/config/app.yaml; do sleep 0.05; done;"
        "echo $(( ($(date +%s%N) - start) / 1000000 ))"
    )
    proc = start_exec(env, target, script)
    assert proc.stdout is not None and proc.stdin is not None
    assert read_line(proc.stdout, 30, "the first read") == "color: blue"
    config.write_text("color: green\n")
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    elapsed_ms = int(read_line(proc.stdout, 10, "the change"))
    assert elapsed_ms < 1000
    assert proc.wait(10) == 0


def test_writes_go_to_the_target_only_under_read_write_paths(env: Env, target: FilesTarget) -> None:
    res = run_exec(
        env,
        target,
        "set -e; echo fresh > /data/uploads/new.txt; echo more >> /data/uploads/existing.txt;"
        "mkdir /data/uploads/dir; mv /data/uploads/new.txt /data/uploads/dir/moved.txt;"
        "chmod 600 /data/uploads/dir/moved.txt; dd if=/dev/zero of=/data/uploads/zero bs=64k "
        "count=40 2>/dev/null; truncate -s 1000 /data/uploads/zero;"
        "echo nope > /app/config/app.yaml 2>/dev/null || echo refused-ro;"
        "echo local > /tmp/nm-files-local-$$ && echo local-ok && rm /tmp/nm-files-local-$$",
        "--files-rw",
        "/data/uploads",
        "--files-ro",
        "/app/config",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["refused-ro", "local-ok"]
    uploads = target.root / "data/uploads"
    moved = uploads / "dir/moved.txt"
    assert moved.read_text() == "fresh\n"
    assert oct(moved.stat().st_mode & 0o777) == "0o600"
    # Made as the target's user would have made them.
    assert (moved.stat().st_uid, (uploads / "dir").stat().st_uid) == (1000, 1000)
    assert (uploads / "existing.txt").read_text() == "uploaded before\nmore\n"
    assert (uploads / "zero").stat().st_size == 1000
    assert (target.root / "app/config/app.yaml").read_text() == "color: blue\n"


def test_this_machines_files_beside_a_missing_remote_path_stay_its_own(
    env: Env, target: FilesTarget, tmp_path: Path
) -> None:
    # The target has <work>/data, which this machine lacks: <work> is covered for the
    # command, and what was in it is still this machine's, read and written as before.
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "main.c").write_text("v1\n")
    (work / "src" / "lib.c").write_text("lib v1\n")
    remote = target.root / str(work).lstrip("/") / "data"
    remote.mkdir(parents=True)
    (remote / "seed.csv").write_text("remote,data\n")
    # The target's user (uid 1000) must be able to reach it there (pytest's
    # directories are root's 0700): in the target's own copy of them only.
    for parent in remote.relative_to(target.root).parents:
        os.chmod(target.root / parent, 0o755)
    res = run_exec(
        env,
        target,
        f"cd {work} && cat data/seed.csv main.c && echo v2 > main.c && echo lib v2 > src/lib.c"
        " && echo new > src/new.c && ls",
        "--files-ro",
        f"{work}/data",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["remote,data", "v1", "data", "main.c", "src"]
    assert (work / "main.c").read_text() == "v2\n"
    assert (work / "src" / "lib.c").read_text() == "lib v2\n"
    assert (work / "src" / "new.c").read_text() == "new\n"
    assert not (work / "data").exists()


def test_errors_are_the_targets(env: Env, target: FilesTarget) -> None:
    script = (
        "python3 - <<'EOF'\n"
        "import errno, os\n"
        "root = os.environ['NETMIRROR_ROOT']\n"
        "def code(fn):\n"
        "    try:\n"
        "        fn()\n"
        "    except OSError as exc:\n"
        "        return errno.errorcode[exc.errno]\n"
        "    return 'ok'\n"
        "print(code(lambda: open('/app/config/missing.yaml')))\n"
        "print(code(lambda: open(root + '/app/root-only').read()))\n"
        "print(code(lambda: open(root + '/app/secret.env').read()))\n"
        "print(code(lambda: open('/app/config/app.yaml', 'a')))\n"
        "print(code(lambda: os.mkdir('/app/config/new')))\n"
        "print(code(lambda: os.unlink(root + '/etc/hostname')))\n"
        "EOF"
    )
    res = run_exec(env, target, script, "--files-ro", "/app/config")
    assert res.returncode == 0, res.stderr
    # The target's user (uid 1000) may read secret.env (its group) but not root-only.
    assert res.stdout.split() == ["ENOENT", "EACCES", "ok", "EROFS", "EROFS", "EROFS"]


def test_a_cut_tunnel_gives_eio_within_the_bound(
    env: Env, target: FilesTarget, tmp_path: Path
) -> None:
    config = tmp_path / "netmirror.yaml"
    config.write_text("files:\n  timeout: 2\n")
    script = "cat /app/config/app.yaml; read go; sleep 1; cat /app/config/features.json; echo rc=$?"
    proc = start_exec(env, target, script, "--config", str(config), stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    assert read_line(proc.stdout, 30, "the first read") == "color: blue"
    agents = [pid for pid, cmd in env._our_pids().items() if " agent " in cmd]
    assert agents, env.our_processes()
    for pid in agents:
        os.kill(pid, signal.SIGSTOP)  # the agent answers nothing: a cut tunnel
    try:
        start = time.monotonic()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert read_line(proc.stdout, 20, "the failed read") == "rc=1"
        assert time.monotonic() - start < 1 + 2 + 3
    finally:
        for pid in agents:
            os.kill(pid, signal.SIGCONT)
    proc.wait(30)
    assert b"Input/output error" in proc.stderr.read()


@pytest.mark.parametrize("how", ["sigint", "kill-exec", "kill-daemon"])
def test_nothing_stays_mounted_however_exec_ends(env: Env, target: FilesTarget, how: str) -> None:
    proc = start_exec(env, target, "cat /app/config/app.yaml; exec sleep 60")
    assert proc.stdout is not None
    assert read_line(proc.stdout, 30, "the first read") == "color: blue"
    mounted = fuse_mounts()
    assert len(mounted) == 1
    ours = connections_of(mounted)
    assert ours <= fuse_connections()
    if how == "sigint":
        proc.send_signal(signal.SIGINT)
    elif how == "kill-exec":
        proc.kill()
    else:
        daemons = [pid for pid, cmd in env._our_pids().items() if " daemon " in cmd]
        assert daemons
        for pid in daemons:
            os.kill(pid, signal.SIGKILL)
    eventually(lambda: not fuse_mounts(), 15, lambda: f"still mounted: {fuse_mounts()}")
    if how == "kill-daemon":
        # The command outlives its session (its file calls fail from now on), and its
        # namespace holds the dead connection until it ends: end it here.
        proc.kill()
        proc.wait(10)
    # The command went with exec (or with the test), and so did its namespace.
    eventually(lambda: not ours & fuse_connections(), 15, "its FUSE connection stayed")


def test_up_mounts_the_root_for_the_session(env: Env, target: FilesTarget) -> None:
    env.netmirror("up", "--target", target.spec, "--session", "f1", "--steal", "9:19", check=True)
    status = env.netmirror("status", "--session", "f1", check=True).stdout
    root = env.state_dir / "f1" / "root"
    assert str(root) in status
    assert (root / "app/config/app.yaml").read_text() == "color: blue\n"
    with pytest.raises(OSError) as exc:
        (root / "app/config/app.yaml").write_text("x")
    assert exc.value.errno == 30  # EROFS
    env.netmirror("down", "--session", "f1", check=True)
    assert not fuse_mounts()


def test_files_off_leaves_the_command_with_this_machines_files(
    env: Env, target: FilesTarget
) -> None:
    res = run_exec(
        env, target, 'cat /etc/hostname; echo "root=${NETMIRROR_ROOT:-none}"', "--files", "off"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [Path("/etc/hostname").read_text().strip(), "root=none"]
    assert not fuse_mounts()
