"""HTTP-filtered steal: what the requests that are *not* stolen pay for the filter.

Run with ``make bench`` (root; wrk and nginx come from Debian). Beside netmirror's
router, the C reference: nginx in the pod on port 81 doing the same job (a ``map`` on
the header between two keep-alive upstreams, the pod's nginx and the developer's);
the ratios to it are the HTTP filter's targets. nginx serves a
1 KiB page in a sandbox pod; wrk (keep-alive, 50 connections) asks for it from
the host. In the same run, alternating so drift hits all alike:

- **direct**: no netmirror;
- **passthrough**: a session steals port 80 only for requests with a header that
  wrk never sends: every request goes through the port's HTTP router to nginx
  (what the rest of the team pays while one developer filters);
- **stolen**: wrk sends the header: every request goes to nginx on this machine,
  through the router, the agent and the tunnel.

wrk runs with 50 connections (throughput), and with 1 (the latency one request
sees when the service is not loaded, the usual case on a staging cluster).

Results: ``benchmarks/results/http_filter.json`` and a Markdown table on stdout.
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
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine, netmirror, nginx_conf, nginx_http_conf, wait_port
from sandbox import Sandbox

POD_PORT = 80
LOCAL_PORT = 18080
#: The C reference: nginx in the pod doing the router's job on another port.
ROUTER_PORT = 81
SESSION = "benchhttp"
HERE = Path(__file__).resolve().parent


def wrk(url: str, seconds: int, header: str | None, connections: int = 50) -> dict[str, Any]:
    threads = str(min(2, connections))
    cmd = ["wrk", "-t", threads, "-c", str(connections), "-d", f"{seconds}s"]
    cmd += ["-s", str(HERE / "wrk_report.lua")]
    if header:
        cmd += ["-H", header]
    out = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed: {(out.stderr or out.stdout)[-300:]}")
    data: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    data["requests_per_s"] = data["requests"] / (data["duration_us"] / 1e6)
    data["errors"] = sum(v for k, v in data.items() if k.startswith("err_"))
    return data


def nginx_router_conf(root: Path, *, pod: str, dev: str, listen: str) -> Path:
    """nginx as the HTTP filter would be in C: a ``map`` on the header chooses between
    two keep-alive upstreams, the pod's server and the developer's (one worker, as the
    router is one process)."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    return nginx_http_conf(
        root,
        f"""  map $http_x_dev $backend {{ "bench" dev; default pod; }}
  upstream pod {{ server {pod}; keepalive 64; }}
  upstream dev {{ server {dev}; keepalive 64; }}
  server {{
    listen {listen} backlog=4096;
    location / {{
      proxy_pass http://$backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }}
  }}""",
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_filter")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("wrk") or not shutil.which("nginx"):
        print("needs root, wrk and nginx (make bench installs them)", file=sys.stderr)
        return 1
    box = Sandbox("benchh", index=203)
    workdir = Path(tempfile.mkdtemp(prefix="netmirror-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    samples: dict[str, list[dict[str, Any]]] = {
        "direct": [],
        "passthrough": [],
        "stolen": [],
        "direct, 1 connection": [],
        "passthrough, 1 connection": [],
        "nginx router, passed": [],
        "nginx router, to the developer": [],
        "nginx router, passed, 1 connection": [],
    }
    try:
        if box.exists():
            box.destroy()
        box.create()
        pod_conf = nginx_conf(workdir / "pod", f"0.0.0.0:{POD_PORT}")
        # The developer's nginx, on loopback (for netmirror) and on this machine's side
        # of the pod's link (for the nginx router in the pod).
        local_conf = nginx_conf(workdir / "local", f"127.0.0.1:{LOCAL_PORT}")
        text = local_conf.read_text()
        local_conf.write_text(
            text.replace(
                f"listen 127.0.0.1:{LOCAL_PORT} backlog=4096;",
                f"listen 127.0.0.1:{LOCAL_PORT} backlog=4096;\n"
                f"    listen {box.host_ip}:{LOCAL_PORT} backlog=4096;",
            )
        )
        router_conf = nginx_router_conf(
            workdir / "router",
            pod=f"127.0.0.1:{POD_PORT}",
            dev=f"{box.host_ip}:{LOCAL_PORT}",
            listen=f"0.0.0.0:{ROUTER_PORT}",
        )
        procs.append(box.popen("nginx", "-p", str(pod_conf.parent), "-c", str(pod_conf)))
        wait_port(box.pod_ip, POD_PORT, proc=procs[-1])
        procs.append(
            subprocess.Popen(["nginx", "-p", str(local_conf.parent), "-c", str(local_conf)])
        )
        wait_port("127.0.0.1", LOCAL_PORT, proc=procs[-1])
        procs.append(box.popen("nginx", "-p", str(router_conf.parent), "-c", str(router_conf)))
        wait_port(box.pod_ip, ROUTER_PORT, proc=procs[-1])
        url = f"http://{box.pod_ip}:{POD_PORT}/index.html"
        router_url = f"http://{box.pod_ip}:{ROUTER_PORT}/index.html"
        wrk(url, 1, None)  # warm up, and check nginx answers
        wrk(router_url, 1, "x-dev: bench")  # and that the router reaches both upstreams
        for _ in range(args.rounds):
            samples["direct"].append(wrk(url, args.seconds, None))
            samples["direct, 1 connection"].append(wrk(url, args.seconds, None, 1))
            samples["nginx router, passed"].append(wrk(router_url, args.seconds, None))
            samples["nginx router, to the developer"].append(
                wrk(router_url, args.seconds, "x-dev: bench")
            )
            samples["nginx router, passed, 1 connection"].append(
                wrk(router_url, args.seconds, None, 1)
            )
            netmirror(
                "up",
                "--target",
                box.target,
                "--session",
                SESSION,
                "--steal",
                f"{POD_PORT}:{LOCAL_PORT}",
                "--http-header",
                "^x-dev: bench$",
            )
            try:
                samples["passthrough"].append(wrk(url, args.seconds, None))
                samples["passthrough, 1 connection"].append(wrk(url, args.seconds, None, 1))
                samples["stolen"].append(wrk(url, args.seconds, "x-dev: bench"))
            finally:
                netmirror("down", "--session", SESSION)
    finally:
        netmirror("down", "--session", SESSION, check=False)
        for proc in procs:
            proc.terminate()
            proc.wait()
        box.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {}
    for path, runs in samples.items():
        baseline = "direct, 1 connection" if "1 connection" in path else "direct"
        direct = statistics.median(s["requests_per_s"] for s in samples[baseline])
        rps = statistics.median(s["requests_per_s"] for s in runs)
        reference = {
            "passthrough": "nginx router, passed",
            "stolen": "nginx router, to the developer",
            "passthrough, 1 connection": "nginx router, passed, 1 connection",
        }.get(path, path)
        nginx = statistics.median(s["requests_per_s"] for s in samples[reference])
        summary[path] = {
            "requests_per_s": rps,
            "ratio_to_direct": rps / direct,
            "ratio_to_nginx_router": rps / nginx,
            "p50_us": statistics.median(s["p50_us"] for s in runs),
            "p99_us": statistics.median(s["p99_us"] for s in runs),
            "errors": sum(s["errors"] for s in runs),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": machine(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "summary": summary,
        "samples": samples,
    }
    (RESULTS / "http_filter.json").write_text(json.dumps(out, indent=2))
    print("| path | requests/s | vs direct | vs the nginx router | p50 | p99 | errors |")
    print("|---|---|---|---|---|---|---|")
    for path, row in summary.items():
        print(
            f"| {path} | {row['requests_per_s']:,.0f} | {row['ratio_to_direct']:.2f}x | "
            f"{row['ratio_to_nginx_router']:.2f}x | "
            f"{row['p50_us'] / 1000:.2f} ms | {row['p99_us'] / 1000:.2f} ms | {row['errors']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
