"""The progress watchdog's AArch32 decoding (harness/guest/watchdog.py ``isa``, ``decode(word, isa)``): words
assembled by arm-linux-gnueabihf-as (firmware/a32_calls.S, a32_spin.S, psci32.S) and the Arm ARM encodings."""

import pytest

from harness.guest import watchdog as w
from harness.images import payloads


@pytest.mark.parametrize("pstate,isa", [(0x3C5, "a64"), (0x3C9, "a64"), (0x1D3, "a32"), (0x1F3, "t32"),
                                        (0x600001D3, "a32")])
def test_isa_from_pstate(pstate, isa):
    assert w.isa(pstate) == isa


@pytest.mark.parametrize("word,isa,text,traps,waits", [
    (0xE1600070, "a32", "smc #0", True, False),
    (0x11600070, "a32", "smcne #0", True, False),     # KVM does not evaluate an SMC32's condition
    (0xE1400070, "a32", "hvc #0", True, False),
    (0xE1400171, "a32", "hvc #0x11", True, False),
    (0xE320F003, "a32", "wfi", False, True),
    (0x0320F002, "a32", "wfeeq", False, True),
    (0xEAFFFFFE, "a32", "b .", False, False),
    (0xEAFFFFFD, "a32", "b .-0x4", False, False),
    (0x8000F7F0, "t32", "smc #0", True, False),
    (0x8000F7E0, "t32", "hvc #0", True, False),
    (0x0000BF30, "t32", "wfi", False, True),
    (0x8002F3AF, "t32", "wfe.w", False, True),
    (0x0000E7FE, "t32", "b .", False, False),
    (0xBFFEF7FF, "t32", "b.w .", False, False),
    (0xBFFCF7FF, "t32", "b.w .-0x4", False, False),
    (0xD4000003, "a64", "smc #0", True, False),      # the default stays A64
])
def test_decode_aarch32(word, isa, text, traps, waits):
    assert w.decode(word, isa) == text
    assert w.traps_to_kvm(word, isa) is traps and w.waits(word, isa) is waits


def test_an_a32_word_is_not_read_as_a64():
    assert w.decode(0xE1600070) == ".inst 0xe1600070" and not w.traps_to_kvm(0xE320F003)


def test_verdict_on_a32_smc_and_t32_wfi():
    samples = [(i * 0.3, 0x4000_0010) for i in range(5)]
    assert w.verdict(samples, 0xE1600070, 0, any_insn=False, isa="a32") == "the trapped instruction is never completed"
    assert w.verdict(samples, 0xE1600070, 0, any_insn=False) is None        # as A64 it is nothing
    assert w.verdict(samples, 0x0000E7FE, 0x0000BF30, any_insn=True, isa="t32") is None   # asleep


def test_words_of_the_built_payloads():
    built = payloads.build_payloads()
    a32 = payloads.load_elf(built["a32_calls"])
    assert w.decode(a32.word(a32.sym("a32_smc_insn")), "a32") == "smc #0"
    assert w.decode(a32.word(a32.sym("a32_smcne_insn")), "a32") == "smcne #0"
    assert w.decode(a32.word(a32.sym("a32_hvc_insn")), "a32") == "hvc #0"
    assert w.decode(a32.word(a32.sym("t32_smc_insn")), "t32") == "smc #0"
    spin = payloads.load_elf(built["a32_spin"])
    assert w.decode(spin.word(spin.sym("a32_spin_insn")), "a32") == "b ."
    assert w.decode(spin.word(spin.sym("t32_spin_insn")), "t32") == "b.w ."     # gas widens a branch to a global
