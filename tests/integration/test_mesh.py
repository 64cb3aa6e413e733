"""Meshed pods: the nat rules of Istio's sidecar mode and a stand-in sidecar proxy.

The pod's namespace gets the rules istio-iptables installs; a small TLS-terminating
proxy (tests/support/mesh_proxy.py) runs as uid 1337 on 15006 and connects to the
application from 127.0.0.6, as Envoy does. Clients speak TLS, as a peer sidecar.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, Env, free_port, wait_ready
from tests.integration.test_exec import Private, private  # noqa: F401 - a fixture
from tests.support.meshes import ISTIO, LINKERD, UNKNOWN

pytestmark = pytest.mark.integration

APP_PORT = 8080


def mesh(env: Env, rules: str) -> None:
    restore = env.sandbox.run("iptables-restore", "--noflush", input=rules)
    assert restore.returncode == 0, restore.stderr


def sidecar(
    env: Env,
    tmp_path: Path,
    *,
    port: int = 15006,
    uid: int = 1337,
    source: str = "127.0.0.6",
    outbound: int | None = None,
) -> Path:
    """Start the stand-in proxy; returns the file where it notes outbound destinations."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=pod", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    argv = [sys.executable, "-m", "tests.support.mesh_proxy", "--port", str(port)]
    argv += ["--uid", str(uid), "--cert", str(cert), "--key", str(key), "--source", source]
    log = tmp_path / "outbound.log"
    if outbound is not None:
        argv += ["--outbound", str(outbound), "--log", str(log)]
    proc = subprocess.Popen(
        env.sandbox.cmd(*argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO
    )
    env.procs.append(proc)
    wait_ready(proc, "the stand-in sidecar")
    return log


def curl_tls(env: Env) -> str:
    out = subprocess.run(
        ["curl", "-sSk", "-m", "5", f"https://{env.sandbox.pod_ip}:{APP_PORT}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout or out.stderr


MESHES = {
    # rules, the proxy's port and uid, the source of its connections to the application,
    # how up and status name it, the prefix of its chains
    "istio": (ISTIO, 15006, 1337, "127.0.0.6", "Istio sidecar", "ISTIO"),
    "linkerd": (LINKERD, 4143, 2102, "0.0.0.0", "Linkerd proxy", "PROXY_INIT"),
}


@pytest.mark.parametrize("kind", sorted(MESHES))
def test_sidecar_steal_gets_the_plaintext_behind_the_proxy(
    env: Env, tmp_path: Path, kind: str
) -> None:
    rules, port, uid, source, label, chains = MESHES[kind]
    env.server("http", APP_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    mesh(env, rules)
    sidecar(env, tmp_path, port=port, uid=uid, source=source)
    assert curl_tls(env) == "pod\n"  # through the sidecar, as the mesh serves it

    up = env.up("--steal", f"{APP_PORT}:{local}")
    found = {
        "istio": "Istio sidecar (inbound to 15006, outbound to 15001, proxy uid 1337)",
        "linkerd": "Linkerd proxy (inbound to 4143, outbound to 4140, proxy uid 2102)",
    }[kind]
    assert f"found {found}" in up.stderr
    # TLS from the client, terminated by the sidecar; the local server got plaintext HTTP
    # (it is a plain HTTP server) and its answer went back through the sidecar.
    for _ in range(3):
        assert curl_tls(env) == "local\n"
    st = json.loads(env.netmirror("status", "--json", check=True).stdout)["sessions"][0]
    assert st["agent"]["mesh"].startswith(label)
    assert st["ports"][0]["connections_total"] == 3
    text = env.netmirror("status", check=True).stdout
    assert f"mesh: {label}" in text and "proxy's connection to the application" in text
    # netmirror's PREROUTING hook comes after the mesh's, its OUTPUT hook before.
    prerouting = env.sandbox.run("iptables", "-t", "nat", "-S", "PREROUTING").stdout
    assert prerouting.index(chains) < prerouting.index("NETMIRROR-t1")
    output = env.sandbox.run("iptables", "-t", "nat", "-S", "OUTPUT").stdout
    assert output.index("NETMIRROR-t1") < output.index(chains)

    env.netmirror("down", "--session", "t1", check=True)
    assert curl_tls(env) == "pod\n"


def test_an_unknown_redirect_gives_a_warning(env: Env) -> None:
    env.server("http", APP_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    mesh(env, UNKNOWN)
    up = env.up("--steal", f"{APP_PORT}:{local}")
    warnings = [line for line in up.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: the target's nat table has unknown redirect rules (SOMEPROXY: REDIRECT"
        " to port 9999): a proxy netmirror does not know may change what the application"
        " receives; what netmirror steals or mirrors is what arrives before it"
    ]
    st = json.loads(env.netmirror("status", "--json", check=True).stdout)["sessions"][0]
    assert st["agent"]["mesh"].startswith("unknown redirect rules")


@pytest.mark.parametrize("kind", sorted(MESHES))
def test_sidecar_http_filter_routes_on_the_plaintext(env: Env, tmp_path: Path, kind: str) -> None:
    rules, port, uid, source, _label, chains = MESHES[kind]
    env.server("http", APP_PORT, in_pod=True, text="pod\n")
    local = free_port()
    env.server("http", local, in_pod=False, text="local\n")
    mesh(env, rules)
    sidecar(env, tmp_path, port=port, uid=uid, source=source)
    env.up("--steal", f"{APP_PORT}:{local}", "--http-header", "^x-dev: me$")

    def get(*headers: str) -> str:
        argv = ["curl", "-sSk", "-m", "5", f"https://{env.sandbox.pod_ip}:{APP_PORT}/"]
        for header in headers:
            argv += ["-H", header]
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        return out.stdout or out.stderr

    # The router sees the sidecar's plaintext requests: it can read their headers.
    assert get("x-dev: me") == "local\n"
    assert get() == "pod\n"
    assert get("x-dev: someone-else") == "pod\n"
    prerouting = env.sandbox.run("iptables", "-t", "nat", "-S", "PREROUTING").stdout
    assert prerouting.index(chains) < prerouting.index("NETMIRROR-http-")


@pytest.mark.parametrize("kind", sorted(MESHES))
@pytest.mark.parametrize("method", ["capture", "passthrough"])
def test_sidecar_mirror_copies_the_plaintext(
    env: Env, tmp_path: Path, method: str, kind: str
) -> None:
    rules, port, uid, source, _label, _chains = MESHES[kind]
    import hashlib
    import socket
    import ssl

    from tests.integration.test_mirror import read_sink

    env.server("http", APP_PORT, in_pod=True, text="pod\n")
    local = free_port()
    sink = tmp_path / "sink.log"
    env.server("sink", local, in_pod=False, log=str(sink))
    mesh(env, rules)
    sidecar(env, tmp_path, port=port, uid=uid, source=source)
    env.up("--mirror", f"{APP_PORT}:{local}", "--mirror-method", method)
    request = b"GET /copied HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n"
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    with socket.create_connection((env.sandbox.pod_ip, APP_PORT), timeout=5) as raw:
        with tls.wrap_socket(raw) as conn:
            conn.sendall(request)
            answer = b""
            while not answer.endswith(b"pod\n") and (chunk := conn.recv(65536)):
                answer += chunk
    assert answer.endswith(b"pod\n")  # the pod answered, through its sidecar
    # One copy, of the plaintext: not the sidecars' TLS bytes beside it.
    ((digest, size, _ended),) = read_sink(sink, 1)
    assert (digest, size) == (hashlib.sha256(request).hexdigest(), len(request))
    st = json.loads(env.netmirror("status", "--json", check=True).stdout)["sessions"][0]
    assert st["ports"][0]["connections_total"] == 1


def test_exec_outgoing_goes_through_the_meshs_outbound_port(
    env: Env,
    tmp_path: Path,
    private: Private,  # noqa: F811 - the fixture imported above
) -> None:
    mesh(env, ISTIO)
    log = sidecar(env, tmp_path, outbound=15001)
    res = env.netmirror(
        "exec",
        "--target",
        env.sandbox.target,
        "--session",
        "t1",
        "--",
        "curl",
        "-sS",
        "-m",
        "5",
        f"http://{private.db_ip}:{private.http_port}/",
        timeout=90,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "orders from the db\n"
    # The agent's connection left as the application's would: through the mesh's proxy.
    assert log.read_text().splitlines() == [f"{private.db_ip}:{private.http_port}"]
