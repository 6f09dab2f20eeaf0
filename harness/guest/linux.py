"""Boot an unmodified arm64 Linux kernel as the handler's guest, its CPUs powered by the userspace PSCI emulator.

The VM (Documentation/arch/arm64/booting.rst for the boot protocol):

| what | IPA |
|---|---|
| vGICv3 distributor / redistributors (in-kernel, with the arch timer) | 0x0800_0000 / 0x080A_0000 |
| PL011 UART, emulated here on KVM_EXIT_MMIO (:mod:`harness.guest.uart`) | 0x0900_0000 |
| RAM (default 256 MiB); the Image at RAM + text_offset | 0x4000_0000 |
| initramfs, then the DTB, at the top of RAM | RAM end - ... |

The generated device tree (:func:`device_tree`) has ``cpus`` with ``enable-method = "psci"`` and a ``psci``
node (``arm,psci-1.0``, ``arm,psci-0.2``) whose ``method`` is ``hvc`` or ``smc``.  With ``psci = "fwd"`` the
PSCI function ranges are forwarded to userspace (KVM_ARM_VM_SMCCC_FILTER, FWD_TO_USER; docs/kvm-smccc-abi.md §1.1)
and answered by :mod:`harness.guest.psci`; with ``psci = "kernel"`` no filter is installed and KVM's own PSCI
answers (the differential baseline).  Power management of the secondaries is the runner's (kvmtool's
userspace PSCI, docs/kvm-smccc-abi.md §3.5): this class reuses :class:`harness.guest.runner.ScenarioRun`'s vCPU
loop, hypercall dispatch and effect handling, and only replaces the setup, the MMIO handling and the result.
"""

from __future__ import annotations

import struct
import threading
import time

from .. import protocol as P
from . import fdt, kvm, psci, smccc
from .runner import GRAVEYARD, ScenarioRun, VcpuState
from .sdei import BASE as SDEI_BASE
from .sdei import NR as SDEI_NR
from .sdei_run import SdeiRun
from .uart import Pl011
from .vm import Vm

GICD_BASE = 0x0800_0000
GICD_SIZE = 0x1_0000
GICR_BASE = 0x080A_0000
GICR_STRIDE = 0x2_0000
UART_BASE = 0x0900_0000
UART_SPI = 1
RAM_BASE = 0x4000_0000
FDT_MAX = 0x20_0000                    # booting.rst: the DTB must not exceed 2 MiB
ARM64_IMAGE_MAGIC = b"ARM\x64"
APB_CLK_PHANDLE = 2
GIC_PHANDLE = 1
IRQ_TYPE_LEVEL_HIGH = 4
GIC_SPI, GIC_PPI = 0, 1
# The arch timer PPIs KVM wires by default (arm_arch_timer.h): secure phys 13, phys 14, virt 11, hyp 10
TIMER_PPIS = (13, 14, 11, 10)
PSCI_RANGES = ((0x8400_0000, 0x20), (0xC400_0000, 0x20))

# DT idle states (arm/idle-states.yaml, arm,psci-suspend-param: DEN0022 §5.4.2 original format):
# "standby" = StateType 0 (retention), StateID 1; Linux then calls CPU_SUSPEND from its idle loop.
IDLE_STATES = {"standby": 0x0000_0001}
IDLE_PHANDLE = 3
SUSPEND_TRACE_PER_VCPU = 4             # CPU_SUSPEND calls traced per vCPU; the rest are only counted

DEFAULT_KERNEL = "/l2/Image"
DEFAULT_INITRD = "/l2/initrd.cpio"


def validate(spec: dict) -> dict:
    """Shape check of a ``linux`` request; raises :class:`harness.protocol.ProtocolError`."""
    if not isinstance(spec, dict):
        raise P.ProtocolError("linux request must be an object")
    s = dict(spec)
    s.setdefault("name", "linux")
    s.setdefault("kernel", DEFAULT_KERNEL)
    s.setdefault("initrd", DEFAULT_INITRD)
    s.setdefault("vcpus", 2)
    s.setdefault("ram_mb", 256)
    s.setdefault("method", "hvc")
    s.setdefault("psci", "fwd")
    s.setdefault("cmdline", "")
    s.setdefault("deadline_s", 300.0)
    s.setdefault("psci_minor", 3)
    s.setdefault("idle_state", None)
    s.setdefault("sdei", None)
    if s["sdei"] not in (None, "hvc", "smc"):
        raise P.ProtocolError(f"sdei must be null (no SDEI node) or the node's conduit 'hvc' or 'smc', got {s['sdei']!r}")
    if s["idle_state"] not in (None, *IDLE_STATES):
        raise P.ProtocolError(f"idle_state must be null or one of {sorted(IDLE_STATES)}, got {s['idle_state']!r}")
    s.setdefault("on_reset", "stop")
    s.setdefault("max_boots", 1)
    if s["on_reset"] not in ("stop", "restart"):
        raise P.ProtocolError(f"on_reset must be 'stop' or 'restart', got {s['on_reset']!r}")
    if not isinstance(s["max_boots"], int) or not 1 <= s["max_boots"] <= 8:
        raise P.ProtocolError(f"max_boots must be in [1, 8], got {s['max_boots']!r}")
    if not isinstance(s["vcpus"], int) or not 1 <= s["vcpus"] <= P.MAX_VCPUS:
        raise P.ProtocolError(f"vcpus must be in [1, {P.MAX_VCPUS}], got {s['vcpus']!r}")
    if not isinstance(s["ram_mb"], int) or not 64 <= s["ram_mb"] <= 2048:
        raise P.ProtocolError(f"ram_mb must be in [64, 2048], got {s['ram_mb']!r}")
    if s["method"] not in ("hvc", "smc"):
        raise P.ProtocolError(f"method must be 'hvc' or 'smc', got {s['method']!r}")
    if s["psci"] not in ("fwd", "kernel"):
        raise P.ProtocolError(f"psci must be 'fwd' (userspace emulator) or 'kernel', got {s['psci']!r}")
    if not isinstance(s["cmdline"], str) or "\0" in s["cmdline"]:
        raise P.ProtocolError("cmdline must be a string")
    if not isinstance(s["deadline_s"], (int, float)) or not 0 < s["deadline_s"] <= 3600:
        raise P.ProtocolError("deadline_s must be in (0, 3600]")
    return s


def image_header(image: bytes) -> tuple[int, int]:
    """(text_offset, image_size) from the arm64 Image header (booting.rst §4 "Call the kernel image")."""
    if len(image) < 64 or image[0x38:0x3C] != ARM64_IMAGE_MAGIC:
        raise ValueError("not an arm64 Image (no 'ARM\\x64' magic at 0x38)")
    text_offset, image_size = struct.unpack_from("<QQ", image, 8)
    if image_size == 0:                 # pre-3.17 kernels: text_offset 0x80000, size unknown
        text_offset, image_size = 0x80000, len(image)
    return text_offset, image_size


def bootargs(spec: dict) -> str:
    """The L2 command line.  ``loglevel=5`` keeps warnings but drops the info chatter: every console byte is
    two MMIO exits to Python (UARTFR poll + UARTDR), ~1 ms each under nested TCG, and the full boot log
    soft-locked a 1-vCPU guest.  The lockup/stall detectors get longer thresholds: an L2 vCPU thread can be
    descheduled in the 1-CPU L1 for seconds, which is not a bug of the kernel under test."""
    base = (f"console=ttyAMA0 earlycon=pl011,mmio32,{UART_BASE:#x} loglevel=5 rdinit=/init panic=-1 "
            "watchdog_thresh=60 rcupdate.rcu_cpu_stall_timeout=120")
    return f"{base} {spec['cmdline']}".strip()


def device_tree(mpidrs: list[int], ram_size: int, method: str, cmdline: str, initrd: tuple[int, int] | None,
                gic_dist: int = GICD_BASE, gic_redist: int = GICR_BASE, idle_param: int | None = None,
                sdei_method: str | None = None) -> bytes:
    """The DTB Linux boots with (bindings: arm/cpus.yaml, arm/psci.yaml, interrupt-controller/arm,gic-v3.yaml,
    timer/arm,arch_timer.yaml, serial/pl011.yaml, clock/fixed-clock.yaml)."""
    root = fdt.Node("", compatible="linux,dummy-virt", model="smccc-harness L2")
    root.set("#address-cells", 2).set("#size-cells", 2).set("interrupt-parent", GIC_PHANDLE)
    chosen = root.add("chosen", bootargs=cmdline, stdout_path=f"/pl011@{UART_BASE:x}")
    if initrd:
        chosen.set("linux,initrd-start", list(fdt.u64(initrd[0])))
        chosen.set("linux,initrd-end", list(fdt.u64(initrd[1])))
    root.add(f"memory@{RAM_BASE:x}", device_type="memory", reg=[*fdt.u64(RAM_BASE), *fdt.u64(ram_size)])
    cpus = root.add("cpus")
    cpus.set("#address-cells", 1).set("#size-cells", 0)
    for mpidr in mpidrs:
        hw = mpidr & 0xFF_FFFF
        cpu = cpus.add(f"cpu@{hw:x}", device_type="cpu", compatible="arm,armv8", reg=hw, enable_method="psci")
        if idle_param is not None:
            cpu.set("cpu-idle-states", [IDLE_PHANDLE])
    if idle_param is not None:
        idle = cpus.add("idle-states", entry_method="psci")
        st = idle.add("cpu-standby", compatible="arm,idle-state", entry_latency_us=10, exit_latency_us=10,
                      min_residency_us=100)
        st.set("arm,psci-suspend-param", idle_param).set("phandle", IDLE_PHANDLE)
    root.add("psci", compatible=["arm,psci-1.0", "arm,psci-0.2"], method=method)
    if sdei_method:     # arm/firmware/sdei.txt: /firmware/sdei, populated by of_platform_default_populate_init
        root.add("firmware").add("sdei", compatible="arm,sdei-1.0", method=sdei_method)
    gic = root.add(f"intc@{gic_dist:x}", compatible="arm,gic-v3")
    gic.set("#interrupt-cells", 3).set("interrupt-controller", True).set("#redistributor-regions", 1)
    gic.set("#address-cells", 2).set("#size-cells", 2).set("ranges", True)      # as QEMU's virt board: dtc wants them
    gic.set("reg", [*fdt.u64(gic_dist), *fdt.u64(GICD_SIZE), *fdt.u64(gic_redist),
                    *fdt.u64(GICR_STRIDE * len(mpidrs))])
    gic.set("phandle", GIC_PHANDLE)
    timer = root.add("timer", compatible="arm,armv8-timer", always_on=True)
    timer.set("interrupts", [c for ppi in TIMER_PPIS for c in (GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH)])
    clk = root.add("apb-pclk", compatible="fixed-clock", clock_frequency=24_000_000,
                   clock_output_names="clk24mhz")
    clk.set("#clock-cells", 0).set("phandle", APB_CLK_PHANDLE)
    root.add(f"pl011@{UART_BASE:x}", compatible=["arm,pl011", "arm,primecell"],
             reg=[*fdt.u64(UART_BASE), *fdt.u64(0x1000)], interrupts=[GIC_SPI, UART_SPI, IRQ_TYPE_LEVEL_HIGH],
             clocks=[APB_CLK_PHANDLE, APB_CLK_PHANDLE], clock_names=["uartclk", "apb_pclk"])
    return fdt.build(root)


class LinuxRun(ScenarioRun):
    """One boot of a Linux guest, to its power-off/reset or the deadline."""

    def __init__(self, spec: dict, sys_fd: int):
        linux = validate(spec)
        # ScenarioRun's own state (trace, locks, counters ...) comes from its constructor, fed a placeholder
        # payload scenario; the Linux spec then replaces the scenario (it keeps the validated defaults).
        # No progress watchdog (livelock_s 0): a Linux guest's PC is a virtual address, not one the VMM can
        # read an instruction at.
        super().__init__({"name": linux["name"], "max_exits": linux.get("max_exits", 50_000_000), "livelock_s": 0,
                          "max_trace": linux.get("max_trace", 20_000),
                          "payload": {"entry": P.RAM_BASE, "segments": [{"addr": P.RAM_BASE, "data": P.b64(b"\0" * 4)}]}},
                         sys_fd)
        merged = dict(self.spec)
        merged.update(linux)
        merged.update({"el2": False, "e2h0": False, "handler": "psci", "filters": [], "replies": {}})
        self.spec = merged
        self.replies = {}
        self.uart = Pl011(UART_BASE, on_line=self._console_line)
        self._psci_lock = threading.Lock()
        self.suspends = [0] * P.MAX_VCPUS
        self.wakeups = [0] * P.MAX_VCPUS
        self.layout: dict = {}

    def _hypercall(self, v, st) -> None:
        """The runner's dispatch, one call at a time: a dying CPU's CPU_OFF and the boot CPU's AFFINITY_INFO
        poll arrive concurrently, and without the lock the trace order could differ from the order in which
        the emulator saw them (AFFINITY_INFO answered ON, yet recorded after the CPU_OFF)."""
        with self._psci_lock:
            fid = v.hypercall()[0] & 0xFFFF_FFFF
            if fid in (psci.CPU_SUSPEND, psci.CPU_SUSPEND64):
                self._cpu_suspend(v, fid)
                return
            super()._hypercall(v, st)

    def _cpu_suspend(self, v, fid: int) -> None:
        """CPU_SUSPEND (DEN0022 §5.4) as a real wait: the emulator answers SUCCESS (KVM treats every state as
        standby and keeps the context), then the vCPU is put in KVM_MP_STATE_SUSPENDED, so its next KVM_RUN
        blocks in KVM's WFI emulation until an interrupt is pending and exits with KVM_SYSTEM_EVENT_WAKEUP
        (api.rst KVM_SET_MP_STATE / KVM_EXIT_SYSTEM_EVENT); :meth:`_dispatch` then makes it RUNNABLE again."""
        args = v.get_xs(4)
        out = self.psci.call(v.index, fid, args[1:4])
        for i, val in enumerate(out.regs or []):
            v.set_x(i, smccc.narrow(fid, val))
        n = self.suspends[v.index] = self.suspends[v.index] + 1
        if n <= SUSPEND_TRACE_PER_VCPU:
            flags = v.hypercall()[1]
            self.trace.add("hypercall", v.index, nr=fid, flags=flags, conduit=smccc.conduit(flags), pc=v.pc,
                           pstate=v.pstate, el=kvm.pstate_el(v.pstate), args=args + [0] * 14, reply=out.regs,
                           by="psci", name=psci.name(fid))
        if out.effect == ("suspend",):
            v.set_mp_state(kvm.KVM_MP_STATE_SUSPENDED)
            if n <= SUSPEND_TRACE_PER_VCPU:
                self.trace.add("psci", v.index, effect="suspend", mp_state="SUSPENDED")

    def _dispatch(self, v, st, reason: int) -> None:
        if reason == kvm.KVM_EXIT_SYSTEM_EVENT and v.system_event()[0] == kvm.KVM_SYSTEM_EVENT_WAKEUP:
            v.set_mp_state(kvm.KVM_MP_STATE_RUNNABLE)
            n = self.wakeups[v.index] = self.wakeups[v.index] + 1
            if n <= SUSPEND_TRACE_PER_VCPU:
                self.trace.add("system_event", v.index, type=kvm.KVM_SYSTEM_EVENT_WAKEUP, name="WAKEUP", data=[],
                               by="kvm")
            return
        super()._dispatch(v, st, reason)

    def _console_line(self, line: str) -> None:
        self.trace.add("console", text=line)
        if "---[ end Kernel panic" in line:     # the guest cannot power itself off this early: end the run
            self.finish("guest_panic")

    # ---- setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        s = self.spec
        ram = s["ram_mb"] << 20
        t0 = time.monotonic()
        with open(s["kernel"], "rb") as f:
            image = f.read()
        text_offset, image_size = image_header(image)
        initrd = b""
        if s["initrd"]:
            with open(s["initrd"], "rb") as f:
                initrd = f.read()
        kernel_addr = RAM_BASE + text_offset
        dtb_addr = RAM_BASE + ram - FDT_MAX
        initrd_addr = (dtb_addr - len(initrd)) & ~0xFFFF
        if kernel_addr + max(image_size, len(image)) > initrd_addr:
            raise P.ProtocolError(f"{s['ram_mb']} MiB of RAM cannot hold the kernel ({image_size} bytes) "
                                  f"and the initramfs ({len(initrd)} bytes)")
        t1 = time.monotonic()
        self.vm = Vm(self.sys_fd)
        self.filter = smccc.Filter()
        self.mem = self.vm.add_memory(RAM_BASE, ram)
        self.mem.write(kernel_addr, image)
        if initrd:
            self.mem.write(initrd_addr, initrd)
        t2 = time.monotonic()
        if s["psci"] == "fwd":
            for base, nr in PSCI_RANGES:
                self.filter.install(self.vm.fd, base, nr, kvm.KVM_SMCCC_FILTER_FWD_TO_USER)
        if s["sdei"]:       # the SDEI ids go to the VMM's dispatcher (harness/guest/sdei.py)
            self.filter.install(self.vm.fd, SDEI_BASE, SDEI_NR, kvm.KVM_SMCCC_FILTER_FWD_TO_USER)
        self.filter_results = self.filter.to_json()
        for _ in range(s["vcpus"]):
            self.vm.add_vcpu((kvm.KVM_ARM_VCPU_PSCI_0_2,))
        self.vm.create_vgic_v3(GICD_BASE, GICR_BASE)
        mpidrs = [v.mpidr for v in self.vm.vcpus]
        dtb = device_tree(mpidrs, ram, s["method"], bootargs(s),
                          (initrd_addr, initrd_addr + len(initrd)) if initrd else None,
                          idle_param=IDLE_STATES.get(s["idle_state"]), sdei_method=s["sdei"])
        if len(dtb) > FDT_MAX:
            raise ValueError(f"the DTB is {len(dtb)} bytes, more than 2 MiB")
        self.mem.write(dtb_addr, dtb)
        boot = self.vm.vcpus[0]
        boot.set_reg(kvm.REG_PC, kernel_addr)
        boot.set_x(0, dtb_addr)
        for i in (1, 2, 3):
            boot.set_x(i, 0)
        for v in self.vm.vcpus[1:]:
            v.set_mp_state(kvm.KVM_MP_STATE_STOPPED)
        self.psci = psci.Psci([psci.CpuState(m, i == 0) for i, m in enumerate(mpidrs)], minor=s["psci_minor"])
        self.sdei_run = SdeiRun({}, mpidrs, None, self.trace)    # handler addresses are virtual: not checked
        self.userspace_power = s["psci"] == "fwd"
        self.vstate = [VcpuState(on=(v.index == 0 or not self.userspace_power)) for v in self.vm.vcpus]
        self.layout = {"kernel": kernel_addr, "kernel_bytes": len(image), "image_size": image_size,
                       "initrd": initrd_addr, "initrd_bytes": len(initrd), "dtb": dtb_addr, "dtb_bytes": len(dtb),
                       "ram": [RAM_BASE, ram], "mpidrs": mpidrs, "bootargs": bootargs(s),
                       "read_files_s": round(t1 - t0, 3), "load_ram_s": round(t2 - t1, 3),
                       "vcpus_gic_dtb_s": round(time.monotonic() - t2, 3)}
        self.trace.add("boot", 0, **{k: v for k, v in self.layout.items()})

    # ---- exits -------------------------------------------------------------------------------------------
    def _mmio(self, v, st) -> None:
        addr, data, length, is_write = v.mmio()
        value = int.from_bytes(data, "little")
        if self.uart.contains(addr):
            if is_write:
                self.uart.write(addr, length, value)
            else:
                v.set_mmio_read_data(self.uart.read(addr, length), length)
            return
        if not is_write:
            v.set_mmio_read_data(0, length)
        self.trace.add("mmio", v.index, addr=addr, len=length, is_write=is_write, data=value, pc=v.pc)

    # ---- top level -----------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.monotonic()
        try:
            self.setup()
        except (kvm.KvmError, OSError, ValueError) as e:
            self._cleanup()
            return {"name": self.spec["name"], "outcome": "setup_error", "error": f"{type(e).__name__}: {e}",
                    "events": self.trace.export(), "console": ""}
        t1 = time.monotonic()
        stuck, vcpus = self._run_vcpus()
        t2 = time.monotonic()
        self.uart.flush()
        result = {
            "name": self.spec["name"], "outcome": self.outcome, "exit_code": None,
            "events": self.trace.export(), "exits": self.exits, "trace_dropped": self.trace.dropped,
            "filters": self.filter_results, "vcpus": vcpus, "stuck_threads": stuck,
            "errors": self.errors, "console": self.uart.text(), "psci_state": self.psci.affinity_state(),
            "layout": self.layout, "spec": {k: v for k, v in self.spec.items()},
            "uart": {"reads": self.uart.reads, "writes": self.uart.writes, "dropped": self.uart.dropped},
            "cpu_suspend": {"calls": self.suspends[:len(self.vm.vcpus)], "wakeups": self.wakeups[:len(self.vm.vcpus)]},
            "timing": {"setup_s": round(t1 - t0, 6), "run_s": round(t2 - t1, 6)},
        }
        t3 = time.monotonic()
        self._cleanup(keep=bool(stuck))
        result["timing"]["cleanup_s"] = round(time.monotonic() - t3, 6)
        result["timing"]["total_s"] = round(time.monotonic() - t0, 6)
        return result

    def _cleanup(self, keep: bool = False) -> None:
        vm = getattr(self, "vm", None)
        if vm is None:
            return
        if keep:
            GRAVEYARD.append(vm)
        else:
            vm.close()


def run_linux(spec: dict, sys_fd: int) -> dict:
    """Boot the guest; with ``on_reset = "restart"`` a SYSTEM_RESET boots it again in a fresh VM, up to
    ``max_boots`` boots.  The result is the last boot's, with the earlier ones in ``previous_boots``."""
    s = validate(spec)
    boots: list[dict] = []
    while True:
        r = LinuxRun(s, sys_fd).run()
        boots.append(r)
        reset = any(e["kind"] == "system_event" and e.get("type") == kvm.KVM_SYSTEM_EVENT_RESET for e in r["events"])
        if not (s["on_reset"] == "restart" and reset and len(boots) < s["max_boots"]):
            break
    result = boots[-1]
    result["boot_count"] = len(boots)
    result["previous_boots"] = boots[:-1]
    return result

