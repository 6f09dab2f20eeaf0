"""harness/machine/leftovers.py: orphaned private socket dirs of dead runs are swept, nothing else is; retention keeps
the newest run directories and never a live run's."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import paths
from harness.errors import HarnessError
from harness.machine import leftovers


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


# ---- retention of run directories ------------------------------------------------------------------------
DEAD_PID = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1       # above pid_max: never a live process


def make_runs(root: Path, n: int, pid: int = DEAD_PID, prefix: str = "guest", start: int = 0) -> list[Path]:
    """``n`` run directories, oldest first, one minute apart from minute ``start`` (named as paths.new_run_dir
    names them); ``pid`` is the run's process (default: one that cannot exist)."""
    out = []
    for i in range(start, start + n):
        d = root / f"{prefix}-20260101-{10 + i // 60:02d}{i % 60:02d}00-{pid}-0"
        d.mkdir(parents=True)
        (d / "console.log").write_text("boot\n")
        out.append(d)
    return out


@pytest.fixture(autouse=True)
def no_qemus(monkeypatch):
    """No real QEMU of another engineer's run may decide these tests (qemu_argvs comes from processes())."""
    monkeypatch.setattr(leftovers, "processes", list)


def test_prune_keeps_the_newest_n_and_deletes_the_rest(tmp_path):
    runs = make_runs(tmp_path, 6)
    assert leftovers.run_dirs(tmp_path) == runs[::-1]
    assert sorted(leftovers.prune_runs(tmp_path, 2)) == runs[:4]
    assert [d.exists() for d in runs] == [False] * 4 + [True] * 2


def test_a_live_run_is_never_pruned(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (old,) = make_runs(tmp_path, 1, pid=sleeper.pid, start=0)      # the oldest, its process still runs
        (ours,) = make_runs(tmp_path, 1, pid=os.getpid(), start=1)     # this process's own run
        newer = make_runs(tmp_path, 3, start=2)
        assert leftovers.run_is_live(old) == f"its process (pid {sleeper.pid}) runs"
        assert sorted(leftovers.prune_runs(tmp_path, 1)) == newer[:2]
        assert old.is_dir() and ours.is_dir() and newer[2].is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert leftovers.run_is_live(old) == ""                             # its process is gone: now prunable
    assert leftovers.prune_runs(tmp_path, 1) == [old] and ours.is_dir()


def test_a_run_whose_qemu_still_runs_is_never_pruned(tmp_path, monkeypatch):
    runs = make_runs(tmp_path, 3)
    qemu = leftovers.Proc(4242, 1, "S", "qemu-system-aar",
                          ("qemu-system-aarch64", "-serial", f"file:{runs[0]}/console.log"))
    monkeypatch.setattr(leftovers, "processes", lambda: [qemu])
    assert leftovers.run_is_live(runs[0]) == "a QEMU uses it"
    assert leftovers.prune_runs(tmp_path, 1) == [runs[1]]
    assert runs[0].is_dir() and runs[2].is_dir()


def test_a_run_whose_private_socket_dir_a_qemu_uses_is_never_pruned(tmp_path, monkeypatch):
    runs = make_runs(tmp_path / "runs", 2)
    sd = tmp_path / "smccc-sock-abc"
    sd.mkdir()
    (runs[0] / "sockets").write_text(str(sd))
    qemu = leftovers.Proc(4242, 1, "S", "qemu-system-aar", ("qemu-system-aarch64", "-chardev", f"socket,path={sd}/c"))
    monkeypatch.setattr(leftovers, "processes", lambda: [qemu])
    assert leftovers.prune_runs(tmp_path / "runs", 1) == [] and runs[0].is_dir() and sd.is_dir()
    monkeypatch.setattr(leftovers, "processes", list)
    assert leftovers.prune_runs(tmp_path / "runs", 1) == [runs[0]] and not sd.exists()    # its socket dir goes too


def test_a_held_lock_or_a_live_pid_file_keeps_a_run(tmp_path):
    runs = make_runs(tmp_path, 4)
    (runs[0] / "lock").write_text("")
    fd = os.open(runs[0] / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    (runs[1] / "qemu.pid").write_text(f"{os.getpid()}\n")
    (runs[2] / "qemu.pid").write_text(f"{DEAD_PID}\n")
    try:
        assert leftovers.run_is_live(runs[0]) == "lock is held"
        assert leftovers.run_is_live(runs[1]).startswith("qemu.pid names a live process")
        assert leftovers.prune_runs(tmp_path, 1) == [runs[2]]
    finally:
        os.close(fd)
    assert leftovers.prune_runs(tmp_path, 1) == [runs[0]]                 # the lock is free now


def test_reusable_vm_matrix_and_other_entries_are_never_pruned(tmp_path):
    runs = make_runs(tmp_path, 2)
    keep = [tmp_path / "reuse-vm-default", tmp_path / "reuse-vm-gw0-20250101-000000-1-0", tmp_path / "matrix-20250101-000000",
            tmp_path / "notes"]
    for d in keep:
        d.mkdir()
    (tmp_path / "file-20250101-000000-1-0").write_text("a file, not a run directory")
    assert leftovers.prune_runs(tmp_path, 1) == [runs[0]]
    assert all(d.is_dir() for d in keep) and (tmp_path / "file-20250101-000000-1-0").is_file()


def test_keep_runs_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(leftovers.KEEP_RUNS_ENV, raising=False)
    assert leftovers.keep_runs() == leftovers.DEFAULT_KEEP_RUNS == 50
    monkeypatch.setenv(leftovers.KEEP_RUNS_ENV, "0")
    runs = make_runs(tmp_path, 3)
    assert leftovers.prune_runs(tmp_path) == [] and all(d.is_dir() for d in runs)      # 0: keep all
    for bad in ("many", "-1"):
        monkeypatch.setenv(leftovers.KEEP_RUNS_ENV, bad)
        with pytest.raises(HarnessError, match="SMCCC_KEEP_RUNS") as ei:
            leftovers.keep_runs()
        assert "0 (keep all)" in ei.value.hint


def test_retention_prunes_once_at_the_start_of_a_run(monkeypatch, tmp_path):
    monkeypatch.setenv(leftovers.KEEP_RUNS_ENV, "2")
    runs = make_runs(tmp_path, 5)
    assert sorted(leftovers.prune_at_start(tmp_path)) == runs[:3]
    first = paths.new_run_dir("guest", tmp_path)
    assert [d.exists() for d in runs] == [False, False, False, True, True] and first.is_dir()
    assert leftovers.prune_at_start(tmp_path) == []                       # same process, same root: no pruning
    second = paths.new_run_dir("guest", tmp_path)
    assert runs[3].is_dir() and runs[4].is_dir() and first.is_dir() and second.is_dir()


def test_cli_keep_runs_option(monkeypatch):
    from harness import cli
    monkeypatch.delenv(leftovers.KEEP_RUNS_ENV, raising=False)
    assert cli.build_parser().parse_args(["boot", "--keep-runs", "7"]).keep_runs == 7
    with pytest.raises(SystemExit) as ei:
        cli.build_parser().parse_args(["boot", "--keep-runs", "-3"])
    assert ei.value.code == 2
