"""What a run leaves behind: QEMU processes, unix sockets, half-written temp directories.

The fault tests (tests/system/test_faults.py) assert that none is left after a fault; the pytest plugin
calls :func:`sweep_stale_sockets` at start-up, so even a harness killed with SIGKILL (QEMU dies with it,
PR_SET_PDEATHSIG) leaves no socket behind for long.

A reusable VM (``--reuse-vm``, harness/machine/reuse.py) outlives its pytest on purpose: its directory
(``reuse-vm-<name>``) is never swept while its QEMU runs; once that QEMU is gone its sockets are removed (its
state file stays, so the next attach can say what happened).

Retention (:func:`prune_runs`): the results root keeps the newest :func:`keep_runs` run directories
(``$SMCCC_KEEP_RUNS``, default :data:`DEFAULT_KEEP_RUNS`; 0 keeps all).  :func:`harness.paths.new_run_dir`
prunes once per process and root, before it creates the first run directory there.  Older run directories are
deleted unless the run is still going (:func:`run_is_live`: the process named in the directory's name runs, a
QEMU's command line names the directory or its private socket dir, a lock file in it is held, or a ``*.pid``
file in it names a live process).  Only directories named like ``new_run_dir`` makes them
(``<prefix>-<YYYYmmdd>-<HHMMSS>-<pid>-<n>``) are candidates: a reusable VM's ``reuse-vm-<name>`` and a matrix's
``matrix-<time>`` never are.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import HarnessError
from ..paths import cache_dir

# Temporary names the harness creates (tempfile prefixes in assets.py, payloads.py, initramfs.py).
CACHE_TEMP_GLOBS = ("debs/.dl-*", "extract/.x-*", "firmware/.build-*", "initramfs/.build-*", "initramfs/.guest-*",
                    "rootfs/.build-*", "snapshots/.build-*", "snapshots/.digests-*")
TMP_PREFIXES = ("smccc",)


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    comm: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        cmd = " ".join(self.argv)[:200] or f"[{self.comm}]"
        return f"pid {self.pid} (ppid {self.ppid}, state {self.state}): {cmd}"


def processes() -> list[Proc]:
    """Every process in /proc (argv empty for zombies and kernel threads)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            argv = tuple(a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0") if a)
        except OSError:
            continue      # exited meanwhile
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2:].split()
        out.append(Proc(int(d.name), int(rest[1]), rest[0], comm, argv))
    return out


def is_qemu(p: Proc) -> bool:
    return p.comm.startswith("qemu-system") or bool(p.argv and os.path.basename(p.argv[0]).startswith("qemu-system"))


def qemu_processes(marker: str | os.PathLike | None = None) -> list[Proc]:
    """QEMU processes whose command line mentions ``marker`` (e.g. a run directory), plus QEMU zombies that
    this process has not reaped (their command line is gone).  ``marker=None``: every QEMU, everyone's."""
    me = os.getpid()
    markers = _markers(marker) if marker is not None else []
    out = []
    for p in processes():
        if not is_qemu(p):
            continue
        argv = " ".join(p.argv)
        if marker is None or any(m in argv for m in markers) or (p.state == "Z" and p.ppid == me):
            out.append(p)
    return out


def _markers(marker: str | os.PathLike) -> list[str]:
    """``marker`` plus the private socket dirs its run directories point to (``<run_dir>/sockets``, written
    by harness.machine.session.sock_dir when a run dir is too deep for a unix socket path)."""
    out = [str(marker)]
    d = Path(marker)
    if d.is_dir():
        for f in d.rglob("sockets"):
            try:
                out.append(f.read_text().strip())
            except OSError:
                pass
    return [m for m in out if m]


def sockets(directory: Path) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.rglob("*") if p.is_socket())


def temp_entries() -> set[Path]:
    """Harness temp directories in the cache and in the system temp dir (compare before/after a test)."""
    root = cache_dir()
    found: set[Path] = set()
    for pattern in CACHE_TEMP_GLOBS:
        found.update(root.glob(pattern))
    tmp = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        found.update(p for p in tmp.iterdir() if p.name.startswith(TMP_PREFIXES))
    return found


def problems(run_dirs: list[Path] = (), temp_before: set[Path] | None = None, settle_s: float = 15.0) -> list[str]:
    """Everything left behind by the runs in ``run_dirs`` (empty list: clean).

    The cache is shared with concurrent runs, whose builds have temp dirs of their own for a few seconds:
    a new temp entry counts only if it is still there after ``settle_s``.
    """
    out = []
    for rd in run_dirs:
        out += [f"QEMU still running: {p}" for p in qemu_processes(rd)]
        out += [f"socket left behind: {s}" for s in sockets(rd)]
    if temp_before is not None:
        stop = time.monotonic() + settle_s
        while (new := {p for p in temp_entries() - temp_before if p.exists()}) and time.monotonic() < stop:
            time.sleep(0.25)
        out += [f"temp entry left behind: {p}" for p in sorted(new)]
    return out


def _pid_of_run_dir(d: Path) -> int | None:
    """``<prefix>-<YYYYmmdd>-<HHMMSS>-<pid>-<n>`` (harness.paths.new_run_dir) -> pid."""
    parts = d.name.split("-")
    if len(parts) >= 5 and parts[-2].isdigit() and parts[-1].isdigit():
        return int(parts[-2])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_sockets(root: Path) -> list[Path]:
    """Remove the sockets of run directories whose harness process is gone (it was SIGKILLed), and orphaned
    private socket dirs (:func:`sweep_orphan_socket_dirs`)."""
    removed = sweep_orphan_socket_dirs()
    root = Path(root)
    if not root.is_dir():
        return removed
    for d in root.iterdir():
        if d.name.startswith("reuse-vm-"):
            removed += _sweep_reusable(d)
            continue
        pid = _pid_of_run_dir(d)
        if pid is None or pid == os.getpid() or _alive(pid) or not d.is_dir():
            continue
        for s in d.glob("*.sock"):
            with contextlib.suppress(OSError):
                if s.is_socket() and not any(str(d) in " ".join(p.argv) for p in qemu_processes(d)):
                    s.unlink()
                    removed.append(s)
        pointer = d / "sockets"         # a private socket dir (harness.machine.session.sock_dir) of that run
        with contextlib.suppress(OSError):
            sd = Path(pointer.read_text().strip())
            if sd.name.startswith("smccc-sock-") and sd.is_dir() and not qemu_processes(sd):
                shutil.rmtree(sd, ignore_errors=True)
                removed.append(sd)
    return removed


ORPHAN_AGE_S = 600.0     # a private socket dir this old with no QEMU using it belongs to a dead run


def sweep_orphan_socket_dirs(tmp: Path | None = None, min_age_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Remove ``$TMPDIR/smccc-sock-*`` dirs (harness.machine.session.sock_dir) of runs that died without cleaning up
    and whose run directory is gone too (a deleted ``--results-dir``): ours, older than ``min_age_s``, and
    named by no live QEMU's argv."""
    removed = []
    tmp = Path(tmp or tempfile.gettempdir())
    live = " ".join(" ".join(p.argv) for p in processes() if is_qemu(p))
    now = time.time()
    for d in tmp.glob("smccc-sock-*"):
        with contextlib.suppress(OSError):
            st = d.lstat()
            if not d.is_dir() or d.is_symlink() or st.st_uid != os.getuid() or now - st.st_mtime < min_age_s:
                continue
            if str(d) in live:
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _sweep_reusable(d: Path) -> list[Path]:
    """The sockets of a reusable VM whose QEMU is gone (never those of a live one)."""
    from .reuse_state import read_state, socket_dir, stale_state
    if not d.is_dir() or not stale_state(d):
        return []
    removed = []
    with contextlib.suppress(Exception):
        st = read_state(d)
        socks = list(d.glob("*.sock"))
        if st is not None:
            socks += [Path(st.control_socket), Path(st.qmp_socket), Path(st.console_socket)]
        for s in socks:
            with contextlib.suppress(OSError):
                if s.is_socket() and not qemu_processes(s):
                    s.unlink()
                    removed.append(s)
        sd = socket_dir(d, create=False)
        if sd != d.absolute() and sd.is_dir() and not any(sd.iterdir()):
            sd.rmdir()
            removed.append(sd)
    return removed


# ==== retention of run directories ===================================================================
KEEP_RUNS_ENV = "SMCCC_KEEP_RUNS"
DEFAULT_KEEP_RUNS = 50
RUN_DIR_RE = re.compile(r"^(?P<prefix>.+)-(?P<stamp>\d{8}-\d{6})-(?P<pid>\d+)-(?P<n>\d+)$")   # paths.new_run_dir


def keep_runs() -> int:
    """How many run directories a results root keeps (``$SMCCC_KEEP_RUNS``; 0: all)."""
    text = os.environ.get(KEEP_RUNS_ENV, "").strip()
    if not text:
        return DEFAULT_KEEP_RUNS
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise HarnessError(f"{KEEP_RUNS_ENV}={text!r} is not a number of run directories to keep",
                           hint=f"set {KEEP_RUNS_ENV} to 0 (keep all) or a positive count, default {DEFAULT_KEEP_RUNS}")
    return n


def run_dirs(root: Path) -> list[Path]:
    """The run directories (``paths.new_run_dir`` names) directly under ``root``, newest first."""
    out = []
    with contextlib.suppress(OSError):
        for d in Path(root).iterdir():
            m = RUN_DIR_RE.match(d.name)
            if m is None or d.name.startswith("reuse-vm-") or d.is_symlink() or not d.is_dir():
                continue
            with contextlib.suppress(OSError):
                out.append(((m["stamp"], d.stat().st_mtime, int(m["n"])), d))
    return [d for _, d in sorted(out, key=lambda x: x[0], reverse=True)]


def _held(lock: Path) -> bool:
    """Someone holds an flock on ``lock`` (fcntl.flock, as harness.machine.reuse does)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def run_is_live(d: Path, qemu_argvs: list[str] | None = None) -> str:
    """Why run directory ``d`` belongs to a run that is still going ('' if none): its process, a QEMU naming it
    (or its private socket dir), a held lock file, a pid file of a live process.  ``qemu_argvs``: the command
    lines of the running QEMUs (default: read from /proc now)."""
    d = Path(d)
    m = RUN_DIR_RE.match(d.name)
    if m is not None and (int(m["pid"]) == os.getpid() or _alive(int(m["pid"]))):
        return f"its process (pid {m['pid']}) runs"
    if qemu_argvs is None:
        qemu_argvs = [" ".join(p.argv) for p in processes() if is_qemu(p)]
    if qemu_argvs:
        names = _markers(d) + [str(d.resolve())]
        if any(name in argv for argv in qemu_argvs for name in names):
            return "a QEMU uses it"
    for f in _files(d, ("lock", "*.lock")):
        if _held(f):
            return f"{f.name} is held"
    for f in _files(d, ("*.pid", "pid")):
        with contextlib.suppress(OSError, ValueError):
            pid = int(f.read_text().split()[0])
            if pid > 0 and _alive(pid):
                return f"{f.name} names a live process (pid {pid})"
    return ""


def _files(d: Path, patterns: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        with contextlib.suppress(OSError):
            out += [f for f in d.glob(pat) if f.is_file()]
            out += [f for f in d.glob(f"*/{pat}") if f.is_file()]
    return out


def prune_runs(root: Path, keep: int | None = None) -> list[Path]:
    """Delete the run directories under ``root`` beyond the newest ``keep`` (default :func:`keep_runs`; 0: keep
    all) whose run is over (:func:`run_is_live`), with their private socket dirs.  Returns what was deleted."""
    keep = keep_runs() if keep is None else keep
    if keep <= 0:
        return []
    old = run_dirs(root)[keep:]
    if not old:
        return []
    qemu_argvs = [" ".join(p.argv) for p in processes() if is_qemu(p)]
    removed = []
    for d in old:
        if run_is_live(d, qemu_argvs):
            continue
        socks = []
        with contextlib.suppress(OSError, ValueError):
            sd = Path((d / "sockets").read_text().strip())
            if sd.name.startswith("smccc-sock-") and sd.is_dir():
                socks.append(sd)
        shutil.rmtree(d, ignore_errors=True)
        for sd in socks:
            shutil.rmtree(sd, ignore_errors=True)
        if not d.exists():
            removed.append(d)
    return removed


_pruned: set[tuple[int, Path]] = set()     # (pid, root): retention already applied by this process


def prune_at_start(root: Path) -> list[Path]:
    """Retention when a run starts (pytest_configure, the CLI): the first call of a process for ``root`` prunes
    it to the newest ``$SMCCC_KEEP_RUNS`` run directories (:func:`prune_runs`); later calls do nothing.  A bad
    ``$SMCCC_KEEP_RUNS`` is a HarnessError before the run starts; a file system error never fails a run."""
    root = Path(root)
    key = (os.getpid(), root.resolve())
    if key in _pruned:
        return []
    keep = keep_runs()
    _pruned.add(key)
    try:
        return prune_runs(root, keep)
    except OSError:
        return []


def keep_runs_arg(text: str) -> int:
    """argparse type of ``--keep-runs N``: a count of run directories, 0 keeps all."""
    import argparse
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of run directories (0 keeps all)")
    return n
