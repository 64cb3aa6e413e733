"""Bulk throughput of one stolen TCP stream, side by side with baselines.

Run with ``make bench`` (root). In one run, on one machine, with iperf3 (Debian):

- **direct**: iperf3 client -> the local app (127.0.0.1), no netmirror: the ceiling
  of what the local process can take;
- **pod**: iperf3 client -> the pod's own server over the veth pair: the path
  before netmirror is involved;
- **steal**: iperf3 client -> the pod's address, stolen by netmirror through the
  websocket tunnel into the local app.

Each scenario runs ``--rounds`` times, interleaved, upload and download (-R); the
median is reported, and netmirror as a ratio of the baselines. Results go to
``benchmarks/results/throughput.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import RESULTS, iperf_json, machine, netmirror
from sandbox import Sandbox

POD_PORT = 5201
LOCAL_PORT = 15201


def iperf(host: str, port: int, *, seconds: int, reverse: bool) -> float:
    """One iperf3 run; bytes per second received."""
    data = iperf_json(host, port, seconds=seconds, reverse=reverse, omit=1)
    return float(data["end"]["sum_received"]["bits_per_second"]) / 8


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput")
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("iperf3") is None:
        print("needs root and iperf3 (make bench installs it)", file=sys.stderr)
        return 1
    box = Sandbox("bench", index=201)
    procs: list[subprocess.Popen[bytes]] = []
    samples: dict[str, list[float]] = {}
    try:
        if box.exists():
            box.destroy()
        box.create()
        procs.append(
            subprocess.Popen(
                ["iperf3", "-s", "-p", str(LOCAL_PORT), "-B", "127.0.0.1"],
                stdout=subprocess.DEVNULL,
            )
        )
        procs.append(box.popen("iperf3", "-s", "-p", str(POD_PORT), stdout=subprocess.DEVNULL))
        time.sleep(0.5)
        for _ in range(args.rounds):
            for reverse in (False, True):
                way = "download" if reverse else "upload"
                samples.setdefault(f"direct/{way}", []).append(
                    iperf("127.0.0.1", LOCAL_PORT, seconds=args.seconds, reverse=reverse)
                )
                samples.setdefault(f"pod/{way}", []).append(
                    iperf(box.pod_ip, POD_PORT, seconds=args.seconds, reverse=reverse)
                )
            netmirror(
                "up",
                "--target",
                box.target,
                "--steal",
                f"{POD_PORT}:{LOCAL_PORT}",
                "--session",
                "bench",
            )
            try:
                for reverse in (False, True):
                    way = "download" if reverse else "upload"
                    samples.setdefault(f"steal/{way}", []).append(
                        iperf(box.pod_ip, POD_PORT, seconds=args.seconds, reverse=reverse)
                    )
            finally:
                netmirror("down", "--session", "bench")
    finally:
        subprocess.run(
            [sys.executable, "-m", "netmirror", "down", "--session", "bench"],
            capture_output=True,
            check=False,
        )
        for proc in procs:
            proc.kill()
            proc.wait()
        box.destroy()

    medians = {key: statistics.median(values) for key, values in samples.items()}
    report: dict[str, Any] = {
        "machine": machine(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "samples_bytes_per_s": samples,
        "median_bytes_per_s": medians,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(report, indent=2))
    print(
        "| one TCP stream | direct (local app) | pod (veth) | netmirror steal "
        "| steal / direct | steal / pod |"
    )
    print("|---|---|---|---|---|---|")
    for way in ("upload", "download"):
        d, p, s = (medians[f"{k}/{way}"] for k in ("direct", "pod", "steal"))
        print(
            f"| {way} | {d / 1e6:,.0f} MB/s | {p / 1e6:,.0f} MB/s | {s / 1e6:,.0f} MB/s "
            f"| {s / d:.2f} | {s / p:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
