"""Where things live on the host: the cache (never in git) and per-run artifact directories."""

from __future__ import annotations

import os
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FIRMWARE_DIR = REPO_ROOT / "firmware"
IMAGES_DIR = REPO_ROOT / "images"
GUEST_PKG_DIR = Path(__file__).resolve().parent / "guest"


def cache_dir() -> Path:
    """`$SMCCC_HARNESS_CACHE`, else `$XDG_CACHE_HOME/smccc-harness`, else `~/.cache/smccc-harness`."""
    env = os.environ.get("SMCCC_HARNESS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "smccc-harness"


def results_root() -> Path:
    """Root of per-run artifact directories (`$SMCCC_HARNESS_RESULTS`, else `./runs`)."""
    return Path(os.environ.get("SMCCC_HARNESS_RESULTS", "runs")).resolve()


def new_run_dir(prefix: str = "run", root: Path | None = None) -> Path:
    """A fresh, private (0700) directory for one run's console log, traces and sockets.  (Retention of old
    ones: harness/machine/leftovers.py ``prune_at_start``, called when a pytest run or a CLI command starts.)"""
    root = Path(root or results_root())
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        d = root / f"{prefix}-{stamp}-{os.getpid()}-{n}"
        try:
            d.mkdir(mode=0o700)
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run directory under {root}")


def prune_newest(directory: Path, pattern: str, keep: Path, max_keep: int) -> None:
    """Delete all but the ``max_keep`` newest files matching ``pattern`` under ``directory`` (``keep`` is
    always kept and counts as one): cached archives and per-run initrds that are rebuilt often."""
    olds = sorted((p for p in Path(directory).glob(pattern) if p != keep),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for p in olds[max_keep - 1:]:
        try:
            p.unlink()
        except OSError:
            pass


def default_qemu_bin() -> str:
    """The QEMU binary when ``--qemu-bin`` is not given: ``$SMCCC_QEMU`` (e.g. the path ``smccc-harness qemu build``
    prints), else ``$QEMU``, else ``qemu-system-aarch64`` from PATH."""
    return os.environ.get("SMCCC_QEMU") or os.environ.get("QEMU") or "qemu-system-aarch64"
