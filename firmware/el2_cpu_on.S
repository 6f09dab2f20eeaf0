// el2_cpu_on.S - PSCI CPU_ON over SMC #0 from a (v)EL2 boot vCPU; the secondary reports where and how it
// started.  Needs 2 vCPUs (scenario vcpus=2).  Written for HAS_EL2 vCPUs (the SMC conduit is the one a
// guest hypervisor uses: HVC stays inside the VM at vEL2), but it also runs at EL1 (SMC #0 is forwarded or
// handled in-kernel there too).  The secondary uses no stack: KVM's CPU_ON reset (in-kernel) and the VMM's
// re-INIT (forwarded) both leave SP_ELx unknown/zero.
//
// Parameter block at PARAM_BASE (u64): [0] target MPIDR, [1] context id.  Both 0 -> defaults 1, 0xC0FFEE.
//
// Boot vCPU (_start):
//     x0 = CPU_ON64, x1 = target, x2 = secondary_entry, x3 = context id; smc #0 (symbol cpu_on_smc)
//     x0 = AFFINITY_INFO64, x1 = target, x2 = 0; smc #0 (symbol affinity_smc), repeated until x0 = 0 (ON),
//          at most 64 times
//     wait (WFE loop, at most 20 s by CNTVCT_EL0) until the secondary has published its record
//     x0 = CPU_ON64 again, same arguments; smc #0 (symbol cpu_on_again_smc) -> ALREADY_ON (-4) expected
//     REPORT slot 0 <- CPU_ON x0, 1 <- last AFFINITY_INFO x0, 2 <- number of AFFINITY_INFO calls,
//            3 <- 1 if the secondary's record was seen (0: the wait gave up), 4 <- second CPU_ON x0
//     DONE 0
// Secondary (secondary_entry, any vCPU started by CPU_ON):
//     records x0 at entry, CurrentEL, the PC of its first instruction, MPIDR_EL1, HCR_EL2 (at EL2, else 0),
//     SCTLR_ELx of its EL; REPORT slot 8 <- x0, 9 <- CurrentEL, 10 <- PC; then publishes the record (magic
//     last), SEV, DONE 0
// Unexpected exceptions on either vCPU: DONE 0xE1 with report slots 504..508 (vectors.inc).
//
// Result block at RESULT_BASE (harness.payloads.decode_cpu_on), zeroed by the boot vCPU at start:
//     +0x00 boot CurrentEL (raw)        +0x08 CPU_ON x0           +0x10 AFFINITY_INFO calls
//     +0x18 last AFFINITY_INFO x0       +0x20 second CPU_ON x0    +0x28 1 = secondary record seen
//     +0x30 target MPIDR used           +0x38 context id used
//     secondary record at +0x40:
//     +0x40 magic 0x5EC0DA7A (written last)   +0x48 x0 at entry   +0x50 CurrentEL (raw)
//     +0x58 PC of the first instruction       +0x60 MPIDR_EL1     +0x68 HCR_EL2 (0 at EL1)
//     +0x70 SCTLR_ELx (x = its EL)            +0x78 0 (reserved)
//   Size: 0x80 bytes.

    .include "common.inc"
    .include "vectors.inc"

    .equ CO_SIZE,           0x80
    .equ CO_SEC,            0x40
    .equ CO_MAGIC,          0x5EC0DA7A
    .equ DEFAULT_TARGET,    1
    .equ DEFAULT_CTX,       0xC0FFEE
    .equ MAX_AFFINITY_POLLS, 64
    .equ WAIT_SECONDS,      20

    .section .text.entry, "ax"
    .global _start
_start:
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2

    LI x19, RESULT_BASE
    mov x1, x19
    add x2, x19, #CO_SIZE
1:  stp xzr, xzr, [x1], #16
    cmp x1, x2
    b.lo 1b
    mrs x0, CurrentEL
    str x0, [x19, #0x00]

    LI x20, PARAM_BASE
    ldp x21, x22, [x20]             // x21 = target, x22 = context id
    orr x0, x21, x22
    cbnz x0, 2f
    mov x21, #DEFAULT_TARGET
    LI x22, DEFAULT_CTX
2:  stp x21, x22, [x19, #0x30]

    LI x0, PSCI_CPU_ON64
    mov x1, x21
    adr x2, secondary_entry
    mov x3, x22
    .global cpu_on_smc
cpu_on_smc:
    smc #0
    str x0, [x19, #0x08]
    mov x23, x0

    mov x24, #0                     // AFFINITY_INFO calls
3:  LI x0, PSCI_AFFINITY_INFO64
    mov x1, x21
    mov x2, #0
    .global affinity_smc
affinity_smc:
    smc #0
    add x24, x24, #1
    str x24, [x19, #0x10]
    str x0, [x19, #0x18]
    mov x25, x0
    cbz x0, 4f
    cmp x24, #MAX_AFFINITY_POLLS
    b.lo 3b

4:  mrs x26, cntfrq_el0             // wait for the secondary's record (only if CPU_ON succeeded), at most
    mov x2, #WAIT_SECONDS           // WAIT_SECONDS by the generic counter: the secondary's thread may need
    mul x26, x26, x2                // a while to be scheduled on a loaded host
    isb
    mrs x2, cntvct_el0
    add x26, x26, x2                // x26 = give-up count
    mov x27, #0
    cbnz x23, 6f
    LI x1, CO_MAGIC
5:  ldr x2, [x19, #CO_SEC]
    cmp x2, x1
    b.eq 7f
    wfe
    isb
    mrs x2, cntvct_el0
    cmp x2, x26
    b.lo 5b
    b 6f
7:  mov x27, #1
6:  str x27, [x19, #0x28]

    LI x0, PSCI_CPU_ON64
    mov x1, x21
    adr x2, secondary_entry
    mov x3, x22
    .global cpu_on_again_smc
cpu_on_again_smc:
    smc #0
    str x0, [x19, #0x20]
    mov x28, x0

    REPORT 0, x23
    REPORT 1, x25
    REPORT 2, x24
    REPORT 3, x27
    REPORT 4, x28
    DONE #DONE_OK

// ---- the secondary: no stack, x0 = context id -----------------------------------------------------
    .balign 16
    .global secondary_entry
secondary_entry:
    adr x1, .                       // the PC this vCPU started at
    mov x20, x0
    mov x21, x1
    INSTALL_FATAL_VECTORS fatal_el1, fatal_el2
    mrs x22, CurrentEL
    mrs x23, mpidr_el1
    mov x24, #0
    ubfx x2, x22, #2, #2
    cmp x2, #2
    b.ne 1f
    mrs x24, hcr_el2
    mrs x25, sctlr_el2
    b 2f
1:  mrs x25, sctlr_el1
2:  LI x19, RESULT_BASE
    str x20, [x19, #(CO_SEC + 0x08)]
    str x22, [x19, #(CO_SEC + 0x10)]
    str x21, [x19, #(CO_SEC + 0x18)]
    str x23, [x19, #(CO_SEC + 0x20)]
    str x24, [x19, #(CO_SEC + 0x28)]
    str x25, [x19, #(CO_SEC + 0x30)]
    REPORT 8, x20                   // reports first: once the boot vCPU sees the magic, they are traced
    REPORT 9, x22
    REPORT 10, x21
    dsb sy
    LI x1, CO_MAGIC
    str x1, [x19, #CO_SEC]
    dsb sy
    sev
    DONE #DONE_OK

    FATAL_VECTORS fatal_el1, 1
    FATAL_VECTORS fatal_el2, 2
