@ t32_entry.S - an AArch32 EL1 payload entered in T32 (a Thumb _start: e_entry bit 0 set).
@ payload-state: aarch32
@
@ The VMM starts the vCPU with PSTATE.T set and PC = _start & ~1.  Does:
@   slot 0 <- CPSR (T bit and SVC mode as the VMM set them)
@   r0 = OEM1, r1..r3 = 0x11111111.. ; hvc #0 (t32_hvc_insn) -> slot 1 <- r0
@   r0 = OEM1; smc #0 (t32_smc_insn) -> slot 2 <- r0
@   DONE 0.  Unexpected exception: DONE 0xE1 (A32 VECTORS32).

    .include "common32.inc"

    .equ OEM1, 0x83000001

    .section .text.entry, "ax"
    .thumb
    .global _start
    .thumb_func
_start:
    INSTALL_VECTORS32 vectors32
    mrs r0, cpsr
    REPORT32 0, r0
    LI32 r0, OEM1
    LI32 r1, 0x11111111
    LI32 r2, 0x22222222
    LI32 r3, 0x33333333
    .global t32_hvc_insn
t32_hvc_insn:
    hvc #0
    REPORT32 1, r0
    LI32 r0, OEM1
    .global t32_smc_insn
t32_smc_insn:
    smc #0
    REPORT32 2, r0
    DONE32 DONE_OK

    VECTORS32 vectors32
