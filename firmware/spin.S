// spin.S - a payload that never exits: the deadline fault (tests/system/test_faults.py).
//
// Runs at: EL1 (or vEL2).
// Does:    REPORT slot 0 <- 0x5B1, then spins forever at `spin_loop` (b .), never storing DONE.
// The VMM should: stop the run at the scenario's deadline (outcome "deadline") and report the vCPU's PC,
// which symbolizes to `spin_loop`.

    .include "common.inc"
    .include "vectors.inc"

    .section .text.entry, "ax"
    .global _start
_start:
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2
    LI x0, 0x5B1
    REPORT 0, x0
    .global spin_loop
spin_loop:
    b spin_loop

    FATAL_VECTORS fatal_el1, 1
    FATAL_VECTORS fatal_el2, 2
