"""The snapshot cache: a snapshot of a booted guest is keyed by what it was made from (kernel, initramfs and
QEMU digests, the normalized QEMU argv), stored under the cache with its metadata, locked while it is made,
and pruned to the newest few.  Saving, restoring and the warm start: harness/machine/snapshot.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from .. import paths
from ..errors import HarnessError
from .config import MachineConfig

SNAPSHOT_FORMAT = 2          # bump when the save procedure or the layout changes (2: validated saves)
STATE_FILE = "state.ram"
META_FILE = "meta.json"
BOOT_LOG = "boot-console.log"
LAST_USED = "last-used"
DIGESTS = "digests.json"
KEEP = 4                     # snapshots kept (the newest by last use); each is ~100 MB on disk
KEEP_RECENT_S = 120.0        # never prune a snapshot restored this recently (another worker may be using it)
LOCK_TIMEOUT_S = 600.0       # waiting for another process that is building the same snapshot
NO_SNAPSHOT_ENV = "SMCCC_NO_SNAPSHOT"
FULL_ARGV_ENV = "SMCCC_SNAPSHOT_FULL_ARGV"


STUB_KERNEL, STUB_INITRD, STUB_KERNEL_BYTES = "stub-kernel", "stub-initrd", 4096


MAPPED_RAM = [{"capability": "mapped-ram", "state": True}]


_KERNEL_PH, _INITRD_PH, _CTL_PH, _QMP_PH = "<kernel>", "<initrd>", "<control-socket>", "<qmp-socket>"


class SnapshotError(HarnessError):
    """Saving or restoring a snapshot failed (the caller falls back to a cold boot)."""


def disabled_by_env() -> bool:
    """``SMCCC_NO_SNAPSHOT`` set to anything but "" or "0"."""
    return os.environ.get(NO_SNAPSHOT_ENV, "") not in ("", "0")


def stub_boot_files() -> bool:
    """Restore with the stub kernel/initrd (default), unless ``SMCCC_SNAPSHOT_FULL_ARGV`` is set."""
    return os.environ.get(FULL_ARGV_ENV, "") in ("", "0")


def snapshots_root() -> Path:
    return paths.cache_dir() / "snapshots"


# ==== the key =======================================================================================
def _digest_memo_path() -> Path:
    return snapshots_root() / DIGESTS


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoized on disk by (path, size, mtime_ns, inode): a 40 MB kernel is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    ident = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    memo_path = _digest_memo_path()
    memo: dict = {}
    with contextlib.suppress(OSError, ValueError):
        memo = json.loads(memo_path.read_text())
    hit = memo.get(str(path))
    if isinstance(hit, dict) and hit.get("id") == ident:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    memo[str(path)] = {"id": ident, "sha256": digest}
    _write_memo(memo_path, memo)
    return digest


def _write_memo(memo_path: Path, memo: dict) -> None:
    """Atomic replace; concurrent writers may lose each other's entries, which only costs a recomputation."""
    with contextlib.suppress(OSError):
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo_path.parent, prefix=".digests-")
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f, sort_keys=True)
        os.replace(tmp, memo_path)


_VERSIONS: dict[str, str] = {}


def qemu_version(qemu_bin: str) -> str:
    """The first line of ``qemu_bin --version`` (memoized per binary path + mtime in this process)."""
    exe = shutil.which(qemu_bin) or qemu_bin
    try:
        st = os.stat(exe)
        ident = f"{os.path.realpath(exe)}:{st.st_size}:{st.st_mtime_ns}"
    except OSError as e:
        raise SnapshotError(f"cannot find QEMU {qemu_bin!r}: {e}") from None
    if ident not in _VERSIONS:
        memo_path = _digest_memo_path()       # on disk too: `qemu --version` costs 20-50 ms per process
        memo: dict = {}
        with contextlib.suppress(OSError, ValueError):
            memo = json.loads(memo_path.read_text())
        if isinstance(memo.get("qemu:" + ident), str):
            _VERSIONS[ident] = memo["qemu:" + ident]
            return _VERSIONS[ident]
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise SnapshotError(f"{exe} --version failed: {e}") from None
        _VERSIONS[ident] = out.strip().splitlines()[0] if out.strip() else "unknown"
        memo["qemu:" + ident] = _VERSIONS[ident]
        _write_memo(memo_path, memo)
    return _VERSIONS[ident]


# QEMU bugs the harness works around, and the token a QEMU with the fix carries in its ``--version`` line (the
# configure ``--with-pkgversion`` of a patched build: ``smccc-harness qemu build``).  EL2_TIMER_FIX: the EL2
# generic timers are re-armed after an incoming migration (harness/machine/snapshot.py DeadTimerSnapshot).
EL2_TIMER_FIX = "el2-timers"
QEMU_FIXES = {EL2_TIMER_FIX: "smccc-fix:el2-timers"}


def qemu_fixes(version: str) -> frozenset[str]:
    """The fixes of :data:`QEMU_FIXES` a QEMU has, from its version string (:func:`qemu_version`)."""
    return frozenset(fix for fix, token in QEMU_FIXES.items() if token in version)


def qemu_has_fix(qemu_bin: str, fix: str) -> bool:
    """Whether the QEMU ``qemu_bin`` carries ``fix`` (a key of :data:`QEMU_FIXES`)."""
    if fix not in QEMU_FIXES:
        raise ValueError(f"unknown QEMU fix {fix!r}; known: {sorted(QEMU_FIXES)}")
    return fix in qemu_fixes(qemu_version(qemu_bin))


def normalized_argv(config: MachineConfig) -> list[str]:
    """The QEMU command line as it matters for the saved state: per-run socket paths and ``-incoming``
    removed, kernel/initrd paths replaced by placeholders (their contents are hashed separately)."""
    cfg = dataclasses.replace(config, incoming=None)
    subst = {str(cfg.kernel): _KERNEL_PH}
    if cfg.initrd is not None:
        subst[str(cfg.initrd)] = _INITRD_PH
    if cfg.control_socket is not None:
        subst[str(cfg.control_socket)] = _CTL_PH
    if cfg.qmp_socket is not None:
        subst[str(cfg.qmp_socket)] = _QMP_PH
    out = []
    for a in cfg.argv()[1:]:              # argv[0] (the binary's path) is covered by its version string
        for old, new in subst.items():
            a = a.replace(old, new)
        out.append(a)
    return out


def key_inputs(config: MachineConfig, *, qemu_version_string: str | None = None) -> dict:
    """Everything that determines a saved guest's state (the key is their sha256)."""
    return {
        "format": SNAPSHOT_FORMAT,
        "kernel_sha256": file_sha256(config.kernel),
        "initrd": config.initrd.name if config.initrd is not None else None,
        "initrd_sha256": file_sha256(config.initrd) if config.initrd is not None else None,
        "qemu_version": qemu_version_string if qemu_version_string is not None else qemu_version(config.qemu_bin),
        "argv": normalized_argv(config),
        "cmdline": config.cmdline,
    }


def snapshot_key(inputs: dict) -> str:
    """sha256 of the canonical JSON of :func:`key_inputs` (32 hex digits, like the initramfs keys)."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


# ==== the cache =====================================================================================
@dataclass(frozen=True)
class Snapshot:
    key: str
    path: Path

    @property
    def state(self) -> Path:
        return self.path / STATE_FILE

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    def meta(self) -> dict:
        return json.loads(self.meta_path.read_text())

    def complete(self) -> bool:
        return self.state.is_file() and self.meta_path.is_file()

    def touch(self) -> None:
        with contextlib.suppress(OSError):
            (self.path / LAST_USED).write_text(f"{time.time():.3f}\n")


class SnapshotStore:
    """``cache_dir()/snapshots``: lookup, atomic creation under a per-key file lock, pruning."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else snapshots_root()

    def snapshot(self, key: str) -> Snapshot:
        return Snapshot(key, self.root / key)

    def lookup(self, key: str) -> Snapshot | None:
        s = self.snapshot(key)
        return s if s.complete() else None

    def lock(self, key: str) -> FileLock:
        d = self.root.parent / "locks"
        d.mkdir(parents=True, exist_ok=True)
        return FileLock(str(d / f"snapshot-{key}.lock"), timeout=LOCK_TIMEOUT_S)

    def create(self, key: str, build) -> Snapshot:
        """Return the snapshot for ``key``, calling ``build(tmpdir)`` to make it if it is missing.

        ``build`` writes STATE_FILE and META_FILE (and anything else) into ``tmpdir``; the directory is then
        renamed to ``<root>/<key>``.  One builder per key across processes; the others wait and reuse it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with self.lock(key):
                snap = self.lookup(key)
                if snap is not None:
                    return snap
                tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".build-{key}-"))
                try:
                    build(tmp)
                    snap = Snapshot(key, tmp)
                    if not snap.complete():
                        raise SnapshotError(f"the snapshot build left no {STATE_FILE} / {META_FILE} in {tmp}")
                    dest = self.snapshot(key)
                    if dest.path.exists():          # an incomplete leftover (crash before the rename)
                        shutil.rmtree(dest.path, ignore_errors=True)
                    os.rename(tmp, dest.path)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                dest.touch()
        except Timeout:
            raise SnapshotError(f"another process held the snapshot lock for {key} longer than "
                                f"{LOCK_TIMEOUT_S:.0f} s") from None
        self.prune(keep=dest)
        return dest

    def discard(self, key: str) -> None:
        """Remove a snapshot found bad (under its lock); the next warm start builds a new one."""
        with self.lock(key):
            shutil.rmtree(self.snapshot(key).path, ignore_errors=True)

    def entries(self) -> list[Snapshot]:
        if not self.root.is_dir():
            return []
        return [Snapshot(p.name, p) for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]

    def prune(self, keep: Snapshot | None = None, max_keep: int = KEEP) -> list[str]:
        """Remove all but the ``max_keep`` most recently used snapshots (never one used in the last
        :data:`KEEP_RECENT_S` s, nor ``keep``).  Returns the removed keys."""
        def used(s: Snapshot) -> float:
            for name in (LAST_USED, META_FILE):
                with contextlib.suppress(OSError):
                    return (s.path / name).stat().st_mtime
            return 0.0
        snaps = sorted(self.entries(), key=used, reverse=True)
        now, removed = time.time(), []
        for s in snaps[max_keep:]:
            if (keep is not None and s.key == keep.key) or now - used(s) < KEEP_RECENT_S:
                continue
            shutil.rmtree(s.path, ignore_errors=True)
            removed.append(s.key)
        for stale in self.root.glob(".build-*"):       # builders that died (older than any live build)
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > LOCK_TIMEOUT_S:
                    shutil.rmtree(stale, ignore_errors=True)
        return removed
