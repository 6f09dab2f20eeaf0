"""QEMU's EL2 generic timers across a migration, reproduced without Linux (docs/upstream/qemu-el2-timer-migration.md).

A bare-metal program at EL2 (bench/el2_timer_repro.py ``PROGRAM``: ``-M virt,virtualization=on``, TCG) arms
CNTHP and CNTHV (the EL2 timers a VHE kernel ticks on) and, as a control, the EL1 physical timer, all with the
interrupt masked and a deadline seconds ahead, then polls their ``CTL.ISTATUS`` and prints a letter for each that
fires.  The state is saved well before the deadline and loaded into a new QEMU.  ``vmstate_arm_cpu``
(target/arm/machine.c) carries only the EL1 timers' QEMUTimers and ``cpu_post_load`` never re-arms the others,
so on a QEMU without the fix the EL2 letters never come after the load: deterministic, unlike the Linux-guest
reproducer of tests/system/test_snapshot_timers.py, whose outcome depends on when the restored guest next wakes.

Strict xfail on a QEMU without ``smccc-fix:el2-timers`` in its ``--version`` (harness/machine/snapshot_store.py
QEMU_FIXES; ``smccc-harness qemu build`` makes one from patches/qemu/): an XPASS there means this QEMU fixed the
bug and the table must learn its version.  Measured 10 of 10 dead on stock 10.0.2, 0 of 10 with the patch
(bench/README.md); figures come from the bench, never from this test.
"""

from __future__ import annotations

import shutil

import pytest

from bench import el2_timer_repro as repro
from harness.images.sysdeps import check_qemu
from harness.machine import snapshot_store

pytestmark = pytest.mark.infra  # the harness's own plumbing (harness/plugin/tiers.py)

DELAY_S = 3     # the timers' deadline after arming: the save (well under a second) comes long before it


@pytest.fixture
def repro_setup(guest_pool, tmp_path, request):
    if shutil.which("aarch64-linux-gnu-as") is None:
        pytest.fail("aarch64-linux-gnu-as is missing: ./smccc-harness setup installs binutils-aarch64-linux-gnu")
    qemu_bin = guest_pool.options.qemu_bin
    check_qemu(qemu_bin)
    if not snapshot_store.qemu_has_fix(qemu_bin, snapshot_store.EL2_TIMER_FIX):
        request.applymarker(pytest.mark.xfail(
            strict=True, raises=AssertionError,
            reason=f"{snapshot_store.qemu_version(qemu_bin)} has no "
                   f"{snapshot_store.QEMU_FIXES[snapshot_store.EL2_TIMER_FIX]!r}: vmstate_arm_cpu migrates the EL1 "
                   "timers only and cpu_post_load never re-arms CNTHP/CNTHV (target/arm/machine.c); "
                   "docs/upstream/qemu-el2-timer-migration.md"))
    work = tmp_path / "el2timer"
    work.mkdir()
    return qemu_bin, repro.build_program(work, DELAY_S), work


def test_el2_timers_armed_at_a_save_fire_after_the_load(repro_setup):
    qemu_bin, elf, work = repro_setup
    ctl = repro.control(qemu_bin, elf, work, DELAY_S)
    # the control run, no migration: the program reaches EL2 and all three timers fire (else the test proves nothing)
    assert ctl["all_fired"] and ctl["console"].startswith("2A"), f"the program itself is broken: {ctl}"
    r = repro.one_round(qemu_bin, elf, work, 0, DELAY_S)
    assert not r["fired_before_save"], f"the save came after the deadline; nothing was armed at the save: {r}"
    assert r["el1_phys_fired"], f"the migrated EL1 timer (the control) did not fire after the load: {r}"
    assert r["el2_phys_fired"] and r["el2_virt_fired"], (
        f"EL2 timers armed at the save never fired after the load: CNTHP "
        f"{'fired' if r['el2_phys_fired'] else 'dead'}, CNTHV {'fired' if r['el2_virt_fired'] else 'dead'} "
        f"(console after the load {r['restored_console']!r}; QEMU {snapshot_store.qemu_version(qemu_bin)})")
