// el2_guest_hyp.S - a tiny guest hypervisor at vEL2 that runs its own EL1 guest (stage 2 off), to
// observe how NV KVM routes the inner guest's HVC and SMC.  Needs a HAS_EL2 vCPU (VHE, E2H=1); at EL1
// it ends with DONE 0xE4 (report slot 0 = CurrentEL).  Also works in a HAS_EL2_E2H0 (nVHE) vCPU: E2H is
// taken from HCR_EL2 at reset (never set by this payload: under NV2 a written E2H=1 reads back as 1 even
// where it is RES0), and when it is 0 the inner EL1 registers are set through the *_EL1 names.
//
// Parameter block at PARAM_BASE: u64 flags (harness.payloads.encode_guest_hyp_params)
//     bit0 TSC        set HCR_EL2.TSC: the inner guest's SMCs trap to this hypervisor (EC 0x17)
//     bit1 HCD        set HCR_EL2.HCD: HVC disabled (RES0 — no effect — while KVM advertises EL3 to the
//                     guest; effective after the VMM clears ID_AA64PFR0_EL1.EL3: then the inner HVC is an
//                     UNDEF taken to the inner EL1 vector)
//     bit2 PROXY      an inner HVC whose w0 is a PSCI id (0x840000xx/0xC40000xx, xx < 0x20) is re-issued by
//                     the hypervisor as `smc #0` at vEL2 (symbol l1_proxy_smc) with the inner x0..x3; the
//                     reply x0..x3 goes back to the inner guest
//     bit3 PROXY_SMC  the same for inner SMCs trapped by TSC
//
// Guest hypervisor (L1, vEL2) setup: VBAR_EL2 = l1_vectors; HCR_EL2 = RW (+TSC/HCD) plus E2H as found at
// reset (1 in a HAS_EL2 vCPU, 0 with HAS_EL2_E2H0), i.e. TGE=0 and VM=0 (no stage 2);
// SCTLR_EL12 = 0x30D00800 (MMU and caches off); VBAR_EL12 = inner_vectors (the *_EL1 names with E2H=0);
// SP_EL1 = top of a 1 KiB stack in .bss; SPSR_EL2 = 0x3c5 (EL1h, DAIF masked); ELR_EL2 = inner_entry; ERET.
//
// Inner guest (L2, EL1):
//     x0 = PSCI_VERSION; hvc #0 (symbol inner_hvc)           -> header +0x20 <- x0 after
//     x0 = PSCI_VERSION; smc #0 (symbol inner_smc)           -> header +0x28 <- x0 after
//     x0 = 0; hvc #0xffff (symbol inner_exit_hvc): "exit to L1"; L1 ends the run with DONE 0.
//     If that HVC returns (it was an UNDEF, HCD), the inner guest ends the run itself (DONE 0 from EL1).
//   Inner EL1 vector (VBAR_EL12+0x200, sync current EL): EC 0 (UNDEF) -> logged, ELR_EL1 += 4,
//   x0 = 0x0DEF0000, ERET; anything else: DONE 0xE1 with report slots 504..508 (EL1 registers).
//
// L1 sync handler for lower-EL exceptions (VBAR_EL2+0x400) logs every trap, then:
//     EC 0x16 HVC64, imm 0xffff: exit: header +0x30 = 1, REPORT slots 0..3, DONE 0
//     EC 0x16 HVC64, otherwise: PROXY and PSCI id -> proxy (action 2); else x0 = 0xE1E10000 | imm16 (action 1);
//                   ERET (ELR_EL2 already points after the HVC)
//     EC 0x17 SMC64 (TSC): ELR_EL2 += 4 (a trapped SMC's ELR is the SMC itself); PROXY_SMC and PSCI id
//                   -> proxy (action 4); else x0 = 0x5C5C0000 | imm16 (action 3); ERET
//     anything else: action 0xE1, DONE 0xE1 with report slots 504..508 (EL2 registers)
//   Only x0 (marker) or x0..x3 (proxy) change in the inner guest's registers (after a proxied call,
//   x13..x17 are whatever the VMM left in them: SMCCC 1.2 replies may use them).
//   Exceptions at vEL2 itself, and all other vectors: DONE 0xE1 with report slots 504..508.
//
// Report slots written at the end (either path): 0 <- x0 after inner_hvc, 1 <- x0 after inner_smc,
//   2 <- number of L1 traps, 3 <- exit path.
//
// Result block at RESULT_BASE (harness.payloads.decode_guest_hyp), zeroed at start:
//   header:
//     +0x00  CurrentEL at entry (raw; 0x8)        +0x08  HCR_EL2 read back after the write
//     +0x10  flags (copied from the parameters)   +0x18  number of traps taken by L1 (lower EL, sync)
//     +0x20  inner x0 after inner_hvc             +0x28  inner x0 after inner_smc
//     +0x30  exit path: 1 = L1 saw hvc #0xffff, 2 = the inner guest ended the run itself
//     +0x38  number of exceptions taken by the inner EL1 vector
//   L1 trap log, entry k < 16 at +0x40 + k*0x40:
//     +0x00 vector offset (0x400)  +0x08 ESR_EL2  +0x10 ELR_EL2 (as taken)  +0x18 SPSR_EL2
//     +0x20 x0 at the trap  +0x28 x0 returned  +0x30 action (1 HVC marker, 2 HVC proxied, 3 SMC marker,
//     4 SMC proxied, 5 exit, 0xE1 unexpected)  +0x38 FAR_EL2
//   inner EL1 exception log, entry k < 4 at +0x440 + k*0x20:
//     +0x00 vector offset (0x200)  +0x08 ESR_EL1  +0x10 ELR_EL1 (as taken)  +0x18 x0 returned
//   Size: 0x4C0 bytes.

    .include "common.inc"
    .include "vectors.inc"

    .equ GH_FLAGS,      0x10
    .equ GH_NTRAPS,     0x18
    .equ GH_X0_HVC,     0x20
    .equ GH_X0_SMC,     0x28
    .equ GH_EXIT_PATH,  0x30
    .equ GH_NINNER,     0x38
    .equ GH_TRAP_LOG,   0x40
    .equ GH_MAX_TRAPS,  16
    .equ GH_INNER_LOG,  0x440
    .equ GH_MAX_INNER,  4
    .equ GH_RESULT_SIZE, 0x4C0

    .equ FLAG_TSC_BIT,       0
    .equ FLAG_HCD_BIT,       1
    .equ FLAG_PROXY_BIT,     2
    .equ FLAG_PROXY_SMC_BIT, 3

    .equ ACT_HVC_MARKER, 1
    .equ ACT_HVC_PROXY,  2
    .equ ACT_SMC_MARKER, 3
    .equ ACT_SMC_PROXY,  4
    .equ ACT_EXIT,       5
    .equ ACT_FATAL,      0xE1

    .equ SCTLR_EL1_MMU_OFF, 0x30D00800
    .equ SPSR_EL1H_DAIF,    0x3c5

    .section .text.entry, "ax"
    .global _start
_start:
    mrs x0, CurrentEL
    ubfx x1, x0, #2, #2
    cmp x1, #2
    b.eq 1f
    REPORT 0, x0
    DONE #DONE_WRONG_EL

1:  LI x19, RESULT_BASE
    mov x1, x19
    add x2, x19, #GH_RESULT_SIZE
2:  stp xzr, xzr, [x1], #16
    cmp x1, x2
    b.lo 2b
    str x0, [x19, #0x00]

    adr x0, l1_vectors
    msr vbar_el2, x0
    isb

    LI x20, PARAM_BASE
    ldr x21, [x20]
    str x21, [x19, #GH_FLAGS]
    // E2H: keep the reset value's.  With HAS_EL2_E2H0 it is RES0, yet under NV2 HCR_EL2 lives in the
    // VNCR page, so a written E2H=1 reads back as 1 while the *_EL12 names UNDEF: never set it ourselves.
    mrs x0, hcr_el2
    and x0, x0, #HCR_E2H
    orr x0, x0, #HCR_RW
    tbz x21, #FLAG_TSC_BIT, 3f
    orr x0, x0, #HCR_TSC
3:  tbz x21, #FLAG_HCD_BIT, 4f
    orr x0, x0, #HCR_HCD
4:  msr hcr_el2, x0
    isb
    mrs x1, hcr_el2
    str x1, [x19, #0x08]

    // the inner EL1 context: *_EL12 names with E2H=1 (VHE); with E2H=0 (a HAS_EL2_E2H0 vCPU, where E2H is
    // RES0) the *_EL12 encodings UNDEF and the plain *_EL1 names reach the EL1 registers instead
    LI x0, SCTLR_EL1_MMU_OFF
    adr x2, inner_vectors
    tbz x1, #34, 5f
    msr sctlr_el12, x0
    msr vbar_el12, x2
    b 6f
5:  msr sctlr_el1, x0
    msr vbar_el1, x2
6:  adr x0, inner_stack_top
    msr sp_el1, x0
    mov x0, #SPSR_EL1H_DAIF
    msr spsr_el2, x0
    adr x0, inner_entry
    msr elr_el2, x0
    isb
    eret

// ---- the inner guest (EL1) ---------------------------------------------------------------------------
    .global inner_entry
inner_entry:
    LI x19, RESULT_BASE
    LI x0, PSCI_VERSION
    .global inner_hvc
inner_hvc:
    hvc #0
    str x0, [x19, #GH_X0_HVC]
    LI x0, PSCI_VERSION
    .global inner_smc
inner_smc:
    smc #0
    str x0, [x19, #GH_X0_SMC]
    mov x0, #0
    .global inner_exit_hvc
inner_exit_hvc:
    hvc #0xffff
    // only reached when the exit HVC did not reach L1 (UNDEF handled by inner_sync)
    mov x1, #2
    str x1, [x19, #GH_EXIT_PATH]
    mov x4, x19
    bl report_summary
    DONE #DONE_OK

// report_summary: x4 = RESULT_BASE; REPORT slots 0..3.  Clobbers x5, x17.
report_summary:
    ldr x5, [x4, #GH_X0_HVC]
    REPORT 0, x5
    ldr x5, [x4, #GH_X0_SMC]
    REPORT 1, x5
    ldr x5, [x4, #GH_NTRAPS]
    REPORT 2, x5
    ldr x5, [x4, #GH_EXIT_PATH]
    REPORT 3, x5
    ret

// inner EL1 sync exception from the current EL: log; UNDEF -> skip it with x0 = 0x0DEF0000; else fatal.
inner_sync:
    stp x9, x10, [sp, #-16]!
    stp x11, x12, [sp, #-16]!
    LI x9, RESULT_BASE
    ldr x10, [x9, #GH_NINNER]
    add x11, x10, #1
    str x11, [x9, #GH_NINNER]
    mov x12, #0
    cmp x10, #GH_MAX_INNER
    b.hs 1f
    add x12, x9, #GH_INNER_LOG
    add x12, x12, x10, lsl #5
    mov x11, #0x200
    str x11, [x12, #0x00]
    mrs x11, esr_el1
    str x11, [x12, #0x08]
    mrs x11, elr_el1
    str x11, [x12, #0x10]
1:  mrs x11, esr_el1
    ubfx x11, x11, #26, #6
    cmp x11, #EC_UNKNOWN
    b.ne 2f
    mrs x11, elr_el1
    add x11, x11, #4
    msr elr_el1, x11
    LI x0, 0x0DEF0000
    cbz x12, 3f
    str x0, [x12, #0x18]
3:  ldp x11, x12, [sp], #16
    ldp x9, x10, [sp], #16
    eret
2:  mov x9, #0x200
    b inner_vectors_common

// IS_PSCI_ID: x8 = 1 if w0 is a PSCI function id (0x84000000..0x8400001F or 0xC4000000..0xC400001F),
// else 0.  Clobbers x9.  (A macro, not a function: the handler must not touch the inner guest's x30.)
.macro IS_PSCI_ID
    LI x8, 0xBFFFFFE0
    and w8, w0, w8
    LI x9, PSCI_VERSION
    cmp w8, w9
    cset x8, eq
.endm

// ---- the guest hypervisor's trap handler (vEL2, lower EL AArch64 sync) ---------------------------------
// frame on SP_EL2: [sp+0] x1,x2  [16] x3,x4  [32] x5,x6  [48] x7,x8  [64] x9,x10  [80] x11,x12
l1_sync_lower:
    sub sp, sp, #96
    stp x1, x2, [sp, #0]
    stp x3, x4, [sp, #16]
    stp x5, x6, [sp, #32]
    stp x7, x8, [sp, #48]
    stp x9, x10, [sp, #64]
    stp x11, x12, [sp, #80]
    LI x4, RESULT_BASE
    ldr x5, [x4, #GH_NTRAPS]
    add x6, x5, #1
    str x6, [x4, #GH_NTRAPS]
    mov x7, #0                      // log entry (0: log full)
    cmp x5, #GH_MAX_TRAPS
    b.hs 1f
    add x7, x4, #GH_TRAP_LOG
    add x7, x7, x5, lsl #6
    mov x8, #0x400
    str x8, [x7, #0x00]
    mrs x8, esr_el2
    str x8, [x7, #0x08]
    mrs x8, elr_el2
    str x8, [x7, #0x10]
    mrs x8, spsr_el2
    str x8, [x7, #0x18]
    str x0, [x7, #0x20]
    mrs x8, far_el2
    str x8, [x7, #0x38]
1:  mrs x8, esr_el2
    ubfx x9, x8, #26, #6            // EC
    and x10, x8, #0xffff            // imm16
    ldr x11, [x4, #GH_FLAGS]
    cmp x9, #EC_HVC64
    b.eq l1_hvc
    cmp x9, #EC_SMC64
    b.eq l1_smc
    mov x12, #ACT_FATAL
    cbz x7, 2f
    str x12, [x7, #0x30]
2:  mov x9, #0x400
    b l1_vectors_common

l1_hvc:
    mov x12, #0xffff
    cmp x10, x12
    b.eq l1_exit
    tbz x11, #FLAG_PROXY_BIT, 1f
    IS_PSCI_ID
    cbz x8, 1f
    mov x12, #ACT_HVC_PROXY
    b l1_proxy
1:  mov x0, x10
    movk x0, #0xE1E1, lsl #16
    mov x12, #ACT_HVC_MARKER
    b l1_return

l1_smc:
    mrs x8, elr_el2
    add x8, x8, #4
    msr elr_el2, x8
    tbz x11, #FLAG_PROXY_SMC_BIT, 1f
    IS_PSCI_ID
    cbz x8, 1f
    mov x12, #ACT_SMC_PROXY
    b l1_proxy
1:  mov x0, x10
    movk x0, #0x5C5C, lsl #16
    mov x12, #ACT_SMC_MARKER
    b l1_return

// re-issue the inner call as SMC #0 from vEL2 with the inner x0..x3; the reply x0..x3 goes back.
l1_proxy:
    stp x7, x12, [sp, #-16]!
    ldp x1, x2, [sp, #16]
    ldr x3, [sp, #32]
    .global l1_proxy_smc
l1_proxy_smc:
    smc #0
    ldp x7, x12, [sp], #16
    stp x1, x2, [sp, #0]
    str x3, [sp, #16]
    // fall through

// x7 = log entry or 0, x12 = action; x0 (and the saved x1..x3) hold what the inner guest gets.
l1_return:
    cbz x7, 1f
    str x0, [x7, #0x28]
    str x12, [x7, #0x30]
1:  ldp x1, x2, [sp, #0]
    ldp x3, x4, [sp, #16]
    ldp x5, x6, [sp, #32]
    ldp x7, x8, [sp, #48]
    ldp x9, x10, [sp, #64]
    ldp x11, x12, [sp, #80]
    add sp, sp, #96
    eret

l1_exit:
    mov x12, #ACT_EXIT
    cbz x7, 1f
    str x12, [x7, #0x30]
1:  mov x5, #1
    str x5, [x4, #GH_EXIT_PATH]
    bl report_summary
    DONE #DONE_OK


    FATAL_VECTORS l1_vectors, 2, sync_lower=l1_sync_lower
    FATAL_VECTORS inner_vectors, 1, sync_cur=inner_sync

    .section .bss
    .balign 16
inner_stack:
    .space 1024
inner_stack_top:
