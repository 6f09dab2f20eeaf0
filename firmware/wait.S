// wait.S - a payload that sleeps forever: a waiting vCPU is not a livelock (tests/system/test_livelock.py).
//
// Runs at: EL1.
// Parameter block at PARAM_BASE (u64): +0x00  0 = sleep in a `wfi` loop, 1 = in a `wfe` loop.
// Does:    REPORT slot 0 <- the parameter, then loops on WFI (`wait_wfi`) or WFE (`wait_wfe`) forever, every
//          interrupt masked and none pending, never storing DONE.
// The VMM should: not end the run as "livelock", even when the scenario opts in to any instruction with
// livelock_s: the vCPU sleeps (in KVM's WFI emulation, or an untrapped WFE), it is not stuck.  The deadline
// ends it, with PC in the wait loop.

    .include "common.inc"
    .include "vectors.inc"

    .section .text.entry, "ax"
    .global _start
_start:
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2
    LI x1, PARAM_BASE
    ldr x0, [x1]
    REPORT 0, x0
    cbnz x0, wait_wfe
    .global wait_wfi
wait_wfi:
    wfi
    b wait_wfi
    .global wait_wfe
wait_wfe:
    wfe
    b wait_wfe

    FATAL_VECTORS fatal_el1, 1
    FATAL_VECTORS fatal_el2, 2
