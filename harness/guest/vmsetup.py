"""A scenario's VM before its vCPUs run: the vCPU features it asks for, the SMCCC filter ranges installed
(each with the errno KVM answered), and the VM-fd device-attribute probes (harness/guest/runner.py ``setup``)."""

from __future__ import annotations

import ctypes

from .. import protocol as P
from . import kvm


def vcpu_features(spec: dict) -> tuple[int, ...]:
    """KVM_ARM_VCPU_INIT features: PSCI 0.2 (unless ``psci_0_2`` is False), HAS_EL2, HAS_EL2_E2H0."""
    feats = []
    if spec.get("psci_0_2", True):
        feats.append(kvm.KVM_ARM_VCPU_PSCI_0_2)
    if spec["el2"]:
        feats.append(kvm.KVM_ARM_VCPU_HAS_EL2)
    if spec["e2h0"]:
        feats.append(kvm.KVM_ARM_VCPU_HAS_EL2_E2H0)
    if aarch32(spec):       # an AArch32 EL1 payload (KVM refuses it together with HAS_EL2: arm.c init_check_features)
        feats.append(kvm.KVM_ARM_VCPU_EL1_32BIT)
    return tuple(feats)


def aarch32(spec: dict) -> bool:
    """The payload runs in AArch32 (A32 or T32 at entry: harness/images/payloads.py ``Payload.state``)."""
    return spec["payload"].get("state", "aarch64") != "aarch64"


def aarch32_entry(entry: int, thumb: bool) -> tuple[int, int]:
    """(PC, PSTATE) that start an AArch32 EL1 vCPU at ``entry``: SVC mode with A, I and F masked (0x1d3, KVM's
    own reset value VCPU_RESET_PSTATE_SVC, arch/arm64/kvm/reset.c), plus T (bit 5) for T32 -- an entry with
    bit 0 set (interworking address) is T32 too, as KVM's PSCI CPU_ON does it (reset.c kvm_reset_vcpu)."""
    thumb = thumb or bool(entry & 1)
    return entry & ~1, kvm.PSTATE_RESET_SVC32 | (kvm.PSR_AA32_T_BIT if thumb else 0)


def install_filters(filt, vm_fd: int, filters) -> list[dict]:
    """Install each range through ``filt`` (harness/guest/smccc.py ``Filter``): [{base, nr, action, errno}]."""
    out = []
    for f in filters:
        f = P.validate_filter(f)    # late_filters are not checked by validate_scenario: shapes, action names, pad
        rec = {"base": f["base"], "nr": f["nr"], "action": f["action"], "errno": None}
        try:
            filt.install(vm_fd, f["base"], f["nr"], f["action"], f["pad"])
        except kvm.KvmError as e:
            rec["errno"] = e.errname
        out.append(rec)
    return out


def probe_attrs(vm_fd: int, probes) -> list[dict]:
    """VM-fd device-attribute probes: ``{"ioctl": "has"|"get", "group", "attr"}`` -> errno or None.

    (Documentation/virt/kvm/devices/vm.rst section 6: HAS answers 0 for the filter; other groups/attrs ENXIO;
    the VM fd has no GET.)
    """
    out = []
    for pr in probes:
        kind = pr.get("ioctl", "has")
        buf = ctypes.create_string_buffer(64)
        attr = kvm.DeviceAttr(flags=0, group=pr.get("group", 0), attr=pr.get("attr", 0), addr=ctypes.addressof(buf))
        req = {"has": kvm.KVM_HAS_DEVICE_ATTR, "get": kvm.KVM_GET_DEVICE_ATTR}[kind]
        rec = {"ioctl": kind, "group": attr.group, "attr": attr.attr, "errno": None}
        try:
            kvm.ioctl(vm_fd, req, attr)
        except kvm.KvmError as e:
            rec["errno"] = e.errname
        out.append(rec)
    return out
