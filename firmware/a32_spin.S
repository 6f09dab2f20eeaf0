@ a32_spin.S - an AArch32 EL1 payload that spins without exits: `b .` in A32, or in T32 (parameter).
@ payload-state: aarch32
@
@ Parameter block (u64 at PARAM_BASE, low word read): 0 spin in A32 at a32_spin_insn; 1 switch to T32
@ (blx) and spin at t32_spin_insn.  Used by the progress watchdog's AArch32 decoding (livelock_s opt-in:
@ "livelock at pc=... (b .)"); it never ends by itself.

    .include "common32.inc"

    .section .text.entry, "ax"
    .arm
    .global _start
_start:
    INSTALL_VECTORS32 vectors32
    LI32 r0, PARAM_BASE
    ldr r1, [r0]
    cmp r1, #0
    bne 1f
    .global a32_spin_insn
a32_spin_insn:
    b a32_spin_insn
1:  ADR32 r2, t32_spin
    orr r2, r2, #1
    bx r2

    .thumb
    .balign 4
t32_spin:
    .global t32_spin_insn
t32_spin_insn:
    b t32_spin_insn

    VECTORS32 vectors32
