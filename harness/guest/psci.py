"""A userspace PSCI 1.x emulator (Arm DEN0022), answering calls KVM forwarded with FWD_TO_USER.

It is a pure state machine: :meth:`Psci.call` takes the caller, the function id and x1..x3 and returns an
:class:`Outcome` (the registers to write back and, for CPU_ON/CPU_OFF/SYSTEM_*, the effect the VMM must carry
out). The vCPU threads in :mod:`harness.guest.runner` apply the effects; a target vCPU is only touched by its
own thread, out of KVM_RUN.

Where DEN0022 leaves a choice, this follows KVM's in-kernel implementation (``arch/arm64/kvm/psci.c``,
docs/kvm-smccc-abi.md §2.3) so that the differential tests compare like with like; each such place says so.
"""

from __future__ import annotations

from .. import protocol as P

# ---- function ids (include/uapi/linux/psci.h) ------------------------------------------------------
PSCI_VERSION = 0x8400_0000
CPU_SUSPEND = 0x8400_0001
CPU_SUSPEND64 = 0xC400_0001
CPU_OFF = 0x8400_0002
CPU_ON = 0x8400_0003
CPU_ON64 = 0xC400_0003
AFFINITY_INFO = 0x8400_0004
AFFINITY_INFO64 = 0xC400_0004
MIGRATE = 0x8400_0005
MIGRATE64 = 0xC400_0005
MIGRATE_INFO_TYPE = 0x8400_0006
MIGRATE_INFO_UP_CPU = 0x8400_0007
MIGRATE_INFO_UP_CPU64 = 0xC400_0007
SYSTEM_OFF = 0x8400_0008
SYSTEM_RESET = 0x8400_0009
PSCI_FEATURES = 0x8400_000A
SYSTEM_SUSPEND = 0x8400_000E
SYSTEM_SUSPEND64 = 0xC400_000E
SYSTEM_RESET2 = 0x8400_0012
SYSTEM_RESET2_64 = 0xC400_0012
SYSTEM_OFF2 = 0x8400_0015
SYSTEM_OFF2_64 = 0xC400_0015
SMCCC_VERSION = 0x8000_0000

NAMES = {v: k for k, v in dict(globals()).items() if isinstance(v, int) and k.isupper() and k != "SMCCC_VERSION"}
NAMES[SMCCC_VERSION] = "SMCCC_VERSION"

# ---- return values ---------------------------------------------------------------------------------
SUCCESS = 0
NOT_SUPPORTED = -1
INVALID_PARAMS = -2
DENIED = -3
ALREADY_ON = -4
ON_PENDING = -5
INTERNAL_FAILURE = -6
NOT_PRESENT = -7
DISABLED = -8
INVALID_ADDRESS = -9

AFFINITY_ON = 0
AFFINITY_OFF = 1
TOS_MP = 2                      # MIGRATE_INFO_TYPE: no Trusted OS needing migration
RESET2_VENDOR_START = 0x8000_0000
OFF2_HIBERNATE_OFF = 1

MPIDR_HWID_BITMASK = 0xFF_00FF_FFFF

# KVM_SYSTEM_EVENT_* types and flags the emulator reports for SYSTEM_OFF/RESET (uapi/linux/kvm.h, asm/kvm.h)
EVENT_SHUTDOWN = 1
EVENT_RESET = 2
FLAG_PSCI_RESET2 = 1
FLAG_PSCI_OFF2 = 1


def version(major: int, minor: int) -> int:
    return (major << 16) | minor


def _regs(x0: int) -> list[int]:
    return [x0 & P.U64_MASK, 0, 0, 0]


def name(fid: int) -> str:
    return NAMES.get(fid, f"{fid:#010x}")


def _u64(v: int) -> int:
    return v & P.U64_MASK


# Plain classes, not dataclasses: importing dataclasses (inspect, ast, dis, tokenize) was a quarter of the
# agent's start-up under TCG (~0.26 s of ~1.1 s, `python3 -X importtime` in the guest), paid by every cold
# boot and every agent reload.
class _Record:
    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


class Outcome(_Record):
    """What the VMM must do: write ``regs`` to x0.. (None = leave the registers alone) and carry out ``effect``.

    effect: None; ("cpu_on", target_index, entry, context_id); ("cpu_off",); ("suspend",);
            ("system_event", type, flags)
    """
    __slots__ = ("effect", "regs")

    def __init__(self, regs: list[int] | None, effect: tuple | None = None) -> None:
        self.regs, self.effect = regs, effect


class CpuState(_Record):
    __slots__ = ("mpidr", "on")

    def __init__(self, mpidr: int, on: bool) -> None:
        self.mpidr, self.on = mpidr, on


class Psci(_Record):
    """PSCI state for one VM: per-vCPU power state, indexed like the VM's vCPUs."""
    __slots__ = ("cpus", "events", "minor", "system_suspend")

    def __init__(self, cpus: list[CpuState], minor: int = 3, system_suspend: bool = False,
                 events: list | None = None) -> None:
        self.cpus = cpus
        self.minor = minor              # KVM's default KVM_REG_ARM_PSCI_VERSION on 6.13+ is 1.3
        self.system_suspend = system_suspend
        self.events = [] if events is None else events

    def affinity_state(self) -> list[bool]:
        return [c.on for c in self.cpus]

    # ------------------------------------------------------------------------------------------------
    def call(self, caller: int, fid: int, args: list[int], aarch32: bool = False) -> Outcome:
        """Handle one PSCI (or SMCCC_VERSION) call from vCPU ``caller``; args = [x1, x2, x3]."""
        args = [_u64(a) for a in (list(args) + [0, 0, 0])[:3]]
        if fid & 0x4000_0000 and aarch32:
            # kvm_psci_check_allowed_function(): no 64-bit functions for a 32-bit caller
            return self._ret(NOT_SUPPORTED)
        if not fid & 0x4000_0000:
            # 32-bit calling convention: arguments are 32-bit (kvm_psci_narrow_to_32bit)
            args = [a & 0xFFFF_FFFF for a in args]
        m = self.minor
        if fid == PSCI_VERSION:
            return self._ret(version(1, m))
        if fid in (CPU_SUSPEND, CPU_SUSPEND64):
            # KVM treats every suspend state as standby (WFI) and preserves registers: SUCCESS.
            return Outcome(_regs(SUCCESS), ("suspend",))
        if fid == CPU_OFF:
            self.cpus[caller].on = False
            return Outcome(None, ("cpu_off",))
        if fid in (CPU_ON, CPU_ON64):
            return self._cpu_on(args[0], args[1], args[2])
        if fid in (AFFINITY_INFO, AFFINITY_INFO64):
            return self._ret(self._affinity_info(args[0], args[1]))
        if fid == MIGRATE_INFO_TYPE:
            return self._ret(TOS_MP)
        if fid in (MIGRATE, MIGRATE64, MIGRATE_INFO_UP_CPU, MIGRATE_INFO_UP_CPU64):
            return self._ret(NOT_SUPPORTED)
        if fid == SYSTEM_OFF:
            # KVM preloads x0 with INTERNAL_FAILURE in case userspace resumes the caller.
            return Outcome(_regs(INTERNAL_FAILURE), ("system_event", EVENT_SHUTDOWN, 0))
        if fid == SYSTEM_RESET:
            return Outcome(_regs(INTERNAL_FAILURE), ("system_event", EVENT_RESET, 0))
        if fid == PSCI_FEATURES:
            return self._ret(self._features(args[0] & 0xFFFF_FFFF, aarch32))
        if fid in (SYSTEM_RESET2, SYSTEM_RESET2_64) and m >= 1:
            rtype = args[0] & 0xFFFF_FFFF
            if rtype == 0 or rtype >= RESET2_VENDOR_START:   # SYSTEM_WARM_RESET or vendor-specific
                return Outcome(_regs(INTERNAL_FAILURE), ("system_event", EVENT_RESET, FLAG_PSCI_RESET2))
            return self._ret(INVALID_PARAMS)
        if fid in (SYSTEM_OFF2, SYSTEM_OFF2_64) and m >= 3:
            # The type is a uint32 in both conventions (DEN0022F.b SYSTEM_OFF2; KVM: `u32 arg`, psci.c:298,385):
            # bits [63:32] of x1 are not part of it.  The cookie (x2) is checked in full.  Caught by the PSCI
            # differential on generated programs (tests/system/test_psci_fuzz.py REGRESSIONS).
            if (args[0] & 0xFFFF_FFFF) not in (0, OFF2_HIBERNATE_OFF) or args[1] != 0:
                return self._ret(INVALID_PARAMS)
            return Outcome(_regs(INTERNAL_FAILURE), ("system_event", EVENT_SHUTDOWN, FLAG_PSCI_OFF2))
        if fid in (SYSTEM_SUSPEND, SYSTEM_SUSPEND64) and self.system_suspend:
            return Outcome(_regs(SUCCESS), ("suspend",))
        return self._ret(NOT_SUPPORTED)

    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def _ret(x0: int) -> Outcome:
        # KVM answers in x0 and zeroes x1..x3 (smccc_set_retval(vcpu, val, 0, 0, 0) in psci.c); the
        # differential tests caught the emulator leaving x1..x3 alone, so do the same.
        return Outcome(_regs(x0))

    def _find(self, mpidr: int) -> int | None:
        for i, c in enumerate(self.cpus):
            if (c.mpidr & MPIDR_HWID_BITMASK) == mpidr:
                return i
        return None

    def _cpu_on(self, target: int, entry: int, context_id: int) -> Outcome:
        if target & ~MPIDR_HWID_BITMASK:
            return self._ret(INVALID_PARAMS)
        idx = self._find(target)
        if idx is None:
            return self._ret(INVALID_PARAMS)
        if self.cpus[idx].on:
            # KVM never returns ON_PENDING: the target is ON as soon as CPU_ON succeeds.
            return self._ret(ALREADY_ON)
        self.cpus[idx].on = True
        return Outcome(_regs(SUCCESS), ("cpu_on", idx, entry, context_id))

    def _affinity_info(self, target: int, level: int) -> int:
        if target & ~MPIDR_HWID_BITMASK:
            return INVALID_PARAMS
        if level > 3:
            return INVALID_PARAMS
        mask = MPIDR_HWID_BITMASK & ~((1 << (level * 8)) - 1)
        target &= mask
        matching = 0
        for c in self.cpus:
            if (c.mpidr & mask) == target:
                matching += 1
                if c.on:
                    return AFFINITY_ON
        return AFFINITY_OFF if matching else INVALID_PARAMS

    def features(self) -> dict[int, int]:
        """PSCI_FEATURES answers, as KVM gives them for this minor version (psci.c kvm_psci_1_x_call)."""
        f = {fid: 0 for fid in (PSCI_VERSION, CPU_SUSPEND, CPU_SUSPEND64, CPU_OFF, CPU_ON, CPU_ON64, AFFINITY_INFO,
                                AFFINITY_INFO64, MIGRATE_INFO_TYPE, SYSTEM_OFF, SYSTEM_RESET, PSCI_FEATURES,
                                SMCCC_VERSION)}
        if self.system_suspend:
            f[SYSTEM_SUSPEND] = f[SYSTEM_SUSPEND64] = 0
        if self.minor >= 1:
            f[SYSTEM_RESET2] = f[SYSTEM_RESET2_64] = 0
        if self.minor >= 3:
            f[SYSTEM_OFF2] = f[SYSTEM_OFF2_64] = OFF2_HIBERNATE_OFF
        return f

    def _features(self, fid: int, aarch32: bool) -> int:
        if fid & 0x4000_0000 and aarch32:
            return NOT_SUPPORTED
        return self.features().get(fid, NOT_SUPPORTED)
