// el2_vectors.S - a vEL2 payload with its own VBAR_EL2: where does an HVC at vEL2 go, and does an SMC
// at vEL2 still reach the VMM?  Needs a HAS_EL2 vCPU (at EL1: DONE 0xE4, report slot 6 = CurrentEL).
//
// Does:
//     REPORT slot 6 <- CurrentEL (raw; 0x8 expected)
//     VBAR_EL2 <- el2_vectors (every vector logs the exception into the result block, below)
//     x0 = PSCI_VERSION; hvc #0 (symbol hvc_insn)
//        -> expected: taken to VBAR_EL2+0x200 (current EL, SPx), ESR_EL2 = 0x5a000000 (EC 0x16),
//           ELR_EL2 = hvc_insn + 4; the handler sets x0 = 0xE1E10000 | imm16 and ERETs.  No VMM exit.
//     REPORT slot 0 <- x0 after the HVC (0xE1E10000 if it went to our vector)
//     REPORT slot 1 <- ESR_EL2, slot 2 <- ELR_EL2, slot 3 <- vector offset of the last logged trap
//                      (all three ~0 if nothing was logged)
//     x0 = PSCI_VERSION; smc #0 (symbol smc_insn)
//        -> expected: KVM_EXIT_HYPERCALL nr=0x84000000 flags=1, PC = smc_insn+4, PSTATE = EL2h (0x3c9)
//           when the PSCI range is FWD_TO_USER; otherwise answered in-kernel.
//     REPORT slot 4 <- x0 after the SMC
//     REPORT slot 5 <- number of exceptions logged (1 expected)
//     REPORT slot 7 <- HCR_EL2 as first read back (an MMIO exit before the second read-back)
//     DONE 0
// Parameter block at PARAM_BASE: u64 flags; bit 0 = set HCR_EL2.HCD (read-modify-write of the reset value)
// before the HVC.  HCD is RES0 while KVM advertises EL3 (ID_AA64PFR0_EL1.EL3 != 0), so the HVC still lands
// on +0x200; once the VMM has cleared that field, the HVC is an UNDEF (EC 0) taken to +0x200: logged and
// skipped with x0 = 0x0DEF0000, and the run goes on (report slot 0).  Skipped means: ELR_EL2 += 4 when ELR
// is hvc_insn itself (the architectural preferred return address of an UNDEF), or returning as is when
// ELR is already hvc_insn + 4 (what KVM 7.3 injects: handle_hvc() raises the UNDEF after the HVC trap has
// advanced the PC; docs/nested-routing.md).  Any other ELR is fatal.
// Any other exception than these two on a synchronous vector (+0x200 or +0x400) is logged and then ends
// the run with DONE 0xE1.
//
// Result block at RESULT_BASE (harness.payloads.decode_el2_vectors):
//     +0x00  number of exceptions taken (counts beyond the 16 logged entries too)
//     +0x08  HCR_EL2 as read back before the HVC (after setting HCD when asked)
//     +0x10  HCR_EL2 read back again after an exit to the VMM (REPORT slot 7, which carries the first value):
//            under NV2 the vEL2 write lands in the VNCR page as written; KVM rewrites that copy, with its
//            RES0 masks applied, on every exit from vEL2 (arch/arm64/kvm/hyp/vhe/switch.c fixup_nv_guest_exit, "Publish the latest
//            HCR_EL2 to the emulation"), so only this second value is deterministic
//     +0x18..+0x3F  0 (reserved)
//     entry k at +0x40 + k*0x40, k < 16:
//         +0x00 vector offset   +0x08 ESR_EL2   +0x10 ELR_EL2   +0x18 FAR_EL2
//         +0x20 SPSR_EL2        +0x28 x0 at the exception       +0x30 x0 returned (0 if fatal)
//         +0x38 0 (reserved)
//   Size: 0x440 bytes.

    .include "common.inc"
    .include "vectors.inc"

    .equ MAX_TRAPS, 16
    .equ TRAP_LOG,  0x40
    .equ TRAP_SIZE, 0x40

    .section .text.entry, "ax"
    .global _start
_start:
    mrs x0, CurrentEL
    REPORT 6, x0
    ubfx x0, x0, #2, #2
    cmp x0, #2
    b.eq 1f
    DONE #DONE_WRONG_EL

1:  LI x19, RESULT_BASE
    str xzr, [x19, #0]
    adr x0, el2_vectors
    msr vbar_el2, x0
    isb
    LI x1, PARAM_BASE               // flags bit 0: set HCR_EL2.HCD before the HVC
    ldr x1, [x1]
    mrs x2, hcr_el2
    tbz x1, #0, 7f
    orr x2, x2, #HCR_HCD
    msr hcr_el2, x2
    isb
    mrs x2, hcr_el2
7:  str x2, [x19, #0x08]
    REPORT 7, x2                    // a full exit to the VMM (KVM_EXIT_MMIO) between the two read-backs
    mrs x2, hcr_el2
    str x2, [x19, #0x10]

    LI x0, PSCI_VERSION
    .global hvc_insn
hvc_insn:
    hvc #0
    REPORT 0, x0

    ldr x1, [x19, #0]
    mov x2, #-1
    mov x3, #-1
    mov x4, #-1
    cbz x1, 2f
    cmp x1, #MAX_TRAPS
    mov x5, #MAX_TRAPS
    csel x1, x1, x5, ls
    sub x1, x1, #1
    add x5, x19, #TRAP_LOG
    add x5, x5, x1, lsl #6
    ldr x2, [x5, #0x08]
    ldr x3, [x5, #0x10]
    ldr x4, [x5, #0x00]
2:  REPORT 1, x2
    REPORT 2, x3
    REPORT 3, x4

    LI x0, PSCI_VERSION
    .global smc_insn
smc_insn:
    smc #0
    REPORT 4, x0

    ldr x1, [x19, #0]
    REPORT 5, x1
    DONE #DONE_OK

// ---- vector table: every entry saves x9..x14 on SP_EL2 and goes to trap_common with x9 = offset ----
    .pushsection .text.vectors, "ax"
    .balign 2048
    .global el2_vectors
el2_vectors:
    .irp off, 0x000, 0x080, 0x100, 0x180, 0x200, 0x280, 0x300, 0x380, 0x400, 0x480, 0x500, 0x580, 0x600, 0x680, 0x700, 0x780
    .balign 128
    stp x9, x10, [sp, #-16]!
    mov x9, #\off
    b trap_common
    .endr

trap_common:
    stp x11, x12, [sp, #-16]!
    stp x13, x14, [sp, #-16]!
    LI x10, RESULT_BASE
    ldr x11, [x10, #0]
    add x14, x11, #1
    str x14, [x10, #0]
    mov x12, #0                     // log entry pointer, 0 = not logged
    cmp x11, #MAX_TRAPS
    b.hs 1f
    add x12, x10, #TRAP_LOG
    add x12, x12, x11, lsl #6
    str x9, [x12, #0x00]
    mrs x13, esr_el2
    str x13, [x12, #0x08]
    mrs x13, elr_el2
    str x13, [x12, #0x10]
    mrs x13, far_el2
    str x13, [x12, #0x18]
    mrs x13, spsr_el2
    str x13, [x12, #0x20]
    str x0, [x12, #0x28]
    str xzr, [x12, #0x30]
    str xzr, [x12, #0x38]
1:  // an HVC on a synchronous vector: x0 = marker, return after the HVC (ELR_EL2 already points there)
    cmp x9, #0x200
    b.eq 2f
    cmp x9, #0x400
    b.ne fatal
2:  mrs x13, esr_el2
    lsr x14, x13, #26
    cmp x14, #EC_HVC64
    b.eq 4f
    // an UNDEF (EC 0) of hvc_insn itself on +0x200 (HCR_EL2.HCD effective): skip it, x0 = 0x0DEF0000
    cbnz x14, fatal
    cmp x9, #0x200
    b.ne fatal
    mrs x13, elr_el2
    adr x14, hvc_insn
    cmp x13, x14
    b.ne 6f
    add x13, x13, #4                // ELR = the HVC (the architectural UNDEF): step over it
    msr elr_el2, x13
    b 8f
6:  add x14, x14, #4                // ELR = after the HVC (KVM 7.3 injects it so): return there
    cmp x13, x14
    b.ne fatal
8:  LI x0, 0x0DEF0000
    b 5f
4:  and x0, x13, #0xffff
    movk x0, #0xE1E1, lsl #16
5:  cbz x12, 3f
    str x0, [x12, #0x30]
3:  ldp x13, x14, [sp], #16
    ldp x11, x12, [sp], #16
    ldp x9, x10, [sp], #16
    eret

fatal:
    mrs x10, esr_el2
    mrs x11, elr_el2
    mrs x12, far_el2
    mrs x13, spsr_el2
    REPORT FATAL_SLOT_VECTOR, x9
    REPORT FATAL_SLOT_ESR, x10
    REPORT FATAL_SLOT_ELR, x11
    REPORT FATAL_SLOT_FAR, x12
    REPORT FATAL_SLOT_SPSR, x13
    DONE #DONE_UNEXPECTED
    .popsection
