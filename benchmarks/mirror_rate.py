"""Mirror, new connections: what each mirror method costs the pod's real traffic.

Run with ``make bench`` (root). nginx serves a 1 KiB page in a sandbox pod; ``ab``
on the host opens a new connection for every request (HTTP/1.0, no keep-alive),
``--concurrency`` at a time. In the same run, rotated per round:

- **unmirrored**: the pod alone;
- **capture**: ``netmirror up --mirror`` by packet capture;
- **passthrough**: ``netmirror up --mirror --mirror-method passthrough`` (the agent
  relays each connection and copies the client's bytes).

A local sink reads every copy. Reported: the connections per second the pod
served on each path (median of the rounds), the ratio to unmirrored, and the
copies the sink got against the requests ab made. Results go to
``benchmarks/results/mirror_rate.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, netmirror, nginx_conf, wait_port
from sandbox import Sandbox

POD_PORT = 80
LOCAL_PORT = 15203
SESSION = "benchmirrate"
PATHS = ("unmirrored", "capture", "passthrough")


def ab(host: str, *, requests: int, concurrency: int) -> dict[str, Any]:
    """One ``ab`` run, a new connection per request."""
    out = subprocess.run(
        [
            "ab",
            "-q",
            "-r",
            "-n",
            str(requests),
            "-c",
            str(concurrency),
            f"http://{host}:{POD_PORT}/",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    rate = re.search(r"Requests per second:\s+([\d.]+)", out.stdout)
    failed = re.search(r"Failed requests:\s+(\d+)", out.stdout)
    done = re.search(r"Complete requests:\s+(\d+)", out.stdout)
    if rate is None or done is None:
        raise RuntimeError(f"ab failed: {(out.stderr or out.stdout).strip()[-300:]}")
    return {
        "connections_per_s": float(rate.group(1)),
        "complete": int(done.group(1)),
        "failed": int(failed.group(1)) if failed else 0,
    }


def finished(log: Path) -> int:
    """Copies the sink has finished so far (one line each)."""
    return len(log.read_text().splitlines()) if log.exists() else 0


def copies(log: Path, before: int, want: int, timeout: float = 20) -> int:
    """Copies finished since ``before``, once the count stops growing (or has them all)."""
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        count = finished(log) - before
        if count >= want or count == seen:
            return count
        seen = count
        time.sleep(0.5)
    return seen


def median(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mirror_rate")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=PATHS, default=list(PATHS))
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("ab") or not shutil.which("nginx"):
        print("needs root, ab and nginx (make bench installs them)", file=sys.stderr)
        return 1
    box = Sandbox("benchmr", index=203)
    procs: list[subprocess.Popen[bytes]] = []
    samples: dict[str, list[dict[str, Any]]] = {p: [] for p in args.only}
    workdir = Path(tempfile.mkdtemp(prefix="netmirror-bench-"))
    log = workdir / "sink.log"
    try:
        if box.exists():
            box.destroy()
        box.create()
        root = workdir / "nginx"
        conf = nginx_conf(root, f"0.0.0.0:{POD_PORT}")
        procs.append(box.popen("nginx", "-p", str(root), "-c", str(conf)))
        sink = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("sink.py")),
                "--port",
                str(LOCAL_PORT),
                "--log",
                str(log),
            ],
            stdout=subprocess.PIPE,
        )
        procs.append(sink)
        assert sink.stdout is not None
        sink.stdout.readline()
        wait_port(box.pod_ip, POD_PORT)
        for rnd in range(args.rounds):
            order = args.only[rnd % len(args.only) :] + args.only[: rnd % len(args.only)]
            for path in order:
                before = finished(log)
                if path != "unmirrored":
                    netmirror(
                        "up",
                        "--target",
                        box.target,
                        "--mirror",
                        f"{POD_PORT}:{LOCAL_PORT}",
                        "--mirror-method",
                        path,
                        "--session",
                        SESSION,
                    )
                try:
                    sample = ab(box.pod_ip, requests=args.requests, concurrency=args.concurrency)
                    if path != "unmirrored":
                        sample["copies"] = copies(log, before, sample["complete"])
                finally:
                    if path != "unmirrored":
                        netmirror("down", "--session", SESSION)
                samples[path].append(sample)
                print(
                    f"round {rnd + 1} {path:12} {sample['connections_per_s']:9,.0f} conn/s"
                    f"  failed {sample['failed']}"
                    + (
                        f"  copies {sample['copies']}/{sample['complete']}"
                        if "copies" in sample
                        else ""
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        subprocess.run(
            [sys.executable, "-m", "netmirror", "down", "--session", SESSION],
            capture_output=True,
            check=False,
        )
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        box.destroy()
        shutil.rmtree(workdir, ignore_errors=True)

    medians = {p: median([s["connections_per_s"] for s in samples[p]]) for p in samples}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mirror_rate.json").write_text(
        json.dumps(
            {"settings": vars(args), "samples": samples, "median_connections_per_s": medians},
            indent=2,
        )
    )
    base = medians.get("unmirrored")
    print(
        "| mirror method | new connections/s the pod served | vs unmirrored | copies / requests |"
    )
    print("|---|---|---|---|")
    for path, rate in medians.items():
        got = sum(s.get("copies", 0) for s in samples[path])
        made = sum(s["complete"] for s in samples[path])
        ratio = f"{rate / base:.2f}x" if base and rate else "-"
        copied = f"{got}/{made}" if path != "unmirrored" else "-"
        print(f"| {path} | {rate:,.0f} | {ratio} | {copied} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
