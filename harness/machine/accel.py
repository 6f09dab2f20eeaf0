"""Choosing QEMU's accelerator: ``--accel {auto,tcg,kvm}``, with a probe of the host's KVM for nested virt.

Everything the harness tests happens inside the guest kernel's KVM, so the guest must boot at EL2:
QEMU ``-M virt,virtualization=on``.  Under TCG that is emulated (``-cpu max``).  Under KVM (an arm64 host)
it needs the host kernel's nested virt: ``KVM_CHECK_EXTENSION(KVM_CAP_ARM_EL2)`` > 0 on the host's /dev/kvm
(Documentation/virt/kvm/api.rst, KVM_CAP_ARM_EL2; FEAT_NV2 hardware and ``kvm-arm.mode=nested``), and
``-cpu host``.  ``--accel kvm`` never falls back to TCG: if the host cannot do it, the error says exactly
what is missing.  ``--accel auto`` picks KVM only when all of it is there, else TCG, and says why.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass

from ..errors import SetupError

KVM_CHECK_EXTENSION = 0xAE03  # _IO(KVMIO, 0x03)
KVM_CAP_ARM_EL2 = 240
KVM_CAP_ARM_EL2_E2H0 = 241
ARM64_MACHINES = ("aarch64", "arm64")


@dataclass(frozen=True)
class HostKvm:
    machine: str  # platform.machine()
    dev_kvm: bool  # /dev/kvm exists and opens read-write
    el2: int = 0  # KVM_CHECK_EXTENSION(KVM_CAP_ARM_EL2) on the host
    e2h0: int = 0
    error: str = ""  # why /dev/kvm could not be opened or queried


@dataclass(frozen=True)
class AccelPlan:
    accel: str  # "kvm" | "tcg"
    cpu: str  # "host" | "max"
    virtualization: bool
    note: str  # one line: why this plan (printed by the harness)


def probe_host(dev: str = "/dev/kvm") -> HostKvm:
    """Ask the host's KVM (ctypes ioctl) whether it can give a guest EL2.  Never raises."""
    machine = platform.machine()
    if not os.path.exists(dev):
        return HostKvm(machine, False, error=f"{dev} does not exist")
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return HostKvm(machine, False, error=f"cannot open {dev}: {e.strerror}")
    try:
        if machine not in ARM64_MACHINES:
            return HostKvm(machine, True)  # an x86 /dev/kvm cannot run arm64 guests: do not ask it about arm caps
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        el2 = libc.ioctl(fd, KVM_CHECK_EXTENSION, ctypes.c_ulong(KVM_CAP_ARM_EL2))
        e2h0 = libc.ioctl(fd, KVM_CHECK_EXTENSION, ctypes.c_ulong(KVM_CAP_ARM_EL2_E2H0))
        return HostKvm(machine, True, max(el2, 0), max(e2h0, 0))
    finally:
        os.close(fd)


def plan(requested: str, host: HostKvm) -> AccelPlan:
    """The accelerator for ``--accel requested`` on this host; SetupError when ``kvm`` cannot work."""
    tcg = AccelPlan("tcg", "max", True, "")
    if requested == "tcg":
        return AccelPlan("tcg", "max", True, "accel tcg (requested): -cpu max, EL2 emulated")
    problems = []
    if host.machine not in ARM64_MACHINES:
        problems.append(f"the host is {host.machine}, not arm64 (KVM runs arm64 guests only on arm64 hosts)")
    elif not host.dev_kvm:
        problems.append(f"no usable /dev/kvm ({host.error or 'absent'})")
    elif host.el2 <= 0:
        problems.append("the host KVM has no nested virt (KVM_CHECK_EXTENSION(KVM_CAP_ARM_EL2) = 0: needs FEAT_NV2 "
                        "hardware, Linux 6.16+ and kvm-arm.mode=nested on the host), so the guest kernel would boot "
                        "at EL1 without KVM")
    if requested == "kvm":
        if problems:
            raise SetupError("--accel kvm is unavailable: " + "; ".join(problems),
                             hint="use --accel tcg (emulates EL2; slower), or run on an arm64 host with nested virt")
        return AccelPlan("kvm", "host", True, f"accel kvm: -cpu host, virtualization=on (host KVM_CAP_ARM_EL2 = "
                                              f"{host.el2})")
    if requested != "auto":
        raise SetupError(f"--accel {requested!r}: use auto, tcg or kvm")
    if problems:
        return AccelPlan(tcg.accel, tcg.cpu, tcg.virtualization, "accel auto -> tcg: " + "; ".join(problems))
    return AccelPlan("kvm", "host", True, f"accel auto -> kvm: -cpu host, virtualization=on (host KVM_CAP_ARM_EL2 = "
                                          f"{host.el2})")


def qemu_probe_argv(qemu_bin: str = "qemu-system-aarch64") -> list[str]:
    """A QEMU that only checks it can create a KVM virt machine with EL2, then quits over QMP on stdio."""
    return [qemu_bin, "-accel", "kvm", "-M", "virt,virtualization=on,gic-version=3", "-cpu", "host", "-S",
            "-nodefaults", "-display", "none", "-qmp", "stdio"]


def qemu_can_nest(qemu_bin: str = "qemu-system-aarch64", timeout_s: float = 20.0) -> tuple[bool, str]:
    """Does this QEMU accept virtualization=on with KVM on this host?  (ok, QEMU's complaint if not)."""
    try:
        r = subprocess.run(qemu_probe_argv(qemu_bin), input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
                           capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return r.returncode == 0, r.stderr.strip()


_resolved: dict[tuple[str, str], AccelPlan] = {}


def resolve(requested: str, qemu_bin: str = "qemu-system-aarch64", host: HostKvm | None = None) -> AccelPlan:
    """``plan()`` on the probed host; for KVM, also asks QEMU whether it can do virtualization=on with KVM.
    Probed once per process and (requested, qemu_bin)."""
    key = (requested, qemu_bin)
    if host is None and key in _resolved:
        return _resolved[key]
    p = _resolve(requested, qemu_bin, host)
    if host is None:
        _resolved[key] = p
    return p


def _resolve(requested: str, qemu_bin: str, host: HostKvm | None) -> AccelPlan:
    p = plan(requested, host or probe_host())
    if p.accel == "kvm":
        ok, why = qemu_can_nest(qemu_bin)
        if not ok:
            msg = f"{qemu_bin} refuses -accel kvm -M virt,virtualization=on: {why or 'no reason given'}"
            if requested == "kvm":
                raise SetupError(f"--accel kvm is unavailable: {msg}", hint="use --accel tcg, or a newer QEMU")
            return AccelPlan("tcg", "max", True, f"accel auto -> tcg: {msg}")
    return p


def resolve_accel(accel: str, qemu_bin: str = "qemu-system-aarch64") -> str:
    """tcg as asked; kvm/auto probe the host's KVM for nested virt (:func:`resolve`): an impossible ``--accel kvm``
    raises SetupError naming what is missing instead of falling back to TCG."""
    if accel == "tcg":
        return accel
    return resolve(accel, qemu_bin).accel
