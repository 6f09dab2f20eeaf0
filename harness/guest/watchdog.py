"""The VMM's progress watchdog: is a vCPU that makes no exit stuck on one instruction for good?

Pure (standard library only, no ioctl): the runner (harness/guest/runner.py) kicks a quiet vCPU out of
``KVM_RUN`` every ``window / SAMPLES`` seconds, reads its PC and hands the samples and the instruction words
at and before that PC to :func:`verdict`.  Why the rule is what it is (and what it must never catch) is in
the runner's docstring, "Progress watchdog".

AArch64 encodings below are from the Arm ARM (DDI 0487) C6.2: SMC, HVC, SVC, BRK, HLT (exception generation,
``1101 0100 opc:3 imm16 op2:3 LL:2``), WFI/WFE/NOP/YIELD/SEV/SEVL (hints, ``1101 0101 0000 0011 0010 CRm op2
11111``), WFET/WFIT (FEAT_WFxT, ``1101 0101 0000 0011 0001 0000 op2:3 Rd``), B/BL (imm26), B.cond (imm19),
CBZ/CBNZ (imm19), ERET.

AArch32 (a vCPU with PSTATE.nRW set; :func:`isa` picks A32 or T32 from PSTATE.T), Arm ARM F5/F3: A32 SMC
``cond 0001 0110 0000 0000 0000 0111 imm4``, HVC ``1110 0001 0100 imm12 0111 imm4``, WFI/WFE
``cond 0011 0010 0000 1111 0000 0000 0011/0010``, B ``cond 1010 imm24``; T32 SMC ``1111 0111 1111 imm4``
``1000 0000 0000 0000``, HVC ``1111 0111 1110 imm4`` ``1000 imm12``, WFI/WFE ``1011 1111 0011/0010 0000`` (16-bit)
and ``1111 0011 1010 1111`` ``1000 0000 0000 0011/0010`` (32-bit), B (T2, 16-bit) ``11100 imm11`` and B.W (T4)
``11110 S imm10`` ``10 J1 1 J2 imm11``.  For T32
the "word" is the little-endian u32 at PC: the first halfword in bits [15:0], the next in [31:16].
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


def isa(pstate: int) -> str:
    """The instruction set a PSTATE runs: "a64", or "a32" / "t32" for AArch32 (nRW = bit 4, T = bit 5)."""
    if not pstate & 0x10:
        return "a64"
    return "t32" if pstate & 0x20 else "a32"


def _decode_a32(w: int) -> str:
    cond = _COND[w >> 28]
    sfx = "" if cond == "al" else cond
    if w & 0x0FFF_FFF0 == 0x0160_0070:
        return f"smc{sfx} {_imm(w & 0xF)}"
    if w & 0xFFF0_00F0 == 0xE140_0070:
        return f"hvc {_imm(((w >> 4) & 0xFFF0) | (w & 0xF))}"
    if w & 0x0FFF_FFFE == 0x0320_F002:
        return f"{'wfi' if w & 1 else 'wfe'}{sfx}"
    if w & 0x0F00_0000 == 0x0A00_0000 and w >> 28 != 0xF:
        return f"b{sfx} {_target(_sext(w & 0xFF_FFFF, 24) * 4 + 8)}"
    return f".inst {w:#010x}"


def _decode_t32(w: int) -> str:
    hw1, hw2 = w & 0xFFFF, w >> 16
    if hw1 & 0xFFF0 == 0xF7F0 and hw2 == 0x8000:
        return f"smc {_imm(hw1 & 0xF)}"
    if hw1 & 0xFFF0 == 0xF7E0 and hw2 & 0xF000 == 0x8000:
        return f"hvc {_imm(((hw1 & 0xF) << 12) | (hw2 & 0xFFF))}"
    if hw1 in (0xBF30, 0xBF20):
        return "wfi" if hw1 == 0xBF30 else "wfe"
    if hw1 == 0xF3AF and hw2 in (0x8003, 0x8002):
        return "wfi.w" if hw2 == 0x8003 else "wfe.w"
    if hw1 & 0xF800 == 0xE000:
        return f"b {_target(_sext(hw1 & 0x7FF, 11) * 2 + 4)}"
    if hw1 & 0xF800 == 0xF000 and hw2 & 0xD000 == 0x9000:            # B.W (T4)
        sign = (hw1 >> 10) & 1
        i1, i2 = 1 ^ ((hw2 >> 13) & 1) ^ sign, 1 ^ ((hw2 >> 11) & 1) ^ sign
        imm = (sign << 24) | (i1 << 23) | (i2 << 22) | ((hw1 & 0x3FF) << 12) | ((hw2 & 0x7FF) << 1)
        return f"b.w {_target(_sext(imm, 25) + 4)}"
    return f".inst.w {w:#010x}" if hw1 >> 11 in (0x1D, 0x1E, 0x1F) else f".inst.n {hw1:#06x}"


def decode(word: int | None, isa: str = "a64") -> str:
    """A short disassembly of one instruction (A64 by default; ``isa`` "a32"/"t32" for AArch32): the kinds the
    watchdog reasons about by name, branches relative to themselves (``b .`` is a self-branch), anything else as
    ``.inst 0x...``; None (the PC is outside guest RAM) is ``unreadable``."""
    if word is None:
        return "unreadable"
    if isa == "a32":
        return _decode_a32(word & 0xFFFF_FFFF)
    if isa == "t32":
        return _decode_t32(word & 0xFFFF_FFFF)
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


def _mnemonic(word: int, isa: str) -> str:
    name = decode(word, isa).split()[0]
    if isa != "a64":
        name = name.split(".")[0]                       # wfi.w
        if name[:3] in ("smc", "hvc", "wfi", "wfe"):    # an A32 condition suffix: smcne, wfieq
            name = name[:3]
    return name


def traps_to_kvm(word: int | None, isa: str = "a64") -> bool:
    """SMC or HVC: an instruction KVM completes on the guest's behalf (HVC always, SMC via HCR_EL2.TSC).  A
    conditional A32 SMC counts too: KVM does not evaluate an SMC32's condition (docs/aarch32.md)."""
    return word is not None and _mnemonic(word, isa) in ("smc", "hvc")


def waits(word: int | None, isa: str = "a64") -> bool:
    """WFI, WFE, WFIT or WFET: a vCPU that sleeps (in KVM's WFI emulation, or natively for an untrapped WFE)."""
    return word is not None and _mnemonic(word, isa) in ("wfi", "wfe", "wfit", "wfet")


def still_run(samples: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """The trailing samples that share the last sample's PC."""
    run: list[tuple[float, int]] = []
    for t, pc in reversed(samples):
        if run and pc != run[0][1]:
            break
        run.insert(0, (t, pc))
    return run


def verdict(samples: list[tuple[float, int]], word_at: int | None, word_before: int | None, *,
            any_insn: bool, need: int = SAMPLES, min_span_s: float = 0.0, isa: str = "a64") -> str | None:
    """Is this vCPU livelocked?  ``samples``: (time, PC) read after each kick since its last exit, oldest
    first, only while it was RUNNABLE; ``word_at`` / ``word_before``: the instruction words at PC and PC - 4
    (None: outside guest RAM); ``any_insn``: the scenario opted in to any instruction, not only SMC/HVC.

    Returns None (no verdict: keep running) or why it is a livelock, for the message.
    """
    run = still_run(samples)
    if len(run) < need or run[-1][0] - run[0][0] < min_span_s:
        return None
    if waits(word_at, isa) or waits(word_before, isa):
        return None     # asleep in WFI/WFE (KVM reports PC past a trapped WFI): waiting is not a livelock
    if traps_to_kvm(word_at, isa):
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
