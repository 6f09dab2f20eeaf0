// psci_fuzz.S - an interpreter of generated multi-vCPU PSCI programs (tests/system/test_psci_fuzz.py).
// The host encodes a program (harness/model/psci_fuzz.py encode) into the parameter block; every vCPU - the
// boot vCPU at _start and each secondary at whichever entry pad CPU_ON sent it to - records how it arrived,
// then executes the program's steps that belong to it, in the program's global order.  No new assembly per
// generated program.  Runs at EL1 (HVC or SMC) and at vEL2 (SMC).  No stack is used: CPU_ON's reset (in-kernel)
// and the VMM's re-INIT (forwarded) leave SP_ELx unknown.
//
// Parameter block at PARAM_BASE (u64):
//     +0x00 magic "PSCIFUZ1"   +0x08 number of vCPUs (1..MAX_CPUS)   +0x10 number of steps (<= MAX_STEPS)
//     +0x18 bits [31:0]: CNTV_TVAL ticks armed before a step with F_ARM_TIMER (it wakes an in-kernel
//           CPU_SUSPEND; 0 = CNTFRQ_EL0 / 1024, ~1 ms).  Not much less: without an in-kernel irqchip KVM's WFI
//           wakes only when the timer's level differs from the one last reported to userspace
//           (arch/arm64/kvm/arm.c:855-863); a timer that fires before the HVC is reported by the exit it causes
//           (KVM_EXIT_INTR, arm.c:1231-1236) and the WFI then sleeps until the run's deadline (at EL1);
//           bit 32: a vCPU with nothing to do sleeps in WFIT (~0.5 ms, CNTFRQ_EL0 / 2048) when
//           ID_AA64ISAR2_EL1.WFxT says it can, instead of spinning on WFE (a trapped WFE only yields: on a
//           1-CPU TCG host every waiting vCPU would take its share of the CPU from the one with work);
//           bit 33: at vEL2, enable the in-kernel vGICv3's PPIs (GICD_CTLR, the vCPU's GICR_ISENABLER0, ICC_PMR_EL1)
//           so that a firing timer is a pending interrupt that wakes KVM's WFI (vgic.c kvm_vgic_vcpu_pending_irq);
//           DAIF stays masked: the interrupt is never taken
//     +0x20 + 8*k  MPIDR_EL1 the VMM set on vCPU k (a secondary finds its index by MPIDR_EL1 & 0xFF00FFFFFF)
//     +0x40 + s*0x40  step s: +0x00 owner vCPU index, +0x08 op | flags << 8, +0x10..+0x28 x0..x3,
//                     +0x30 poll: the x0 to wait for, +0x38 poll: at most this many calls
//        op 0: hvc #0 (symbol fuzz_hvc)  op 1: smc #0 (symbol fuzz_smc)  op 2/3: like 0/1, repeated until x0 ==
//        +0x30 or +0x38 calls
//        flags: F_JOINED (1) this step starts together with the one before it (a race group: the owners run
//        their steps concurrently; the first step's owner waits for all of them, then moves the cursor on);
//        F_ADVANCE (2) move the cursor on before the call (CPU_OFF: the call does not return);
//        F_ARM_TIMER (4) arm the EL1 virtual timer before the call, disarm it after (CPU_SUSPEND)
// Result block at RESULT_BASE:
//     +0x00 magic "FUZZRES1"   +0x08 cursor (the next step to run)   +0x10 CurrentEL (raw) of the boot vCPU
//     +0x40 + s*0x40  record of step s: x0..x3 after the call, +0x20 status (0 not run, 2 issued and not
//                     returned yet, 1 returned), +0x28 calls made, +0x30 index of the vCPU that ran it
//     +0x2000 + k*0x400  vCPU k: +0x00 arrivals; arrival a (< MAX_ARRIVALS) at +0x40 + a*0x40: x0..x3 at entry,
//                     pad (0..3: fuzz_entryN, 0xB0: _start), PSTATE (NZCV|DAIF|CurrentEL|SPSel|PAN|UAO|DIT as
//                     read with MRS), MPIDR_EL1, SCTLR_ELx of its EL
// DONE codes: 0 the program ran to its end; 0xE1 an unexpected exception (vectors.inc report slots 504..508);
// 0xE2 bad parameter block; 0xE3 the vCPU's MPIDR_EL1 is not in the parameter block's table.

    .include "common.inc"
    .include "vectors.inc"

    .equ MAX_CPUS,      4
    .equ MAX_STEPS,     112
    .equ MAX_ARRIVALS,  15
    .equ P_MAGIC,       0x315a554649435350      // "PSCIFUZ1"
    .equ R_MAGIC,       0x315345525a5a5546      // "FUZZRES1"
    .equ P_NCPUS,       0x08
    .equ P_NSTEPS,      0x10
    .equ P_TICKS,       0x18
    .equ P_MPIDRS,      0x20
    .equ P_STEPS,       0x40
    .equ S_OWNER,       0x00
    .equ S_OPFLAGS,     0x08
    .equ S_X0,          0x10
    .equ S_X2,          0x20
    .equ S_UNTIL,       0x30
    .equ S_MAXITER,     0x38
    .equ R_CURSOR,      0x08
    .equ R_BOOT_EL,     0x10
    .equ R_RECS,        0x40
    .equ REC_STATUS,    0x20
    .equ REC_CALLS,     0x28
    .equ REC_BY,        0x30
    .equ R_ARR,         0x2000
    .equ F_JOINED,      (1 << 8)
    .equ F_ADVANCE,     (2 << 8)
    .equ F_ARM_TIMER,   (4 << 8)
    .equ BOOT_PAD,      0xB0
    .equ DONE_NO_CPU,   0xE3
    .equ HWID_MASK,     0xFF00FFFFFF
    .equ GICD_BASE,     0x08000000          // harness/protocol.py
    .equ GICR_BASE,     0x080A0000

// IDLE: wait a little for another vCPU: WFIT for x18 ticks when x18 != 0, else WFE.  Clobbers x6.
.macro IDLE
    cbz x18, 98f
    mrs x6, cntvct_el0
    add x6, x6, x18
    .inst 0xd5031006                // wfit x6
    b 99f
98: wfe
99:
.endm

    .section .text.entry, "ax"
    .global _start
_start:
    mov x9, #BOOT_PAD
    b arrive

// ---- entry pads: CPU_ON sends a secondary to one of these (aligned) addresses --------------------------------
    .irp k, 0, 1, 2, 3
    .balign 16
    .global fuzz_entry\k
fuzz_entry\k:
    mov x9, #\k
    b arrive
    .endr

// ---- arrival: record x0..x3, PSTATE, MPIDR and SCTLR before anything else changes them ------------------------
arrive:
    mov x10, x0
    mov x11, x1
    mov x12, x2
    mov x13, x3
    mrs x14, nzcv
    mrs x15, daif
    orr x14, x14, x15
    mrs x15, CurrentEL
    orr x14, x14, x15
    mrs x15, SPSel
    orr x14, x14, x15
    mrs x15, pan
    orr x14, x14, x15
    mrs x15, uao
    orr x14, x14, x15
    mrs x15, dit
    orr x14, x14, x15
    mrs x16, mpidr_el1
    READ_EL x15
    cmp x15, #2
    b.eq 1f
    mrs x17, sctlr_el1
    b 2f
1:  mrs x17, sctlr_el2
2:  LI x20, PARAM_BASE
    LI x21, RESULT_BASE
    ldr x0, [x20]
    LI x1, P_MAGIC
    cmp x0, x1
    b.ne bad_params
    ldr x1, [x20, #P_NCPUS]
    cmp x1, #MAX_CPUS
    b.hi bad_params
    ldr x22, [x20, #P_NSTEPS]
    cmp x22, #MAX_STEPS
    b.hi bad_params
    LI x2, HWID_MASK
    and x3, x16, x2
    mov x19, #0
    add x4, x20, #P_MPIDRS
3:  cmp x19, x1
    b.hs no_cpu
    ldr x5, [x4, x19, lsl #3]
    and x5, x5, x2
    cmp x5, x3
    b.eq 4f
    add x19, x19, #1
    b 3b
4:  add x4, x21, #R_ARR
    add x4, x4, x19, lsl #10
    ldr x5, [x4]
    cmp x5, #MAX_ARRIVALS
    b.hs 5f
    add x6, x4, #0x40
    add x6, x6, x5, lsl #6
    stp x10, x11, [x6, #0x00]
    stp x12, x13, [x6, #0x10]
    stp x9, x14, [x6, #0x20]
    stp x16, x17, [x6, #0x30]
5:  add x5, x5, #1
    dmb sy
    str x5, [x4]
    dmb sy
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2
    ldr x0, [x20, #P_TICKS]
    tbz x0, #33, 7f
    READ_EL x1
    cmp x1, #2
    b.ne 7f
    cbnz x19, 8f
    LI x1, GICD_BASE
    mov w2, #0x12                   // GICD_CTLR: ARE, EnableGrp1 (one security state)
    str w2, [x1]
8:  LI x1, GICR_BASE
    add x1, x1, x19, lsl #17        // this vCPU's redistributor (128 KiB each, in vCPU order)
    str wzr, [x1, #0x14]            // GICR_WAKER: awake
    add x1, x1, #0x10000            // SGI_base
    mov w2, #-1
    str w2, [x1, #0x80]             // GICR_IGROUPR0: group 1
    mov w2, #0xffff0000
    str w2, [x1, #0x100]            // GICR_ISENABLER0: every PPI (the timers: 26-30)
    mrs x1, icc_sre_el2
    mov x2, #0x9                    // SRE, Enable
    orr x1, x1, x2
    msr icc_sre_el2, x1
    isb
    mov x1, #0xff
    msr icc_pmr_el1, x1
    mov x1, #1
    msr icc_igrpen1_el1, x1
    isb
7:  mov x18, #0                     // x18: WFIT sleep in ticks, 0 = WFE
    ldr x0, [x20, #P_TICKS]
    tbz x0, #32, 6f
    mrs x0, S3_0_C0_C6_2            // ID_AA64ISAR2_EL1
    and x0, x0, #0xf                // WFxT, bits [3:0]: 2 = WFET and WFIT
    cmp x0, #2
    b.lo 6f
    mrs x18, cntfrq_el0
    lsr x18, x18, #11
6:  cbnz x19, wait_loop
    LI x0, R_MAGIC                  // the boot vCPU: the header (its memory starts zeroed)
    str x0, [x21]
    mrs x0, CurrentEL
    str x0, [x21, #R_BOOT_EL]

// ---- the interpreter: x19 me, x20 params, x21 results, x22 steps, x23 cursor, x26 my step ---------------------
wait_loop:
    dmb sy
    ldr x23, [x21, #R_CURSOR]
    cmp x23, x22
    b.hs finished
    mov x26, x23
scan:
    cmp x26, x22
    b.hs idle
    add x24, x20, #P_STEPS
    add x24, x24, x26, lsl #6
    ldr x28, [x24, #S_OPFLAGS]
    cmp x26, x23
    b.eq 6f
    tst x28, #F_JOINED              // past the cursor's step: only its race group
    b.eq idle
6:  ldr x0, [x24, #S_OWNER]
    cmp x0, x19
    b.ne 7f
    add x25, x21, #R_RECS
    add x25, x25, x26, lsl #6
    ldr x0, [x25, #REC_STATUS]
    cbz x0, execute
7:  add x26, x26, #1
    b scan
idle:
    IDLE
    b wait_loop

execute:
    and x27, x28, #0xff             // op
    cmp x27, #3
    b.hi bad_params
    str x19, [x25, #REC_BY]
    tst x28, #F_ADVANCE
    b.eq 1f
    mov x0, #2
    str x0, [x25, #REC_STATUS]
    add x0, x26, #1
    dmb sy
    str x0, [x21, #R_CURSOR]
    dmb sy
    sev
1:  tst x28, #F_ARM_TIMER
    b.eq 2f
    ldr w0, [x20, #P_TICKS]
    cbnz w0, 3f
    mrs x0, cntfrq_el0              // 0: ~1 ms, so that the timer fires while KVM's WFI already waits (see header)
    lsr x0, x0, #10
3:  msr cntv_tval_el0, x0
    mov x0, #1
    msr cntv_ctl_el0, x0
    isb
2:  mov x29, #0
call_again:
    add x29, x29, #1
    ldp x0, x1, [x24, #S_X0]
    ldp x2, x3, [x24, #S_X2]
    tst x27, #1
    b.ne 3f
    .global fuzz_hvc
fuzz_hvc:
    hvc #0
    b 4f
3:
    .global fuzz_smc
fuzz_smc:
    smc #0
4:  cmp x27, #2
    b.lo record
    ldr x30, [x24, #S_UNTIL]
    cmp x0, x30
    b.eq record
    ldr x30, [x24, #S_MAXITER]
    cmp x29, x30
    b.lo call_again
record:
    tst x28, #F_ARM_TIMER
    b.eq 5f
    msr cntv_ctl_el0, xzr
    isb
5:  stp x0, x1, [x25, #0x00]
    stp x2, x3, [x25, #0x10]
    str x29, [x25, #REC_CALLS]
    mov x0, #1
    dmb sy
    str x0, [x25, #REC_STATUS]
    dmb sy
    sev
    tst x28, #F_ADVANCE
    b.ne wait_loop                  // the cursor moved on before the call
    cmp x26, x23
    b.ne wait_loop                  // a race group's follower: its leader moves the cursor
    mov x1, x23                     // the leader: wait for the group, then move the cursor past it
lead_next:
    add x1, x1, #1
    cmp x1, x22
    b.hs lead_done
    add x2, x20, #P_STEPS
    add x2, x2, x1, lsl #6
    ldr x3, [x2, #S_OPFLAGS]
    tst x3, #F_JOINED
    b.eq lead_done
    add x4, x21, #R_RECS
    add x4, x4, x1, lsl #6
lead_wait:
    dmb sy
    ldr x5, [x4, #REC_STATUS]
    cbnz x5, lead_next
    IDLE
    b lead_wait
lead_done:
    dmb sy
    str x1, [x21, #R_CURSOR]
    dmb sy
    sev
    b wait_loop

finished:
    cbnz x19, park
    DONE #DONE_OK
park:
    IDLE
    b park

bad_params:
    DONE #DONE_BAD_PARAMS
no_cpu:
    DONE #DONE_NO_CPU

    FATAL_VECTORS fatal_el1, 1
    FATAL_VECTORS fatal_el2, 2
