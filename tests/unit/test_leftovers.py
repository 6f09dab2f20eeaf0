"""harness/leftovers.py: orphaned private socket dirs of dead runs are swept, nothing else is."""

from __future__ import annotations

import os
import time

from harness import leftovers


def test_orphan_socket_dirs_are_swept_only_when_old_and_unused(tmp_path):
    old, young, other = tmp_path / "smccc-sock-old", tmp_path / "smccc-sock-young", tmp_path / "not-ours-old"
    for d in (old, young, other):
        d.mkdir()
        (d / "ctl.sock").write_text("")
    past = time.time() - 2 * leftovers.ORPHAN_AGE_S
    for d in (old, other):
        os.utime(d, (past, past))
    assert leftovers.sweep_orphan_socket_dirs(tmp_path) == [old]
    assert not old.exists() and young.is_dir() and other.is_dir()
