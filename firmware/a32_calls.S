@ a32_calls.S - SMCCC calls from an AArch32 EL1 guest: A32 and T32 HVC/SMC, conditional SMCs.
@ payload-state: aarch32
@
@ Runs at: AArch32 EL1 (SVC mode), entered in A32; a vCPU created with KVM_ARM_VCPU_EL1_32BIT.
@ Does (OEM ids; the test forwards 0x83000000..3 and scripts replies with non-zero upper halves):
@   r0..r3 = OEM1, 0x11111111, 0x22222222, 0x33333333; hvc #0 (a32_hvc_insn) -> slots 0..3 <- r0..r3
@   r0 = OEM1; smc #0   (a32_smc_insn)   -> slot 4 <- r0
@   r0 = OEM2; cmp r0, r0 (Z=1); smcne #0 (a32_smcne_insn): condition fails -> slot 5 <- r0 (still OEM2)
@   r0 = OEM3; cmp r0, r0; smceq #0 (a32_smceq_insn): condition passes -> slot 6 <- r0
@   r0 = OEM3; smc #1   (a32_smc1_insn)  -> slot 12 <- r0 (imm4 = 1: not visible to KVM, see the test)
@   blx to t32_body (T32): r0..r3 = OEM1, ...; hvc #0 (t32_hvc_insn) -> slot 8 <- r0
@                          r0 = OEM1; smc #0 (t32_smc_insn) -> slot 9 <- r0; slot 10 <- CPSR (T set)
@                          r0 = OEM2; cmp; it ne; smcne #0 (t32_smcne_insn) -> slot 11 <- r0; bx lr
@   slot 7 <- CPSR (back in A32, SVC), DONE 0.  Unexpected exception: DONE 0xE1 (VECTORS32).

    .include "common32.inc"

    .equ OEM1, 0x83000001
    .equ OEM2, 0x83000002
    .equ OEM3, 0x83000003

    .section .text.entry, "ax"
    .arm
    .global _start
_start:
    INSTALL_VECTORS32 vectors32

    LI32 r0, OEM1
    LI32 r1, 0x11111111
    LI32 r2, 0x22222222
    LI32 r3, 0x33333333
    .global a32_hvc_insn
a32_hvc_insn:
    hvc #0
    REPORT32 0, r0
    REPORT32 1, r1
    REPORT32 2, r2
    REPORT32 3, r3

    LI32 r0, OEM1
    .global a32_smc_insn
a32_smc_insn:
    smc #0
    REPORT32 4, r0

    LI32 r0, OEM2
    cmp r0, r0
    .global a32_smcne_insn
a32_smcne_insn:
    smcne #0
    REPORT32 5, r0

    LI32 r0, OEM3
    cmp r0, r0
    .global a32_smceq_insn
a32_smceq_insn:
    smceq #0
    REPORT32 6, r0

    LI32 r0, OEM3
    .global a32_smc1_insn
a32_smc1_insn:
    smc #1
    REPORT32 12, r0

    ADR32 r4, t32_body
    orr r4, r4, #1
    blx r4
    mrs r0, cpsr
    REPORT32 7, r0
    DONE32 DONE_OK

    .thumb
    .balign 4
t32_body:
    LI32 r0, OEM1
    LI32 r1, 0x11111111
    LI32 r2, 0x22222222
    LI32 r3, 0x33333333
    .global t32_hvc_insn
t32_hvc_insn:
    hvc #0
    REPORT32 8, r0
    LI32 r0, OEM1
    .global t32_smc_insn
t32_smc_insn:
    smc #0
    REPORT32 9, r0
    mrs r0, cpsr
    REPORT32 10, r0
    LI32 r0, OEM2
    cmp r0, r0
    it ne
    .global t32_smcne_insn
t32_smcne_insn:
    smcne #0
    REPORT32 11, r0
    bx lr

    VECTORS32 vectors32
