"""UAPI constants and layouts of harness.guest.kvm against the values in docs/platform.md / docs/kvm-smccc-abi.md §1.5."""

import ctypes

import pytest

from harness.guest import kvm, smccc


@pytest.mark.parametrize("name,value", [
    ("KVM_CREATE_VM", 0xAE01), ("KVM_RUN", 0xAE80), ("KVM_SET_USER_MEMORY_REGION", 0x4020AE46),
    ("KVM_GET_ONE_REG", 0x4010AEAB), ("KVM_SET_ONE_REG", 0x4010AEAC), ("KVM_ARM_VCPU_INIT", 0x4020AEAE),
    ("KVM_ARM_PREFERRED_TARGET", 0x8020AEAF), ("KVM_SET_DEVICE_ATTR", 0x4018AEE1),
    ("KVM_HAS_DEVICE_ATTR", 0x4018AEE3), ("KVM_CREATE_DEVICE", 0xC00CAEE0),
    ("KVM_GET_MP_STATE", 0x8004AE98), ("KVM_SET_MP_STATE", 0x4004AE99),
])
def test_ioctl_numbers(name, value):
    assert getattr(kvm, name) == value


def test_struct_sizes():
    assert ctypes.sizeof(kvm.SmcccFilter) == 24
    assert ctypes.sizeof(kvm.UserspaceMemoryRegion) == 32
    assert ctypes.sizeof(kvm.VcpuInit) == 32
    assert ctypes.sizeof(kvm.DeviceAttr) == 24
    assert ctypes.sizeof(kvm.CreateDevice) == 12


def test_register_ids():
    assert kvm.xreg(0) == 0x6030000000100000
    assert kvm.xreg(30) == 0x603000000010003C
    assert kvm.REG_PC == 0x6030000000100040
    assert kvm.REG_PSTATE == 0x6030000000100042
    assert kvm.REG_ID_AA64PFR0_EL1 == 0x603000000013C020
    assert kvm.REG_MPIDR_EL1 == 0x603000000013C005
    assert kvm.REG_HCR_EL2 == 0x603000000013E088
    assert kvm.REG_PSCI_VERSION == 0x6030000000140000
    assert kvm.FW_BMAP_REGS["vendor_hyp"] == 0x6030000000160002


def test_function_id_fields():
    assert smccc.call_id(True, True, smccc.OWNER_STANDARD, 3) == 0xC4000003
    assert smccc.owner(0xC6000003) == smccc.OWNER_VENDOR_HYP
    assert smccc.narrow(0x84000000, -1) == 0xFFFF_FFFF
    assert smccc.narrow(0xC4000003, -1) == 0xFFFF_FFFF_FFFF_FFFF
    assert smccc.conduit(1) == "smc" and smccc.conduit(0) == "hvc"
