"""The agent image itself: built without Docker, loadable, and complete.

What users run in their cluster is this image, so it is checked from the outside:
the archive loads into podman, ``netmirror agent`` runs in it, capture filters
compile against its libpcap, and with only the capabilities netmirror's pod spec
asks for, iptables REDIRECT rules and packet sockets work in a namespace it joins.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from sandbox.containers import Podman, PodmanError

pytestmark = pytest.mark.integration

PYTHON = "/opt/netmirror/bin/python"


def run_in(podman: Podman, ref: str, *args: str, options: tuple[str, ...] = ()) -> str:
    name = f"nm-img-{uuid.uuid4().hex[:8]}"
    try:
        return podman.run("run", "--rm", "--name", name, *options, ref, *args)
    finally:
        podman.remove(name)


def python_in(podman: Podman, ref: str, code: str, *options: str) -> str:
    return run_in(podman, ref, "-c", code, options=("--entrypoint", PYTHON, *options))


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"nm-img-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_the_agent_runs_from_the_image(agent_podman: tuple[Podman, str]) -> None:
    podman, ref = agent_podman
    out = run_in(podman, ref, "--help")  # the entrypoint is `netmirror agent`
    assert out.startswith("usage: netmirror agent")
    assert "--token-sha256" in out


def test_capture_filters_compile_against_the_images_libpcap(
    agent_podman: tuple[Podman, str],
) -> None:
    podman, ref = agent_podman
    out = python_in(
        podman,
        ref,
        "import ctypes.util, json; from netmirror.agent.capture import bpf; "
        "print(json.dumps([ctypes.util.find_library('pcap'), len(bpf.compile_ports([80, 8080]))]))",
    )
    library, instructions = json.loads(out.strip().splitlines()[-1])
    assert library and library.startswith("libpcap")
    assert instructions > 10


def test_the_image_holds_no_compiler_pip_or_test_code(agent_podman: tuple[Podman, str]) -> None:
    podman, ref = agent_podman
    out = python_in(
        podman,
        ref,
        "import importlib.util, json, shutil; "
        "print(json.dumps({'tools': [t for t in ('gcc', 'cc', 'pip', 'pip3') if shutil.which(t)],"
        " 'modules': [m for m in ('pip', 'sandbox', 'tests', 'pytest', 'kmock')"
        " if importlib.util.find_spec(m)],"
        " 'commands': [t for t in ('iptables', 'iptables-legacy', 'iptables-nft', 'ip')"
        " if shutil.which(t)]}))",
    )
    found = json.loads(out.strip().splitlines()[-1])
    assert found["tools"] == []
    assert found["modules"] == []
    assert found["commands"] == ["iptables", "iptables-legacy", "iptables-nft", "ip"]


def test_rules_and_packet_sockets_work_with_the_pod_specs_capabilities(
    agent_podman: tuple[Podman, str], netns: str
) -> None:
    podman, ref = agent_podman
    code = (
        "import socket, subprocess\n"
        "for args in (['-t', 'nat', '-N', 'NM-CHECK'],\n"
        "             ['-t', 'nat', '-A', 'NM-CHECK', '-p', 'tcp', '--dport', '80',"
        " '-j', 'REDIRECT', '--to-ports', '8080'],\n"
        "             ['-t', 'nat', '-A', 'PREROUTING', '-j', 'NM-CHECK']):\n"
        "    subprocess.run(['iptables', *args], check=True)\n"
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        "s.close()\n"
        "print('ok')\n"
    )
    out = python_in(
        podman,
        ref,
        code,
        "--network",
        f"ns:/run/netns/{netns}",
        "--cap-drop",
        "all",
        "--cap-add",
        "NET_ADMIN,NET_RAW",
        "--security-opt",
        "no-new-privileges",
    )
    assert out.strip().endswith("ok")
    rules = subprocess.run(
        ["ip", "netns", "exec", netns, "iptables-save", "-t", "nat"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "-A NM-CHECK -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8080" in rules
    # Without NET_ADMIN the same container is refused: the capabilities are what it has.
    with pytest.raises(PodmanError, match=r"Permission denied|not permitted"):
        python_in(
            podman,
            ref,
            "import subprocess; subprocess.run(['iptables', '-t', 'nat', '-N', 'X'], check=True)",
            "--network",
            f"ns:/run/netns/{netns}",
            "--cap-drop",
            "all",
        )
