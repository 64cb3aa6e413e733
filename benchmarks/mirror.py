"""Mirror by capture: which rate of one TCP stream is copied with zero loss.

Run with ``make bench`` (root). An iperf3 client on the host sends one stream at a
fixed rate (``-b``) to an iperf3 server in a sandbox pod; at each rate, in the
same run:

- **unmirrored**: the stream alone (what the pod gets without netmirror);
- **mirrored**: the same stream while netmirror mirrors the port by capture to a
  local process that reads and counts every byte.

Reported per rate: the throughput achieved both ways (the mirror must not slow the
real traffic) and the bytes the local copy got against what iperf3 sent (loss).
Results go to ``benchmarks/results/mirror.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, iperf_json, netmirror
from sandbox import Sandbox

POD_PORT = 5201
LOCAL_PORT = 15202
SESSION = "benchmirror"
# iperf3 sends a 37-byte cookie on the data connection before the payload.
COOKIE = 37


def iperf(host: str, *, rate_mbytes: int, seconds: int) -> int:
    """One iperf3 stream at ``rate_mbytes`` MB/s (0: unlimited); bytes sent."""
    rate = f"{rate_mbytes * 8}M" if rate_mbytes else "0"
    data = iperf_json(host, POD_PORT, seconds=seconds, rate=rate)
    return int(data["end"]["sum_sent"]["bytes"])


def sink_lines(log: Path) -> list[str]:
    """The sink's log: one line per copy it finished (the sink keeps the file open)."""
    return log.read_text().splitlines() if log.exists() else []


def copied(log: Path, before: int, timeout: float = 15) -> tuple[int, str]:
    """Bytes and end of the largest connection the sink saw after line ``before``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = sink_lines(log)[before:]
        if len(lines) >= 2:  # iperf3's control and data connections
            best = max((line.split() for line in lines), key=lambda f: int(f[0]))
            return int(best[0]), best[1]
        time.sleep(0.2)
    return 0, "missing"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mirror")
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument(
        "--rates",
        default="100,250,400,500,750,1000,0",
        help="MB/s, comma separated; 0 means as fast as possible",
    )
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("iperf3") is None:
        print("needs root and iperf3 (make bench installs it)", file=sys.stderr)
        return 1
    rates = [int(r) for r in args.rates.split(",")]
    box = Sandbox("benchm", index=202)
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="netmirror-bench-"))
    try:
        if box.exists():
            box.destroy()
        box.create()
        procs.append(box.popen("iperf3", "-s", "-p", str(POD_PORT), stdout=subprocess.DEVNULL))
        sink = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("sink.py")),
                "--port",
                str(LOCAL_PORT),
                "--log",
                str(workdir / "sink.log"),
            ],
            stdout=subprocess.PIPE,
        )
        procs.append(sink)
        assert sink.stdout is not None
        sink.stdout.readline()
        time.sleep(0.5)
        for rate in rates:
            plain = iperf(box.pod_ip, rate_mbytes=rate, seconds=args.seconds)
            log = workdir / "sink.log"
            before = len(sink_lines(log))
            netmirror(
                "up",
                "--target",
                box.target,
                "--mirror",
                f"{POD_PORT}:{LOCAL_PORT}",
                "--session",
                SESSION,
            )
            try:
                sent = iperf(box.pod_ip, rate_mbytes=rate, seconds=args.seconds)
                got, ended = copied(log, before)
                status = json.loads(netmirror("status", "--json", "--session", SESSION))
            finally:
                netmirror("down", "--session", SESSION)
            session = status["sessions"][0]
            expected = sent + COOKIE
            rows.append(
                {
                    "rate_mbytes": rate,
                    "unmirrored_mbytes_s": plain / args.seconds / 1e6,
                    "mirrored_mbytes_s": sent / args.seconds / 1e6,
                    "sent": sent,
                    "copied": got,
                    "copy_end": ended,
                    "lost": max(expected - got, 0),
                    "loss_pct": 100.0 * max(expected - got, 0) / expected,
                    "kernel_drops": (session.get("capture") or {}).get("kernel_drops"),
                    "mirror": session["ports"][0].get("mirror"),
                }
            )
    finally:
        subprocess.run(
            [sys.executable, "-m", "netmirror", "down", "--session", SESSION],
            capture_output=True,
            check=False,
        )
        for proc in procs:
            proc.kill()
            proc.wait()
        box.destroy()
        shutil.rmtree(workdir, ignore_errors=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mirror.json").write_text(
        json.dumps({"seconds": args.seconds, "rows": rows}, indent=2)
    )
    print(
        "| offered rate | unmirrored | mirrored (real traffic) | mirrored / unmirrored "
        "| copy lost | kernel drops |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        offered = f"{row['rate_mbytes']} MB/s" if row["rate_mbytes"] else "unlimited"
        ratio = row["mirrored_mbytes_s"] / row["unmirrored_mbytes_s"]
        print(
            f"| {offered} | {row['unmirrored_mbytes_s']:,.0f} MB/s "
            f"| {row['mirrored_mbytes_s']:,.0f} MB/s | {ratio:.2f} "
            f"| {row['loss_pct']:.1f}% | {row['kernel_drops']} |"
        )
    clean = [r["mirrored_mbytes_s"] for r in rows if r["lost"] == 0]
    print(
        f"\nhighest rate copied with zero loss: {max(clean):,.0f} MB/s"
        if clean
        else "\nno rate was copied without loss"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
