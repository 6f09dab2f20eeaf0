"""A deterministic reproducer of QEMU's EL2-timer migration gap, without Linux: a bare-metal program at EL2.

    python3 -m bench.el2_timer_repro                                   # the installed QEMU, 10 rounds
    python3 -m bench.el2_timer_repro --qemu-bin "$(./smccc-harness qemu build | tail -n 1)" --n 10

The program (:data:`PROGRAM`, assembled with binutils-aarch64-linux-gnu, which setup installs) starts at EL2
(``-M virt,virtualization=on``, no EL3), sets ``CNTHP_CVAL_EL2`` and ``CNTHV_CVAL_EL2`` to now + ``--delay``
seconds, and, as a control, ``CNTP_CVAL_EL0`` (with HCR_EL2.E2H = 0 the EL1 physical timer, whose QEMUTimer
QEMU does migrate); enables the three with the interrupt masked (``CTL = ENABLE | IMASK``: no GIC needed), prints
``A`` on the PL011 and then polls the ``CTL.ISTATUS`` bits, printing ``P`` (EL2 physical), ``V`` (EL2 virtual)
and ``E`` (EL1 physical) when each becomes set.  Under TCG, ISTATUS only changes when QEMU recalculates the
timer (its QEMUTimer fires, or a register is written), so a letter appears after a migration only if QEMU
re-armed that timer's QEMUTimer.

Each round: start QEMU, wait for ``A``, QMP ``stop`` + ``migrate`` to a file (mapped-ram) + ``quit``; start a
new QEMU with ``-incoming defer``, ``migrate-incoming``, ``cont``, and wait ``--delay`` + 4 s for ``P``, ``V``
and ``E``.  A timer whose letter does not come is dead.  A control run first, without a migration, shows that
all three fire.  The save happens well before the deadline whatever the host's load, so
unlike the Linux guests of bench/dead_snapshots.py the outcome does not depend on timing.

Results are printed and written to ``runs/bench-el2timer-*/el2_timer_repro.json``.  Nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from bench.run import out
from harness import paths
from harness.machine.snapshot_store import MAPPED_RAM, qemu_version

PROGRAM = """\
    .global _start
    .text
_start:
    ldr     x1, =0x09000000             // PL011 UARTDR of -M virt
    mrs     x2, CurrentEL
    lsr     x2, x2, #2
    add     w0, w2, #'0'                // the exception level, as a digit
    str     w0, [x1]
    mrs     x3, cntfrq_el0
    ldr     x4, =DELAY_S
    mul     x3, x3, x4
    isb
    mrs     x2, cntpct_el0
    add     x2, x2, x3                  // now + DELAY_S seconds (CNTVOFF_EL2 is 0: virtual = physical)
    msr     cnthp_cval_el2, x2
    msr     S3_4_C14_C3_2, x2           // CNTHV_CVAL_EL2 (FEAT_VHE)
    msr     cntp_cval_el0, x2           // HCR_EL2.E2H = 0: the EL1 physical timer (its QEMUTimer is migrated)
    mov     x4, #3                      // ENABLE | IMASK
    msr     cnthp_ctl_el2, x4
    msr     S3_4_C14_C3_1, x4           // CNTHV_CTL_EL2
    msr     cntp_ctl_el0, x4
    isb
    mov     w0, #'A'                    // armed
    str     w0, [x1]
    mov     x5, #0                      // bit 0: P printed, bit 1: V printed, bit 2: E printed
1:  mrs     x4, cnthp_ctl_el2
    tbz     x4, #2, 2f
    tbnz    x5, #0, 2f
    mov     w0, #'P'
    str     w0, [x1]
    orr     x5, x5, #1
2:  mrs     x4, S3_4_C14_C3_1
    tbz     x4, #2, 3f
    tbnz    x5, #1, 3f
    mov     w0, #'V'
    str     w0, [x1]
    orr     x5, x5, #2
3:  mrs     x4, cntp_ctl_el0
    tbz     x4, #2, 5f
    tbnz    x5, #2, 5f
    mov     w0, #'E'
    str     w0, [x1]
    orr     x5, x5, #4
5:  cmp     x5, #7
    b.ne    1b
    mov     w0, #10                     // newline
    str     w0, [x1]
4:  wfi
    b       4b
    .ltorg
"""


def build_program(work: Path, delay_s: int) -> Path:
    src = work / "el2timer.S"
    src.write_text(PROGRAM.replace("DELAY_S", str(delay_s)))
    obj, elf = work / "el2timer.o", work / "el2timer.elf"
    subprocess.run(["aarch64-linux-gnu-as", "-march=armv8.1-a", "-o", str(obj), str(src)], check=True)
    subprocess.run(["aarch64-linux-gnu-ld", "-Ttext=0x40080000", "-e", "_start", "-o", str(elf), str(obj)],
                   check=True)
    return elf


def argv(qemu_bin: str, elf: Path, qmp: Path, console: Path, incoming: bool) -> list[str]:
    a = [qemu_bin, "-M", "virt,virtualization=on,gic-version=3", "-accel", "tcg", "-cpu", "max", "-smp", "1",
         "-m", "128", "-display", "none", "-monitor", "none", "-nic", "none", "-no-reboot",
         "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
         "-kernel", str(elf), "-qmp", f"unix:{qmp},server=on,wait=off"]
    return a + (["-incoming", "defer"] if incoming else [])


class Qemu:
    def __init__(self, qemu_bin: str, elf: Path, work: Path, name: str, incoming: bool = False):
        self.qmp_path, self.console = work / f"{name}.qmp", work / f"{name}.console"
        with open(work / f"{name}.stderr", "w") as err:
            self.p = subprocess.Popen(argv(qemu_bin, elf, self.qmp_path, self.console, incoming),
                                      stdout=subprocess.DEVNULL, stderr=err)
        stop = time.monotonic() + 30
        while not self.qmp_path.is_socket():
            if self.p.poll() is not None or time.monotonic() > stop:
                raise RuntimeError(f"QEMU {name} did not start: {(work / f'{name}.stderr').read_text()[-500:]}")
            time.sleep(0.02)
        try:
            self.q = self._connect(stop)
        except BaseException:
            self.p.kill()
            self.p.wait()
            raise
        self.q.settimeout(30)

    def _connect(self, stop: float) -> QEMUMonitorProtocol:
        """QMP on the socket (the file appears a moment before QEMU listens on it: retry until ``stop``)."""
        while True:
            q = QEMUMonitorProtocol(str(self.qmp_path))
            try:
                q.connect(negotiate=True)
                return q
            except Exception:
                q.close()
                if self.p.poll() is not None or time.monotonic() > stop:
                    raise
                time.sleep(0.05)

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_for(self, chars: str, timeout_s: float) -> bool:
        stop = time.monotonic() + timeout_s
        while time.monotonic() < stop:
            if all(c in self.text() for c in chars):
                return True
            time.sleep(0.05)
        return False

    def migrate_wait(self, timeout_s: float = 30.0) -> None:
        stop = time.monotonic() + timeout_s
        while (st := self.q.cmd("query-migrate").get("status")) != "completed":
            if st in ("failed", "cancelled") or time.monotonic() > stop:
                raise RuntimeError(f"migration {st}")
            time.sleep(0.01)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.q.cmd("quit")
        with contextlib.suppress(Exception):
            self.q.close()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def one_round(qemu_bin: str, elf: Path, work: Path, i: int, delay_s: int) -> dict:
    state = work / f"state-{i}.ram"
    src = Qemu(qemu_bin, elf, work, f"save-{i}")
    try:
        if not src.wait_for("A", 30):
            raise RuntimeError(f"the program did not arm its timers: {src.text()!r}")
        t_armed = time.monotonic()
        src.q.cmd("stop")
        src.q.cmd("migrate-set-capabilities", capabilities=MAPPED_RAM)
        src.q.cmd("migrate", uri=f"file:{state}")
        src.migrate_wait()
        saved_after_s = time.monotonic() - t_armed
        early = [c for c in "PV" if c in src.text()]
    finally:
        src.close()
    dst = Qemu(qemu_bin, elf, work, f"restore-{i}", incoming=True)
    try:
        dst.q.cmd("migrate-set-capabilities", capabilities=MAPPED_RAM)
        dst.q.cmd("migrate-incoming", uri=f"file:{state}")
        dst.migrate_wait()
        dst.q.cmd("cont")
        dst.wait_for("PVE", delay_s + 4.0)
        got = dst.text()
    finally:
        dst.close()
        state.unlink(missing_ok=True)
    return {"round": i, "saved_after_armed_s": round(saved_after_s, 2), "fired_before_save": early,
            "el2_phys_fired": "P" in got, "el2_virt_fired": "V" in got, "el1_phys_fired": "E" in got,
            "restored_console": got}


def control(qemu_bin: str, elf: Path, work: Path, delay_s: int) -> dict:
    """No migration: the time until all three letters come (they must), and the exception level printed."""
    q = Qemu(qemu_bin, elf, work, "control")
    try:
        t0 = time.monotonic()
        q.wait_for("A", 30)
        fired = q.wait_for("PVE", delay_s + 10.0)
        return {"all_fired": fired, "after_s": round(time.monotonic() - t0, 2), "console": q.text()}
    finally:
        q.close()


def main(argv_: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qemu-bin", default="qemu-system-aarch64")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--delay", type=int, default=5, help="seconds between arming the timers and their deadline")
    args = ap.parse_args(argv_)
    version = qemu_version(args.qemu_bin)
    d = paths.new_run_dir("bench-el2timer")
    work = Path(tempfile.mkdtemp(prefix="el2timer-", dir=d))
    elf = build_program(work, args.delay)
    out(f"EL2 timers across a migration: {args.n} rounds, deadline {args.delay} s after arming, {version}")
    ctl = control(args.qemu_bin, elf, work, args.delay)
    out(f"  control, no migration: console {ctl['console']!r}: "
        + (f"all three fired after {ctl['after_s']} s" if ctl["all_fired"] else "NOT all fired: the program is broken"))
    rounds = []
    for i in range(args.n):
        try:
            r = one_round(args.qemu_bin, elf, work, i, args.delay)
        except (RuntimeError, OSError, subprocess.SubprocessError, QMPError) as e:   # QEMU did not start, ...
            # a failed migration: say so, go on
            out(f"  {i + 1:3d}/{args.n}: error {type(e).__name__}: {e}")
            continue
        rounds.append(r)
        out(f"  {i + 1:3d}/{args.n}: saved {r['saved_after_armed_s']} s after arming; after the restore: "
            f"CNTHP {'fired' if r['el2_phys_fired'] else 'DEAD'}, CNTHV {'fired' if r['el2_virt_fired'] else 'DEAD'}, "
            f"EL1 CNTP {'fired' if r['el1_phys_fired'] else 'DEAD'}"
            + (f" (fired before the save: {r['fired_before_save']})" if r["fired_before_save"] else ""))
    valid = [r for r in rounds if not r["fired_before_save"]]
    dead_p = sum(not r["el2_phys_fired"] for r in valid)
    dead_v = sum(not r["el2_virt_fired"] for r in valid)
    dead_e = sum(not r["el1_phys_fired"] for r in valid)
    out(f"dead after restore: CNTHP {dead_p} of {len(valid)}, CNTHV {dead_v} of {len(valid)}, EL1 CNTP {dead_e} "
        f"of {len(valid)} ({version})")
    (d / "el2_timer_repro.json").write_text(json.dumps(
        {"qemu_bin": args.qemu_bin, "qemu_version": version, "delay_s": args.delay, "n": args.n,
         "dead_cnthp": dead_p, "dead_cnthv": dead_v, "dead_el1_cntp": dead_e, "valid": len(valid),
         "control": ctl, "rounds": rounds}, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    out(f"results: {d / 'el2_timer_repro.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
