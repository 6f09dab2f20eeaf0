"""The KVM_ARM_VM_SMCCC_FILTER contract, one behaviour per test.

ABI: Documentation/virt/kvm/devices/vm.rst §6 and arch/arm64/kvm/hypercalls.c (docs/kvm-smccc-abi.md §1.1, §1.2,
§1.4, §2.1, §2.2; behaviours §6 items 1–16).  EL1 payloads: firmware/smccc_calls.S (a call table) and
firmware/psci_version.S.  Errnos come straight from the kernel: each filter's result is in
``result.filters[i]["errno"]``.
"""

import pytest

from harness.guest import kvm
from harness.images.payloads import get_payload
from harness.model.known_bad import zero_zero_errno
from harness.model.payload_abi import decode_call_results, encode_call_table
from harness.model.scenarios import PSCI_FWD, deny, fwd, handle, scenario

pytestmark = [pytest.mark.el1, pytest.mark.filter]
CONDUITS = [pytest.param("hvc", marks=pytest.mark.hvc), pytest.param("smc", marks=pytest.mark.smc)]
U64 = 0xFFFF_FFFF_FFFF_FFFF
PSCI_VERSION = 0x8400_0000
CPU_ON64 = 0xC400_0003
SIP_CALL = 0xC200_0123          # SiP service, no implementation anywhere: NOT_SUPPORTED in-kernel
KVM_FEATURES = 0x8600_0000      # vendor hyp: KVM_FEATURES (bitmap KVM_REG_ARM_VENDOR_HYP_BMAP bit 0)
WA1 = 0x8000_8000


def kernel_at_least(guest, major, minor):
    ver = guest.caps["uname"].split("+")[0].split("-")[0].split(".")
    return (int(ver[0]), int(ver[1])) >= (major, minor)


@pytest.fixture(scope="module")
def calls():
    return get_payload("smccc_calls")


def run_calls(guest, payload, table, name, **kw):
    r = guest.run(scenario(name, payload, params=encode_call_table(table), **kw), payload=payload)
    assert r.outcome == "done", r.describe()
    return r, decode_call_results(r.result_block, len(table))


def errnos(result, key="filters"):
    return [f["errno"] for f in result.raw[key]]


def install(guest, payload, filters, name):
    """Install ``filters`` in order on a fresh VM (the payload does nothing but DONE); return the errnos."""
    r = guest.run(scenario(name, payload, params=encode_call_table([]), filters=filters), payload=payload)
    return errnos(r)


# ---- probing ----------------------------------------------------------------------------------------
def test_has_device_attr_probes_the_filter(guest, calls):
    r = guest.run(scenario("probe", calls, params=[0], probes=[
        {"ioctl": "has", "group": 0, "attr": 0}, {"ioctl": "has", "group": 0, "attr": 1},
        {"ioctl": "has", "group": 1, "attr": 0}, {"ioctl": "get", "group": 0, "attr": 0}]), payload=calls)
    assert errnos(r, "probes")[:3] == [None, "ENXIO", "ENXIO"], r.probes


def test_filter_attribute_is_write_only(guest, calls):
    """arm.c handles only HAS and SET on the VM fd: GET fails, so a VMM must remember what it installed."""
    r = guest.run(scenario("probe_get", calls, params=[0], probes=[{"ioctl": "get", "group": 0, "attr": 0}]),
                  payload=calls)
    assert errnos(r, "probes") == ["EINVAL"], r.probes


# ---- EINVAL / EEXIST / accepted -------------------------------------------------------------------------
@pytest.mark.parametrize("bad,why", [
    ({"base": PSCI_VERSION, "nr": 1, "action": "fwd", "pad": [0xFF] + [0] * 14}, "non-zero pad"),
    ({"base": CPU_ON64, "nr": 0, "action": "fwd"}, "zero length"),
    ({"base": 0xFFFF_FFFF, "nr": 0xFFFF_FFFF, "action": "fwd"}, "wrapping range"),
    ({"base": 0xFFFF_FFF0, "nr": 0x20, "action": "fwd"}, "range past 2^32"),
    ({"base": PSCI_VERSION, "nr": 1, "action": 3}, "unknown action 3"),
    ({"base": PSCI_VERSION, "nr": 1, "action": 255}, "unknown action 255"),
])
def test_malformed_filter_is_einval(guest, calls, bad, why):
    assert install(guest, calls, [bad], "einval") == ["EINVAL"], why


def test_base0_nr0_errno_depends_on_kernel_version(guest, calls):
    """(base 0, nr 0): EINVAL where kvm_smccc_set_filter rejects nr == 0 first (6.12 and later), EEXIST where
    only ``end < start`` was checked and the wrapped range reached the insert (6.4-6.11):
    harness/model/known_bad.py zero_zero_errno, decided from arch/arm64/kvm/hypercalls.c."""
    want = zero_zero_errno(guest.caps["uname"])
    got = install(guest, calls, [{"base": 0, "nr": 0, "action": "fwd"}], "base0")
    assert got == [want], f"kernel {guest.caps['uname']}: (0,0) gave {got[0]}, expected {want} for this version"


@pytest.mark.parametrize("base,nr", [(0x8000_0000, 1), (WA1, 1), (0x8000_FFFF, 1), (0xC000_0000, 1),
                                      (0xC000_8000, 0x10), (0x7FFF_FFF0, 0x20)],
                         ids=["arch_version", "arch_wa1", "arch_last", "arch64_first", "arch64_mid", "straddles"])
def test_reserved_arch_ranges_are_eexist(guest, calls, base, nr):
    assert install(guest, calls, [fwd(base, nr)], "reserved") == ["EEXIST"]


def test_overlaps_are_eexist_full_and_partial(guest, calls):
    got = install(guest, calls, [fwd(0x8400_0000, 0x20), fwd(0x8400_0000, 0x20), fwd(0x8400_0010, 0x20),
                                 fwd(0x83FF_FFF0, 0x11), fwd(0x8400_001F, 1)], "overlap")
    assert got == [None, "EEXIST", "EEXIST", "EEXIST", "EEXIST"]


def test_adjacent_and_multiple_ranges_are_accepted(guest, calls):
    got = install(guest, calls, [fwd(0x8400_0000, 0x10), deny(0x8400_0010, 0x10), handle(0xC400_0000, 0x20),
                                 fwd(0xC200_0000, 0x1000), fwd(0x8300_0000, 1)], "adjacent")
    assert got == [None] * 5


def test_filter_is_ebusy_once_any_vcpu_has_run(guest, calls):
    """kvm_vm_has_ran_once(): vCPU 0 ran, vCPU 1 never did; a new, disjoint range is still refused."""
    r = guest.run(scenario("ebusy", calls, params=encode_call_table([]), vcpus=2, filters=[fwd(0xC200_0000, 1)],
                           late_filters=[fwd(0xC300_0000, 1)]), payload=calls)
    assert errnos(r) == [None] and errnos(r, "late_filters") == ["EBUSY"], r.describe()


# ---- runtime behaviour --------------------------------------------------------------------------------
@pytest.mark.parametrize("conduit", CONDUITS)
def test_deny_returns_not_supported_without_an_exit(guest, calls, conduit):
    r, rec = run_calls(guest, calls, [(conduit, [PSCI_VERSION, 11, 12, 13, 14])], f"deny_{conduit}",
                       filters=[deny(PSCI_VERSION)])
    assert r.hypercalls == [], r.describe()
    assert rec[0]["ret"] == [U64, 0, 0, 0], rec[0]
    assert rec[0]["regs"][4] == 14


@pytest.mark.parametrize("conduit", CONDUITS)
def test_handle_range_keeps_in_kernel_psci(guest, calls, conduit):
    r, rec = run_calls(guest, calls, [(conduit, [PSCI_VERSION])], f"handle_{conduit}",
                       filters=[handle(0x8400_0000, 0x20)])
    assert r.hypercalls == [] and rec[0]["ret"][0] == guest.caps["psci_version_raw"], r.describe()


@pytest.mark.parametrize("conduit", CONDUITS)
def test_calls_outside_every_range_stay_in_kernel(guest, calls, conduit):
    r, rec = run_calls(guest, calls, [(conduit, [PSCI_VERSION]), (conduit, [0x8000_0000]), (conduit, [CPU_ON64])],
                       f"outside_{conduit}", filters=[fwd(SIP_CALL)])
    assert r.hypercalls == [], r.describe()
    assert rec[0]["ret"][0] == guest.caps["psci_version_raw"]
    assert rec[1]["ret"][0] == 0x10001            # SMCCC_VERSION 1.1, always in-kernel


@pytest.mark.parametrize("conduit", CONDUITS)
def test_arguments_x1_to_x17_are_readable(guest, calls, conduit):
    regs = [SIP_CALL] + [(0xA5 << 56) | n for n in range(1, 18)]
    r, _ = run_calls(guest, calls, [(conduit, regs)], f"args_{conduit}", filters=[fwd(SIP_CALL)], handler="record")
    assert len(r.hypercalls) == 1 and r.hypercalls[0]["args"] == regs, r.describe()


@pytest.mark.parametrize("conduit", CONDUITS)
def test_results_x0_to_x3_written_back_other_registers_untouched(guest, calls, conduit):
    regs = [SIP_CALL] + [0x5A00 + n for n in range(1, 18)]
    reply = [0x1000_0000_0000_0001, 0x2222, 0x3333_3333_3333_3333, 0x4444]
    r, rec = run_calls(guest, calls, [(conduit, regs)], f"writeback_{conduit}", filters=[fwd(SIP_CALL)],
                       replies={SIP_CALL: reply})
    got = rec[0]["regs"]
    assert got[:4] == reply, r.describe()
    assert got[4:18] == regs[4:18], "x4..x17 must be the guest's own values"
    assert got[18:31] == [0x1800 | n for n in range(18, 31)], "x18..x30 (the payload's pattern) must survive"


@pytest.mark.parametrize("conduit", CONDUITS)
def test_without_write_back_the_guest_sees_its_own_function_id(guest, calls, conduit):
    r, rec = run_calls(guest, calls, [(conduit, [SIP_CALL, 1, 2, 3])], f"noreply_{conduit}",
                       filters=[fwd(SIP_CALL)], handler="record")
    assert len(r.hypercalls) == 1 and r.hypercalls[0]["reply"] is None, r.describe()
    assert rec[0]["ret"] == [SIP_CALL, 1, 2, 3], rec[0]


@pytest.mark.smc
@pytest.mark.parametrize("conduit", ["smc1", "smcffff"])
def test_smc_with_nonzero_immediate_is_never_forwarded(guest, calls, conduit):
    """handle_smc(): an SMC #imm != 0 gets x0 = ~0 and PC += 4, with no filter lookup (§2.2)."""
    r, rec = run_calls(guest, calls, [(conduit, [PSCI_VERSION])], f"{conduit}_fwd", filters=PSCI_FWD)
    assert r.hypercalls == [], r.describe()
    assert rec[0]["ret"][0] == U64


@pytest.mark.hvc
@pytest.mark.parametrize("conduit", ["hvc1", "hvcffff"])
def test_hvc_immediate_is_ignored(guest, calls, conduit):
    r, rec = run_calls(guest, calls, [(conduit, [PSCI_VERSION])], f"{conduit}_fwd", filters=PSCI_FWD,
                       psci_minor=1)
    assert [(h["nr"], h["flags"]) for h in r.hypercalls] == [(PSCI_VERSION, 0)], r.describe()
    assert r.hypercalls[0]["pc"] == calls.sym(f"call_{conduit}") + 4
    assert rec[0]["ret"][0] == 0x10001


@pytest.mark.parametrize("conduit", CONDUITS)
def test_upper_half_of_x0_is_ignored_for_the_function_id(guest, calls, conduit):
    """nr is taken from w0 (smccc_get_function → u32)."""
    r, _ = run_calls(guest, calls, [(conduit, [(0xDEAD << 32) | SIP_CALL])], f"w0_{conduit}",
                     filters=[fwd(SIP_CALL)], handler="record")
    assert [h["nr"] for h in r.hypercalls] == [SIP_CALL], r.describe()


@pytest.mark.parametrize("conduit", CONDUITS)
def test_unimplemented_ids_are_not_supported_in_kernel_and_forwarded_with_fwd(guest, calls, conduit):
    table = [(conduit, [SIP_CALL]), (conduit, [0xB200_0001])]
    r0, rec0 = run_calls(guest, calls, table, f"unimpl_kernel_{conduit}")
    assert [x["ret"][0] for x in rec0] == [U64, U64] and r0.hypercalls == []
    r1, _ = run_calls(guest, calls, table, f"unimpl_fwd_{conduit}", handler="record",
                      filters=[fwd(SIP_CALL), fwd(0xB200_0001)])
    assert [(h["nr"], h["conduit"]) for h in r1.hypercalls] == [(SIP_CALL, conduit), (0xB200_0001, conduit)]


def test_legacy_psci_0_1_ids_can_be_denied(guest, calls):
    """kvmtool installs {0x95c1ba5e, 4, DENY} for PSCI 0.1 (docs/kvm-smccc-abi.md §3.5)."""
    assert install(guest, calls, [deny(0x95C1_BA5E, 4)], "psci01_deny") == [None]


@pytest.mark.hvc
def test_fwd_range_wins_over_a_cleared_firmware_bitmap_bit(guest, calls):
    """KVM_REG_ARM_VENDOR_HYP_BMAP bit 0 cleared → KVM_FEATURES is DENYed in-kernel; with a FWD range
    covering it, it exits to userspace instead (kvm_smccc_get_action: a non-HANDLE filter action wins)."""
    clear = [{"reg": "fw_vendor_hyp", "value": 0}]
    r0, rec0 = run_calls(guest, calls, [("hvc", [KVM_FEATURES])], "bmap_cleared", set_regs=clear)
    assert r0.hypercalls == [] and rec0[0]["ret"][0] == U64, r0.describe()
    r1, _ = run_calls(guest, calls, [("hvc", [KVM_FEATURES])], "bmap_cleared_fwd", set_regs=clear,
                      filters=[fwd(KVM_FEATURES)], handler="record")
    assert [h["nr"] for h in r1.hypercalls] == [KVM_FEATURES], r1.describe()


@pytest.mark.hvc
def test_set_firmware_bitmap_bit_is_handled_in_kernel(guest, calls):
    r, rec = run_calls(guest, calls, [("hvc", [KVM_FEATURES])], "bmap_default")
    assert r.hypercalls == [] and rec[0]["ret"][0] != U64, r.describe()


@pytest.mark.smc
def test_exit_flags_are_exactly_the_smc_bit_for_aarch64(guest, calls):
    """KVM_HYPERCALL_EXIT_16BIT is never set for an AArch64 guest (api.rst)."""
    r, _ = run_calls(guest, calls, [("smc", [SIP_CALL]), ("hvc", [SIP_CALL])], "flags",
                     filters=[fwd(SIP_CALL)], handler="record")
    assert [h["flags"] for h in r.hypercalls] == [kvm.KVM_HYPERCALL_EXIT_SMC, 0], r.describe()
