"""VMM-side save and restore of a paused VM, SMCCC filter included (docs/vmm-save-restore.md).

KVM keeps no readable copy of the SMCCC filter: the attribute is write-only (arm.c handles only
KVM_HAS_DEVICE_ATTR/KVM_SET_DEVICE_ATTR on the VM fd) and it is frozen once any vCPU has run (EBUSY,
hypercalls.c kvm_smccc_set_filter).  So a VMM that migrates or snapshots a guest must (docs/kvm-smccc-abi.md §5):

1. remember the ranges it installed (:class:`harness.guest.smccc.Filter`),
2. on the destination, create the VM and REPLAY the ranges before the first KVM_RUN of any vCPU,
3. restore the vCPUs (every register in KVM_GET_REG_LIST, then the mp_state) and guest memory,
4. carry its own userspace state along: here the PSCI emulator's per-vCPU power state.

Registers are saved with KVM_GET_REG_LIST + KVM_GET_ONE_REG (api.rst §4.68, §4.84) — the same generic
approach QEMU uses — so nothing is forgotten; a few registers are read-only or invariant and refuse a SET:
those are counted and reported, not hidden.
"""

from __future__ import annotations

import ctypes
import errno

from . import kvm
from .vm import Vm

KVM_GET_REG_LIST = kvm._IOWR(0xB0, 8)


def reg_size(reg_id: int) -> int:
    """KVM_REG_SIZE(): bytes of a register from bits 52..55 of its id (api.rst KVM_SET_ONE_REG)."""
    return 1 << ((reg_id >> 52) & 0xF)


def reg_list(vcpu_fd: int) -> list[int]:
    probe = (ctypes.c_uint64 * 1)(0)
    try:
        kvm.ioctl(vcpu_fd, KVM_GET_REG_LIST, probe)
        return []
    except kvm.KvmError as e:
        if e.errno != errno.E2BIG:
            raise
    n = probe[0]
    buf = (ctypes.c_uint64 * (n + 1))(n)
    kvm.ioctl(vcpu_fd, KVM_GET_REG_LIST, buf)
    return list(buf[1:buf[0] + 1])


def _get(vcpu_fd: int, reg_id: int) -> bytes:
    buf = ctypes.create_string_buffer(reg_size(reg_id))
    kvm.ioctl(vcpu_fd, kvm.KVM_GET_ONE_REG, kvm.OneReg(id=reg_id, addr=ctypes.addressof(buf)))
    return buf.raw


def _set(vcpu_fd: int, reg_id: int, value: bytes) -> None:
    buf = ctypes.create_string_buffer(value, len(value))
    kvm.ioctl(vcpu_fd, kvm.KVM_SET_ONE_REG, kvm.OneReg(id=reg_id, addr=ctypes.addressof(buf)))


def save_vm(vm: Vm, filter_ranges, psci_on: list[bool]) -> dict:
    """Snapshot a VM whose vCPUs are all out of KVM_RUN."""
    vcpus = []
    for v in vm.vcpus:
        regs = {}
        for rid in reg_list(v.fd):
            try:
                regs[rid] = _get(v.fd, rid)
            except kvm.KvmError:
                pass
        vcpus.append({"features": v.features, "regs": regs, "mp_state": v.get_mp_state()})
    return {"memory": [(m.base, m.read(m.base, m.size)) for m in vm.memory], "vcpus": vcpus,
            "filter": list(filter_ranges), "psci_on": list(psci_on), "gic": vm.gic_fd is not None}


def restore_vm(sys_fd: int, state: dict, *, replay_filter: bool = True, gic=None) -> tuple[Vm, dict]:
    """Build a fresh VM from ``state``; returns (vm, report).  The filter is replayed before any vCPU runs."""
    vm = Vm(sys_fd)
    report = {"regs_set": 0, "regs_refused": 0, "refused": [], "filter_replayed": 0}
    for base, data in state["memory"]:
        vm.add_memory(base, len(data)).write(base, data)
    if replay_filter:
        from .smccc import set_filter
        for base, nr, action in state["filter"]:
            set_filter(vm.fd, base, nr, action)
            report["filter_replayed"] += 1
    for saved in state["vcpus"]:
        vm.add_vcpu(saved["features"])
    if state["gic"] and gic is not None:
        vm.create_vgic_v3(*gic)
    for v, saved in zip(vm.vcpus, state["vcpus"], strict=True):
        for rid, value in saved["regs"].items():
            try:
                _set(v.fd, rid, value)
                report["regs_set"] += 1
            except kvm.KvmError as e:
                report["regs_refused"] += 1
                if len(report["refused"]) < 8:
                    report["refused"].append(f"{rid:#x}:{e.errname}")
        v.set_mp_state(saved["mp_state"])
    return vm, report
