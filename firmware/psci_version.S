// psci_version.S - PSCI_VERSION over both conduits, at EL1.
//
// Runs at: EL1 (also harmless at vEL2, but there the HVC goes to the guest's own vector -> fatal DONE 0xE1).
// Does:
//     x0 = PSCI_VERSION (0x84000000); hvc #0   (symbol hvc_insn)  -> REPORT slot 0 <- x0
//     x0 = PSCI_VERSION (0x84000000); smc #0   (symbol smc_insn)  -> REPORT slot 1 <- x0
//     DONE 0
// The VMM should see (with the PSCI range FWD_TO_USER): KVM_EXIT_HYPERCALL nr=0x84000000 flags=0 with
// PC = hvc_insn + 4, then report slot 0 = the x0 it wrote back; KVM_EXIT_HYPERCALL nr=0x84000000
// flags=1 (SMC) with PC = smc_insn + 4, then report slot 1; then DONE = 0.  Without a filter both
// calls are answered in-kernel and slots 0/1 hold KVM's PSCI version (e.g. 0x10003).
// An unexpected exception ends the run with DONE 0xE1 (vectors.inc: slots 504..508).

    .include "common.inc"
    .include "vectors.inc"

    .section .text.entry, "ax"
    .global _start
_start:
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2

    LI x0, PSCI_VERSION
    .global hvc_insn
hvc_insn:
    hvc #0
    REPORT 0, x0

    LI x0, PSCI_VERSION
    .global smc_insn
smc_insn:
    smc #0
    REPORT 1, x0

    DONE #DONE_OK

    FATAL_VECTORS fatal_el1, 1
    FATAL_VECTORS fatal_el2, 2
