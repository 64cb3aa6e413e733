"""The agent image, built once per test run and loaded into a private podman.

``make agent-image`` (``agent_image/build.py``) keeps its archive while its inputs
are unchanged, so a run builds it at most once. Tests that need it take the
``agent_podman`` fixture: a :class:`~sandbox.containers.Podman` of the session with
the image loaded, and the image's reference. Where the image cannot be built or
run, they skip and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.containers import Podman, missing_tools

REPO = Path(__file__).resolve().parents[2]


def build_archive() -> Path:
    """The agent image's docker-archive, built if its inputs changed."""
    missing = missing_tools() + [t for t in ("mmdebstrap",) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the agent image needs {', '.join(missing)} (make test installs them)")
    if os.geteuid() != 0:
        pytest.skip("building the agent image needs root")
    result = subprocess.run(
        [sys.executable, str(REPO / "agent_image" / "build.py")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        pytest.fail(f"make agent-image failed:\n{result.stderr[-3000:]}")
    _ref, path = result.stdout.strip().splitlines()[-1].split(" ", 1)
    return Path(path)


@pytest.fixture(scope="session")
def agent_podman() -> Iterator[tuple[Podman, str]]:
    """A private podman with the agent image loaded, for the whole test run."""
    archive = build_archive()
    with Podman() as podman:
        ref = podman.load(archive)
        yield podman, ref
