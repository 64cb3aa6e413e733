"""Small asyncio programs for the benchmark suite, each run as a process of its own.

``python -m benchmarks.apps server --port P [--port P2 ...]``
    the local app of the connection benchmarks: answers ``pong\\n`` to every
    ``ping\\n`` on each connection, closes when the client does. Prints ``ready``.
``python -m benchmarks.apps connrate --host H --port P -n 3000 -c 50``
    one short connection per request (connect, ping, pong, close), ``-c`` in
    flight; prints one JSON line: connections/s, latency percentiles, errors.
``python -m benchmarks.apps hold --host H --port P -n 10000``
    opens ``-n`` connections and checks each with a ping, then holds them; on the
    line ``check`` on stdin pings every one again, on ``close`` closes them all.
    Prints one JSON line after each step.

Each raises its open-file limit (``RLIMIT_NOFILE``) as far as it may, and uses
uvloop when it is installed (it is a netmirror dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

PING = b"ping\n"
PONG = b"pong\n"


def raise_nofile(want: int = 65536) -> int:
    """Raise the soft (and, as root, the hard) open-file limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in ((max(want, soft), max(want, hard)), (min(max(want, soft), hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def error_name(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


# --- the local app ----------------------------------------------------------------------


class Reply(asyncio.Protocol):
    """``pong`` for each ``ping``: one reply per newline received."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        count = data.count(b"\n")
        if count:
            self.transport.write(PONG * count)

    def eof_received(self) -> bool:
        return False  # close our side too


async def serve(ports: list[int], host: str) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(Reply, host, port, backlog=65535, reuse_address=True)
        for port in ports
    ]
    print("ready", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


# --- connections per second -------------------------------------------------------------


async def one_exchange(host: str, port: int, timeout: float) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(PING)
        reply = await asyncio.wait_for(reader.readexactly(len(PONG)), timeout)
        if reply != PONG:
            raise RuntimeError(f"unexpected reply {reply!r}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def connrate(host: str, port: int, count: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            next_index += 1
            started = time.perf_counter()
            try:
                await one_exchange(host, port, timeout=10)
                latencies.append(time.perf_counter() - started)
            except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as exc:
                errors[error_name(exc)] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return {
        "connections": count,
        "concurrency": concurrency,
        "ok": len(latencies),
        "failed": sum(errors.values()),
        "errors": dict(errors.most_common(5)),
        "seconds": elapsed,
        "connections_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": p50 * 1e3 if p50 is not None else None,
        "p99_ms": p99 * 1e3 if p99 is not None else None,
    }


# --- many connections held open ---------------------------------------------------------


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def limited(jobs: Sequence[Callable[[], Awaitable[None]]], concurrency: int) -> Counter[str]:
    """Run ``jobs`` with at most ``concurrency`` at once; errors counted by text."""
    errors: Counter[str] = Counter()
    queue = iter(jobs)

    async def worker() -> None:
        for job in queue:
            try:
                await job()
            except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as exc:
                errors[error_name(exc)] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


async def ping(conn: Conn, timeout: float) -> None:
    reader, writer = conn
    writer.write(PING)
    reply = await asyncio.wait_for(reader.readexactly(len(PONG)), timeout)
    if reply != PONG:
        raise RuntimeError(f"unexpected reply {reply!r}")


async def hold(host: str, port: int, count: int, concurrency: int) -> None:
    conns: list[Conn] = []
    loop = asyncio.get_running_loop()

    def emit(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    async def open_one() -> None:
        conn = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        try:
            await ping(conn, 30)
        except BaseException:
            conn[1].close()
            raise
        conns.append(conn)

    started = time.perf_counter()
    errors = await limited([open_one] * count, concurrency)
    emit(
        step="opened",
        wanted=count,
        ok=len(conns),
        failed=sum(errors.values()),
        errors=dict(errors.most_common(5)),
        seconds=time.perf_counter() - started,
    )
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).strip():
        if line == b"check":
            started = time.perf_counter()
            jobs = [functools.partial(ping, c, 30) for c in conns]
            errors = await limited(jobs, concurrency)
            emit(
                step="checked",
                held=len(conns),
                ok=len(conns) - sum(errors.values()),
                failed=sum(errors.values()),
                errors=dict(errors.most_common(5)),
                seconds=time.perf_counter() - started,
            )
        elif line == b"close":
            break
    for _, writer in conns:
        writer.close()
    await asyncio.sleep(0.2)
    emit(step="closed", closed=len(conns))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.apps")
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, action="append", required=True)
    rate = sub.add_parser("connrate")
    rate.add_argument("--host", required=True)
    rate.add_argument("--port", type=int, required=True)
    rate.add_argument("-n", type=int, default=3000)
    rate.add_argument("-c", type=int, default=50)
    keep = sub.add_parser("hold")
    keep.add_argument("--host", required=True)
    keep.add_argument("--port", type=int, required=True)
    keep.add_argument("-n", type=int, default=10_000)
    keep.add_argument("-c", type=int, default=200, help="connects in flight")
    args = parser.parse_args()
    raise_nofile()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        if args.command == "server":
            runner.run(serve(args.port, args.host))
        elif args.command == "connrate":
            print(json.dumps(runner.run(connrate(args.host, args.port, args.n, args.c))))
        else:
            runner.run(hold(args.host, args.port, args.n, args.c))


if __name__ == "__main__":
    main()
