"""A guest's memory as an ELF core file (QMP ``dump-guest-memory``), for crash(8) or drgn after a kernel splat.

``pytest --dump-on-splat`` (harness/plugin/scanning.py) calls :func:`dump_guest_memory` on the first splat of each
guest, while the guest still runs (a WARNING, BUG, Oops, KASAN or lockdep report; a panic ends QEMU first:
``panic=-1`` with ``-no-reboot``), and names the file in the failure.  docs/debug-kernels.md shows how to open it.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import GuestError

DUMP_DEADLINE_S = 300.0    # a 1 GiB guest takes a few seconds; a loaded host much longer


def open_hint(core: Path, vmlinux: Path | None) -> str:
    """How to open the core file (the vmlinux gives crash and drgn the symbols and types; DWARF: --debug)."""
    vm = str(vmlinux) if vmlinux is not None else "VMLINUX"
    return f"crash {vm} {core}   or   drgn -s {vm} -c {core}"


def dump_guest_memory(machine, path: Path, deadline_s: float = DUMP_DEADLINE_S) -> dict:
    """Write the running guest's memory to ``path`` (ELF, no paging: physical memory as PT_LOAD segments, the
    vCPUs' registers as notes).  Returns {"path", "bytes", "seconds"}; a GuestError if QEMU cannot."""
    qmp = getattr(machine, "qmp", None)
    if qmp is None or not machine.alive():
        raise GuestError(f"cannot dump the guest's memory: {'QEMU has exited' if qmp else 'no QMP on this machine'}")
    t0 = time.monotonic()
    path = Path(path).resolve()
    q = qmp()
    q.settimeout(deadline_s)
    try:     # detach=false: the command returns when the file is complete
        q.cmd("dump-guest-memory", paging=False, protocol=f"file:{path}", format="elf")
    except Exception as e:  # noqa: BLE001 - QMP errors, timeouts: one message naming the file
        raise GuestError(f"dump-guest-memory to {path} failed: {e}") from e
    finally:
        q.settimeout(10.0)
    return {"path": path, "bytes": path.stat().st_size, "seconds": round(time.monotonic() - t0, 2)}
