// storm.S - a payload that storms hypercalls: the exit-storm fault (tests/system/test_faults.py).
//
// Runs at: EL1.
// Does:    forever: x0 = PSCI_VERSION (0x84000000); hvc #0 (symbol storm_hvc); never stores DONE.
// The VMM should (with the PSCI range FWD_TO_USER): see one KVM_EXIT_HYPERCALL per iteration and end the
// run when the scenario's exit cap (max_exits) is passed: outcome "exit_storm", with the exit count.

    .include "common.inc"
    .include "vectors.inc"

    .section .text.entry, "ax"
    .global _start
_start:
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2
    .global storm_loop
storm_loop:
    LI x0, PSCI_VERSION
    .global storm_hvc
storm_hvc:
    hvc #0
    b storm_loop

    FATAL_VECTORS fatal_el1, 1
    FATAL_VECTORS fatal_el2, 2
