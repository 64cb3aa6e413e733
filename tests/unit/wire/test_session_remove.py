"""Removing a session's directory never deletes through a mount inside it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from netmirror.wire.session import SessionDir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind-mount")


def test_a_bind_mount_of_the_same_file_system_is_left_whole(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "a").write_text("keep\n")
    (victim / "sub" / "b").write_text("keep too\n")
    state = tmp_path / "state"
    (state / "s1" / "root").mkdir(parents=True)
    (state / "s1" / "session.json").write_text("{}")
    subprocess.run(["mount", "--bind", str(victim), str(state / "s1" / "root")], check=True)
    try:
        SessionDir("s1", root=state).remove()
        assert (victim / "a").read_text() == "keep\n"
        assert (victim / "sub" / "b").read_text() == "keep too\n"
        assert not (state / "s1" / "session.json").exists()
    finally:
        subprocess.run(["umount", str(state / "s1" / "root")], check=True)
    SessionDir("s1", root=state).remove()
    assert not (state / "s1").exists()
