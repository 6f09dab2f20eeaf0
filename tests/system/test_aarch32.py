"""SMCCC calls from an AArch32 EL1 guest (KVM_ARM_VCPU_EL1_32BIT): A32 and T32 HVC/SMC, forwarded and in-kernel.

Platform (measured in the Debian 7.3 guest under QEMU TCG ``-cpu max``): the payload vCPU's ID_AA64PFR0_EL1 is
0x1101001021110222 (EL1 = 2: AArch64 and AArch32), KVM_CAP_ARM_EL1_32BIT = 1 ("CPU features: detected: 32-bit
EL1 Support" in dmesg).  AArch32 EL1 with HAS_EL2 is refused: arch/arm64/kvm/arm.c kvm_vcpu_init_check_features
("NV is incompatible with AArch32": test_bit(KVM_ARM_VCPU_HAS_EL2) -> -EINVAL), asserted below.

What KVM does with a call from AArch32 (Debian 7.3.4 source):
* flags: KVM_HYPERCALL_EXIT_SMC for EC SMC32/SMC64, KVM_HYPERCALL_EXIT_16BIT iff ESR_ELx.IL == 0
  (hypercalls.c:247-257 kvm_prepare_hypercall_exit).  HVC and SMC have only 32-bit encodings in T32 (HVC T1
  0xf7e0_8000, SMC T1 0xf7f0_8000), and the Arm ARM gives IL = 1 for them, so 16BIT is never set by an HVC or
  SMC; the T32 tests assert flags without it.
* PC is past the call at the exit: 4 bytes in A32 and in T32 (both 32-bit encodings; kvm_incr_pc uses IL).
* A conditional SMC that fails its condition: handle_trap_exceptions (handle_exit.c:429) skips a trapped
  instruction that kvm_condition_valid() rejects, but kvm_condition_valid32 (hyp/aarch32.c:57-69) checks only
  CP15/CP14/FP/SVC classes, not SMC32: a trapped failing SMC would be forwarded.  Whether it traps at all is
  IMPLEMENTATION DEFINED (Arm ARM: "SMC ... that fails its condition code check" with HCR_EL2.TSC); the test
  asserts the guest-visible contract: no KVM_EXIT_HYPERCALL and the payload continues with r0 unchanged.
* SMC32's ISS has no immediate (EC 0x13: CV/COND/CCKNOWNPASS only), so handle_smc's "nonzero immediate" check
  (handle_exit.c:82 kvm_vcpu_hvc_get_imm) cannot see an A32 ``smc #1``: it is forwarded like ``smc #0``
  (in AArch64 ``smc #1`` gets x0 = -1 without an exit).
* Register views: KVM_SET_ONE_REG of a core register of a vCPU in a privileged AArch32 mode narrows x0..x30 to
  32 bits (arch/arm64/kvm/guest.c set_core_reg), so a reply's upper halves never reach the guest.
"""

import pytest

from harness.guest import kvm
from harness.images.payloads import get_payload
from harness.model.scenarios import fwd, scenario

OEM1, OEM2, OEM3 = 0x8300_0001, 0x8300_0002, 0x8300_0003
REPLY1 = [0xDEADBEEF_0000A001, 0xCAFEF00D_0000A002, 0x12345678_0000A003, 0xFFFFFFFF_0000A004]
REPLY2 = [0xBAD0_0002]          # would land in r0 if the failing smcne were forwarded
REPLY3 = [0xFFFF0000_0000600D]
OEM_FWD = (fwd(0x8300_0000, 4),)
REPLIES = {OEM1: REPLY1, OEM2: REPLY2, OEM3: REPLY3}
AA32_SVC = 0x13


def _need_aarch32(g):
    if not g.caps.get("kvm") or not g.caps.get("smccc_filter"):
        pytest.skip(f"kernel {g.caps.get('uname')}: no KVM or no SMCCC filter")
    if not g.caps.get("KVM_CAP_ARM_EL1_32BIT"):
        pytest.skip(f"kernel {g.caps.get('uname')}: KVM_CAP_ARM_EL1_32BIT is 0: the CPU has no AArch32 EL1 "
                    "(ID_AA64PFR0_EL1.EL1 != 2)")


@pytest.fixture(scope="module")
def a32_run(guest_pool):
    g = guest_pool.get()
    _need_aarch32(g)
    p = get_payload("a32_calls")
    return p, g.run(scenario("a32_calls", p, filters=OEM_FWD, replies=REPLIES), payload=p)


@pytest.fixture(scope="module")
def t32_run(guest_pool):
    g = guest_pool.get()
    _need_aarch32(g)
    p = get_payload("t32_entry")
    return p, g.run(scenario("t32_entry", p, filters=OEM_FWD, replies=REPLIES), payload=p)


def _at(r, p, sym):
    calls = [h for h in r.hypercalls if h["pc"] == p.sym(sym) + 4]
    assert len(calls) == 1, f"one exit with PC past {sym} expected\n{r.describe()}"
    return calls[0]


pytestmark = [pytest.mark.el1, pytest.mark.aarch32]


def test_a32_payload_runs_to_done(guest, a32_run):
    p, r = a32_run
    assert p.state == "a32"
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    cpsr = r.reports[7]
    assert cpsr & 0x1F == 0x10 | AA32_SVC and not cpsr & kvm.PSR_AA32_T_BIT, f"CPSR {cpsr:#x}\n{r.describe()}"
    assert cpsr & 0x1C0 == 0x1C0, f"A/I/F not masked: CPSR {cpsr:#x}"


@pytest.mark.parametrize("sym,flags", [
    pytest.param("a32_hvc_insn", 0, marks=pytest.mark.hvc),
    pytest.param("a32_smc_insn", kvm.KVM_HYPERCALL_EXIT_SMC, marks=pytest.mark.smc),
    pytest.param("t32_hvc_insn", 0, marks=pytest.mark.hvc),
    pytest.param("t32_smc_insn", kvm.KVM_HYPERCALL_EXIT_SMC, marks=pytest.mark.smc),
])
def test_forwarded_call_nr_flags_pc(guest, a32_run, sym, flags):
    """nr = the id, flags = SMC bit only (never 16BIT: IL = 1 for HVC/SMC in T32 too), PC = insn + 4."""
    p, r = a32_run
    h = _at(r, p, sym)
    assert h["nr"] == OEM1, r.describe()
    assert h["flags"] == flags, f"{sym}: flags {h['flags']:#x}, expected {flags:#x}\n{r.describe()}"
    assert not h["flags"] & kvm.KVM_HYPERCALL_EXIT_16BIT
    thumb = sym.startswith("t32")
    assert bool(h["pstate"] & kvm.PSR_AA32_T_BIT) == thumb, f"PSTATE {h['pstate']:#x}"
    assert h["pstate"] & kvm.PSR_MODE32_BIT and h["pstate"] & 0xF == AA32_SVC & 0xF
    assert h["el"] == 1


def test_32bit_register_views(guest, a32_run):
    """Arguments arrive with zero upper halves; KVM narrows what the VMM writes back: r0..r3 = the low halves."""
    p, r = a32_run
    h = _at(r, p, "a32_hvc_insn")
    assert h["args"][:4] == [OEM1, 0x11111111, 0x22222222, 0x33333333], r.describe()
    assert h["reply"] == REPLY1
    assert h["readback"] == [x & 0xFFFF_FFFF for x in REPLY1], f"KVM kept {h['readback']}\n{r.describe()}"
    assert [r.reports[i] for i in range(4)] == [x & 0xFFFF_FFFF for x in REPLY1], r.describe()
    later = _at(r, p, "a32_smc_insn")
    assert all(x >> 32 == 0 for x in later["args"][:18]), f"upper halves at the next call: {later['args']}"


def test_t32_call_arguments_and_result(guest, a32_run):
    p, r = a32_run
    h = _at(r, p, "t32_hvc_insn")
    assert h["args"][:4] == [OEM1, 0x11111111, 0x22222222, 0x33333333], r.describe()
    assert r.reports[8] == REPLY1[0] & 0xFFFF_FFFF and r.reports[9] == REPLY1[0] & 0xFFFF_FFFF
    # MRS reads the execution-state bits (T, J, IT) as zero (Arm ARM, MRS): the T bit shows at the exit
    assert r.reports[10] & 0x3F == 0x10 | AA32_SVC, f"CPSR in the T32 body {r.reports[10]:#x}"
    assert h["pstate"] & kvm.PSR_AA32_T_BIT, f"PSTATE at the T32 exit {h['pstate']:#x}"


@pytest.mark.smc
@pytest.mark.parametrize("sym,slot", [("a32_smcne_insn", 5), ("t32_smcne_insn", 11)])
def test_conditional_smc_that_fails_is_skipped_not_forwarded(guest, a32_run, sym, slot):
    p, r = a32_run
    assert not [h for h in r.hypercalls if h["nr"] == OEM2], f"a failing {sym} was forwarded\n{r.describe()}"
    assert not [h for h in r.hypercalls if h["pc"] == p.sym(sym) + 4]
    assert r.reports[slot] == OEM2, f"r0 after {sym}: {r.reports.get(slot)}\n{r.describe()}"


@pytest.mark.smc
def test_conditional_smc_that_passes_is_forwarded(guest, a32_run):
    p, r = a32_run
    h = _at(r, p, "a32_smceq_insn")
    assert h["nr"] == OEM3 and h["flags"] == kvm.KVM_HYPERCALL_EXIT_SMC, r.describe()
    assert r.reports[6] == REPLY3[0] & 0xFFFF_FFFF


@pytest.mark.smc
def test_a32_smc_immediate_is_invisible_to_kvm(guest, a32_run):
    """``smc #1`` in A32 is forwarded: the SMC32 syndrome carries no immediate (AArch64 ``smc #1`` gets -1)."""
    p, r = a32_run
    h = _at(r, p, "a32_smc1_insn")
    assert h["nr"] == OEM3 and r.reports[12] == REPLY3[0] & 0xFFFF_FFFF, r.describe()


def test_t32_entry_starts_in_thumb(guest, t32_run):
    p, r = t32_run
    assert p.state == "t32" and p.entry & 1
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    # MRS reads T as zero (Arm ARM, MRS); the mode is SVC, and PSTATE at the exits has T
    assert r.reports[0] & 0x3F == 0x10 | AA32_SVC, f"CPSR at entry {r.reports[0]:#x}\n{r.describe()}"
    for sym, flags in (("t32_hvc_insn", 0), ("t32_smc_insn", kvm.KVM_HYPERCALL_EXIT_SMC)):
        h = _at(r, p, sym)
        assert h["nr"] == OEM1 and h["flags"] == flags, r.describe()
        assert h["pstate"] & kvm.PSR_AA32_T_BIT and not h["flags"] & kvm.KVM_HYPERCALL_EXIT_16BIT, r.describe()
    assert r.reports[1] == r.reports[2] == REPLY1[0] & 0xFFFF_FFFF


def test_in_kernel_answers_from_aarch32(guest, guest_pool):
    """Without the filter KVM answers the OEM id itself: NOT_SUPPORTED, as a 32-bit -1 in r0."""
    g = guest_pool.get()
    _need_aarch32(g)
    p = get_payload("a32_calls")
    r = g.run(scenario("a32_calls_in_kernel", p), payload=p)
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    assert not r.hypercalls, r.describe()
    assert r.reports[0] == 0xFFFF_FFFF and r.reports[4] == 0xFFFF_FFFF, r.describe()
    assert r.reports[5] == OEM2, "the failing smcne must leave r0 alone in-kernel too"


@pytest.mark.el2
def test_aarch32_el1_with_has_el2_is_refused(guest, guest_pool):
    g = guest_pool.get()
    _need_aarch32(g)
    if not g.caps.get("KVM_CAP_ARM_EL2"):
        pytest.skip(f"kernel {g.caps.get('uname')}: no KVM_CAP_ARM_EL2")
    p = get_payload("a32_calls")
    r = g.run(scenario("a32_with_el2", p, el2=True), payload=p)
    assert r.outcome == "setup_error" and r.raw.get("errno") == "EINVAL", r.describe()


# ---- PSCI from AArch32: in-kernel vs the emulator's aarch32 path (firmware/psci32.S) ----------------------
U32 = 0xFFFF_FFFF
PSCI32_EXPECTED = [
    0x1_0003,           # 0 PSCI_VERSION (KVM 1.3; the emulator's default minor is 3)
    U32,                # 1 FEATURES(CPU_ON64): NOT_SUPPORTED for an AArch32 caller (kvm_psci_check_allowed_function)
    0,                  # 2 FEATURES(CPU_ON)
    U32,                # 3 FEATURES(AFFINITY_INFO64): NOT_SUPPORTED
    U32,                # 4 CPU_ON64 from AArch32: NOT_SUPPORTED, the secondary stays off
    U32,                # 5 AFFINITY_INFO64: NOT_SUPPORTED
    1,                  # 6 AFFINITY_INFO32(1): OFF
    0,                  # 7 CPU_ON32(1): SUCCESS
    0,                  # 8 AFFINITY_INFO32(1): ON
    U32 - 3,            # 9 CPU_ON32 again: ALREADY_ON (-4)
    U32 - 1,            # 10 AFFINITY_INFO32(0x100): no such vCPU, INVALID_PARAMS (-2)
    2,                  # 11 MIGRATE_INFO_TYPE: no Trusted OS
    0,                  # 12 FEATURES(SMCCC_VERSION)
    0,                  # 13 FEATURES(PSCI_FEATURES)
]
CTX32 = 0xC0FFEE32


def _psci32(r):
    import struct
    blk = r.result_block.ljust(0x110, b"\0")
    words = list(struct.unpack_from("<14I", blk, 0))
    magic, ctx, cpsr, code = struct.unpack_from("<4I", blk, 0x100)
    return words, {"magic": magic, "ctx": ctx, "cpsr": cpsr, "code": code}


@pytest.mark.psci
@pytest.mark.parametrize("sec_state", ["a32", "t32"])
@pytest.mark.parametrize("conduit", [pytest.param("hvc", marks=pytest.mark.hvc),
                                     pytest.param("smc", marks=pytest.mark.smc)])
def test_psci_from_aarch32_in_kernel_and_forwarded_agree(guest, guest_pool, conduit, sec_state):
    from harness.model.scenarios import PSCI_FWD
    g = guest_pool.get()
    _need_aarch32(g)
    p = get_payload("psci32")
    params = [{"hvc": 0, "smc": 1}[conduit], {"a32": 0, "t32": 1}[sec_state]]
    views = {}
    for how, filters in (("in_kernel", ()), ("forwarded", PSCI_FWD)):
        r = g.run(scenario(f"psci32_{conduit}_{sec_state}_{how}", p, filters=filters, vcpus=2, params=params),
                  payload=p)
        assert r.outcome == "done" and r.exit_code == 0, r.describe()
        words, sec = _psci32(r)
        assert words == PSCI32_EXPECTED, f"{how}: {[hex(w) for w in words]}\n{r.describe()}"
        assert sec == {"magic": 0x5EC0ED, "ctx": CTX32, "cpsr": sec["cpsr"],
                       "code": {"a32": 0xA32, "t32": 0x732}[sec_state]}, f"{how}: {sec}\n{r.describe()}"
        assert sec["cpsr"] & 0x1F == AA32_SVC | 0x10 and sec["cpsr"] & 0x1C0 == 0x1C0, f"{how}: CPSR {sec['cpsr']:#x}"
        if how == "forwarded":
            calls = r.hypercalls
            assert len(calls) == len(PSCI32_EXPECTED), r.describe()
            assert all(h["pstate"] & kvm.PSR_MODE32_BIT and h["el"] == 1 for h in calls), r.describe()
            on = [e for e in r.events if e["kind"] == "psci" and e.get("effect") == "powered_on"]
            assert on and on[0]["context_id"] == CTX32, r.describe()
        else:
            assert not r.hypercalls, r.describe()
        views[how] = (words, sec)
    assert views["in_kernel"] == views["forwarded"]


# ---- the progress watchdog reads A32/T32 words (harness/guest/watchdog.py isa/decode) ----------------------
@pytest.mark.parametrize("isa,sym,insn", [("a32", "a32_spin_insn", "b ."), ("t32", "t32_spin_insn", "b.w .")])
def test_watchdog_names_an_aarch32_spin(guest, guest_pool, isa, sym, insn):
    """With the scenario's livelock_s opt-in, a payload spinning at one A32 or T32 branch ends as a livelock
    whose message decodes the instruction in the vCPU's own instruction set (PSTATE.nRW/T)."""
    g = guest_pool.get()
    _need_aarch32(g)
    p = get_payload("a32_spin")
    r = g.run(scenario(f"a32_spin_{isa}", p, params=[int(isa == "t32")], livelock_s=1.0, deadline_s=20.0),
              payload=p)
    assert r.outcome == "livelock", r.describe()
    ll = r.livelock
    assert ll["pc"] == p.sym(sym) and ll["insn"] == insn, r.describe()
    assert ll["message"] == f"livelock at pc={p.sym(sym):#x} ({insn})", r.describe()
    assert f"({insn})" in r.livelock_message()
    assert bool(ll["pstate"] & kvm.PSR_AA32_T_BIT) == (isa == "t32")
