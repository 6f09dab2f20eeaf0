"""SMCCC function ids, conduits and the KVM SMCCC filter.

References: Arm DEN0028 (SMCCC) and ``include/linux/arm-smccc.h`` (docs/kvm-smccc-abi.md §4.1);
the filter ABI in ``Documentation/virt/kvm/devices/vm.rst`` §6 (docs/kvm-smccc-abi.md §1.1).
"""

from __future__ import annotations

import ctypes

from .. import protocol as P
from . import kvm

# ---- function id fields (DEN0028 §2.5) --------------------------------------------------------------
FAST_CALL = 1 << 31
SMC64 = 1 << 30
OWNER_SHIFT = 24
OWNER_MASK = 0x3F

OWNER_ARCH = 0
OWNER_CPU = 1
OWNER_SIP = 2
OWNER_OEM = 3
OWNER_STANDARD = 4
OWNER_STANDARD_HYP = 5
OWNER_VENDOR_HYP = 6
OWNER_TRUSTED_APP = 48
OWNER_TRUSTED_OS = 50

SMCCC_VERSION = 0x8000_0000
SMCCC_ARCH_FEATURES = 0x8000_0001
SMCCC_ARCH_WORKAROUND_1 = 0x8000_8000
SMCCC_RET_SUCCESS = 0
SMCCC_RET_NOT_SUPPORTED = -1
SMCCC_RET_NOT_REQUIRED = -2
SMCCC_RET_INVALID_PARAMETER = -3

# Ranges KVM reserves for itself: the Arm Architecture Calls (vm.rst §6; hypercalls.c).

ACTION_NAMES = {kvm.KVM_SMCCC_FILTER_HANDLE: "handle", kvm.KVM_SMCCC_FILTER_DENY: "deny",
                kvm.KVM_SMCCC_FILTER_FWD_TO_USER: "fwd"}


def call_id(fast: bool, smc64: bool, owner: int, func: int) -> int:
    """ARM_SMCCC_CALL_VAL()."""
    return (FAST_CALL if fast else 0) | (SMC64 if smc64 else 0) | ((owner & OWNER_MASK) << OWNER_SHIFT) | (func & 0xFFFF)


def is_smc64(fid: int) -> bool:
    return bool(fid & SMC64)


def owner(fid: int) -> int:
    return (fid >> OWNER_SHIFT) & OWNER_MASK


def func_num(fid: int) -> int:
    return fid & 0xFFFF


def conduit(flags: int) -> str:
    """Which instruction made the call, from ``kvm_run.hypercall.flags`` (api.rst, KVM_EXIT_HYPERCALL)."""
    return "smc" if flags & kvm.KVM_HYPERCALL_EXIT_SMC else "hvc"


def to_u64(v: int) -> int:
    return v & P.U64_MASK


def narrow(fid: int, value: int) -> int:
    """SMC32/HVC32 calls pass and return 32-bit values (DEN0028 §2.6): truncate for a 32-bit id."""
    return value & 0xFFFF_FFFF if not is_smc64(fid) else to_u64(value)


def set_filter(vm_fd: int, base: int, nr: int, action: int, pad=None) -> None:
    """KVM_SET_DEVICE_ATTR(KVM_ARM_VM_SMCCC_CTRL, KVM_ARM_VM_SMCCC_FILTER) on the VM fd.

    Raises :class:`kvm.KvmError` with the kernel's errno (EINVAL, EEXIST, EBUSY, ENXIO ...), unchanged:
    the filter-contract tests assert on it.
    """
    f = kvm.SmcccFilter(base=base, nr_functions=nr, action=action)
    for i, b in enumerate(pad or ()):
        f.pad[i] = b
    attr = kvm.DeviceAttr(flags=0, group=kvm.KVM_ARM_VM_SMCCC_CTRL, attr=kvm.KVM_ARM_VM_SMCCC_FILTER,
                          addr=ctypes.addressof(f))
    kvm.ioctl(vm_fd, kvm.KVM_SET_DEVICE_ATTR, attr)


def has_filter(vm_fd: int, group: int = kvm.KVM_ARM_VM_SMCCC_CTRL, attr: int = kvm.KVM_ARM_VM_SMCCC_FILTER) -> None:
    """KVM_HAS_DEVICE_ATTR probe: there is no capability bit for the filter (docs/kvm-smccc-abi.md §1.1)."""
    a = kvm.DeviceAttr(flags=0, group=group, attr=attr, addr=0)
    kvm.ioctl(vm_fd, kvm.KVM_HAS_DEVICE_ATTR, a)


class Filter:
    """The ranges a VMM installed, kept on the VMM side because the attribute is write-only.

    KVM offers no GET for the filter (arm.c handles only HAS/SET), so a VMM that wants to migrate or
    restore a VM must remember what it installed and replay it before the first KVM_RUN (§5).
    """

    def __init__(self):
        self.ranges: list[tuple[int, int, int]] = []

    def install(self, vm_fd: int, base: int, nr: int, action: int, pad=None) -> None:
        set_filter(vm_fd, base, nr, action, pad)
        self.ranges.append((base, nr, action))

    def replay(self, vm_fd: int) -> None:
        for base, nr, action in self.ranges:
            set_filter(vm_fd, base, nr, action)

    def action_for(self, fid: int) -> int | None:
        for base, nr, action in self.ranges:
            if base <= fid < base + nr:
                return action
        return None

    def to_json(self) -> list[dict]:
        return [{"base": b, "nr": n, "action": ACTION_NAMES.get(a, a)} for b, n, a in self.ranges]
