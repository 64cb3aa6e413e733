"""The target's files: what reading them through netmirror costs, and what it costs a
command that reads none of them.

Run with ``make bench`` (root; FUSE). The target is :class:`sandbox.files.FilesTarget`:
a process in a sandbox's network namespace with a root of its own (tmpfs on overlay)
holding a 100 MB file and 1,000 small files under ``/data``. In the same run, the
paths alternating round by round so drift hits all alike:

- **sequential read** of the 100 MB file with 1 MiB reads: *direct* (this machine
  reads ``/proc/PID/root/data/big``) vs *netmirror* (``netmirror exec --files-ro /data``
  reads ``/data/big``);
- **small files**: ``os.listdir`` of the 1,000-file directory and each file opened
  and read, *direct* vs *netmirror*;
- **local work**: a command that touches no remote file (Python imports, a ``find``
  over the standard library, a ``tar`` of /usr/share/doc piped into ``wc -c``, each
  five times) in
  ``netmirror exec`` with files on (``--files-ro /data``) vs ``--files off``, and
  without netmirror for reference.

Every timing is taken *inside* the command (a fresh Python process per measurement),
so exec's startup (agent, tunnel, mount) is not in it. Both sides are warm: the
target's files live in a tmpfs, and nothing is dropped between rounds; netmirror's
own caches (0.5 s) have expired when a round starts, and the kernel's page cache is
not kept for netmirror's files (each open reads the target again).

Results: ``benchmarks/results/files.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine, netmirror
from sandbox import Sandbox
from sandbox.files import FilesTarget

BIG = 100 * 1024 * 1024
SMALL = 1000
#: The same interpreter on both sides (the command sees this machine's /usr and venv).
PYTHON = sys.executable

#: One measurement, in a Python process of its own; prints ``RESULT {json}``.
#: ``big PATH``: sequential 1 MiB reads; ``small DIR``: listdir + read each file;
#: ``local``: work that touches no remote file (each step 5 times). With ``--fs`` it
#: also reports the file system type of the mount holding PATH (netmirror's FUSE?).
DRIVER = r"""
import json, os, subprocess, sys, time

def fstype(path):
    best, kind = "", "?"
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            point = fields[4]
            sep = fields.index("-")
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, kind = point, fields[sep + 1]
    return kind

mode, arg = sys.argv[1], sys.argv[2]
LOCAL_REPEAT = 5  # each local step this many times, so the total is worth timing
out = {}
if mode == "big":
    start = time.perf_counter()
    n = 0
    last = b""
    with open(arg, "rb", buffering=0) as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            n += len(block)
            last = block
    out["seconds"] = time.perf_counter() - start
    out["bytes"] = n
    out["last_block_index"] = int.from_bytes(last[-8:], "big")
elif mode == "small":
    start = time.perf_counter()
    names = os.listdir(arg)
    out["list_s"] = time.perf_counter() - start
    total = 0
    for name in names:
        with open(os.path.join(arg, name), "rb") as f:
            total += len(f.read())
    out["seconds"] = time.perf_counter() - start
    out["files"] = len(names)
    out["bytes"] = total
elif mode == "local":
    steps = {
        "imports": [sys.executable, "-c", "import json, email, http.client, asyncio"],
        "find": ["sh", "-c", "find /usr/lib/python3* -name '*.py' | wc -l"],
        "tar": ["sh", "-c", "tar cf - /usr/share/doc 2>/dev/null | wc -c"],
    }
    start = time.perf_counter()
    for name, argv in steps.items():
        t = time.perf_counter()
        for _ in range(LOCAL_REPEAT):
            res = subprocess.run(argv, stdout=subprocess.PIPE, check=True)
        out[name + "_s"] = time.perf_counter() - t
        out[name + "_out"] = res.stdout.decode().strip()
    out["seconds"] = time.perf_counter() - start
if "--fs" in sys.argv:
    out["fstype"] = fstype(os.path.realpath(arg) if mode != "local" else "/usr")
print("RESULT " + json.dumps(out), flush=True)
"""


def parse(stdout: str, what: str) -> dict[str, Any]:
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{what}: no result in {stdout[-500:]!r}")
    data: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return data


def direct(mode: str, arg: str) -> dict[str, Any]:
    """One measurement on this machine, no netmirror."""
    out = subprocess.run(
        [PYTHON, "-c", DRIVER, mode, arg],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"direct {mode} failed: {out.stderr[-500:]}")
    return parse(out.stdout, f"direct {mode}")


def in_exec(
    target: FilesTarget, env: dict[str, str], mode: str, arg: str, *flags: str
) -> dict[str, Any]:
    """One measurement inside its own ``netmirror exec`` (timed inside the command)."""
    started = time.monotonic()
    stdout = netmirror(
        "exec",
        "--target",
        target.spec,
        "--no-outgoing",
        *flags,
        "--",
        PYTHON,
        "-c",
        DRIVER,
        mode,
        arg,
        "--fs",
        env=env,
        timeout=300,
    )
    data = parse(stdout, f"exec {mode} {' '.join(flags)}")
    data["exec_wall_s"] = time.monotonic() - started
    return data


def check_big(sample: dict[str, Any], what: str) -> None:
    if sample["bytes"] != BIG or sample["last_block_index"] != BIG // (1 << 20) - 1:
        raise RuntimeError(f"{what}: read {sample['bytes']} bytes, not the target's file")


def check_small(sample: dict[str, Any], what: str, want_bytes: int) -> None:
    if sample["files"] != SMALL or sample["bytes"] != want_bytes:
        raise RuntimeError(
            f"{what}: {sample['files']} files, {sample['bytes']} bytes; "
            f"want {SMALL} files, {want_bytes} bytes"
        )


def check_fuse(sample: dict[str, Any], what: str) -> None:
    if not str(sample.get("fstype", "")).startswith("fuse"):
        raise RuntimeError(f"{what}: read from {sample.get('fstype')}, not netmirror's FUSE")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.files")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0 or not Path("/dev/fuse").exists() or not shutil.which("fusermount3"):
        print("needs root and FUSE (/dev/fuse, fusermount3; make deps)", file=sys.stderr)
        return 1
    box = Sandbox("benchf", index=204)
    state_dir = Path(tempfile.mkdtemp(prefix="netmirror-bench-files-"))
    env = dict(os.environ, NETMIRROR_STATE_DIR=str(state_dir))
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    target = FilesTarget(box.netns, big=BIG, small=SMALL)
    names = [
        "big direct",
        "big netmirror",
        "small direct",
        "small netmirror",
        "local no netmirror",
        "local files off",
        "local files on",
    ]
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        if box.exists():
            box.destroy()
        box.create()
        target.start()
        root = str(target.root)
        small_bytes = sum(p.stat().st_size for p in (target.root / "data/small").iterdir())
        on = ("--files-ro", "/data")
        off = ("--files", "off")
        # Warm up (untimed): the page cache for /usr, the venv's bytecode, the agent.
        direct("local", "-")
        check_fuse(in_exec(target, env, "small", "/data/small", *on), "warm-up")
        for index in range(args.rounds):
            flip = index % 2 == 1  # alternate the order within a round
            big_runs = [
                ("big direct", lambda: direct("big", f"{root}/data/big")),
                ("big netmirror", lambda: in_exec(target, env, "big", "/data/big", *on)),
            ]
            small_runs = [
                ("small direct", lambda: direct("small", f"{root}/data/small")),
                ("small netmirror", lambda: in_exec(target, env, "small", "/data/small", *on)),
            ]
            local_runs = [
                ("local no netmirror", lambda: direct("local", "-")),
                ("local files off", lambda: in_exec(target, env, "local", "-", *off)),
                ("local files on", lambda: in_exec(target, env, "local", "-", *on)),
            ]
            for group in (big_runs, small_runs, local_runs):
                for name, run in reversed(group) if flip else group:
                    sample = run()
                    if name.startswith("big"):
                        check_big(sample, name)
                    elif name.startswith("small"):
                        check_small(sample, name, small_bytes)
                    if name in ("big netmirror", "small netmirror"):
                        check_fuse(sample, name)
                    samples[name].append(sample)
            print(f"round {index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            time.sleep(1)  # netmirror's caches (0.5 s) have expired before the next round
    finally:
        netmirror("down", "--all", env=env, check=False)
        target.stop()
        box.destroy()
        shutil.rmtree(state_dir, ignore_errors=True)

    def med(name: str, key: str = "seconds") -> float:
        return float(statistics.median(s[key] for s in samples[name]))

    mb = BIG / 1e6
    rows: list[dict[str, Any]] = []
    for name, base in (("big direct", "big direct"), ("big netmirror", "big direct")):
        rows.append(
            {
                "scenario": f"100 MB sequential read, {name.split()[1]}",
                "value": f"{mb / med(name):,.0f} MB/s",
                "seconds": med(name),
                "mb_per_s": mb / med(name),
                "ratio": (mb / med(name)) / (mb / med(base)),
                "ratio_of": "throughput vs direct",
            }
        )
    for name in ("small direct", "small netmirror"):
        rows.append(
            {
                "scenario": f"list + read 1,000 small files, {name.split()[1]}",
                "value": f"{med(name) * 1000:,.1f} ms",
                "seconds": med(name),
                "list_s": med(name, "list_s"),
                "ratio": med(name) / med("small direct"),
                "ratio_of": "time vs direct",
            }
        )
    for name in ("local no netmirror", "local files off", "local files on"):
        rows.append(
            {
                "scenario": f"local work (imports, find, tar), {name.removeprefix('local ')}",
                "value": f"{med(name):.3f} s",
                "seconds": med(name),
                "steps_s": {k: med(name, f"{k}_s") for k in ("imports", "find", "tar")},
                "ratio": med(name) / med("local files off"),
                "ratio_of": "time vs --files off",
            }
        )
    big_nm = rows[1]
    summary = {
        "rows": rows,
        "targets": {
            "big read >= 200 MB/s or >= 0.2x direct": big_nm["mb_per_s"] >= 200
            or big_nm["ratio"] >= 0.2,
            "small files within 10x of direct": rows[3]["ratio"] <= 10,
            "local work no slower with files on (<= 1.05x)": rows[6]["ratio"] <= 1.05,
        },
        "exec_wall_s_median": statistics.median(
            s["exec_wall_s"] for runs in samples.values() for s in runs if "exec_wall_s" in s
        ),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": machine(),
        "rounds": args.rounds,
        "big_bytes": BIG,
        "small_files": SMALL,
        "note": "timed inside the command (exec startup excluded); both sides warm "
        "(tmpfs target, nothing dropped); median of rounds",
        "summary": summary,
        "samples": samples,
    }
    (RESULTS / "files.json").write_text(json.dumps(out, indent=2))
    print(f"medians of {args.rounds} rounds, timed inside the command; both sides warm")
    print("| scenario | median | ratio |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['scenario']} | {row['value']} | {row['ratio']:.2f}x {row['ratio_of']} |")
    for row in rows[2:4]:
        print(f"  {row['scenario']}: of which os.listdir {row['list_s'] * 1000:.1f} ms")
    for row in rows[4:]:
        steps = ", ".join(f"{k} {v:.3f} s" for k, v in row["steps_s"].items())
        print(f"  {row['scenario']}: {steps}")
    print(
        f"  exec wall time (startup included, not in the figures): "
        f"{summary['exec_wall_s_median']:.2f} s median"
    )
    for goal, met in summary["targets"].items():
        print(f"  target {goal}: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
