"""VM, vCPU and guest memory over /dev/kvm (api.rst §4: KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_RUN ...).

One Python thread per vCPU.  Deadlines: a vCPU thread sitting in KVM_RUN is kicked out by setting
``kvm_run.immediate_exit`` and sending it SIGUSR1 (api.rst "immediate_exit"); KVM_RUN then fails with EINTR.
A spinning payload never returns on its own, so every run in this package has a deadline; the same kick lets
the runner's progress watchdog read the PC of a vCPU that makes no exit (runner.py "Progress watchdog").
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import struct
import threading

from .. import protocol as P
from . import kvm

_KICK_SIGNAL = signal.SIGUSR1
_kick_installed = False


def install_kick_handler() -> None:
    """Must run in the main thread once: a no-op handler so SIGUSR1 interrupts ioctls instead of killing us."""
    global _kick_installed
    if not _kick_installed:
        signal.signal(_KICK_SIGNAL, lambda signum, frame: None)
        _kick_installed = True


def ensure_kick_handler() -> None:
    """Before vCPU threads run: a kick must find a SIGUSR1 handler, or its default action ends the process.

    The progress watchdog kicks within the first second of a run (not only at a deadline), so a process that
    forgot :func:`install_kick_handler` would die at once.  Installed here when called from the main thread;
    from another thread (signal.signal cannot) it is an error saying what to call.
    """
    if _kick_installed or signal.getsignal(_KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return
    if threading.current_thread() is threading.main_thread():
        install_kick_handler()
        return
    raise RuntimeError("no SIGUSR1 handler: a vCPU kick would kill this process; call "
                       "harness.guest.vm.install_kick_handler() from the main thread before running a VM")


class Memory:
    """Anonymous host memory backing one KVM memory slot."""

    def __init__(self, base: int, size: int):
        self.base = base
        self.size = size
        self.mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self.mm)
        self.host_addr = ctypes.addressof(self._anchor)

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.base <= addr and addr + length <= self.base + self.size

    def write(self, addr: int, data: bytes) -> None:
        if not self.contains(addr, len(data)):
            raise ValueError(f"[{addr:#x}, {addr + len(data):#x}) is outside guest RAM")
        off = addr - self.base
        self.mm[off:off + len(data)] = data

    def read(self, addr: int, length: int) -> bytes:
        if not self.contains(addr, length):
            raise ValueError(f"[{addr:#x}, {addr + length:#x}) is outside guest RAM")
        off = addr - self.base
        return bytes(self.mm[off:off + length])

    def write_u64s(self, addr: int, values) -> None:
        values = list(values)
        self.write(addr, struct.pack(f"<{len(values)}Q", *[v & P.U64_MASK for v in values]))

    def close(self) -> None:
        del self._anchor
        self.mm.close()


class Vcpu:
    def __init__(self, vm: Vm, index: int, features: tuple[int, ...]):
        self.vm = vm
        self.index = index
        self.features = features
        self.fd = kvm.ioctl(vm.fd, kvm.KVM_CREATE_VCPU, index)
        size = kvm.ioctl(vm.sys_fd, kvm.KVM_GET_VCPU_MMAP_SIZE)
        self.run = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.thread_ident: int | None = None
        self._kick_lock = threading.Lock()     # a kick never signals a thread that release_thread() let go
        self.init()

    # -- setup ------------------------------------------------------------------------------------
    def init(self) -> None:
        """KVM_ARM_VCPU_INIT with the preferred target and our features (api.rst §4.82).

        Re-running it with the same features is the architectural warm reset kvmtool uses for CPU_ON.
        """
        init = kvm.VcpuInit()
        kvm.ioctl(self.vm.fd, kvm.KVM_ARM_PREFERRED_TARGET, init)
        for bit in self.features:
            init.features[bit // 32] |= 1 << (bit % 32)
        kvm.ioctl(self.fd, kvm.KVM_ARM_VCPU_INIT, init)

    # -- registers ---------------------------------------------------------------------------------
    def get_reg(self, reg_id: int) -> int:
        val = ctypes.c_uint64()
        kvm.ioctl(self.fd, kvm.KVM_GET_ONE_REG, kvm.OneReg(id=reg_id, addr=ctypes.addressof(val)))
        return val.value

    def set_reg(self, reg_id: int, value: int) -> None:
        val = ctypes.c_uint64(value & P.U64_MASK)
        kvm.ioctl(self.fd, kvm.KVM_SET_ONE_REG, kvm.OneReg(id=reg_id, addr=ctypes.addressof(val)))

    def get_x(self, n: int) -> int:
        return self.get_reg(kvm.xreg(n))

    def set_x(self, n: int, value: int) -> None:
        self.set_reg(kvm.xreg(n), value)

    def get_xs(self, count: int = 31) -> list[int]:
        return [self.get_x(i) for i in range(count)]

    @property
    def pc(self) -> int:
        return self.get_reg(kvm.REG_PC)

    @property
    def pstate(self) -> int:
        return self.get_reg(kvm.REG_PSTATE)

    @property
    def mpidr(self) -> int:
        return self.get_reg(kvm.REG_MPIDR_EL1)

    def set_mp_state(self, state: int) -> None:
        kvm.ioctl(self.fd, kvm.KVM_SET_MP_STATE, kvm.MpState(state))

    def get_mp_state(self) -> int:
        st = kvm.MpState()
        kvm.ioctl(self.fd, kvm.KVM_GET_MP_STATE, st)
        return st.mp_state

    # -- running -----------------------------------------------------------------------------------
    def enter(self) -> int:
        """One KVM_RUN. Returns the exit reason; raises KvmError (EINTR when kicked)."""
        self.thread_ident = threading.get_ident()
        kvm.ioctl(self.fd, kvm.KVM_RUN)
        return struct.unpack_from("<I", self.run, kvm.RUN_EXIT_REASON)[0]

    def kick(self) -> None:
        """Get this vCPU out of KVM_RUN (or keep it from entering): immediate_exit + a signal.

        Used by the deadline, by a stop or a pause, and by the runner's progress watchdog, which kicks a vCPU
        that makes no exit every few hundred ms to read its PC (runner.py "Progress watchdog").
        """
        self.run[kvm.RUN_IMMEDIATE_EXIT] = 1
        with self._kick_lock:
            if self.thread_ident is not None:
                try:
                    signal.pthread_kill(self.thread_ident, _KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    def release_thread(self) -> None:
        """The thread running this vCPU is about to end: no kick may signal it any more."""
        with self._kick_lock:
            self.thread_ident = None

    def clear_kick(self) -> None:
        self.run[kvm.RUN_IMMEDIATE_EXIT] = 0

    def hypercall(self) -> tuple[int, int]:
        nr, *_args, _ret, flags = kvm.HYPERCALL.unpack_from(self.run, kvm.RUN_UNION)
        return nr, flags

    def mmio(self) -> tuple[int, bytes, int, bool]:
        addr, data, length, is_write = kvm.MMIO.unpack_from(self.run, kvm.RUN_UNION)
        return addr, data[:length], length, bool(is_write)

    def set_mmio_read_data(self, value: int, length: int) -> None:
        self.run[kvm.RUN_UNION + 8:kvm.RUN_UNION + 16] = struct.pack("<Q", value & P.U64_MASK)

    def system_event(self) -> tuple[int, list[int]]:
        typ, ndata, *data = kvm.SYSTEM_EVENT.unpack_from(self.run, kvm.RUN_UNION)
        return typ, data[:min(ndata, 16)]

    def raw_union(self, n: int = 64) -> bytes:
        return bytes(self.run[kvm.RUN_UNION:kvm.RUN_UNION + n])

    def close(self) -> None:
        self.run.close()
        os.close(self.fd)


class Vm:
    """A VM with one RAM slot, optional in-kernel vGICv3 and a VMM-side record of its SMCCC filter."""

    def __init__(self, sys_fd: int, ipa_type: int = 0):
        self.sys_fd = sys_fd
        self.fd = kvm.ioctl(sys_fd, kvm.KVM_CREATE_VM, ipa_type)
        self.vcpus: list[Vcpu] = []
        self.memory: list[Memory] = []
        self.gic_fd: int | None = None
        self.closed = False

    def add_memory(self, base: int, size: int, slot: int | None = None) -> Memory:
        mem = Memory(base, size)
        region = kvm.UserspaceMemoryRegion(slot=len(self.memory) if slot is None else slot, flags=0,
                                           guest_phys_addr=base, memory_size=size, userspace_addr=mem.host_addr)
        kvm.ioctl(self.fd, kvm.KVM_SET_USER_MEMORY_REGION, region)
        self.memory.append(mem)
        return mem

    def add_vcpu(self, features: tuple[int, ...]) -> Vcpu:
        vcpu = Vcpu(self, len(self.vcpus), features)
        self.vcpus.append(vcpu)
        return vcpu

    def create_vgic_v3(self, dist: int, redist: int) -> None:
        """In-kernel vGICv3; a nested (HAS_EL2) vCPU refuses to run without one (docs/platform.md: EAGAIN)."""
        dev = kvm.CreateDevice(type=kvm.KVM_DEV_TYPE_ARM_VGIC_V3, fd=0, flags=0)
        kvm.ioctl(self.fd, kvm.KVM_CREATE_DEVICE, dev)
        self.gic_fd = dev.fd
        for typ, addr in ((kvm.KVM_VGIC_V3_ADDR_TYPE_DIST, dist), (kvm.KVM_VGIC_V3_ADDR_TYPE_REDIST, redist)):
            val = ctypes.c_uint64(addr)
            kvm.ioctl(self.gic_fd, kvm.KVM_SET_DEVICE_ATTR,
                      kvm.DeviceAttr(flags=0, group=kvm.KVM_DEV_ARM_VGIC_GRP_ADDR, attr=typ,
                                     addr=ctypes.addressof(val)))
        kvm.ioctl(self.gic_fd, kvm.KVM_SET_DEVICE_ATTR,
                  kvm.DeviceAttr(flags=0, group=kvm.KVM_DEV_ARM_VGIC_GRP_CTRL, attr=kvm.KVM_DEV_ARM_VGIC_CTRL_INIT,
                                 addr=0))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for v in self.vcpus:
            v.close()
        if self.gic_fd is not None:
            os.close(self.gic_fd)
        os.close(self.fd)
        for m in self.memory:
            m.close()
