"""What a kernel must offer, and what a test needs: the capability expectation table per kernel series, the
kernel release parser, and the capability -> skip-reason table.  Pure: reads the guest's reported caps only.
(tests/unit/test_kernel.py checks the tables; tests/system/test_capabilities.py holds real kernels to them.)"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CapExpectation:
    """One line of :data:`EXPECTED_CAPS`: a kernel at or after ``since`` (and, when ``nested``, booted with
    ``kvm-arm.mode=nested`` on a CPU model with FEAT_NV2, i.e. QEMU ``-cpu max``/TCG) must report
    ``caps[cap] == value``.  ``source`` says where the expectation comes from."""

    cap: str
    value: object
    since: tuple[int, int]
    nested: bool
    source: str

    def line(self) -> str:
        cond = f">= {self.since[0]}.{self.since[1]}" + (" with kvm-arm.mode=nested" if self.nested else "")
        return f"EXPECTED_CAPS: {self.cap} == {self.value!r} for kernels {cond} ({self.source})"


# What each kernel series must offer.  A kernel that should have a capability and lacks it fails
# tests/system/test_capabilities.py with the line below; the tests that need it skip (skip_reason), and
# `smccc-harness bisect` treats those skips as 125, not good (harness/kdev/bisect.py).
EXPECTED_CAPS: tuple[CapExpectation, ...] = (
    CapExpectation("kvm", True, (0, 0), False,
                   "the guest boots at EL2 (virtualization=on): /dev/kvm must exist"),
    CapExpectation("api_version", 12, (0, 0), False, "KVM_API_VERSION, include/uapi/linux/kvm.h"),
    CapExpectation("smccc_filter", True, (6, 4), False,
                   "KVM_ARM_VM_SMCCC_FILTER, arch/arm64/kvm/hypercalls.c kvm_smccc_set_filter, Linux 6.4"),
    CapExpectation("KVM_CAP_ARM_SYSTEM_SUSPEND", 1, (5, 19), False,
                   "arch/arm64/kvm/arm.c kvm_vm_ioctl_check_extension, Linux 5.19"),
    CapExpectation("psci_version", "1.3", (6, 13), False,
                   "KVM_ARM_PSCI_LATEST = PSCI 1.3 (SYSTEM_OFF2), include/kvm/arm_psci.h, Linux 6.13"),
    CapExpectation("KVM_CAP_ARM_EL2", 1, (6, 16), True,
                   "arch/arm64/kvm/arm.c: cpus_have_final_cap(ARM64_HAS_NESTED_VIRT), Linux 6.16"),
    CapExpectation("KVM_CAP_ARM_EL2_E2H0", 1, (6, 16), True,
                   "arch/arm64/kvm/arm.c: cpus_have_final_cap(ARM64_HAS_HCR_NV1); QEMU -cpu max has FEAT_NV, "
                   "so NV1 is there, Linux 6.16"),
)


def release_version(uname: str | None) -> tuple[int, int, int] | None:
    """``7.3.4+deb13-cloud-arm64`` -> (7, 3, 4); ``6.16-rc1`` -> (6, 16, 0); None if unparseable."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", uname or "")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def nested_requested(cmdline: str) -> bool:
    """The last ``kvm-arm.mode=`` of the kernel command line is ``nested`` (the kernel's own parsing order)."""
    modes = re.findall(r"(?:^|\s)kvm-arm\.mode=(\S+)", cmdline or "")
    return bool(modes) and modes[-1] == "nested"


def expected_caps(uname: str | None, cmdline: str, accel: str = "tcg") -> list[CapExpectation]:
    """The lines of :data:`EXPECTED_CAPS` that apply to this kernel release, command line and accelerator
    (nested lines only under TCG, whose ``-cpu max`` has FEAT_NV2; under KVM the host CPU decides)."""
    v = release_version(uname)
    if v is None:
        return []
    nested = nested_requested(cmdline) and accel == "tcg"
    return [e for e in EXPECTED_CAPS if v[:2] >= e.since and (nested or not e.nested)]


def missing_caps(caps: dict, cmdline: str, accel: str = "tcg") -> list[str]:
    """One message per :data:`EXPECTED_CAPS` line this kernel does not meet (empty: all met)."""
    out = []
    for e in expected_caps(caps.get("uname"), cmdline, accel):
        got = caps.get(e.cap)
        if got != e.value:
            out.append(f"kernel {caps.get('uname')}: {e.cap} is {got!r}, expected {e.value!r}; {e.line()}")
    return out


# ---- capabilities -> skip reasons -------------------------------------------------------------------
def skip_reason(caps: dict, markers: set[str] | frozenset[str]) -> str | None:
    """Why a test with these markers cannot run on the booted kernel (None: it can).

    ``caps`` is what the guest agent detected once per boot (harness/guest/agent.py): ``kvm``,
    ``smccc_filter``, ``KVM_CAP_ARM_EL2``, ``KVM_CAP_ARM_EL2_E2H0``, ``psci_version``, ``system_suspend``.
    Markers: ``filter``/``psci`` need the SMCCC filter, ``el2`` KVM_CAP_ARM_EL2, ``e2h0`` KVM_CAP_ARM_EL2_E2H0,
    ``system_suspend`` KVM_CAP_ARM_SYSTEM_SUSPEND.
    """
    k = caps.get("uname")
    if not caps.get("kvm"):
        return f"kernel {k}: {caps.get('reason', '/dev/kvm is absent')}"
    if markers & {"filter", "psci"} and not caps.get("smccc_filter"):
        return (f"kernel {k}: no SMCCC filter (KVM_HAS_DEVICE_ATTR on the VM fd failed: "
                f"{caps.get('smccc_filter_errno')}); it needs Linux 6.4+")
    if "el2" in markers and not caps.get("KVM_CAP_ARM_EL2"):
        return (f"kernel {k}: KVM_CAP_ARM_EL2 is 0 (nested virt needs 6.16+, FEAT_NV2 and kvm-arm.mode=nested; "
                f"KVM says: {caps.get('kvm_mode')})")
    if "e2h0" in markers and not caps.get("KVM_CAP_ARM_EL2_E2H0"):
        return f"kernel {k}: KVM_CAP_ARM_EL2_E2H0 is 0"
    if "system_suspend" in markers and not caps.get("KVM_CAP_ARM_SYSTEM_SUSPEND"):
        return f"kernel {k}: KVM_CAP_ARM_SYSTEM_SUSPEND is 0 (PSCI SYSTEM_SUSPEND exits need Linux 6.2+)"
    return None

