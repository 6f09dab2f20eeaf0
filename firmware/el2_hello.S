// el2_hello.S - where am I?  For a HAS_EL2 (nested-virt) vCPU; also runs at EL1.
//
// Does:
//     REPORT slot 0 <- CurrentEL (raw register: 0x8 = EL2, 0x4 = EL1)
//     REPORT slot 1 <- HCR_EL2            (only when CurrentEL is EL2; slot 1 is not written at EL1)
//     REPORT slot 2 <- ID_AA64PFR0_EL1    (EL3 field bits[15:12]: KVM advertises EL3=1 to NV guests)
//     REPORT slot 3 <- ID_AA64MMFR1_EL1   (VH bits[11:8])
//     REPORT slot 4 <- ID_AA64MMFR2_EL1   (NV bits[27:24])
//     DONE 0
// The VMM should see, in a HAS_EL2 vCPU: slot 0 = 0x8 and slot 1 = 0x480000000 (E2H, bit 34, set; with
// HAS_EL2_E2H0: 0x80000000, E2H clear) - the reset value, even though KVM_GET_ONE_REG of HCR_EL2 before the
// first run reads 0; without HAS_EL2: slot 0 = 0x4 and no slot 1.  No hypercall exits.

    .include "common.inc"
    .include "vectors.inc"

    .section .text.entry, "ax"
    .global _start
_start:
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2

    mrs x0, CurrentEL
    REPORT 0, x0
    ubfx x1, x0, #2, #2
    cmp x1, #2
    b.ne 1f
    .global read_hcr
read_hcr:
    mrs x1, hcr_el2
    REPORT 1, x1
1:  mrs x2, id_aa64pfr0_el1
    REPORT 2, x2
    mrs x3, id_aa64mmfr1_el1
    REPORT 3, x3
    mrs x4, id_aa64mmfr2_el1
    REPORT 4, x4
    DONE #DONE_OK

    FATAL_VECTORS fatal_el1, 1
    FATAL_VECTORS fatal_el2, 2
