"""Mirror mode end to end: the pod keeps answering, the local process gets copies."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Env, free_port
from tests.support.clients import Exchange, sha_exchange
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

POD_PORT = 8080
METHODS = ["capture", "passthrough"]


def status(env: Env) -> dict[str, Any]:
    result = env.netmirror("status", "--json", check=True)
    return json.loads(result.stdout)["sessions"][0]  # type: ignore[no-any-return]


def read_sink(path: Path, count: int, timeout: float = 30) -> list[tuple[str, int, str]]:
    """Wait until the sink logged ``count`` connections; what it logged."""
    lines: list[str] = []

    def logged() -> bool:
        lines[:] = path.read_text().splitlines() if path.exists() else []
        return len(lines) >= count

    eventually(
        logged,
        timeout,
        lambda: f"the sink logged {len(lines)} of {count} connections",
        interval=0.1,
    )
    out = []
    for line in lines:
        digest, size, ended = line.split()
        out.append((digest, int(size), ended))
    return out


def run_clients(env: Env, sizes: list[tuple[int, int]]) -> list[Exchange]:
    async def run_all() -> list[Exchange]:
        return await asyncio.gather(
            *(
                sha_exchange(env.sandbox.pod_ip, POD_PORT, up=up, down=down, timeout=120)
                for up, down in sizes
            )
        )

    return asyncio.run(run_all())


@pytest.mark.parametrize("method", METHODS)
def test_mirror_copies_every_connection_exactly(env: Env, tmp_path: Path, method: str) -> None:
    env.server("sha", POD_PORT, in_pod=True, tag="pod")
    local = free_port()
    sink = tmp_path / "sink.log"
    env.server("sink", local, in_pod=False, log=str(sink))
    env.up("--mirror", f"{POD_PORT}:{local}", "--mirror-method", method)
    rng = random.Random(11)
    sizes = [(rng.randrange(1, 3 << 20), rng.randrange(0, 1 << 20)) for _ in range(30)]
    results = run_clients(env, sizes)
    # The pod answered every client, correctly.
    assert [r.tag for r in results] == ["pod"] * len(sizes)
    assert all(r.upload_intact and r.download_intact for r in results)
    # The local process got an exact copy of what each client sent.
    copies = read_sink(sink, len(sizes))
    assert Counter((d, n) for d, n, _ in copies) == Counter(
        (r.sent_sha256, r.sent_bytes) for r in results
    )
    assert {ended for _, _, ended in copies} == {"eof"}
    st = status(env)
    (port,) = st["ports"]
    assert port["method"] == method and port["errors"] == 0
    assert port["connections_total"] == len(sizes)
    assert port["bytes_in"] == sum(r.sent_bytes for r in results)
    eventually(
        lambda: status(env)["ports"][0].get("mirror", {}).get("flows", 0) >= len(sizes),
        3,
        "the agent's counters did not arrive",
        interval=0.2,
    )
    mirror = status(env)["ports"][0]["mirror"]
    assert mirror["gaps"] == 0 and mirror["dropped"] == 0 and mirror["partial"] == 0
    if method == "capture":
        assert st["capture"]["kernel_drops"] == 0
        assert env.chains() == ""  # nothing in the traffic path


def test_pcap_file_opens_with_real_readers(env: Env, tmp_path: Path) -> None:
    env.server("http", POD_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("sink", local, in_pod=False, log=str(tmp_path / "sink.log"))
    capture = tmp_path / "mirror.pcap"
    env.up("--mirror", f"{POD_PORT}:{local}", "--pcap", str(capture))
    for i in range(3):
        out = subprocess.run(
            ["curl", "-sS", "-m", "5", f"http://{env.sandbox.pod_ip}:{POD_PORT}/p{i}"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.stdout == "pod\n"
    from scapy.layers.inet import TCP
    from scapy.utils import rdpcap

    def in_file(packets: list[Any]) -> tuple[int, int]:
        """SYNs and GET requests to the pod among ``packets``."""
        syns = sum(1 for p in packets if TCP in p and p[TCP].flags == "S")
        gets = sum(1 for p in packets if TCP in p and bytes(p[TCP].payload).startswith(b"GET /p"))
        return syns, gets

    # The daemon writes whole records and flushes each time: the file is readable as is.
    eventually(
        lambda: in_file(list(rdpcap(str(capture)))) == (3, 3),
        5,
        lambda: f"the pcap file holds (SYNs, GETs) {in_file(list(rdpcap(str(capture))))}",
        interval=0.1,
    )
    assert status(env)["pcap"]["records"] > 0
    env.netmirror("down", "--session", "t1", check=True)
    tcpdump = subprocess.run(
        ["tcpdump", "-nn", "-r", str(capture)], capture_output=True, text=True, check=False
    )
    assert tcpdump.returncode == 0, tcpdump.stderr
    syns = [line for line in tcpdump.stdout.splitlines() if "Flags [S]" in line]
    assert len(syns) == 3
    assert all(f"> {env.sandbox.pod_ip}.{POD_PORT}:" in line for line in syns)
    gets = [line for line in tcpdump.stdout.splitlines() if "GET /p" in line]
    assert len(gets) == 3
    packets = rdpcap(str(capture))
    assert all(p[TCP].dport == POD_PORT for p in packets)
    assert b"GET /p2 " in b"".join(bytes(p[TCP].payload) for p in packets)


def test_connection_open_before_mirroring_is_copied_as_partial(env: Env, tmp_path: Path) -> None:
    env.server("echo", POD_PORT, in_pod=True)
    local = free_port()
    sink = tmp_path / "sink.log"
    env.server("sink", local, in_pod=False, log=str(sink))
    with socket.create_connection((env.sandbox.pod_ip, POD_PORT), timeout=10) as sock:
        sock.sendall(b"before " * 100)
        assert sock.recv(65536)
        env.up("--mirror", f"{POD_PORT}:{local}")
        later = os.urandom(200_000)
        sock.sendall(later)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    (copy,) = read_sink(sink, 1)
    import hashlib

    assert copy[:2] == (hashlib.sha256(later).hexdigest(), len(later))
    eventually(
        lambda: status(env)["ports"][0].get("mirror", {}).get("partial", 0) >= 1,
        3,
        "the copy was not counted as partial",
        interval=0.2,
    )


@pytest.mark.parametrize("method", METHODS)
def test_stuck_local_process_never_slows_the_real_traffic(env: Env, method: str) -> None:
    env.server("sha", POD_PORT, in_pod=True, tag="pod")
    local = free_port()
    env.server("stall", local, in_pod=False)
    env.up("--mirror", f"{POD_PORT}:{local}", "--mirror-method", method)
    # 120 MiB through a copy that is never read: far beyond every buffer on the way.
    (result,) = run_clients(env, [(120 << 20, 1 << 20)])
    assert result.tag == "pod" and result.upload_intact and result.download_intact
    eventually(
        lambda: status(env)["ports"][0].get("mirror", {}).get("dropped", 0) >= 1,
        3,
        lambda: f"no copy counted as dropped: {status(env)}",
        interval=0.2,
    )
    assert "fell behind" in status(env)["ports"][0]["last_error"]


def test_no_local_process_the_pod_still_serves(env: Env) -> None:
    env.server("sha", POD_PORT, in_pod=True, tag="pod")
    env.up("--mirror", f"{POD_PORT}:{free_port()}")
    results = run_clients(env, [(100_000, 100_000)] * 5)
    assert all(r.tag == "pod" and r.upload_intact and r.download_intact for r in results)
    eventually(
        lambda: status(env)["ports"][0]["errors"] >= 5,
        3,
        lambda: f"the 5 refused copies were not counted: {status(env)['ports'][0]}",
        interval=0.1,
    )
    assert "refused" in status(env)["ports"][0]["last_error"]


def test_killing_the_agent_during_capture_leaves_the_target_serving(env: Env) -> None:
    env.server("sha", POD_PORT, in_pod=True, tag="pod")
    local = free_port()
    env.server("echo", local, in_pod=False)
    env.up("--mirror", f"{POD_PORT}:{local}")
    agent = status(env)["agent"]["pid"]

    async def clients_while_killing() -> list[Exchange]:
        tasks = [
            asyncio.create_task(
                sha_exchange(env.sandbox.pod_ip, POD_PORT, up=2 << 20, down=2 << 20, timeout=60)
            )
            for _ in range(10)
        ]
        # Not synchronisation: the kill is meant to land while the transfers run.
        await asyncio.sleep(0.05)
        os.kill(agent, signal.SIGKILL)
        return await asyncio.gather(*tasks)

    results = asyncio.run(clients_while_killing())
    assert all(r.tag == "pod" and r.upload_intact and r.download_intact for r in results)
    after = run_clients(env, [(10_000, 10_000)] * 3)
    assert all(r.tag == "pod" and r.upload_intact for r in after)
    assert env.chains() == ""
