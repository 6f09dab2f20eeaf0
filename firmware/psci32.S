@ psci32.S - PSCI from an AArch32 EL1 guest (both vCPUs in AArch32): the differential of KVM's in-kernel PSCI
@ and the VMM's emulator (harness/guest/psci.py, aarch32 path).
@ payload-state: aarch32
@
@ Parameter block (u64 at PARAM_BASE, low words read): +0x00 conduit (0 hvc #0, 1 smc #0),
@   +0x08 secondary's instruction set (0 A32: entry secondary_a32; 1 T32: entry secondary_t32 | 1).
@ The boot vCPU (vCPU 0, MPIDR 0) makes these calls and stores r0 after each at RESULT_BASE + 4*i:
@    0 PSCI_VERSION                      1 PSCI_FEATURES(CPU_ON64)       2 PSCI_FEATURES(CPU_ON)
@    3 PSCI_FEATURES(AFFINITY_INFO64)    4 CPU_ON64(1, secondary, ctx)   5 AFFINITY_INFO64(1, 0)
@    6 AFFINITY_INFO(1, 0)               7 CPU_ON(1, secondary, CTX)      (then waits for the secondary)
@    8 AFFINITY_INFO(1, 0)               9 CPU_ON(1, ...) again           10 AFFINITY_INFO(0x100, 0)
@   11 MIGRATE_INFO_TYPE                12 PSCI_FEATURES(SMCCC_VERSION)  13 PSCI_FEATURES(PSCI_FEATURES)
@ The secondary writes at RESULT_BASE + 0x100: +0x04 r0 at entry (the context id), +0x08 CPSR (mode),
@   +0x0c 0xA32 or 0x732 (the code that ran: A32 or T32), then +0x00 = 0x5EC0ED; then it sleeps (wfi).
@ DONE 0 when all is stored; 0xE1 on an unexpected exception (VECTORS32).

    .include "common32.inc"

    .equ CTX, 0xC0FFEE32
    .equ SEC, 0x100

@ CALL i: the call in r0..r3 over the conduit in r8, then RESULT_BASE + 4*i <- r0 (r9 = RESULT_BASE)
.macro CALL i
    cmp r8, #0
    bne 1f
    hvc #0
    b 2f
1:  smc #0
2:  str r0, [r9, #4 * (\i)]
.endm

    .section .text.entry, "ax"
    .arm
    .global _start
_start:
    INSTALL_VECTORS32 vectors32
    LI32 r9, RESULT_BASE
    LI32 r10, PARAM_BASE
    ldr r8, [r10]                  @ conduit
    ldr r7, [r10, #8]              @ secondary's instruction set
    ADR32 r6, secondary_a32
    cmp r7, #0
    beq 3f
    ADR32 r6, secondary_t32
    orr r6, r6, #1                 @ interworking address: T32
3:
    LI32 r0, PSCI_VERSION
    CALL 0
    LI32 r0, PSCI_FEATURES
    LI32 r1, PSCI_CPU_ON64
    CALL 1
    LI32 r0, PSCI_FEATURES
    LI32 r1, PSCI_CPU_ON
    CALL 2
    LI32 r0, PSCI_FEATURES
    LI32 r1, PSCI_AFFINITY_INFO64
    CALL 3
    LI32 r0, PSCI_CPU_ON64
    mov r1, #1
    mov r2, r6
    LI32 r3, CTX
    CALL 4
    LI32 r0, PSCI_AFFINITY_INFO64
    mov r1, #1
    mov r2, #0
    CALL 5
    LI32 r0, PSCI_AFFINITY_INFO
    mov r1, #1
    mov r2, #0
    CALL 6
    LI32 r0, PSCI_CPU_ON
    mov r1, #1
    mov r2, r6
    LI32 r3, CTX
    CALL 7
    LI32 r5, 0x5EC0ED
4:  ldr r4, [r9, #SEC]
    cmp r4, r5
    bne 4b
    dmb sy
    LI32 r0, PSCI_AFFINITY_INFO
    mov r1, #1
    mov r2, #0
    CALL 8
    LI32 r0, PSCI_CPU_ON
    mov r1, #1
    mov r2, r6
    LI32 r3, CTX
    CALL 9
    LI32 r0, PSCI_AFFINITY_INFO
    mov r1, #0x100
    mov r2, #0
    CALL 10
    LI32 r0, PSCI_MIGRATE_INFO_TYPE
    CALL 11
    LI32 r0, PSCI_FEATURES
    LI32 r1, SMCCC_VERSION
    CALL 12
    LI32 r0, PSCI_FEATURES
    LI32 r1, PSCI_FEATURES
    CALL 13
    DONE32 DONE_OK

    .arm
    .global secondary_a32
secondary_a32:
    LI32 r9, RESULT_BASE + SEC
    str r0, [r9, #4]
    mrs r1, cpsr
    str r1, [r9, #8]
    LI32 r1, 0xA32
    str r1, [r9, #12]
    dmb sy
    LI32 r1, 0x5EC0ED
    str r1, [r9]
5:  wfi
    b 5b

    .thumb
    .balign 4
    .global secondary_t32
secondary_t32:
    LI32 r9, RESULT_BASE + SEC
    str r0, [r9, #4]
    mrs r1, cpsr
    str r1, [r9, #8]
    LI32 r1, 0x732
    str r1, [r9, #12]
    dmb sy
    LI32 r1, 0x5EC0ED
    str r1, [r9]
6:  wfi
    b 6b

    VECTORS32 vectors32
