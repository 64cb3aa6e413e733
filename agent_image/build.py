"""Build the agent image without Docker: a docker-archive tarball from Debian packages.

    python agent_image/build.py [--output DIR] [--force]

1. Wheels of netmirror and its dependencies are built on this machine.
2. ``mmdebstrap`` makes a minimal Debian root file system with the packages of
   ``packages.txt``, creates a venv in it and installs the wheels there, with a pip
   that is run from its wheel and never installed (no pip, no compilers in the image).
3. ``podman import`` turns that file system into an image, in a storage of its own
   that is removed afterwards, and ``podman save`` writes the docker-archive
   (``docker load``, ``podman load``, ``skopeo copy docker-archive:...``).

The archive is named after the version; beside it, ``.json`` records the digest of
the inputs (the package, ``packages.txt`` and this file). When they have not changed
the existing archive is kept, so tests and CI build once. The last line printed is
``IMAGE-REF ARCHIVE-PATH``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the sandbox package is beside it

from sandbox.containers import containers_conf  # noqa: E402

HERE = Path(__file__).resolve().parent
#: The Debian release of the image when the host's cannot be read.
DEFAULT_SUITE = "bookworm"
VENV = "/opt/netmirror"
ENTRYPOINT = [f"{VENV}/bin/netmirror", "agent"]
IMAGE_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The host's package sources, passed on so the image uses the same mirror.
SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
#: The commands the build runs, each from the Debian package of the same name.
TOOLS = ("mmdebstrap", "podman", "runc")


class BuildError(Exception):
    """The image cannot be built; the message says why, in one line."""


def version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
    if match is None:
        raise BuildError("pyproject.toml has no version")
    return match.group(1)


def image_ref() -> str:
    """The reference the archive carries."""
    return f"localhost/netmirror/agent:{version()}"


def packages() -> list[str]:
    """The Debian packages of ``packages.txt``."""
    lines = (HERE / "packages.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def inputs_digest() -> str:
    """SHA-256 over everything that goes into the image."""
    files = [REPO / "pyproject.toml", REPO / "README.md", HERE / "packages.txt", Path(__file__)]
    files += sorted((REPO / "netmirror").rglob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def archive_path(output: Path) -> Path:
    return output / f"netmirror-agent-{version()}.tar"


def cached(output: Path) -> Path | None:
    """The archive of these very inputs, if it was built already."""
    archive = archive_path(output)
    meta = archive.with_suffix(".json")
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if archive.exists() and recorded.get("inputs") == inputs_digest():
        return archive
    return None


def _run(
    cmd: list[str], *, what: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> None:
    print(f"... {what}", file=sys.stderr, flush=True)
    try:
        result = subprocess.run(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} is not installed") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        raise BuildError(f"{what} failed (exit {result.returncode}):\n" + "\n".join(tail))


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    """The host's Debian release: the image uses the host's package sources, and the
    wheels built here must fit its Python."""
    try:
        for line in os_release.read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME" and value.strip('"'):
                return value.strip('"')
    except OSError:
        pass
    return DEFAULT_SUITE


def _sources() -> str:
    for path in SOURCES:
        if path.exists() and path.read_text().strip():
            return str(path)
    return "http://deb.debian.org/debian"


def build(output: Path) -> Path:
    """Build the archive into ``output``; returns its path."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is not installed (apt-get install {' '.join(TOOLS)})")
    if os.geteuid() != 0:
        raise BuildError("building the image needs root (mmdebstrap --mode=root)")
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    suite = host_suite()
    with tempfile.TemporaryDirectory(prefix="agent-image-", dir=output) as tmp:
        work = Path(tmp)
        wheels, tools = work / "wheels", work / "tools"
        wheels.mkdir()
        tools.mkdir()
        _run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), str(REPO)],
            what="building the wheels of netmirror and its dependencies",
        )
        _run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tools), "pip"],
            what="fetching pip (run from its wheel in the image, never installed)",
        )
        (pip_wheel,) = tools.glob("pip-*.whl")
        pip_wheel.rename(tools / "pip.whl")
        rootfs = work / "rootfs.tar"
        install = (
            f"{VENV}/bin/python /opt/pip.whl/pip install -q --no-index --no-cache-dir "
            f"--no-warn-script-location --find-links /opt/wheels netmirror"
        )
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        # Wheels of compiled packages (uvloop, pydantic-core...) are built for this
        # Python: the image's must be the same version, or nothing installs.
        check_python = (
            "import sys; v = '%d.%d' % sys.version_info[:2]; "
            f"sys.exit(0 if v == '{python}' else 'the image has Python ' + v + "
            f"', the wheels were built with Python {python}: build with a Python {python}')"
        )
        hooks = [
            f'chroot "$1" python3 -c "{check_python}"',
            'mkdir -p "$1/opt/wheels"',
            f"sync-in {wheels} /opt/wheels",
            f"copy-in {tools / 'pip.whl'} /opt",
            f'chroot "$1" python3 -m venv --without-pip {VENV}',
            f'chroot "$1" {install}',
            f'chroot "$1" {VENV}/bin/python -c "import netmirror.agent.main, scapy.all"',
            'rm -rf "$1/opt/wheels" "$1/opt/pip.whl"',
            # What a minimal image does without: documentation and the apt lists.
            'rm -rf "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/info/*',
        ]
        cmd = [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--format=tar",
            "--include=" + ",".join(packages()),
            *(f"--customize-hook={hook}" for hook in hooks),
            suite,
            str(rootfs),
            _sources(),
        ]
        # A clean environment: the host's pip settings must not reach the image's pip.
        clean = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
        _run(cmd, what=f"making the root file system (Debian {suite} and a venv)", env=clean)
        conf = containers_conf(work / "containers.conf")
        # podman refuses a run root of more than 50 characters: a short one in /tmp.
        store = Path(tempfile.mkdtemp(prefix="nm-img-"))
        podman = [
            "podman",
            "--root",
            str(store / "storage"),
            "--runroot",
            str(store / "run"),
            "--storage-driver",
            "vfs",
        ]
        penv = {**os.environ, "CONTAINERS_CONF": str(conf)}
        try:
            ref = image_ref()
            _run(
                [
                    *podman,
                    "import",
                    "--change",
                    f"ENTRYPOINT {json.dumps(ENTRYPOINT)}",
                    "--change",
                    f"ENV PATH={IMAGE_PATH}",
                    "--change",
                    "LABEL org.opencontainers.image.title=netmirror-agent",
                    str(rootfs),
                    ref,
                ],
                what="importing it as an image",
                env=penv,
            )
            archive = archive_path(output)
            partial = archive.with_suffix(".partial")
            partial.unlink(missing_ok=True)
            _run(
                [*podman, "save", "--format", "docker-archive", "-o", str(partial), ref],
                what="writing the docker-archive",
                env=penv,
            )
        finally:
            subprocess.run([*podman, "rmi", "-af"], env=penv, capture_output=True, check=False)
            shutil.rmtree(store, ignore_errors=True)
        partial.rename(archive)
    archive.with_suffix(".json").write_text(
        json.dumps(
            {"ref": ref, "inputs": inputs_digest(), "seconds": round(time.monotonic() - started, 1)}
        )
        + "\n"
    )
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="agent_image/build.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--output", type=Path, default=REPO / "build" / "agent-image")
    parser.add_argument(
        "--force", action="store_true", help="build even if the inputs are unchanged"
    )
    args = parser.parse_args(argv)
    try:
        archive = None if args.force else cached(args.output)
        if archive is not None:
            print(f"... the image of these inputs is built already: {archive}", file=sys.stderr)
        else:
            archive = build(args.output)
            size = archive.stat().st_size / 1e6
            print(f"... {archive} ({size:.0f} MB)", file=sys.stderr)
    except BuildError as exc:
        print(f"agent image: {exc}", file=sys.stderr)
        return 1
    print(f"{image_ref()} {archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
