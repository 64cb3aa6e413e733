"""The package layout: each process imports only its own package and the shared layers.

``make lint`` checks the import contracts of ``pyproject.toml`` with import-linter;
these tests show that the check bites (a deliberate wrong import fails it) and that
the processes, started as they are in real use, load no module of another's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROCESSES = ("netmirror.cli", "netmirror.daemon", "netmirror.agent", "netmirror.router")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which(
        "lint-imports"
    )
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    return subprocess.run(
        [lint, "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package and its contracts, to break on purpose."""
    shutil.copytree(
        REPO / "netmirror", tmp_path / "netmirror", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "sandbox").mkdir()
    (tmp_path / "sandbox" / "__init__.py").write_text("")
    return tmp_path


def test_the_contracts_hold_for_the_package_as_it_is(tree: Path) -> None:
    result = _lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "bad_import", "contract"),
    [
        ("router/router.py", "import netmirror.daemon.daemon", "never import each other"),
        ("agent/share.py", "from netmirror.cli import commands", "never import each other"),
        ("wire/session.py", "import netmirror.agent.agent", "shared layers never above them"),
        ("net/sockets.py", "import sandbox", "imports the demo"),
        ("router/http1.py", "import aiohttp", "router loads no websocket"),
    ],
)
def test_a_wrong_import_breaks_the_lint(
    tree: Path, module: str, bad_import: str, contract: str
) -> None:
    path = tree / "netmirror" / module
    text = path.read_text()
    marker = "from __future__ import annotations\n"
    assert marker in text
    path.write_text(text.replace(marker, marker + bad_import + "\n", 1))
    result = _lint(tree)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), result.stdout


# What each process's entry point imports when it starts, as it is started for real.
ENTRIES = {
    "agent": "import netmirror.agent.main",
    "daemon": "import netmirror.daemon.main",
    "router": "import netmirror.router.router",
    "cli": "import netmirror.cli",
}


@pytest.mark.parametrize("process", sorted(ENTRIES))
def test_a_process_loads_no_module_of_another(process: str) -> None:
    code = f"{ENTRIES[process]}; import json, sys; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    loaded = set(json.loads(out))
    own = f"netmirror.{process}"
    foreign = sorted(
        name
        for name in loaded
        for package in PROCESSES
        if package != own and (name == package or name.startswith(package + "."))
    )
    assert foreign == []
    assert not any(name == "sandbox" or name.startswith("sandbox.") for name in loaded)


def test_the_router_loads_no_websocket_code() -> None:
    code = "import netmirror.router.router, json, sys; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    loaded = set(json.loads(out))
    assert "netmirror.router.router" in loaded
    assert not {"aiohttp", "netmirror.tunnel", "pydantic", "kubernetes_asyncio"} & loaded
