// smccc_calls.S - the "call table" interpreter: issue a list of SMCCC calls given by the host and record
// every GPR after each call.  Runs at EL1 or at vEL2 (HAS_EL2 vCPU).  Single vCPU.
//
// Parameter block at PARAM_BASE (u64 little-endian; harness.payloads.encode_call_table):
//     +0                 count n (0 <= n <= MAX_CALLS = 63; larger -> DONE 0xE2)
//     +8 + i*160         entry i, 20 u64: [0] conduit index, [1..18] x0..x17, [19] reserved (0)
// Conduit index -> instruction (each has a global symbol, so the host knows the exit PC = symbol + 4):
//     0 call_hvc0     hvc #0          3 call_smc1     smc #1
//     1 call_smc0     smc #0          4 call_hvcffff  hvc #0xffff
//     2 call_hvc1     hvc #1          5 call_smcffff  smc #0xffff
// An index > 5 ends the run with DONE 0xE2 (header +0x10 tells which call).
//
// For call i: x18..x30 are set to PATTERN(i, n) = (i << 16) | 0x1800 | n  (e.g. x18 = 0x1812 for call 0,
// x30 = 0x1181e for call 1), x0..x17 are loaded from the entry, the instruction runs, and then
// x0..x30 and SP are stored.  Nothing but the instruction runs between the load and the store.
//
// Result block at RESULT_BASE (harness.payloads.decode_call_results):
//   header, 64 bytes:
//     +0x00  CurrentEL (raw: 0x4 = EL1, 0x8 = EL2)
//     +0x08  HCR_EL2 as read at start when at EL2, else 0
//     +0x10  calls completed (updated after each call)
//     +0x18  count n read from the parameter block
//     +0x20  SP at entry (the value the VMM set)
//     +0x28  0 (reserved), +0x30 0 (reserved), +0x38 magic 0x534d434343414c4c ("SMCCCALL" as a u64)
//   record i at +0x40 + i*0x100 (256 bytes):
//     +0x00 + 8*k  xk after the call, k = 0..30
//     +0xF8        SP after the call (= SP at entry - 32: the payload keeps a 32-byte frame)
// Total size: 64 + 256*n bytes (at most 16192).
//
// Exceptions: at vEL2 an HVC is taken to the payload's own VBAR_EL2+0x200 (NV KVM never forwards HVC from
// a nested guest); that handler sets x0 = 0xE1E10000 | imm16 and returns after the HVC, leaving all
// other registers alone, so the record shows it.  Any other exception: DONE 0xE1 with report slots
// 504..508 = vector offset, ESR, ELR, FAR, SPSR (vectors.inc).
// The VMM should see: one KVM_EXIT_HYPERCALL per forwarded call (PC = call_* + 4), then DONE 0.

    .include "common.inc"
    .include "vectors.inc"

    .equ MAX_CALLS,     63
    .equ ENTRY_SIZE,    160
    .equ RECORD_SIZE,   256
    .equ HEADER_SIZE,   64
    .equ RESULT_MAGIC,  0x534d434343414c4c
    .equ SLOT_SHIFT,    6       // each call slot is 64 bytes
    .equ N_CONDUITS,    6

    .section .text.entry, "ax"
    .global _start
_start:
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2

    LI x20, RESULT_BASE
    mrs x0, CurrentEL
    str x0, [x20, #0x00]
    mov x1, #0
    ubfx x2, x0, #2, #2
    cmp x2, #2
    b.ne 1f
    mrs x1, hcr_el2
1:  str x1, [x20, #0x08]
    str xzr, [x20, #0x10]
    LI x21, PARAM_BASE
    ldr x22, [x21]
    str x22, [x20, #0x18]
    mov x3, sp
    str x3, [x20, #0x20]
    str xzr, [x20, #0x28]
    str xzr, [x20, #0x30]
    LI x4, RESULT_MAGIC
    str x4, [x20, #0x38]
    cmp x22, #MAX_CALLS
    b.hi bad_params

    // frame: [sp+0] entry pointer, [sp+8] record pointer, [sp+16] count, [sp+24] index
    sub sp, sp, #32
    add x0, x21, #8
    add x1, x20, #HEADER_SIZE
    stp x0, x1, [sp, #0]
    stp x22, xzr, [sp, #16]

next_call:
    ldp x2, x3, [sp, #16]
    cmp x3, x2
    b.hs all_done
    ldr x17, [sp, #0]
    ldr x1, [x17]
    cmp x1, #N_CONDUITS
    b.hs bad_params
    // x18..x30 = (i << 16) | 0x1800 | n
    lsl x30, x3, #16
    mov x16, #0x1800
    orr x30, x30, x16
    add x18, x30, #18
    add x19, x30, #19
    add x20, x30, #20
    add x21, x30, #21
    add x22, x30, #22
    add x23, x30, #23
    add x24, x30, #24
    add x25, x30, #25
    add x26, x30, #26
    add x27, x30, #27
    add x28, x30, #28
    add x29, x30, #29
    add x30, x30, #30
    adr x16, call_slots
    add x16, x16, x1, lsl #SLOT_SHIFT
    br x16

// CALL_SLOT sym, op, imm: load x0..x17 from the entry at x17, run `op #imm` (symbol `sym`), record.
.macro CALL_SLOT sym, op, imm
    .balign (1 << SLOT_SHIFT)
    ldp x0, x1, [x17, #8]
    ldp x2, x3, [x17, #24]
    ldp x4, x5, [x17, #40]
    ldp x6, x7, [x17, #56]
    ldp x8, x9, [x17, #72]
    ldp x10, x11, [x17, #88]
    ldp x12, x13, [x17, #104]
    ldp x14, x15, [x17, #120]
    ldr x16, [x17, #136]
    ldr x17, [x17, #144]
    .global \sym
\sym:
    \op #\imm
    b after_call
.endm

    .balign (1 << SLOT_SHIFT)
call_slots:
    CALL_SLOT call_hvc0, hvc, 0
    CALL_SLOT call_smc0, smc, 0
    CALL_SLOT call_hvc1, hvc, 1
    CALL_SLOT call_smc1, smc, 1
    CALL_SLOT call_hvcffff, hvc, 0xffff
    CALL_SLOT call_smcffff, smc, 0xffff

after_call:
    sub sp, sp, #16
    stp x0, x1, [sp]
    ldr x0, [sp, #(16 + 8)]
    stp x2, x3, [x0, #16]
    stp x4, x5, [x0, #32]
    stp x6, x7, [x0, #48]
    stp x8, x9, [x0, #64]
    stp x10, x11, [x0, #80]
    stp x12, x13, [x0, #96]
    stp x14, x15, [x0, #112]
    stp x16, x17, [x0, #128]
    stp x18, x19, [x0, #144]
    stp x20, x21, [x0, #160]
    stp x22, x23, [x0, #176]
    stp x24, x25, [x0, #192]
    stp x26, x27, [x0, #208]
    stp x28, x29, [x0, #224]
    str x30, [x0, #240]
    ldp x2, x3, [sp]
    stp x2, x3, [x0, #0]
    add sp, sp, #16
    mov x1, sp
    str x1, [x0, #248]
    ldp x2, x3, [sp, #0]
    add x2, x2, #ENTRY_SIZE
    add x3, x3, #RECORD_SIZE
    stp x2, x3, [sp, #0]
    ldr x5, [sp, #24]
    add x5, x5, #1
    str x5, [sp, #24]
    LI x6, RESULT_BASE
    str x5, [x6, #0x10]
    b next_call

all_done:
    add sp, sp, #32
    DONE #DONE_OK

bad_params:
    DONE #DONE_BAD_PARAMS

// vEL2: HVC taken to our own vector -> x0 = 0xE1E10000 | imm16, return after the HVC.  Only x0 and
// NZCV change, and ERET restores NZCV from SPSR_EL2.
el2_sync_cur:
    mrs x0, esr_el2
    lsr x0, x0, #26
    cmp x0, #EC_HVC64
    b.ne 1f
    mrs x0, esr_el2
    and x0, x0, #0xffff
    movk x0, #0xE1E1, lsl #16
    eret
1:  mov x9, #0x200
    b fatal_el2_common

    FATAL_VECTORS fatal_el1, 1
    FATAL_VECTORS fatal_el2, 2, sync_cur=el2_sync_cur
