// psci_smp.S - a PSCI program for several vCPUs: the boot vCPU runs a list of PSCI calls given by the host,
// secondaries started with CPU_ON record how they arrived and then do what the host asked.
// Runs at EL1 (HVC or SMC conduit) or at vEL2 (SMC conduit).  Used by the PSCI tests and the
// in-kernel-vs-userspace differential (harness.payloads.encode_psci_program / decode_psci_smp).
//
// Parameter block at PARAM_BASE (u64):
//     +0x00  n, the number of program entries (<= MAX_ENTRIES = 48)
//     +0x08  secondary action: 0 park (stay ON, wfe loop), 1 CPU_OFF over the secondary conduit, 2 DONE,
//            3 CPU_ON64(target MPIDR at +0x18, entry secondary_entry, context id 0x3ACE) then park
//     +0x10  secondary conduit: 0 hvc #0, 1 smc #0
//     +0x18  target MPIDR for action 3
//     +0x20 + i*0x40  entry i: [op, x0, x1, x2, x3, arg, max_iter, 0]
//        op 0: hvc #0 with x0..x3 (symbol psci_hvc)       op 1: smc #0 (symbol psci_smc)
//        op 2: like 0, repeated until x0 == arg or max_iter calls      op 3: the same over smc
//        op 4: wait until secondary number x1 (MPIDR.Aff0) has arrived x2 times (max_iter spins);
//              the record's x0 is the arrival count seen
//        op 5: wait until secondary number x1 has finished its action (+0x38 != 0; max_iter spins)
// Result block at RESULT_BASE:
//     +0x00 magic "PSCISMP", +0x08 entries completed, +0x10 CurrentEL (raw) of the boot vCPU
//     +0x40 + i*0x40  record i: x0, x1, x2, x3 after the call, +0x20 number of calls/spins made
//     +0x1000 + k*0x40  secondary k (Aff0 = k): +0x00 magic 0x5EC0ED, +0x08 x0 at entry (the context id),
//        +0x10 CurrentEL (raw), +0x18 MPIDR_EL1, +0x20 x0 returned by its action's call (CPU_OFF only
//        if it returned), +0x28 SPSel, +0x30 arrivals (incremented on every entry, written last),
//        +0x38 action finished (1)
// Registers: the program keeps its state in x19..x28 (SMCCC preserves x18..x30 across calls).

    .include "common.inc"
    .include "vectors.inc"

    .equ MAX_ENTRIES,   48
    .equ ENTRY_SIZE,    0x40
    .equ SEC_BASE,      0x1000
    .equ SMP_MAGIC,     0x00504d5349435350      // "PSCISMP"
    .equ SEC_MAGIC,     0x5EC0ED

    .section .text.entry, "ax"
    .global _start
_start:
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2
    LI x20, RESULT_BASE
    LI x0, SMP_MAGIC
    str x0, [x20, #0x00]
    str xzr, [x20, #0x08]
    mrs x0, CurrentEL
    str x0, [x20, #0x10]
    LI x21, PARAM_BASE
    ldr x22, [x21]
    cmp x22, #MAX_ENTRIES
    b.hi bad_params
    mov x23, #0                     // i
    add x24, x21, #0x20             // entry pointer
    add x25, x20, #0x40             // record pointer

next_entry:
    cmp x23, x22
    b.hs all_done
    ldr x19, [x24, #0x00]           // op
    ldr x26, [x24, #0x28]           // arg (expected x0 for polls)
    ldr x27, [x24, #0x30]           // max_iter
    mov x28, #0
    cmp x19, #4
    b.eq wait_secondary
    cmp x19, #5
    b.eq wait_action
    b.hi bad_params
call_again:
    add x28, x28, #1
    // x4..x15 carry a known pattern into every call: SMCCC (DEN0028, "Register use in AArch64 SMC and HVC
    // calls") has the callee preserve x4-x17, so the VMM's state after the call must still show it
    // (tests/system/test_psci_el1.py, CPU_SUSPEND).
    .irp n, 4,5,6,7,8,9,10,11,12,13,14,15
    movz x\n, #0x5eed, lsl #16
    movk x\n, #\n
    .endr
    ldp x0, x1, [x24, #0x08]
    ldp x2, x3, [x24, #0x18]
    tst x19, #1
    b.ne 1f
    .global psci_hvc
psci_hvc:
    hvc #0
    b 2f
1:
    .global psci_smc
psci_smc:
    smc #0
2:  cmp x19, #2
    b.lo record
    cmp x0, x26
    b.eq record
    cmp x28, x27
    b.lo call_again
record:
    stp x0, x1, [x25, #0x00]
    stp x2, x3, [x25, #0x10]
    str x28, [x25, #0x20]
    add x23, x23, #1
    str x23, [x20, #0x08]
    add x24, x24, #ENTRY_SIZE
    add x25, x25, #ENTRY_SIZE
    b next_entry

wait_secondary:
    ldr x10, [x24, #0x10]           // x1 field: secondary number
    ldr x11, [x24, #0x18]           // x2 field: arrivals to wait for
    LI x12, (RESULT_BASE + SEC_BASE)
    add x12, x12, x10, lsl #6
3:  add x28, x28, #1
    ldr x13, [x12, #0x30]
    cmp x13, x11
    b.hs 4f
    cmp x28, x27
    b.lo 3b
4:  mov x0, x13
    mov x1, #0
    mov x2, #0
    mov x3, #0
    b record

wait_action:
    ldr x10, [x24, #0x10]
    LI x12, (RESULT_BASE + SEC_BASE)
    add x12, x12, x10, lsl #6
5:  add x28, x28, #1
    ldr x13, [x12, #0x38]
    cbnz x13, 4b
    cmp x28, x27
    b.lo 5b
    b 4b

all_done:
    DONE #DONE_OK

bad_params:
    DONE #DONE_BAD_PARAMS

// ---- secondaries: entered from CPU_ON with x0 = context id, MMU off, at the caller's EL ----------
    .global secondary_entry
secondary_entry:
    mov x19, x0
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2
    mrs x20, mpidr_el1
    and x21, x20, #0xff
    LI x22, (RESULT_BASE + SEC_BASE)
    add x22, x22, x21, lsl #6
    ldr x23, [x22, #0x30]
    add x23, x23, #1
    LI x24, SEC_MAGIC
    str x24, [x22, #0x00]
    str x19, [x22, #0x08]
    mrs x25, CurrentEL
    str x25, [x22, #0x10]
    str x20, [x22, #0x18]
    mrs x26, SPSel
    str x26, [x22, #0x28]
    dmb sy
    str x23, [x22, #0x30]
    dmb sy
    LI x1, PARAM_BASE
    ldr x2, [x1, #0x08]
    cbz x2, park
    cmp x2, #1
    b.eq cpu_off
    cmp x2, #3
    b.eq cpu_on_other
    DONE #DONE_OK
cpu_on_other:
    ldr x3, [x1, #0x10]
    ldr x4, [x1, #0x18]
    LI x0, PSCI_CPU_ON64
    mov x1, x4
    adr x2, secondary_entry
    mov x3, #0x3ACE
    LI x9, PARAM_BASE
    ldr x9, [x9, #0x10]
    cbnz x9, 7f
    hvc #0
    b 8f
7:  smc #0
8:  str x0, [x22, #0x20]
    mov x0, #1
    str x0, [x22, #0x38]
    b park
cpu_off:
    ldr x3, [x1, #0x10]
    LI x0, PSCI_CPU_OFF
    cbnz x3, 5f
    .global secondary_hvc
secondary_hvc:
    hvc #0
    b 6f
5:
    .global secondary_smc
secondary_smc:
    smc #0
6:  str x0, [x22, #0x20]            // CPU_OFF returned: an error
park:
    wfe
    b park

    FATAL_VECTORS fatal_el1, 1
    FATAL_VECTORS fatal_el2, 2
