"""The VMM's progress watchdog: is a vCPU that makes no exit stuck on one instruction for good?

Pure (standard library only, no ioctl): the runner (harness/guest/runner.py) kicks a quiet vCPU out of
``KVM_RUN`` every ``window / SAMPLES`` seconds, reads its PC and hands the samples and the instruction words
at and before that PC to :func:`verdict`.  Why the rule is what it is (and what it must never catch) is in
the runner's docstring, "Progress watchdog".

AArch64 encodings below are from the Arm ARM (DDI 0487) C6.2: SMC, HVC, SVC, BRK, HLT (exception generation,
``1101 0100 opc:3 imm16 op2:3 LL:2``), WFI/WFE/NOP/YIELD/SEV/SEVL (hints, ``1101 0101 0000 0011 0010 CRm op2
11111``), WFET/WFIT (FEAT_WFxT, ``1101 0101 0000 0011 0001 0000 op2:3 Rd``), B/BL (imm26), B.cond (imm19),
CBZ/CBNZ (imm19), ERET.
"""

from __future__ import annotations

DEFAULT_WINDOW_S = 1.5  # a scenario without ``livelock_s``: watch trapping instructions (SMC/HVC) only
SAMPLES = 5             # PC samples (one kick each) a window is cut into; all must agree, with no exit between

_HINTS = {0xD503201F: "nop", 0xD503203F: "yield", 0xD503205F: "wfe", 0xD503207F: "wfi", 0xD503209F: "sev",
          0xD50320BF: "sevl"}
_EXC = {(0, 1): "svc", (0, 2): "hvc", (0, 3): "smc", (1, 0): "brk", (2, 0): "hlt"}   # (opc, LL) -> name
_COND = ("eq", "ne", "cs", "cc", "mi", "pl", "vs", "vc", "hi", "ls", "ge", "lt", "gt", "le", "al", "nv")


def _sext(value: int, bits: int) -> int:
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def _target(offset: int) -> str:
    return "." if offset == 0 else f".{offset:+#x}"


def _imm(n: int) -> str:
    return f"#{n}" if n < 10 else f"#{n:#x}"


def decode(word: int | None) -> str:
    """A short disassembly of one A64 instruction word: the kinds the watchdog reasons about by name, branches
    relative to themselves (``b .`` is a self-branch), anything else as ``.inst 0x...``; None (the PC is outside
    guest RAM) is ``unreadable``."""
    if word is None:
        return "unreadable"
    w = word & 0xFFFF_FFFF
    if w >> 24 == 0xD4 and (w >> 2) & 7 == 0:                          # exception generation
        name = _EXC.get(((w >> 21) & 7, w & 3))
        if name:
            return f"{name} {_imm((w >> 5) & 0xFFFF)}"
    if w in _HINTS:
        return _HINTS[w]
    if w & 0xFFFF_FFC0 == 0xD503_1000:                                  # WFET / WFIT Xd
        return f"{'wfit' if w & 0x20 else 'wfet'} x{w & 0x1F}"
    if w == 0xD69F_03E0:
        return "eret"
    if w & 0x7C00_0000 == 0x1400_0000:                                  # B / BL imm26
        return f"{'bl' if w >> 31 else 'b'} {_target(_sext(w & 0x3FF_FFFF, 26) * 4)}"
    if w & 0xFF00_0010 == 0x5400_0000:                                  # B.cond imm19
        return f"b.{_COND[w & 0xF]} {_target(_sext((w >> 5) & 0x7FFFF, 19) * 4)}"
    if w & 0x7E00_0000 == 0x3400_0000:                                  # CBZ / CBNZ
        reg = ("x" if w >> 31 else "w") + str(w & 0x1F)
        return f"{'cbnz' if w & 0x0100_0000 else 'cbz'} {reg}, {_target(_sext((w >> 5) & 0x7FFFF, 19) * 4)}"
    return f".inst {w:#010x}"


def traps_to_kvm(word: int | None) -> bool:
    """SMC or HVC: an instruction KVM completes on the guest's behalf (HVC always, SMC via HCR_EL2.TSC)."""
    return word is not None and decode(word).split()[0] in ("smc", "hvc")


def waits(word: int | None) -> bool:
    """WFI, WFE, WFIT or WFET: a vCPU that sleeps (in KVM's WFI emulation, or natively for an untrapped WFE)."""
    return word is not None and decode(word).split()[0] in ("wfi", "wfe", "wfit", "wfet")


def still_run(samples: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """The trailing samples that share the last sample's PC."""
    run: list[tuple[float, int]] = []
    for t, pc in reversed(samples):
        if run and pc != run[0][1]:
            break
        run.insert(0, (t, pc))
    return run


def verdict(samples: list[tuple[float, int]], word_at: int | None, word_before: int | None, *,
            any_insn: bool, need: int = SAMPLES, min_span_s: float = 0.0) -> str | None:
    """Is this vCPU livelocked?  ``samples``: (time, PC) read after each kick since its last exit, oldest
    first, only while it was RUNNABLE; ``word_at`` / ``word_before``: the instruction words at PC and PC - 4
    (None: outside guest RAM); ``any_insn``: the scenario opted in to any instruction, not only SMC/HVC.

    Returns None (no verdict: keep running) or why it is a livelock, for the message.
    """
    run = still_run(samples)
    if len(run) < need or run[-1][0] - run[0][0] < min_span_s:
        return None
    if waits(word_at) or waits(word_before):
        return None     # asleep in WFI/WFE (KVM reports PC past a trapped WFI): waiting is not a livelock
    if traps_to_kvm(word_at):
        return "the trapped instruction is never completed"
    if any_insn:
        return "the scenario's livelock_s opts in to any instruction"
    return None


def mode(spec: dict) -> tuple[float, bool]:
    """(window in seconds, any instruction?) for a validated scenario; window 0 turns the watchdog off."""
    if "livelock_s" in spec:
        window = float(spec["livelock_s"])
        return window, window > 0
    return DEFAULT_WINDOW_S, False
