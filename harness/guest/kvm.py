"""KVM UAPI for arm64: constants, structures and ioctls, straight from the kernel headers.

Sources (see docs/kvm-smccc-abi.md §1.5 and docs/platform.md "Constants"):
``include/uapi/linux/kvm.h`` and ``arch/arm64/include/uapi/asm/kvm.h``.  Values were checked against
linux-libc-dev 7.3.4 by compiling small C programs; ``tests/unit/test_guest_kvm.py`` re-derives the ioctl
numbers from the ``_IOC`` encoding and checks the structure sizes.

ioctls go through libc with ctypes (not ``fcntl.ioctl``): ctypes releases the GIL for the call, so one
thread per vCPU can sit in ``KVM_RUN`` while the others run, and an ``EINTR`` from a deadline signal comes
back to us instead of being retried (PEP 475 retries some calls transparently).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

# ---- _IOC encoding (asm-generic/ioctl.h) ----------------------------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _IOC(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, nr, 0)


def _IOW(nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, nr, size)


def _IOR(nr: int, size: int) -> int:
    return _IOC(_IOC_READ, nr, size)


def _IOWR(nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, nr, size)


# ---- structures ------------------------------------------------------------------------------------
class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("guest_phys_addr", ctypes.c_uint64),
                ("memory_size", ctypes.c_uint64), ("userspace_addr", ctypes.c_uint64)]


class OneReg(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("addr", ctypes.c_uint64)]


class VcpuInit(ctypes.Structure):
    _fields_ = [("target", ctypes.c_uint32), ("features", ctypes.c_uint32 * 7)]


class DeviceAttr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("group", ctypes.c_uint32), ("attr", ctypes.c_uint64),
                ("addr", ctypes.c_uint64)]


class CreateDevice(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class SmcccFilter(ctypes.Structure):
    """``struct kvm_smccc_filter`` (asm/kvm.h; Documentation/virt/kvm/devices/vm.rst §6)."""
    _fields_ = [("base", ctypes.c_uint32), ("nr_functions", ctypes.c_uint32), ("action", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 15)]


class MpState(ctypes.Structure):
    _fields_ = [("mp_state", ctypes.c_uint32)]


# ---- ioctl numbers (docs/kvm-smccc-abi.md §1.5) ---------------------------------------------------------
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_CREATE_VCPU = _IO(0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, ctypes.sizeof(UserspaceMemoryRegion))
KVM_RUN = _IO(0x80)
KVM_GET_MP_STATE = _IOR(0x98, ctypes.sizeof(MpState))
KVM_SET_MP_STATE = _IOW(0x99, ctypes.sizeof(MpState))
KVM_GET_ONE_REG = _IOW(0xAB, ctypes.sizeof(OneReg))
KVM_SET_ONE_REG = _IOW(0xAC, ctypes.sizeof(OneReg))
KVM_ARM_VCPU_INIT = _IOW(0xAE, ctypes.sizeof(VcpuInit))
KVM_ARM_PREFERRED_TARGET = _IOR(0xAF, ctypes.sizeof(VcpuInit))
KVM_CREATE_DEVICE = _IOWR(0xE0, ctypes.sizeof(CreateDevice))
KVM_SET_DEVICE_ATTR = _IOW(0xE1, ctypes.sizeof(DeviceAttr))
KVM_GET_DEVICE_ATTR = _IOW(0xE2, ctypes.sizeof(DeviceAttr))
KVM_HAS_DEVICE_ATTR = _IOW(0xE3, ctypes.sizeof(DeviceAttr))

# ---- capabilities (include/uapi/linux/kvm.h) -------------------------------------------------------
KVM_CAP_USER_MEMORY = 3
KVM_CAP_ONE_REG = 70
KVM_CAP_ARM_PSCI = 87
KVM_CAP_ARM_EL1_32BIT = 93
KVM_CAP_DEVICE_CTRL = 89
KVM_CAP_VM_ATTRIBUTES = 101
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_ARM_VM_IPA_SIZE = 165
KVM_CAP_SYSTEM_EVENT_DATA = 215
KVM_CAP_ARM_SYSTEM_SUSPEND = 216
KVM_CAP_ARM_EL2 = 240
KVM_CAP_ARM_EL2_E2H0 = 241

# ---- exit reasons -------------------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_MMIO = 6
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_ARM_NISV = 28
EXIT_NAMES = {0: "UNKNOWN", 3: "HYPERCALL", 6: "MMIO", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR",
              24: "SYSTEM_EVENT", 28: "ARM_NISV"}

KVM_HYPERCALL_EXIT_SMC = 1 << 0
KVM_HYPERCALL_EXIT_16BIT = 1 << 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
SYSTEM_EVENT_NAMES = {1: "SHUTDOWN", 2: "RESET", 3: "CRASH", 4: "WAKEUP", 5: "SUSPEND"}

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_STOPPED = 5
KVM_MP_STATE_SUSPENDED = 10

# ---- vCPU features (asm/kvm.h) ---------------------------------------------------------------------
KVM_ARM_VCPU_POWER_OFF = 0
KVM_ARM_VCPU_EL1_32BIT = 1
KVM_ARM_VCPU_PSCI_0_2 = 2
KVM_ARM_VCPU_PMU_V3 = 3
KVM_ARM_VCPU_HAS_EL2 = 7
KVM_ARM_VCPU_HAS_EL2_E2H0 = 8

# ---- VM attributes: the SMCCC filter (devices/vm.rst §6) -------------------------------------------
KVM_ARM_VM_SMCCC_CTRL = 0
KVM_ARM_VM_SMCCC_FILTER = 0
KVM_SMCCC_FILTER_HANDLE = 0
KVM_SMCCC_FILTER_DENY = 1
KVM_SMCCC_FILTER_FWD_TO_USER = 2

# ---- vGICv3 device ---------------------------------------------------------------------------------
KVM_DEV_TYPE_ARM_VGIC_V3 = 7
KVM_DEV_ARM_VGIC_GRP_ADDR = 0
KVM_DEV_ARM_VGIC_GRP_CTRL = 4
KVM_DEV_ARM_VGIC_CTRL_INIT = 0
KVM_VGIC_V3_ADDR_TYPE_DIST = 2
KVM_VGIC_V3_ADDR_TYPE_REDIST = 3

# ---- register ids (asm/kvm.h: KVM_REG_ARM64 | KVM_REG_SIZE_U64 | ...) ------------------------------
KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_ARM_CORE = 0x0010 << 16
KVM_REG_ARM64_SYSREG = 0x0013 << 16
KVM_REG_ARM_FW = 0x0014 << 16
KVM_REG_ARM_FW_FEAT_BMAP = 0x0016 << 16
_CORE = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE


def core_reg(offset_bytes: int) -> int:
    """``KVM_REG_ARM_CORE_REG(name)``: offsetof(struct kvm_regs, name) / 4."""
    return _CORE | (offset_bytes // 4)


def xreg(n: int) -> int:
    if not 0 <= n <= 30:
        raise ValueError(f"x{n}: no such register")
    return core_reg(8 * n)


REG_SP = core_reg(8 * 31)        # SP_EL0 (user_pt_regs.sp)
REG_PC = core_reg(8 * 32)
REG_PSTATE = core_reg(8 * 33)
REG_SP_EL1 = core_reg(8 * 34)
REG_ELR_EL1 = core_reg(8 * 35)


def sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG
            | (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2)


REG_MPIDR_EL1 = sys_reg(3, 0, 0, 0, 5)
REG_ID_AA64PFR0_EL1 = sys_reg(3, 0, 0, 4, 0)
REG_ID_AA64MMFR2_EL1 = sys_reg(3, 0, 0, 7, 2)
REG_HCR_EL2 = sys_reg(3, 4, 1, 1, 0)
REG_SP_EL2 = sys_reg(3, 6, 4, 1, 0)
REG_PSCI_VERSION = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW | 0
FW_BMAP_REGS = {  # fw-pseudo-registers.rst
    "std": KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW_FEAT_BMAP | 0,
    "std_hyp": KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW_FEAT_BMAP | 1,
    "vendor_hyp": KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW_FEAT_BMAP | 2,
    "vendor_hyp_2": KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_FW_FEAT_BMAP | 3,
}

# PSTATE modes
PSR_MODE_MASK = 0xF
PSR_MODE_EL1H = 0x5
PSR_MODE_EL2H = 0x9
PSTATE_RESET_EL1 = 0x3C5
PSTATE_RESET_EL2 = 0x3C9
PSR_MODE32_BIT = 0x10           # PSTATE.nRW: the vCPU is in AArch32
PSR_AA32_T_BIT = 0x20           # PSTATE.T: T32
PSR_AA32_MODE_SVC = 0x13
PSTATE_RESET_SVC32 = 0x1D3      # SVC, A/I/F masked (reset.c VCPU_RESET_PSTATE_SVC)


def pstate_el(pstate: int) -> int:
    """The exception level of a PSTATE: M[3:2] in AArch64; from the AArch32 mode when PSTATE.nRW (M[4]) is set
    (usr 0 -> EL0, hyp 0xA -> EL2, mon 6 -> EL3, every other mode EL1)."""
    if pstate & PSR_MODE32_BIT:
        return {0x0: 0, 0xA: 2, 0x6: 3}.get(pstate & 0xF, 1)
    return (pstate >> 2) & 3


# ---- struct kvm_run layout (offsets; include/uapi/linux/kvm.h) -------------------------------------
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_UNION = 32
HYPERCALL = struct.Struct("<Q6QQQ")         # nr, args[6], ret, flags   @32
MMIO = struct.Struct("<Q8sIB")              # phys_addr, data[8], len, is_write   @32
SYSTEM_EVENT = struct.Struct("<II16Q")      # type, ndata, data[16]   @32
FAIL_ENTRY = struct.Struct("<QI")           # hardware_entry_failure_reason, cpu
INTERNAL = struct.Struct("<II16Q")          # suberror, ndata, data[16]
ARM_NISV = struct.Struct("<QQ")             # esr_iss, fault_ipa

# ---- libc ------------------------------------------------------------------------------------------
_libc = None


def libc():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        lib.ioctl.restype = ctypes.c_int
        lib.pthread_self.restype = ctypes.c_ulong
        _libc = lib
    return _libc


class KvmError(OSError):
    """An ioctl failed; ``errno`` and ``strerror`` as usual, plus the ioctl's name."""

    def __init__(self, err: int, what: str):
        super().__init__(err, f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")
        self.what = what

    @property
    def errname(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno))


_NAMES = {globals()[n]: n for n in (
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE", "KVM_CREATE_VCPU",
    "KVM_SET_USER_MEMORY_REGION", "KVM_RUN", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_GET_ONE_REG",
    "KVM_SET_ONE_REG", "KVM_ARM_VCPU_INIT", "KVM_ARM_PREFERRED_TARGET", "KVM_CREATE_DEVICE", "KVM_SET_DEVICE_ATTR",
    "KVM_GET_DEVICE_ATTR", "KVM_HAS_DEVICE_ATTR")}


def ioctl(fd: int, request: int, arg=None) -> int:
    """ioctl(2) with the GIL released; raises :class:`KvmError` on failure, returns the result."""
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = libc().ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmError(err, _NAMES.get(request, hex(request)))
    return ret


def open_kvm() -> int:
    return os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)


def check_extension(fd: int, cap: int) -> int:
    """KVM_CHECK_EXTENSION on the system fd or a VM fd (a VM fd answers for that VM)."""
    return ioctl(fd, KVM_CHECK_EXTENSION, cap)
