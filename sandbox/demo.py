"""``make demo``: the main job end to end on a sandbox "pod", no cluster needed.

1. a network namespace with a veth pair and an address runs the "deployed"
   service (v1) on port 8080;
2. a "new version" (v2) runs on this machine, on 127.0.0.1:18080;
3. ``netmirror up --steal 8080:18080``: requests to the pod now reach v2;
4. ``netmirror status``, then ``netmirror down``: the pod answers again;
5. ``--http-header``: only requests carrying your header come to v2;
6. ``netmirror exec``: a local command with the pod's environment, reaching a
   service only the pod can reach, by a name only the pod knows;
7. the pod's files: a container-like process in the pod with a root of its own;
   a local command reads its config and its service-account token at their paths.

Everything is removed at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sandbox import Sandbox

POD_PORT = 8080
LOCAL_PORT = 18080
SESSION = "demo"
PRIVATE_IP = "10.77.0.1"
PRIVATE_PORT = 9000
ETC = Path("/etc/netns/nm-demo")
BOLD = "\x1b[1m" if sys.stdout.isatty() else ""
RESET = "\x1b[0m" if sys.stdout.isatty() else ""


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run and echo a command as the user would type it."""
    # Quoted as a shell would, so the line can be pasted (--http-header '^x-dev: me$').
    shown = shlex.join(argv).replace(shlex.join([sys.executable, "-m", "netmirror"]), "netmirror")
    print(f"$ {shown}", flush=True)
    # One pipe for both: progress lines (stderr) and results (stdout) in the order
    # they happen, as in a terminal.
    result = subprocess.run(
        list(argv), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False
    )
    out = result.stdout.rstrip()
    if out:
        print(out, flush=True)
    if check and result.returncode != 0:
        raise SystemExit(f"demo failed: {shown} exited with {result.returncode}")
    return result


def netmirror(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "netmirror", *args, check=check)


async def _serve(port: int, host: str, text: str) -> None:
    body = text.encode() + b"\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def start_server(cmd: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"demo failed: could not start {' '.join(cmd)}")
    return proc


def demo() -> int:
    box = Sandbox("demo", index=77)
    procs: list[subprocess.Popen[str]] = []
    serve = [sys.executable, "-m", "sandbox.demo", "serve"]
    # Turn SIGTERM into the same clean exit as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if box.exists():
            box.destroy()  # left over from an interrupted run
        say(f"A sandbox pod: namespace {box.netns}, address {box.pod_ip}")
        box.create()
        procs.append(
            start_server(
                box.cmd(
                    "env",
                    f"ORDERS_URL=http://orders.internal:{PRIVATE_PORT}/",
                    *serve,
                    "--port",
                    str(POD_PORT),
                    "--host",
                    "0.0.0.0",
                    "--text",
                    "hello from the deployed pod (v1)",
                )
            )
        )
        # A service only the pod reaches (an address this machine has no route to),
        # under a name only the pod's hosts file knows.
        run(*box.cmd("ip", "addr", "add", f"{PRIVATE_IP}/32", "dev", "lo"))
        ETC.mkdir(parents=True, exist_ok=True)
        (ETC / "hosts").write_text(f"127.0.0.1 localhost\n{PRIVATE_IP} orders.internal\n")
        procs.append(
            start_server(
                box.cmd(
                    *serve,
                    "--port",
                    str(PRIVATE_PORT),
                    "--host",
                    PRIVATE_IP,
                    "--text",
                    "orders service, reachable only from inside the pod",
                )
            )
        )
        url = f"http://{box.pod_ip}:{POD_PORT}/"
        run("curl", "-sS", "-m", "5", url)

        say(f"Your new version, running locally on 127.0.0.1:{LOCAL_PORT}")
        procs.append(
            start_server(
                [
                    *serve,
                    "--port",
                    str(LOCAL_PORT),
                    "--host",
                    "127.0.0.1",
                    "--text",
                    "hello from your machine (v2, not deployed)",
                ]
            )
        )
        run("curl", "-sS", "-m", "5", f"http://127.0.0.1:{LOCAL_PORT}/")

        say("Steal the pod's port 8080 into the local version")
        started = time.monotonic()
        netmirror(
            "up",
            "--target",
            box.target,
            "--steal",
            f"{POD_PORT}:{LOCAL_PORT}",
            "--session",
            SESSION,
        )
        print(f"(ready in {time.monotonic() - started:.2f}s)")

        say("Requests to the pod's address are now answered by your machine")
        for _ in range(3):
            run("curl", "-sS", "-m", "5", url)
        say("...and so are the pod's own localhost connections")
        run(*box.cmd("curl", "-sS", "-m", "5", f"http://127.0.0.1:{POD_PORT}/"))

        say("What netmirror sees")
        netmirror("status", "--session", SESSION)

        say("Put everything back")
        netmirror("down", "--session", SESSION)
        run("curl", "-sS", "-m", "5", url)
        left = subprocess.run(
            box.cmd("iptables-save"), capture_output=True, text=True, check=False
        ).stdout
        print("netmirror rules left in the pod:", "none" if "NETMIRROR" not in left else left)

        say("Steal only the requests that carry your header; the rest stay with the pod")
        netmirror(
            "up",
            "--target",
            box.target,
            "--steal",
            f"{POD_PORT}:{LOCAL_PORT}",
            "--http-header",
            "^x-dev: me$",
            "--session",
            SESSION,
        )
        run("curl", "-sS", "-m", "5", url)
        run("curl", "-sS", "-m", "5", "-H", "x-dev: me", url)
        netmirror("down", "--session", SESSION)

        say("Run a local command as if inside the pod: its environment, its network, its names")
        script = 'echo "ORDERS_URL=$ORDERS_URL"; curl -sS -m 5 "$ORDERS_URL"'
        print(
            f"(orders.internal is {PRIVATE_IP}, an address only the pod has: this machine "
            "neither reaches it nor knows the name)"
        )
        netmirror("exec", "--target", box.target, "--session", SESSION, "--", "sh", "-c", script)

        say("Read the pod's files at their own paths (its ConfigMap, its token)")
        from sandbox.files import TOKEN_DIR, FilesTarget

        container = FilesTarget(box.netns, big=1 << 20, small=10).start()
        try:
            print(
                f"(a process in the pod with a root of its own: {TOKEN_DIR} and /app do not "
                "exist on this machine, and never will)"
            )
            script = (
                f"cat /app/config/app.yaml {TOKEN_DIR}/token; "
                'ls "$NETMIRROR_ROOT/data/small" | head -3'
            )
            netmirror(
                "exec",
                "--target",
                container.spec,
                "--session",
                SESSION,
                "--no-outgoing",
                "--files-ro",
                "/app/config",
                "--",
                "sh",
                "-c",
                script,
            )
            run("ls", "-d", "/app", TOKEN_DIR, check=False)
        finally:
            container.stop()
        say("Done: the pod answers itself again, and nothing of netmirror is left")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(
                [sys.executable, "-m", "netmirror", "down", "--session", SESSION],
                capture_output=True,
                check=False,
                timeout=60,
            )
        for proc in procs:
            proc.kill()
            proc.wait()
        box.destroy()
        shutil.rmtree(ETC, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.demo")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="a tiny HTTP server answering TEXT (used by the demo)")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--text", required=True)
    args = parser.parse_args(argv)
    if args.command == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.port, args.host, args.text))
        return 0
    if os.geteuid() != 0:
        print(
            "the demo needs root (network namespaces and iptables): sudo make demo", file=sys.stderr
        )
        return 1
    return demo()


if __name__ == "__main__":
    raise SystemExit(main())
