"""harness/model/capabilities.py EXPECTED_CAPS: which capabilities a kernel series must offer, and the message when it does not."""

import pytest

from harness.machine.config import default_cmdline
from harness.model import capabilities as K

NESTED = default_cmdline()
FULL_73 = {"uname": "7.3.4+deb13-cloud-arm64", "kvm": True, "api_version": 12, "smccc_filter": True,
           "KVM_CAP_ARM_EL2": 1, "KVM_CAP_ARM_EL2_E2H0": 1, "KVM_CAP_ARM_SYSTEM_SUSPEND": 1, "psci_version": "1.3"}


@pytest.mark.parametrize("uname,want", [
    ("7.3.4+deb13-cloud-arm64", (7, 3, 4)), ("6.16-rc1", (6, 16, 0)), ("6.12.117+deb13-cloud-arm64", (6, 12, 117)),
    ("garbage", None), (None, None)])
def test_release_version(uname, want):
    assert K.release_version(uname) == want


@pytest.mark.parametrize("cmdline,want", [
    (NESTED, True), ("console=ttyAMA0", False), (NESTED + " kvm-arm.mode=nvhe", False),
    ("kvm-arm.mode=nvhe kvm-arm.mode=nested", True)])
def test_nested_is_the_last_kvm_arm_mode(cmdline, want):
    assert K.nested_requested(cmdline) is want


@pytest.mark.parametrize("uname,caps", [
    ("7.3.4+deb13-cloud-arm64", ["kvm", "api_version", "smccc_filter", "KVM_CAP_ARM_SYSTEM_SUSPEND", "psci_version",
                                 "KVM_CAP_ARM_EL2", "KVM_CAP_ARM_EL2_E2H0"]),
    ("7.2.13+deb14-cloud-arm64", ["kvm", "api_version", "smccc_filter", "KVM_CAP_ARM_SYSTEM_SUSPEND", "psci_version",
                                  "KVM_CAP_ARM_EL2", "KVM_CAP_ARM_EL2_E2H0"]),
    ("6.12.117+deb13-cloud-arm64", ["kvm", "api_version", "smccc_filter", "KVM_CAP_ARM_SYSTEM_SUSPEND"]),
    ("6.3.0", ["kvm", "api_version", "KVM_CAP_ARM_SYSTEM_SUSPEND"]),
])
def test_each_series_expects_exactly_these(uname, caps):
    assert [e.cap for e in K.expected_caps(uname, NESTED)] == caps


def test_el2_is_expected_only_with_nested_mode_under_tcg():
    assert "KVM_CAP_ARM_EL2" not in [e.cap for e in K.expected_caps("7.3.4", "console=ttyAMA0 kvm-arm.mode=nvhe")]
    assert "KVM_CAP_ARM_EL2" not in [e.cap for e in K.expected_caps("7.3.4", NESTED, accel="kvm")]


def test_a_complete_kernel_meets_the_table():
    assert K.missing_caps(FULL_73, NESTED) == []


@pytest.mark.parametrize("lost,value", [("KVM_CAP_ARM_EL2", 0), ("KVM_CAP_ARM_EL2_E2H0", 0), ("smccc_filter", False)])
def test_a_lost_capability_names_the_table_line(lost, value):
    (msg,) = K.missing_caps({**FULL_73, lost: value}, NESTED)
    line = next(e for e in K.EXPECTED_CAPS if e.cap == lost).line()
    assert msg == f"kernel 7.3.4+deb13-cloud-arm64: {lost} is {value!r}, expected {FULL_73[lost]!r}; {line}"
