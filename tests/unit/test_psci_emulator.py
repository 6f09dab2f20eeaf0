"""The userspace PSCI emulator as a pure state machine (DEN0022; KVM's psci.c where the spec leaves a choice)."""

import pytest

from harness.guest import psci
from harness.guest.psci import CpuState, Psci

U64 = 0xFFFF_FFFF_FFFF_FFFF


def machine(n=2, minor=3):
    return Psci([CpuState(mpidr=0x8000_0000 | i, on=(i == 0)) for i in range(n)], minor=minor)


def x0(outcome):
    return outcome.regs[0]


def test_version_reports_1_minor():
    assert x0(machine(minor=3).call(0, psci.PSCI_VERSION, [])) == 0x10003
    assert x0(machine(minor=1).call(0, psci.PSCI_VERSION, [])) == 0x10001


def test_cpu_on_starts_an_off_cpu_with_entry_and_context():
    m = machine()
    out = m.call(0, psci.CPU_ON64, [1, 0x4000_1000, 0xDEAD_BEEF_CAFE])
    assert out.regs == [psci.SUCCESS, 0, 0, 0]
    assert out.effect == ("cpu_on", 1, 0x4000_1000, 0xDEAD_BEEF_CAFE)
    assert m.affinity_state() == [True, True]


def test_cpu_on_twice_is_already_on():
    m = machine()
    m.call(0, psci.CPU_ON64, [1, 0x4000_1000, 0])
    assert x0(m.call(0, psci.CPU_ON64, [1, 0x4000_1000, 0])) == psci.ALREADY_ON & U64


def test_cpu_on_unknown_or_malformed_mpidr_is_invalid_params():
    m = machine()
    assert x0(m.call(0, psci.CPU_ON64, [7, 0, 0])) == psci.INVALID_PARAMS & U64
    assert x0(m.call(0, psci.CPU_ON64, [1 << 63 | 1, 0, 0])) == psci.INVALID_PARAMS & U64


def test_cpu_on_32bit_narrows_arguments():
    m = machine()
    out = m.call(0, psci.CPU_ON, [0xFFFF_FFFF_0000_0001, 0x1_4000_1000, 0xAAAA_BBBB_CCCC_DDDD])
    assert out.effect == ("cpu_on", 1, 0x4000_1000, 0xCCCC_DDDD)


def test_cpu_off_does_not_return_and_powers_off():
    m = machine()
    m.call(0, psci.CPU_ON64, [1, 0, 0])
    out = m.call(1, psci.CPU_OFF, [])
    assert out.regs is None and out.effect == ("cpu_off",)
    assert m.affinity_state() == [True, False]


@pytest.mark.parametrize("level,target,expected", [
    (0, 0, psci.AFFINITY_ON), (0, 1, psci.AFFINITY_OFF), (0, 5, psci.INVALID_PARAMS),
    (1, 0, psci.AFFINITY_ON), (1, 0x100, psci.INVALID_PARAMS), (4, 0, psci.INVALID_PARAMS),
    (0, 1 << 48, psci.INVALID_PARAMS),
])
def test_affinity_info(level, target, expected):
    assert x0(machine().call(0, psci.AFFINITY_INFO64, [target, level])) == expected & U64


def test_migrate_family():
    m = machine()
    assert x0(m.call(0, psci.MIGRATE_INFO_TYPE, [])) == psci.TOS_MP
    for fid in (psci.MIGRATE, psci.MIGRATE64, psci.MIGRATE_INFO_UP_CPU, psci.MIGRATE_INFO_UP_CPU64):
        assert x0(m.call(0, fid, [])) == psci.NOT_SUPPORTED & U64


def test_system_off_and_reset_end_the_vm_like_kvm():
    m = machine()
    off = m.call(0, psci.SYSTEM_OFF, [])
    assert off.effect == ("system_event", psci.EVENT_SHUTDOWN, 0)
    assert x0(off) == psci.INTERNAL_FAILURE & U64     # KVM preloads x0 in case userspace resumes
    assert m.call(0, psci.SYSTEM_RESET, []).effect == ("system_event", psci.EVENT_RESET, 0)


def test_system_reset2_types():
    m = machine()
    assert m.call(0, psci.SYSTEM_RESET2, [0]).effect == ("system_event", psci.EVENT_RESET, psci.FLAG_PSCI_RESET2)
    assert m.call(0, psci.SYSTEM_RESET2_64, [0x8000_0001]).effect[0] == "system_event"
    assert x0(m.call(0, psci.SYSTEM_RESET2, [1])) == psci.INVALID_PARAMS & U64
    assert x0(machine(minor=0).call(0, psci.SYSTEM_RESET2, [0])) == psci.NOT_SUPPORTED & U64


def test_system_off2_cookie_must_be_zero():
    m = machine()
    assert m.call(0, psci.SYSTEM_OFF2, [1, 0]).effect == ("system_event", psci.EVENT_SHUTDOWN, psci.FLAG_PSCI_OFF2)
    assert x0(m.call(0, psci.SYSTEM_OFF2_64, [1, 1])) == psci.INVALID_PARAMS & U64
    assert x0(m.call(0, psci.SYSTEM_OFF2_64, [2, 0])) == psci.INVALID_PARAMS & U64


def test_features_match_dispatch_table():
    m = machine()
    assert x0(m.call(0, psci.PSCI_FEATURES, [psci.CPU_ON64])) == 0
    assert x0(m.call(0, psci.PSCI_FEATURES, [psci.SMCCC_VERSION])) == 0
    assert x0(m.call(0, psci.PSCI_FEATURES, [psci.SYSTEM_OFF2])) == psci.OFF2_HIBERNATE_OFF
    assert x0(m.call(0, psci.PSCI_FEATURES, [psci.MIGRATE])) == psci.NOT_SUPPORTED & U64
    assert x0(m.call(0, psci.PSCI_FEATURES, [0x8400_001F])) == psci.NOT_SUPPORTED & U64
    assert x0(m.call(0, psci.PSCI_FEATURES, [psci.CPU_ON64], aarch32=True)) == psci.NOT_SUPPORTED & U64


def test_unknown_psci_function_is_not_supported():
    assert x0(machine().call(0, 0x8400_001F, [])) == psci.NOT_SUPPORTED & U64


def test_cpu_suspend_returns_success():
    out = machine().call(0, psci.CPU_SUSPEND64, [0, 0, 0])
    assert out.regs == [psci.SUCCESS, 0, 0, 0] and out.effect == ("suspend",)


def test_results_zero_x1_to_x3_like_kvm():
    assert machine().call(0, psci.PSCI_VERSION, []).regs == [0x10003, 0, 0, 0]


def test_system_off2_64_type_is_a_uint32_and_the_cookie_is_not():
    """DEN0022F.b SYSTEM_OFF2(uint32 type, cookie); KVM reads the type into a u32 (arch/arm64/kvm/psci.c:298,385)
    and checks the cookie in full (psci.c:390-391).  Kept by tests/system/test_psci_fuzz.py REGRESSIONS."""
    m = machine()
    out = m.call(0, psci.SYSTEM_OFF2_64, [(1 << 32) | psci.OFF2_HIBERNATE_OFF, 0])
    assert out.effect == ("system_event", psci.EVENT_SHUTDOWN, psci.FLAG_PSCI_OFF2)
    assert machine().call(0, psci.SYSTEM_OFF2_64, [0xFFFF_FFFF_0000_0000, 0]).effect[0] == "system_event"
    assert x0(machine().call(0, psci.SYSTEM_OFF2_64, [(1 << 32) | 2, 0])) == psci.INVALID_PARAMS & U64
    assert x0(machine().call(0, psci.SYSTEM_OFF2_64, [1, 1 << 32])) == psci.INVALID_PARAMS & U64
    # the 32-bit id narrows x2 first (kvm_psci_narrow_to_32bit): a cookie with only high bits is 0
    assert machine().call(0, psci.SYSTEM_OFF2, [1, 1 << 32]).effect[0] == "system_event"
