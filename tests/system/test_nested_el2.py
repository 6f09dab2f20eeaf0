"""Nested EL2 guests (KVM_ARM_VCPU_HAS_EL2): SMCCC routing from a guest hypervisor at vEL2 and from its own
EL1 guest, on the VHE (E2H=1) vCPU and on the nVHE variant (KVM_ARM_VCPU_HAS_EL2_E2H0).

ABI: docs/kvm-smccc-abi.md §1.3 (HAS_EL2, E2H0, reset PSTATE EL2h), §2.2 (handle_hvc()/handle_smc() under NV:
HVC never reaches the filter, an inner SMC with the guest's HCR_EL2.TSC goes to vEL2 before the PC
increment, every other SMC #0 goes through the filter), §2.3 (in-kernel PSCI CPU_ON), §6 items 23-27;
measured cases in docs/platform.md "Nested routing, measured"; routing table and surprises in
docs/nested-routing.md.

Every scenario runs once per guest and variant (a ~20-90 ms nested VM, never destroyed: runner GRAVEYARD);
the tests below assert one behaviour each on the shared result.  The skips come from the plugin:
``el2`` -> "KVM_CAP_ARM_EL2 is 0 ...", ``e2h0`` -> "KVM_CAP_ARM_EL2_E2H0 is 0".
"""

import pytest

from harness.guest import kvm, psci
from harness.images import payloads as pl
from harness.images.payloads import get_payload
from harness.model import payload_abi as abi
from harness.model.capabilities import release_version
from harness.model.known_bad import KNOWN_BAD
from harness.model.scenarios import PSCI_BASE32, PSCI_BASE64, PSCI_FWD, PSCI_NR, deny, handle, scenario

pytestmark = [pytest.mark.el2, pytest.mark.psci]

VARIANTS = [pytest.param(False, id="e2h"), pytest.param(True, id="e2h0", marks=pytest.mark.e2h0)]
HANDLER_MARK = 0x5EED_0001            # what the Python handler answers to PSCI_VERSION: KVM never says this
PSCI_VERSION = psci.PSCI_VERSION
CTX = 0xC0FFEE
HCR_HCD = 1 << 29                     # HCR_EL2.HCD (firmware/common.inc)
# Kernel series whose KVM re-masks vEL2's HCR_EL2 at every exit, so that a RES0 HCD written at vEL2 reads set until
# the next exit and 0 after it (measured on 7.3.4; 7.2.13 keeps the written value): docs/nested-routing.md, surprise 5
HCR_REMASKED_AT_EXIT = ((7, 3),)
HCR_E2H = 1 << 34
ID_AA64PFR0_EL3 = 0xF << 12          # ID_AA64PFR0_EL1.EL3, bits [15:12]
MODE_MASK, MODE_EL1H, MODE_EL2H = 0xF, 0x5, 0x9
SPSR_EL1H_DAIF = 0x3C5
VEC_CUR_SPX, VEC_LOWER_A64 = 0x200, 0x400
U64 = (1 << 64) - 1
SMC_FLAG = kvm.KVM_HYPERCALL_EXIT_SMC
HIDE_EL3 = [{"reg": "id_aa64pfr0_el1", "clear": ID_AA64PFR0_EL3}]
PSCI_DENY = [deny(PSCI_BASE32, PSCI_NR), deny(PSCI_BASE64, PSCI_NR)]
PSCI_HANDLE = [handle(PSCI_BASE32, PSCI_NR), handle(PSCI_BASE64, PSCI_NR)]
REPLY = {PSCI_VERSION: [HANDLER_MARK]}
CALLS = [("smc", [PSCI_VERSION, 0x1111, 0x2222, 0x3333])]
FWD_REPLY = [HANDLER_MARK, 0xA1, 0xA2, 0xA3]

# name -> (payload, scenario keywords); el2=True and the variant's e2h0 are added by NestedRuns.get
SCENARIOS = {
    "hello": ("el2_hello", {}),
    "hello_no_el3": ("el2_hello", {"set_regs": HIDE_EL3}),
    "vectors": ("el2_vectors", {"filters": PSCI_FWD, "replies": REPLY}),
    "vectors_hcd": ("el2_vectors", {"filters": PSCI_FWD, "replies": REPLY,
                                    "params": abi.encode_el2_vectors_params(hcd=True)}),
    "vectors_hcd_no_el3": ("el2_vectors", {"filters": PSCI_FWD, "replies": REPLY, "set_regs": HIDE_EL3,
                                           "params": abi.encode_el2_vectors_params(hcd=True)}),
    "calls_fwd": ("smccc_calls", {"filters": PSCI_FWD, "replies": {PSCI_VERSION: FWD_REPLY},
                                  "params": abi.encode_call_table(CALLS)}),
    "calls_deny": ("smccc_calls", {"filters": PSCI_DENY, "params": abi.encode_call_table(CALLS)}),
    "calls_handle": ("smccc_calls", {"filters": PSCI_HANDLE, "params": abi.encode_call_table(CALLS)}),
    "ghyp": ("el2_guest_hyp", {"filters": PSCI_FWD, "replies": REPLY}),
    "ghyp_tsc": ("el2_guest_hyp", {"filters": PSCI_FWD, "replies": REPLY,
                                   "params": abi.encode_guest_hyp_params(tsc=True)}),
    "ghyp_proxy_hvc": ("el2_guest_hyp", {"filters": PSCI_FWD, "replies": REPLY,
                                         "params": abi.encode_guest_hyp_params(proxy=True, tsc=True)}),
    "ghyp_proxy_smc": ("el2_guest_hyp", {"filters": PSCI_FWD, "replies": REPLY,
                                         "params": abi.encode_guest_hyp_params(tsc=True, proxy_smc=True)}),
    "ghyp_hcd": ("el2_guest_hyp", {"filters": PSCI_FWD, "replies": REPLY,
                                   "params": abi.encode_guest_hyp_params(hcd=True)}),
    "ghyp_hcd_no_el3": ("el2_guest_hyp", {"filters": PSCI_FWD, "replies": REPLY, "set_regs": HIDE_EL3,
                                          "params": abi.encode_guest_hyp_params(hcd=True)}),
    "cpu_on_kernel": ("el2_cpu_on", {"vcpus": 2, "params": abi.encode_cpu_on_params(1, CTX)}),
    "cpu_on_fwd": ("el2_cpu_on", {"vcpus": 2, "filters": PSCI_FWD, "params": abi.encode_cpu_on_params(1, CTX)}),
}


class NestedRuns:
    """Runs each (scenario, variant) once per booted guest; later tests reuse the result."""

    def __init__(self):
        self.results = {}

    def get(self, guest, name: str, e2h0: bool):
        key = (id(guest), name, e2h0)
        if key not in self.results:
            payload_name, kw = SCENARIOS[name]
            p = get_payload(payload_name)
            spec = scenario(f"nested_{name}_{'e2h0' if e2h0 else 'e2h'}", p, el2=True, e2h0=e2h0,
                            deadline_s=30.0, **kw)
            self.results[key] = guest.run(spec, payload=p)
        return self.results[key]


@pytest.fixture(scope="module")
def nested():
    return NestedRuns()


def ok(r):
    """The run ended with the payload's DONE 0 (and no vCPU error)."""
    assert r.outcome == "done" and r.exit_code == pl.DONE_OK and not r.errors, r.describe()
    return r


def block(r) -> bytes:
    return r.result_block.ljust(pl.RESULT_BLOCK_SIZE, b"\0")


def mode(pstate: int) -> int:
    return pstate & MODE_MASK


def signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


# ---- 1. the payload runs at EL2, E2H as the vCPU feature says ------------------------------------------
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_has_el2_vcpu_runs_the_payload_at_el2(guest, nested, e2h0):
    """§1.3: a HAS_EL2 vCPU starts at EL2h; the payload reads CurrentEL = 0x8 (EL2)."""
    r = ok(nested.get(guest, "hello", e2h0))
    assert r.reports[0] == 0x8, r.describe()


@pytest.mark.parametrize("e2h0", VARIANTS)
def test_hcr_el2_e2h_is_set_unless_the_vcpu_is_e2h0(guest, nested, e2h0):
    """§1.3: HCR_EL2.E2H is RES1 for HAS_EL2 (VHE), RES0 with HAS_EL2_E2H0 (nVHE); the guest reads it."""
    r = ok(nested.get(guest, "hello", e2h0))
    hcr = r.reports[1]
    assert bool(hcr & HCR_E2H) == (not e2h0), f"HCR_EL2 = {hcr:#x}\n{r.describe()}"


# ---- 2. SMC #0 from vEL2: forwarded (flag, PC, reply), DENY, HANDLE -----------------------------------------
def _only_exit(r):
    assert len(r.hypercalls) == 1, r.describe()
    return r.hypercalls[0]


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_vel2_smc_is_forwarded_with_the_smc_flag(guest, nested, e2h0):
    """§2.2 last row, §6 item 24: SMC #0 at vEL2 in a FWD range -> KVM_EXIT_HYPERCALL, nr = id, flags = SMC."""
    r = ok(nested.get(guest, "vectors", e2h0))
    h = _only_exit(r)
    assert (h["nr"], h["flags"], h["conduit"]) == (PSCI_VERSION, SMC_FLAG, "smc"), r.describe()


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_vel2_smc_exit_pc_is_past_the_smc_and_pstate_is_el2h(guest, nested, e2h0):
    """§1.2/§2.2: the PC is already advanced at the exit; PSTATE.M = EL2h tells the call came from vEL2."""
    r = ok(nested.get(guest, "vectors", e2h0))
    h = _only_exit(r)
    assert h["pc"] == r.payload.sym("smc_insn") + 4, f"exit PC {r.symbol(h['pc'])}\n{r.describe()}"
    assert mode(h["pstate"]) == MODE_EL2H, r.describe()


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_vel2_smc_reply_reaches_the_guest(guest, nested, e2h0):
    """§1.2: the x0 the VMM writes with KVM_SET_ONE_REG is what the vEL2 payload sees after its SMC."""
    r = ok(nested.get(guest, "vectors", e2h0))
    assert _only_exit(r)["reply"] == [HANDLER_MARK], r.describe()
    assert r.reports[4] == HANDLER_MARK, r.describe()


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_vel2_smc_call_table_round_trips_x0_to_x3(guest, nested, e2h0):
    """§1.2, §6 items 8/9 at vEL2: the handler reads x1..x3 with KVM_GET_ONE_REG; the x0..x3 it writes are what
    the smccc_calls payload records, and x4..x30 are left alone."""
    r = ok(nested.get(guest, "calls_fwd", e2h0))
    h = _only_exit(r)
    assert h["args"][:4] == CALLS[0][1] and h["pc"] == r.payload.sym("call_smc0") + 4, r.describe()
    rec = abi.decode_call_results(block(r), 1)[0]
    assert rec["ret"] == FWD_REPLY, f"x0..x3 = {[hex(x) for x in rec['ret']]}\n{r.describe()}"
    assert rec["regs"][4:18] == [0] * 14, "x4..x17 must be the guest's own values (0)\n" + r.describe()
    assert rec["regs"][18:31] == [abi.call_pattern(0, n) for n in range(18, 31)], r.describe()


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_vel2_smc_deny_returns_minus_one_without_an_exit(guest, nested, e2h0):
    """§1.1 DENY, §6 items 11/24: no exit; x0 = -1 (NOT_SUPPORTED), x1..x3 = 0, from vEL2 too."""
    r = ok(nested.get(guest, "calls_deny", e2h0))
    assert r.hypercalls == [], r.describe()
    assert abi.decode_call_header(block(r))["current_el"] == 2, r.describe()
    rec = abi.decode_call_results(block(r), 1)[0]
    assert rec["ret"] == [U64, 0, 0, 0], f"x0..x3 = {[hex(x) for x in rec['ret']]}\n{r.describe()}"


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_vel2_smc_handle_range_is_answered_in_kernel(guest, nested, e2h0):
    """§1.1 HANDLE, §6 item 24: an explicit HANDLE range keeps PSCI in the kernel: KVM's PSCI_VERSION, no exit."""
    r = ok(nested.get(guest, "calls_handle", e2h0))
    assert r.hypercalls == [], r.describe()
    rec = abi.decode_call_results(block(r), 1)[0]
    assert rec["ret"][0] == guest.caps["psci_version_raw"], r.describe()


# ---- 3. HVC #0 from vEL2: the guest's own EL2 vector; HCD ---------------------------------------------------
@pytest.mark.hvc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_vel2_hvc_is_not_forwarded_to_userspace(guest, nested, e2h0):
    """§2.2 "HVC from vEL2": never reaches the filter, even with the PSCI ranges FWD_TO_USER."""
    r = ok(nested.get(guest, "vectors", e2h0))
    assert [h for h in r.hypercalls if h["conduit"] == "hvc"] == [], r.describe()


@pytest.mark.hvc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_vel2_hvc_lands_on_the_guest_el2_vector_as_hvc64(guest, nested, e2h0):
    """§2.2, §6 item 25: VBAR_EL2+0x200 (current EL, SPx), ESR_EL2.EC = 0x16 (HVC64), ELR_EL2 = HVC + 4."""
    r = ok(nested.get(guest, "vectors", e2h0))
    v = abi.decode_el2_vectors(block(r))
    assert v["count"] == 1, f"{v}\n{r.describe()}"
    t = v["traps"][0]
    assert (t["vector"], t["ec"], t["elr"]) == (VEC_CUR_SPX, pl.EC_HVC64, r.payload.sym("hvc_insn") + 4), (
        f"{ {k: hex(x) for k, x in t.items()} }\n{r.describe()}")
    assert r.reports[0] == pl.HVC_MARKER, r.describe()


@pytest.mark.hvc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_hcd_is_res0_at_vel2_while_kvm_advertises_el3(guest, nested, e2h0):
    """docs/platform.md "Nested routing": with ID_AA64PFR0_EL1.EL3 != 0 HCR_EL2.HCD is RES0: the HVC still lands
    on the vEL2 vector as HVC64 although the guest set HCD."""
    hello = ok(nested.get(guest, "hello", e2h0))
    assert hello.reports[2] & ID_AA64PFR0_EL3, f"guest ID_AA64PFR0_EL1 = {hello.reports[2]:#x}: no EL3 advertised"
    r = ok(nested.get(guest, "vectors_hcd", e2h0))
    v = abi.decode_el2_vectors(block(r))
    assert [(t["vector"], t["ec"]) for t in v["traps"]] == [(VEC_CUR_SPX, pl.EC_HVC64)], r.describe()
    assert r.reports[7] == v["hcr_el2"], r.describe()
    first, after = v["hcr_el2"] & HCR_HCD, v["hcr_el2_after_exit"] & HCR_HCD
    if release_version(guest.caps["uname"])[:2] in HCR_REMASKED_AT_EXIT:
        # KVM rewrites vEL2's HCR_EL2 with its RES0 masks at every exit (arch/arm64/kvm/hyp/vhe/switch.c
        # fixup_nv_guest_exit; HCD is RES0 with EL3 advertised: config.c NEEDS_FEAT(HCR_EL2_HCD, not_feat_aa64el3)):
        # HCD reads 0 after an exit.  The read right after the write shows it set unless an exit fell between
        # the MSR and the MRS (a host tick under TCG), so it is not asserted: docs/nested-routing.md, surprise 5.
        assert not after, f"HCR_EL2 after an exit = {v['hcr_el2_after_exit']:#x}\n{r.describe()}"
    else:
        # a RES0 bit reads the same before and after an exit (7.2.13 keeps the written value both times)
        assert first == after, (f"HCR_EL2 {v['hcr_el2']:#x}, then {v['hcr_el2_after_exit']:#x} after an exit: HCD changed "
                                f"under the guest, as on the series in HCR_REMASKED_AT_EXIT (docs/nested-routing.md, "
                                f"surprise 5); add this series there if that is this kernel's behaviour\n{r.describe()}")
    assert r.reports[0] == pl.HVC_MARKER, r.describe()


@pytest.mark.parametrize("e2h0", VARIANTS)
def test_vmm_can_hide_el3_from_the_nested_guest(guest, nested, e2h0):
    """docs/platform.md "Nested routing": KVM_SET_ONE_REG(ID_AA64PFR0_EL1) with EL3 = 0 before the first run is
    accepted, and the vEL2 guest then reads EL3 = 0 (the precondition of the HCD tests below)."""
    r = ok(nested.get(guest, "hello_no_el3", e2h0))
    _el3_hidden(r)
    assert r.reports[2] & ID_AA64PFR0_EL3 == 0, f"guest ID_AA64PFR0_EL1 = {r.reports[2]:#x}\n{r.describe()}"


def _el3_hidden(r):
    """The set_reg trace record: ID_AA64PFR0_EL1 read back with EL3 = 0 before the first run."""
    recs = [e for e in r.events if e["kind"] == "set_reg"]
    assert len(recs) == 1 and recs[0]["old"] & ID_AA64PFR0_EL3, r.describe()
    assert recs[0]["readback"] & ID_AA64PFR0_EL3 == 0, r.describe()


@pytest.mark.hvc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_hcd_makes_vel2_hvc_undef_once_the_vmm_hides_el3(guest, nested, e2h0):
    """docs/platform.md "Nested routing": after KVM_SET_ONE_REG(ID_AA64PFR0_EL1, EL3 = 0) before the first run, HCD
    is effective: the HVC is an UNDEF (EC 0) on the guest's VBAR_EL2+0x200; no exit."""
    r = ok(nested.get(guest, "vectors_hcd_no_el3", e2h0))
    _el3_hidden(r)
    v = abi.decode_el2_vectors(block(r))
    assert [(t["vector"], t["ec"]) for t in v["traps"]] == [(VEC_CUR_SPX, pl.EC_UNKNOWN)], r.describe()
    assert r.reports[0] == pl.UNDEF_MARKER, r.describe()
    # with EL3 hidden HCD is a real bit: it survives KVM's rewrite at an exit, both read-backs show it set
    assert v["hcr_el2"] & HCR_HCD and v["hcr_el2_after_exit"] & HCR_HCD, (
        f"HCR_EL2 {v['hcr_el2']:#x} then {v['hcr_el2_after_exit']:#x} after an exit\n{r.describe()}")
    assert [h for h in r.hypercalls if h["conduit"] == "hvc"] == [], r.describe()


@pytest.mark.hvc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_hcd_undef_at_vel2_returns_to_the_hvc_itself(guest, nested, e2h0, request):
    """Arm ARM: the preferred return address of an UNDEFINED instruction is that instruction, so ELR_EL2 of the
    UNDEF an HCD-disabled HVC becomes should be the HVC (the inner-EL1 case in this file does get that).
    Known bad on the series harness/model/known_bad.py names (strict xfail there; a plain test everywhere else,
    and on a kernel whose release carries the fix's tag, e.g. 7.3.4-kvm-nv-hcd-elr built from patches/linux:
    docs/upstream/kvm-nv-hcd-undef-elr.md)."""
    bad = KNOWN_BAD["hcd_undef_elr_after_hvc"]
    if bad.applies(guest.caps["uname"]):
        request.applymarker(pytest.mark.xfail(strict=True, reason=bad.reason(guest.caps["uname"])))
    r = ok(nested.get(guest, "vectors_hcd_no_el3", e2h0))
    t = abi.decode_el2_vectors(block(r))["traps"][0]
    assert t["elr"] == r.payload.sym("hvc_insn"), f"ELR_EL2 = {r.symbol(t['elr'])}"


# ---- 4. a guest hypervisor and its own EL1 guest ------------------------------------------------------------
def _ghyp(r):
    return abi.decode_guest_hyp(block(r))


def _traps(g, ec):
    return [t for t in g["traps"] if t["ec"] == ec]


@pytest.mark.hvc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_inner_hvc_goes_to_the_guest_hypervisor_never_to_userspace(guest, nested, e2h0):
    """§2.2 first row, §6 item 26: the inner EL1 guest's HVC #0 (a FWD PSCI id) -> L1's VBAR_EL2+0x400,
    EC 0x16, ELR = HVC + 4, SPSR = EL1h; no KVM_EXIT_HYPERCALL."""
    r = ok(nested.get(guest, "ghyp", e2h0))
    g = _ghyp(r)
    p = r.payload
    t = g["traps"][0]
    assert (t["vector"], t["ec"], t["elr"], t["spsr"]) == (
        VEC_LOWER_A64, pl.EC_HVC64, p.sym("inner_hvc") + 4, SPSR_EL1H_DAIF), r.describe()
    assert g["x0_after_hvc"] == pl.HVC_MARKER, r.describe()
    assert [h for h in r.hypercalls if h["conduit"] == "hvc" or h["pc"] == p.sym("inner_hvc") + 4] == [], \
        r.describe()


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_inner_smc_with_tsc_traps_to_the_guest_hypervisor_unadvanced(guest, nested, e2h0):
    """§2.2 (forward_smc_trap), §6 item 27: guest HCR_EL2.TSC = 1 -> L1 takes the inner SMC: EC 0x17 (SMC64),
    ELR_EL2 = the SMC itself (not advanced); no exit to userspace."""
    r = ok(nested.get(guest, "ghyp_tsc", e2h0))
    g = _ghyp(r)
    smc = _traps(g, pl.EC_SMC64)
    assert len(smc) == 1 and smc[0]["elr"] == r.payload.sym("inner_smc"), r.describe()
    assert smc[0]["spsr"] == SPSR_EL1H_DAIF, r.describe()
    assert r.hypercalls == [], r.describe()
    assert g["x0_after_smc"] == pl.SMC_MARKER, r.describe()


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_inner_smc_without_tsc_is_forwarded_with_el1h_pstate(guest, nested, e2h0):
    """§2.2 last row, §6 item 27: TSC = 0 -> the inner SMC goes through the filter: exit with flags = SMC,
    PC = SMC + 4 and the inner context's PSTATE (EL1h, 0x3c5), not vEL2's."""
    r = ok(nested.get(guest, "ghyp", e2h0))
    h = _only_exit(r)
    assert (h["nr"], h["flags"]) == (PSCI_VERSION, SMC_FLAG), r.describe()
    assert h["pc"] == r.payload.sym("inner_smc") + 4, f"exit PC {r.symbol(h['pc'])}\n{r.describe()}"
    assert h["pstate"] & 0x3CF == SPSR_EL1H_DAIF, f"pstate {h['pstate']:#x}\n{r.describe()}"
    assert _traps(_ghyp(r), pl.EC_SMC64) == [], "the guest hypervisor saw the SMC\n" + r.describe()


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_inner_smc_reply_reaches_the_inner_guest(guest, nested, e2h0):
    """§1.2 under NV: the x0 the VMM writes for an exit taken from the inner EL1 goes to the inner guest."""
    r = ok(nested.get(guest, "ghyp", e2h0))
    assert _ghyp(r)["x0_after_smc"] == HANDLER_MARK, r.describe()


@pytest.mark.hvc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_hcd_is_res0_for_the_inner_hvc_while_kvm_advertises_el3(guest, nested, e2h0):
    """docs/platform.md "Nested routing": L1 sets HCR_EL2.HCD, but with EL3 advertised the inner HVC still goes to L1."""
    r = ok(nested.get(guest, "ghyp_hcd", e2h0))
    g = _ghyp(r)
    # L1 asked for HCD; its read-back right after the write is not asserted: it is set unless an exit fell
    # between the write and the read, after which KVM has re-masked it (docs/nested-routing.md, surprise 5;
    # the post-exit value is asserted by test_hcd_is_res0_at_vel2_while_kvm_advertises_el3).
    assert g["flags"] & abi.GH_FLAG_HCD and g["inner_exceptions"] == [], r.describe()
    assert g["x0_after_hvc"] == pl.HVC_MARKER and len(_traps(g, pl.EC_HVC64)) == 2, r.describe()


@pytest.mark.hvc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_hcd_makes_the_inner_hvc_undef_once_the_vmm_hides_el3(guest, nested, e2h0):
    """docs/platform.md "Nested routing": with EL3 hidden, HCD works: the inner HVC is an UNDEF taken to the inner
    EL1 vector (ESR_EL1.EC 0, ELR_EL1 = the HVC itself); L1 sees nothing, userspace sees nothing."""
    r = ok(nested.get(guest, "ghyp_hcd_no_el3", e2h0))
    _el3_hidden(r)
    g = _ghyp(r)
    assert g["ntraps"] == 0 and g["exit_path"] == abi.GH_EXIT_BY_INNER, r.describe()
    first = g["inner_exceptions"][0]
    assert (first["ec"], first["elr"]) == (pl.EC_UNKNOWN, r.payload.sym("inner_hvc")), r.describe()
    assert g["x0_after_hvc"] == pl.UNDEF_MARKER, r.describe()
    assert [h for h in r.hypercalls if h["conduit"] == "hvc"] == [], r.describe()


# ---- 5. proxying: L1 re-issues its guest's PSCI call with SMC -------------------------------------------------
PROXIED = [pytest.param("ghyp_proxy_hvc", "x0_after_hvc", abi.GH_ACT_HVC_PROXY, id="inner_hvc",
                        marks=pytest.mark.hvc),
           pytest.param("ghyp_proxy_smc", "x0_after_smc", abi.GH_ACT_SMC_PROXY, id="inner_smc_tsc")]


@pytest.mark.smc
@pytest.mark.parametrize("name,field,action", PROXIED)
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_guest_hypervisor_proxies_the_inner_psci_call_with_smc(guest, nested, e2h0, name, field, action):
    """Seed thread ("A nested hypervisor can (and does) use SMCs as the conduit"), §2.2: L1 catches the inner
    PSCI call and re-issues it with SMC #0 from vEL2; the only exit is that SMC (PSTATE EL2h)."""
    r = ok(nested.get(guest, name, e2h0))
    h = _only_exit(r)
    assert (h["nr"], h["flags"]) == (PSCI_VERSION, SMC_FLAG), r.describe()
    assert h["pc"] == r.payload.sym("l1_proxy_smc") + 4 and mode(h["pstate"]) == MODE_EL2H, r.describe()
    assert [t["action"] for t in _ghyp(r)["traps"]].count(action) == 1, r.describe()


@pytest.mark.smc
@pytest.mark.parametrize("name,field,action", PROXIED)
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_proxied_answer_reaches_the_innermost_guest(guest, nested, e2h0, name, field, action):
    """The Python handler's answer to the proxied SMC travels back through L1 to the inner EL1 guest."""
    r = ok(nested.get(guest, name, e2h0))
    assert _ghyp(r)[field] == HANDLER_MARK, r.describe()


# ---- 6. PSCI CPU_ON for EL2 vCPUs: in-kernel and forwarded, and they agree ----------------------------------
CPU_ON_PATHS = [pytest.param("cpu_on_kernel", id="in_kernel"), pytest.param("cpu_on_fwd", id="forwarded")]


def _cpu_on(r):
    d = abi.decode_cpu_on(block(r))
    assert d["secondary"] is not None, (
        f"the secondary never published its record within the payload's 20 s wait: {d}\n"
        "(no vcpu1 report at all = its thread was never scheduled in the L1 guest: docs/nested-routing.md, "
        f"'A secondary that never runs')\n{r.describe()}")
    return d


@pytest.mark.smc
@pytest.mark.parametrize("path", CPU_ON_PATHS)
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_cpu_on_starts_the_secondary_at_el2(guest, nested, e2h0, path):
    """§1.3 reset PSTATE, §6 item 17: the CPU_ON target of a HAS_EL2 VM starts at EL2 (CurrentEL = 0x8), with
    the vCPU's E2H."""
    r = ok(nested.get(guest, path, e2h0))
    sec = _cpu_on(r)["secondary"]
    assert sec["current_el"] == 2, r.describe()
    assert bool(sec["hcr_el2"] & HCR_E2H) == (not e2h0), f"secondary HCR_EL2 {sec['hcr_el2']:#x}\n{r.describe()}"


@pytest.mark.smc
@pytest.mark.parametrize("path", CPU_ON_PATHS)
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_cpu_on_secondary_starts_at_the_entry_with_the_context_id(guest, nested, e2h0, path):
    """§2.3 CPU_ON: PC = entry (x2), x0 = context id (x3); CPU_ON returns SUCCESS."""
    r = ok(nested.get(guest, path, e2h0))
    d = _cpu_on(r)
    assert d["cpu_on"] == psci.SUCCESS, r.describe()
    assert (d["secondary"]["pc"], d["secondary"]["x0"]) == (r.payload.sym("secondary_entry"), CTX), r.describe()
    assert (r.reports_of(1)[abi.CO_SLOT_SEC_X0], r.reports_of(1)[abi.CO_SLOT_SEC_EL]) == (CTX, 0x8), r.describe()


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_forwarded_cpu_on_exits_from_vel2_and_the_vmm_starts_the_secondary(guest, nested, e2h0):
    """§1.2 + kvmtool-style userspace PSCI (§3.5): CPU_ON64 over SMC from vEL2 exits with flags = SMC and the
    caller's EL2h PSTATE; the VMM re-INITs the parked secondary at the entry with the context id."""
    r = ok(nested.get(guest, "cpu_on_fwd", e2h0))
    on = [h for h in r.hypercalls if h["nr"] == psci.CPU_ON64]
    assert len(on) == 2 and all(h["flags"] == SMC_FLAG and mode(h["pstate"]) == MODE_EL2H for h in on), r.describe()
    assert on[0]["args"][1:4] == [1, r.payload.sym("secondary_entry"), CTX], r.describe()
    started = [e for e in r.events if e["kind"] == "psci" and e["effect"] == "powered_on"]
    assert [(e["vcpu"], e["entry"], e["context_id"]) for e in started] == [
        (1, r.payload.sym("secondary_entry"), CTX)], r.describe()


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_in_kernel_cpu_on_never_exits(guest, nested, e2h0):
    """§2.3: without a filter KVM's own PSCI powers the secondary on; nothing reaches userspace."""
    r = ok(nested.get(guest, "cpu_on_kernel", e2h0))
    assert r.hypercalls == [], r.describe()


@pytest.mark.smc
@pytest.mark.parametrize("e2h0", VARIANTS)
def test_cpu_on_in_kernel_and_forwarded_agree(guest, nested, e2h0):
    """Differential (§2.3 vs harness/guest/psci.py): every value both guests saw — CPU_ON, AFFINITY_INFO, the
    repeated CPU_ON (ALREADY_ON), the secondary's x0, EL, PC, MPIDR, HCR_EL2 and SCTLR_EL2 — is the same."""
    rk = ok(nested.get(guest, "cpu_on_kernel", e2h0))
    ru = ok(nested.get(guest, "cpu_on_fwd", e2h0))
    # both sides are what they claim: no filter and no exit in-kernel; forwarded: filter installed, and the
    # PSCI calls the program makes (CPU_ON64, AFFINITY_INFO64, CPU_ON64 again) each exited to the emulator
    assert rk.filters == [] and rk.hypercalls == [], rk.describe()
    assert ru.filters and all(f["errno"] is None for f in ru.filters), ru.describe()
    psci_exits = [h for h in ru.hypercalls if (h["nr"] & 0xBFFF_FFE0) == 0x8400_0000]
    assert all(h["by"] == "psci" for h in psci_exits), ru.describe()
    assert [h["nr"] for h in psci_exits if h["vcpu"] == 0] == [psci.CPU_ON64, psci.AFFINITY_INFO64, psci.CPU_ON64], \
        ru.describe()
    dk, du = _cpu_on(rk), _cpu_on(ru)
    diff = {k: (dk[k], du[k]) for k in dk if dk[k] != du[k]}
    assert not diff, (f"in-kernel vs forwarded differ: {diff}\n--- in-kernel ---\n{rk.describe()}"
                      f"\n--- forwarded ---\n{ru.describe()}")
    assert (dk["affinity"], dk["cpu_on_again"]) == (psci.AFFINITY_ON, psci.ALREADY_ON), rk.describe()
