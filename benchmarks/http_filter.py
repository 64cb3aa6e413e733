"""HTTP-filtered steal: what the requests that are *not* stolen pay for the filter.

Run with ``make bench`` (root; wrk, h2load and nginx come from Debian). Beside netmirror's
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

The same paths in HTTP/2 (cleartext, prior knowledge), measured with h2load
(10 clients x 10 concurrent streams): the pod's nginx serves h2c on port 82 too,
the session steals 82 (to an h2c nginx on this machine) beside 80, with the same
header filter, and netmirror's router relays HTTP/2 to HTTP/2 upstreams. The nginx
router reference has an h2c listener on port 83; nginx speaks HTTP/2 only to the
client and HTTP/1.1 keep-alive to its upstreams (its proxy cannot speak HTTP/2), so
that reference does less than netmirror's router, which re-encodes HTTP/2 frames on
both sides. h2load gives no latency percentiles: the h2 rows have none.

Results: ``benchmarks/results/http_filter.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
#: The same three in HTTP/2 (h2c, prior knowledge).
H2_POD_PORT = 82
H2_LOCAL_PORT = 18082
H2_ROUTER_PORT = 83
#: h2load's load: clients, and concurrent streams on each.
H2_CLIENTS = 10
H2_STREAMS = 10
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


def h2load(url: str, seconds: int, header: str | None) -> dict[str, Any]:
    """One h2load run (h2c, prior knowledge): its counts and request rate.

    ``errors`` is h2load's ``failed`` (requests that got no 2xx/3xx answer; it
    includes ``errored``, the streams that ended without one); a run with failures,
    or with no request done, keeps the tail of h2load's output as ``output``.
    """
    cmd = ["h2load", "-c", str(H2_CLIENTS), "-m", str(H2_STREAMS), "-D", str(seconds)]
    if header:
        cmd += ["-H", header]
    out = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    finished = re.search(
        r"^finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", out.stdout, re.MULTILINE
    )
    requests = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored(?:, (\d+) timeout)?",
        out.stdout,
        re.MULTILINE,
    )
    if out.returncode != 0 or finished is None or requests is None:
        raise RuntimeError(f"h2load failed: {(out.stderr + out.stdout)[-500:]}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[finished.group(2)]
    total, started, done, succeeded, failed, errored = map(int, requests.groups()[:6])
    data: dict[str, Any] = {
        "duration_s": float(finished.group(1)) * scale,
        "requests_per_s": float(finished.group(3)),
        "requests": done,
        "total": total,
        "started": started,
        "succeeded": succeeded,
        "failed": failed,
        "errored": errored,
        "timeout": int(requests.group(7) or 0),
        "errors": failed,
    }
    status = re.search(
        r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out.stdout, re.MULTILINE
    )
    if status:
        codes = map(int, status.groups())
        data["status"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), codes, strict=True))
    if failed or not done:
        data["output"] = (out.stderr + out.stdout)[-2000:]
    return data


def listen_also(conf: Path, listen: str, *extra: str) -> None:
    """Add ``listen`` lines after the server's ``listen LISTEN backlog=4096;``."""
    line = f"listen {listen} backlog=4096;"
    text = conf.read_text()
    if line not in text:
        raise RuntimeError(f"{conf}: no {line!r}")
    conf.write_text(text.replace(line, "\n    ".join([line, *extra])))


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
    if os.geteuid() != 0 or not all(shutil.which(c) for c in ("wrk", "h2load", "nginx")):
        print("needs root, wrk, h2load and nginx (make bench installs them)", file=sys.stderr)
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
        "h2 direct": [],
        "h2 passthrough": [],
        "h2 stolen": [],
        "h2 nginx router, passed": [],
        "h2 nginx router, to the developer": [],
    }
    try:
        if box.exists():
            box.destroy()
        box.create()
        # The pod's nginx: HTTP/1.1 on 80, h2c with prior knowledge on 82 (in nginx
        # 1.22, ``http2`` on a listen without ``ssl`` is prior-knowledge h2c).
        pod_conf = nginx_conf(workdir / "pod", f"0.0.0.0:{POD_PORT}")
        listen_also(
            pod_conf, f"0.0.0.0:{POD_PORT}", f"listen 0.0.0.0:{H2_POD_PORT} http2 backlog=4096;"
        )
        # The developer's nginx, on loopback (for netmirror) and on this machine's side
        # of the pod's link (for the nginx router in the pod); h2c on loopback for the
        # session's HTTP/2 port.
        local_conf = nginx_conf(workdir / "local", f"127.0.0.1:{LOCAL_PORT}")
        listen_also(
            local_conf,
            f"127.0.0.1:{LOCAL_PORT}",
            f"listen {box.host_ip}:{LOCAL_PORT} backlog=4096;",
            f"listen 127.0.0.1:{H2_LOCAL_PORT} http2 backlog=4096;",
        )
        router_conf = nginx_router_conf(
            workdir / "router",
            pod=f"127.0.0.1:{POD_PORT}",
            dev=f"{box.host_ip}:{LOCAL_PORT}",
            listen=f"0.0.0.0:{ROUTER_PORT}",
        )
        # HTTP/2 to the client, HTTP/1.1 keep-alive to the same upstreams.
        listen_also(
            router_conf,
            f"0.0.0.0:{ROUTER_PORT}",
            f"listen 0.0.0.0:{H2_ROUTER_PORT} http2 backlog=4096;",
        )
        procs.append(box.popen("nginx", "-p", str(pod_conf.parent), "-c", str(pod_conf)))
        wait_port(box.pod_ip, POD_PORT, proc=procs[-1])
        wait_port(box.pod_ip, H2_POD_PORT, proc=procs[-1])
        procs.append(
            subprocess.Popen(["nginx", "-p", str(local_conf.parent), "-c", str(local_conf)])
        )
        wait_port("127.0.0.1", LOCAL_PORT, proc=procs[-1])
        wait_port("127.0.0.1", H2_LOCAL_PORT, proc=procs[-1])
        procs.append(box.popen("nginx", "-p", str(router_conf.parent), "-c", str(router_conf)))
        wait_port(box.pod_ip, ROUTER_PORT, proc=procs[-1])
        wait_port(box.pod_ip, H2_ROUTER_PORT, proc=procs[-1])
        url = f"http://{box.pod_ip}:{POD_PORT}/index.html"
        router_url = f"http://{box.pod_ip}:{ROUTER_PORT}/index.html"
        h2_url = f"http://{box.pod_ip}:{H2_POD_PORT}/index.html"
        h2_router_url = f"http://{box.pod_ip}:{H2_ROUTER_PORT}/index.html"
        wrk(url, 1, None)  # warm up, and check nginx answers
        wrk(router_url, 1, "x-dev: bench")  # and that the router reaches both upstreams
        for check_url, header in ((h2_url, None), (h2_router_url, "x-dev: bench")):
            check = h2load(check_url, 1, header)  # and that both speak h2c
            if check["errors"] or not check["requests"]:
                raise RuntimeError(f"h2load {check_url}: {check.get('output', '')[-500:]}")
        # The developer's h2c nginx, through loopback as the session will reach it.
        check = h2load(f"http://127.0.0.1:{H2_LOCAL_PORT}/index.html", 1, None)
        if check["errors"] or not check["requests"]:
            raise RuntimeError(f"h2load on {H2_LOCAL_PORT}: {check.get('output', '')[-500:]}")
        for _ in range(args.rounds):
            samples["direct"].append(wrk(url, args.seconds, None))
            samples["direct, 1 connection"].append(wrk(url, args.seconds, None, 1))
            samples["h2 direct"].append(h2load(h2_url, args.seconds, None))
            samples["nginx router, passed"].append(wrk(router_url, args.seconds, None))
            samples["nginx router, to the developer"].append(
                wrk(router_url, args.seconds, "x-dev: bench")
            )
            samples["nginx router, passed, 1 connection"].append(
                wrk(router_url, args.seconds, None, 1)
            )
            samples["h2 nginx router, passed"].append(h2load(h2_router_url, args.seconds, None))
            samples["h2 nginx router, to the developer"].append(
                h2load(h2_router_url, args.seconds, "x-dev: bench")
            )
            netmirror(
                "up",
                "--target",
                box.target,
                "--session",
                SESSION,
                "--steal",
                f"{POD_PORT}:{LOCAL_PORT}",
                "--steal",
                f"{H2_POD_PORT}:{H2_LOCAL_PORT}",
                "--http-header",
                "^x-dev: bench$",
            )
            try:
                samples["passthrough"].append(wrk(url, args.seconds, None))
                samples["passthrough, 1 connection"].append(wrk(url, args.seconds, None, 1))
                samples["stolen"].append(wrk(url, args.seconds, "x-dev: bench"))
                samples["h2 passthrough"].append(h2load(h2_url, args.seconds, None))
                samples["h2 stolen"].append(h2load(h2_url, args.seconds, "x-dev: bench"))
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
        if path.startswith("h2 "):
            baseline = "h2 direct"
        elif "1 connection" in path:
            baseline = "direct, 1 connection"
        else:
            baseline = "direct"
        direct = statistics.median(s["requests_per_s"] for s in samples[baseline])
        rps = statistics.median(s["requests_per_s"] for s in runs)
        reference = {
            "passthrough": "nginx router, passed",
            "stolen": "nginx router, to the developer",
            "passthrough, 1 connection": "nginx router, passed, 1 connection",
            "h2 passthrough": "h2 nginx router, passed",
            "h2 stolen": "h2 nginx router, to the developer",
        }.get(path, path)
        nginx = statistics.median(s["requests_per_s"] for s in samples[reference])
        latency = all("p50_us" in s for s in runs)  # h2load gives no percentiles
        summary[path] = {
            "requests_per_s": rps,
            "ratio_to_direct": rps / direct if direct else None,
            "ratio_to_nginx_router": rps / nginx if nginx else None,
            "p50_us": statistics.median(s["p50_us"] for s in runs) if latency else None,
            "p99_us": statistics.median(s["p99_us"] for s in runs) if latency else None,
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
            f"| {path} | {row['requests_per_s']:,.0f} | {_ratio(row['ratio_to_direct'])} | "
            f"{_ratio(row['ratio_to_nginx_router'])} | "
            f"{_ms(row['p50_us'])} | {_ms(row['p99_us'])} | {row['errors']} |"
        )
    failed = {path: runs for path, runs in samples.items() if any("output" in s for s in runs)}
    for path, runs in failed.items():
        for sample in runs:
            if "output" in sample:
                print(f"\n{path}: h2load reported failures:\n{sample['output']}", file=sys.stderr)
    return 0


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.2f} ms"


if __name__ == "__main__":
    sys.exit(main())
