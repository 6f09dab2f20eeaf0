// sdei_calls.S - an SDEI client at EL1: runs a list of SDEI calls from the host and records what its
// event handlers saw (the VMM's SDEI dispatcher: harness/guest/sdei.py, harness/guest/sdei_run.py).
//
// Runs at: EL1 (the dispatcher enters handlers at the client's EL with DAIF masked).
// Parameter block at PARAM_BASE (u64): +0x00 n (<= 32), then entry i at +0x08 + i*0x38: [op, x0, x1, x2, x3, x4, x5]
//     op 0: smc #0 with x0..x5 (symbol sdei_smc)          op 1: hvc #0 with x0..x5 (symbol sdei_hvc)
//     op 2: like 0 with x2 = the address of handler number x2 (0..4, table below): EVENT_REGISTER
//     op 3: wait until the handler entry count >= x1: a REPORT store (slot 100) per spin, so the VMM gets
//           an exit to deliver at; at most x2 spins
//     op 4: like 0 with x2 = this PE's MPIDR_EL1 affinity (EVENT_SIGNAL to itself)
//     Before every call x6..x17 = 0x5EED0006..0x5EED0011 (COMPLETE must restore them).
// Result block at RESULT_BASE:
//     +0x00 magic "SDEI", +0x08 entries completed, +0x10 handler entry count
//     +0x40 + i*0x40  record i: x0, x1, x2, x3, x10, x17 after the call, +0x30 the entry count then
//     +0x800 resume target (COMPLETE_AND_RESUME): ELR_EL1, SPSR_EL1, CurrentEL, DAIF, +0x20 times taken
//     +0x1000 + k*0x80  handler entry k (< 16): x0 event, x1 argument, x2 interrupted PC, x3 interrupted PSTATE,
//        +0x20 CurrentEL, +0x28 DAIF, +0x30 SPSel, +0x38 EVENT_CONTEXT(0), +0x40 (1), +0x48 (2), +0x50 (17),
//        +0x58 handler number, +0x60 EVENT_STATUS(event), +0x68 the handler's own call result (h3, h4)
// Handlers (entered with x0..x3 = event, argument, interrupted PC, PSTATE; they use x0..x17 only):
//     h0 COMPLETE         h1 COMPLETE_AND_RESUME(sdei_resume)        h2 never completes (b .)
//     h3 first entry: EVENT_SIGNAL(0, self) (+0x68), then COMPLETE; later entries: COMPLETE
//     h4 EVENT_UNREGISTER(event) from inside (+0x68: PENDING), then COMPLETE
// A COMPLETE that returns (DENIED) ends the run with DONE 0xE5 and the x0 it got in handler +0x70.

    .include "common.inc"
    .include "vectors.inc"

    .equ MAX_ENTRIES, 32
    .equ ENTRY_SIZE, 0x38
    .equ REC_SIZE, 0x40
    .equ H_BASE, 0x1000
    .equ H_SIZE, 0x80
    .equ H_MAX, 16
    .equ RESUME_BASE, 0x800
    .equ SDEI_MAGIC, 0x49454453          // "SDEI"
    .equ SDEI_EVENT_CONTEXT, 0xC4000024
    .equ SDEI_EVENT_COMPLETE, 0xC4000025
    .equ SDEI_EVENT_COMPLETE_AND_RESUME, 0xC4000026
    .equ SDEI_EVENT_UNREGISTER, 0xC4000027
    .equ SDEI_EVENT_STATUS, 0xC4000028
    .equ SDEI_EVENT_SIGNAL, 0xC400002F
    .equ DONE_COMPLETE_RETURNED, 0xE5

.macro SEEDS
    .irp n, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17
    LI x\n, (0x5EED0000 + \n)
    .endr
.endm

    .section .text.entry, "ax"
    .global _start
_start:
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2
    LI x19, PARAM_BASE
    LI x20, RESULT_BASE
    LI x0, SDEI_MAGIC
    str x0, [x20]
    ldr x22, [x19]
    cmp x22, #MAX_ENTRIES
    b.hi bad_params
    mov x21, #0
next:
    cmp x21, x22
    b.hs finished
    mov x0, #ENTRY_SIZE
    madd x23, x21, x0, x19
    add x23, x23, #8
    mov x0, #REC_SIZE
    madd x24, x21, x0, x20
    add x24, x24, #0x40
    ldr x25, [x23]                  // op
    cmp x25, #3
    b.eq op_wait
    SEEDS
    ldp x0, x1, [x23, #8]
    ldp x2, x3, [x23, #24]
    ldp x4, x5, [x23, #40]
    cmp x25, #2
    b.ne 1f
    cmp x2, #4
    b.hi bad_params
    adr x26, handlers
    ldr x2, [x26, x2, lsl #3]
1:  cmp x25, #4
    b.ne 2f
    mrs x2, mpidr_el1
    LI x26, 0xFF00FFFFFF
    and x2, x2, x26
2:  cmp x25, #1
    b.eq 3f
    .global sdei_smc
sdei_smc:
    smc #0
    b record
3:
    .global sdei_hvc
sdei_hvc:
    hvc #0
record:
    stp x0, x1, [x24]
    stp x2, x3, [x24, #16]
    stp x10, x17, [x24, #32]
    ldr x26, [x20, #0x10]
    str x26, [x24, #0x30]
    add x21, x21, #1
    str x21, [x20, #8]
    b next

op_wait:
    ldr x27, [x23, #16]             // x1: the count to wait for
    ldr x28, [x23, #24]             // x2: max spins
    mov x26, #0
4:  ldr x25, [x20, #0x10]
    cmp x25, x27
    b.hs 5f
    cmp x26, x28
    b.hs 5f
    REPORT 100, x25, x18
    add x26, x26, #1
    b 4b
5:  str x25, [x24]
    str x26, [x24, #8]
    ldr x26, [x20, #0x10]
    str x26, [x24, #0x30]
    add x21, x21, #1
    str x21, [x20, #8]
    b next

finished:
    DONE #DONE_OK
bad_params:
    DONE #DONE_BAD_PARAMS

    .balign 8
handlers:
    .quad sdei_h0, sdei_h1, sdei_h2, sdei_h3, sdei_h4

// ---- handlers: x9 = this entry's record, x11 = its number k ---------------------------------------------
// H_ENTER hnum: count the entry, fill +0x00..+0x60 of the record (EVENT_CONTEXT and EVENT_STATUS over smc)
.macro H_ENTER hnum
    LI x10, RESULT_BASE
    ldr x11, [x10, #0x10]
    add x12, x11, #1
    str x12, [x10, #0x10]
    cmp x11, #H_MAX
    b.lo 10f
    mov x11, #(H_MAX - 1)
10: LI x12, (RESULT_BASE + H_BASE)
    mov x13, #H_SIZE
    madd x9, x11, x13, x12
    stp x0, x1, [x9]
    stp x2, x3, [x9, #16]
    mov x14, x0                     // the event number
    mrs x12, CurrentEL
    str x12, [x9, #0x20]
    mrs x12, daif
    str x12, [x9, #0x28]
    mrs x12, spsel
    str x12, [x9, #0x30]
    .irp n, 0, 1, 2, 17
    LI x0, SDEI_EVENT_CONTEXT
    mov x1, #\n
    smc #0
    .if \n == 17
    str x0, [x9, #0x50]
    .else
    str x0, [x9, #(0x38 + 8 * \n)]
    .endif
    .endr
    mov x12, #\hnum
    str x12, [x9, #0x58]
    LI x0, SDEI_EVENT_STATUS
    mov x1, x14
    smc #0
    str x0, [x9, #0x60]
.endm

.macro H_COMPLETE
    LI x0, SDEI_EVENT_COMPLETE
    mov x1, #0
    smc #0
    str x0, [x9, #0x70]             // only if COMPLETE returned (DENIED)
    DONE #DONE_COMPLETE_RETURNED
.endm

    .balign 4
    .global sdei_h0
sdei_h0:
    H_ENTER 0
    H_COMPLETE

    .global sdei_h1
sdei_h1:
    H_ENTER 1
    LI x0, SDEI_EVENT_COMPLETE_AND_RESUME
    adr x1, sdei_resume
    smc #0
    str x0, [x9, #0x70]
    DONE #DONE_COMPLETE_RETURNED

    .global sdei_h2
sdei_h2:
    H_ENTER 2
    .global sdei_h2_spin
sdei_h2_spin:
    b sdei_h2_spin

    .global sdei_h3
sdei_h3:
    H_ENTER 3
    cbnz x11, 11f
    LI x0, SDEI_EVENT_SIGNAL
    mov x1, #0
    mrs x2, mpidr_el1
    LI x12, 0xFF00FFFFFF
    and x2, x2, x12
    smc #0
    str x0, [x9, #0x68]
11: H_COMPLETE

    .global sdei_h4
sdei_h4:
    H_ENTER 4
    LI x0, SDEI_EVENT_UNREGISTER
    mov x1, x14
    smc #0
    str x0, [x9, #0x68]
    H_COMPLETE

// ---- the resume target of COMPLETE_AND_RESUME: an IRQ-vector stand-in (x18, x29 are its scratch) --------
    .balign 4
    .global sdei_resume
sdei_resume:
    LI x18, (RESULT_BASE + RESUME_BASE)
    mrs x29, elr_el1
    str x29, [x18]
    mrs x29, spsr_el1
    str x29, [x18, #8]
    mrs x29, CurrentEL
    str x29, [x18, #16]
    mrs x29, daif
    str x29, [x18, #24]
    ldr x29, [x18, #32]
    add x29, x29, #1
    str x29, [x18, #32]
    eret

    FATAL_VECTORS fatal_el1, 1
    FATAL_VECTORS fatal_el2, 2
