"""A kubeconfig with one cluster, one user and one context, for the emulated API servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_kubeconfig(path: Path, server: str, user: dict[str, Any], *, namespace: str) -> Path:
    """Write a kubeconfig for ``server`` whose user entry is ``user``; returns ``path``."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "dev", "user": user}],
                "contexts": [
                    {
                        "name": "fake",
                        "context": {"cluster": "fake", "user": "dev", "namespace": namespace},
                    }
                ],
                "current-context": "fake",
            }
        )
    )
    return path
