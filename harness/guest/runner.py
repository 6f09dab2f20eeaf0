"""Run one scenario: build a VM for a payload, install the SMCCC filter, run every vCPU to a result.

Exit dispatch (api.rst §5 "kvm_run"):

* ``KVM_EXIT_HYPERCALL`` — a forwarded SMCCC call (vm.rst §6 FWD_TO_USER). Arguments come from x0..x17
  with KVM_GET_ONE_REG (KVM fills only ``nr`` and ``flags``); results go back with KVM_SET_ONE_REG; PC is
  already past the HVC/SMC and is never touched (api.rst KVM_EXIT_HYPERCALL).
* ``KVM_EXIT_MMIO`` in the report page — the payload's reports and its DONE (docs/design.md).
* ``KVM_EXIT_SYSTEM_EVENT`` — in-kernel PSCI SYSTEM_OFF/RESET...: the VM ends.

Power management of secondaries follows kvmtool's userspace PSCI (docs/kvm-smccc-abi.md §3.5): every secondary
starts with mp_state STOPPED.  When CPU_ON is handled in the kernel, its thread waits inside KVM_RUN for the
kernel to wake it; when CPU_ON is forwarded, its thread waits in userspace and, on CPU_ON, re-runs
KVM_ARM_VCPU_INIT (warm reset) and sets PC/x0 itself — a vCPU is only ever touched by its own thread.

Progress watchdog (harness/guest/watchdog.py; scenario key ``livelock_s``).  A kernel whose SMC handler returns
to the guest without advancing PC makes the vCPU re-execute the SMC forever *inside* ``KVM_RUN``: no exit ever
reaches us, and without a watchdog every such scenario waits out its whole deadline (10-30 s).  So the
controller thread (:meth:`ScenarioRun._run_vcpus`) kicks a vCPU that has made no exit for ``window / 5`` s
(the deadline's kick: ``immediate_exit`` + SIGUSR1, vm.py), and that vCPU's own thread, back from ``KVM_RUN``
with EINTR, reads its mp_state and PC (KVM_GET_MP_STATE, KVM_GET_ONE_REG) and re-enters.  Five samples at one
PC with no exit in between, RUNNABLE each time, end the run as ``livelock`` with ``livelock at pc=0x...
(<instruction>)``, the word at PC read from the VMM's own mapping of guest RAM (payloads run with the MMU off,
so PC is a guest physical address).

* Kicking works on a vCPU stuck that way (checked in Debian's 7.3.4 source): KVM's run loop checks for a
  pending signal before every guest entry, so also between two traps of a re-executed SMC
  (arch/arm64/kvm/arm.c:1302-1306 ``kvm_arch_vcpu_ioctl_run`` -> include/linux/kvm_host.h:2511
  ``kvm_xfer_to_guest_mode_handle_work``: exit reason KVM_EXIT_INTR, -EINTR), and a vCPU asleep in KVM's WFI
  emulation wakes on a signal (virt/kvm/kvm_main.c:3689 ``kvm_vcpu_check_block``).  A pending PC increment is
  committed before the return to userspace (arm.c:1468-1470 ``__kvm_adjust_pc``), so the PC read is the
  guest's architectural one: past a WFI the vCPU slept in (handle_exit.c:175 ``kvm_incr_pc`` after
  ``kvm_vcpu_wfi``).  Measured on a kernel with the planted bug (tests/system/data/broken-kernel/): the kick
  gets the vCPU out every time, with PC on the SMC.
* PC stillness alone proves nothing for an ordinary instruction: TCG takes interrupts only at translation
  block boundaries, so a polling loop (``1: ldr; cbz 1b``) shows its first instruction at every kick.  A
  trapped instruction is different: KVM completes an SMC/HVC it handles by moving PC past it before the next
  entry (an HVC's ELR is already past it), so a vCPU seen at one SMC/HVC at every kick, having made no exit,
  is re-executing a call KVM never completes.  Hence by default only SMC and HVC fire (window 1.5 s); any
  other instruction (a ``b .``, a polling loop) only when the scenario sets ``livelock_s`` itself (its
  window); ``livelock_s: 0`` turns the watchdog off (the host's ``SMCCC_LIVELOCK_S=0`` does that for every
  scenario that does not set it: harness/model/scenarios.py).
* Never a livelock: a vCPU that is STOPPED or SUSPENDED (waiting for CPU_ON, or suspended, inside KVM_RUN),
  one parked in userspace for a forwarded CPU_ON or done (not kicked at all), and one whose instruction at PC
  or at PC - 4 is WFI/WFE/WFIT/WFET (asleep: KVM reports PC past a trapped WFI, an untrapped WFE loops).
* Kicks are not exits: ``exits``/``max_exits`` count only real KVM_RUN returns, and the trace gets no record
  per kick (the result's ``watchdog`` has the count and each vCPU's last samples).
"""

from __future__ import annotations

import base64
import errno
import os
import threading
import time

from .. import protocol as P
from . import kvm, psci, sdei, smccc, watchdog
from .sdei_run import SdeiRun, is_sdei
from .trace import Trace
from .vm import Vcpu, Vm, ensure_kick_handler
from .vmsetup import aarch32, aarch32_entry, install_filters, probe_attrs, vcpu_features

MAX_EXITS_DEFAULT = 100_000     # per scenario: more KVM_RUN exits than this end the run as "exit_storm"
TRACE_LIMIT_DEFAULT = 4096      # trace records sent back per scenario; later ones are counted, the last kept
# VMs whose vCPUs had EL2: never destroyed (destroying a nested VM costs 6-8 s under TCG and can lock up a
# restored guest, docs/platform.md).  They live until the guest is thrown away.
GRAVEYARD: list[Vm] = []

REG_NAMES = {"pc": kvm.REG_PC, "pstate": kvm.REG_PSTATE, "sp": kvm.REG_SP, "sp_el1": kvm.REG_SP_EL1,
             "mpidr_el1": kvm.REG_MPIDR_EL1, "id_aa64pfr0_el1": kvm.REG_ID_AA64PFR0_EL1,
             "id_aa64mmfr2_el1": kvm.REG_ID_AA64MMFR2_EL1, "hcr_el2": kvm.REG_HCR_EL2,
             "sp_el2": kvm.REG_SP_EL2, "psci_version": kvm.REG_PSCI_VERSION}
REG_NAMES.update({f"x{i}": kvm.xreg(i) for i in range(31)})
REG_NAMES.update({f"fw_{k}": v for k, v in kvm.FW_BMAP_REGS.items()})


def reg_id(name) -> int:
    if isinstance(name, int):
        return name
    try:
        return REG_NAMES[name.lower()]
    except KeyError:
        raise P.ProtocolError(f"unknown register {name!r}; known: {sorted(REG_NAMES)}") from None


class VcpuState:
    def __init__(self, on: bool):
        self.parked = not on            # waiting in userspace for a forwarded CPU_ON
        self.pending_on: tuple | None = None
        self.done = False
        # progress watchdog: exits is written by the vCPU's thread, sample_due/next_kick/seen_exits by the
        # controller; samples ((t, pc) since the last exit) only by the vCPU's thread
        self.exits = 0
        self.seen_exits = -1
        self.next_kick = 0.0
        self.sample_due = False
        self.kicks = 0
        self.samples: list[tuple[float, int]] = []


class ScenarioRun:
    def __init__(self, spec: dict, sys_fd: int):
        self.spec = P.validate_scenario(spec)
        self.sys_fd = sys_fd
        self.trace = Trace(limit=int(spec.get("max_trace", TRACE_LIMIT_DEFAULT)))
        self.exits = 0
        self.max_exits = int(spec.get("max_exits", MAX_EXITS_DEFAULT))
        self.outcome: str | None = None
        self.exit_code: int | None = None
        self.stopping = False
        # VMM-side save/restore ("migrate": {"after_hypercalls": N, "replay_filter": bool}): stop the world
        # after the N-th forwarded call, save, restore into a fresh VM, continue there (guest/migrate.py).
        self.migrate = spec.get("migrate") or {}
        self.hypercall_count = 0
        self.pausing = False
        self.paused: set[int] = set()
        self.migrations: list[dict] = []
        self.psci_lock = threading.Lock()
        self.finished = threading.Event()
        self.cond = threading.Condition()
        self.errors: list[str] = []
        self.replies = {int(k, 0) & 0xFFFF_FFFF: v for k, v in self.spec["replies"].items()}
        self.livelock: dict | None = None
        self.watch = watchdog.mode(self.spec)     # set again when the run starts (LinuxRun replaces the spec)
        self.t_run = time.monotonic()

    # ---- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        s = self.spec
        self.vm = Vm(self.sys_fd)
        self.filter = smccc.Filter()
        self.mem = self.vm.add_memory(P.RAM_BASE, s["ram_size"])
        for seg in s["payload"]["segments"]:
            self.mem.write(seg["addr"], P.unb64(seg["data"]))
        if s["params"]:
            self.mem.write_u64s(P.PARAM_BASE, s["params"])
        self.probe_results = probe_attrs(self.vm.fd, s.get("probes", []))
        self.filter_results = install_filters(self.filter, self.vm.fd, s["filters"])
        feats = vcpu_features(s)
        for _ in range(s["vcpus"]):
            self.vm.add_vcpu(feats)
        if s.get("in_kernel_gic", s["el2"]):
            self.vm.create_vgic_v3(P.GICD_BASE, P.GICR_BASE)
        ram_end = P.RAM_BASE + s["ram_size"]
        for v in self.vm.vcpus:
            stack = ram_end - v.index * P.STACK_SIZE
            v.set_reg(kvm.REG_SP_EL1, stack)
            if aarch32(s):      # ---- AArch32 payloads: R13_svc is x19 (the AArch32 register mapping)
                v.set_x(19, stack)
            if s["el2"]:
                try:
                    v.set_reg(kvm.REG_SP_EL2, stack)
                except kvm.KvmError:
                    pass
            if v.index:
                v.set_mp_state(kvm.KVM_MP_STATE_STOPPED)
        boot = self.vm.vcpus[0]
        boot.set_reg(kvm.REG_PC, s["payload"]["entry"])
        if aarch32(s):          # ---- AArch32 payloads: SVC mode, PSTATE.T for a T32 entry (vmsetup.py)
            pc, pstate = aarch32_entry(s["payload"]["entry"], s["payload"]["state"] == "t32")
            boot.set_reg(kvm.REG_PSTATE, pstate)
            boot.set_reg(kvm.REG_PC, pc)
        for r in s.get("set_regs", []):
            target = self.vm.vcpus[r.get("vcpu", 0)]
            if "value" in r:
                target.set_reg(reg_id(r["reg"]), r["value"])
            else:   # read-modify-write: {"reg", "clear": mask, "set": bits} (e.g. ID_AA64PFR0_EL1.EL3 = 0)
                old = target.get_reg(reg_id(r["reg"]))
                new = (old & ~r.get("clear", 0)) | r.get("set", 0)
                target.set_reg(reg_id(r["reg"]), new)
                self.trace.add("set_reg", target.index, reg=str(r["reg"]), old=old, value=new,
                               readback=target.get_reg(reg_id(r["reg"])))
        # ---- SDEI: the dispatcher for forwarded SDEI ids (harness/guest/sdei_run.py) ----
        self.sdei_run = SdeiRun(s, [v.mpidr for v in self.vm.vcpus], (P.RAM_BASE, s["ram_size"]), self.trace)
        self.psci = psci.Psci([psci.CpuState(v.mpidr, v.index == 0) for v in self.vm.vcpus],
                              minor=s.get("psci_minor", 3))
        cpu_on_fwd = any(self.filter.action_for(f) == kvm.KVM_SMCCC_FILTER_FWD_TO_USER
                         for f in (psci.CPU_ON, psci.CPU_ON64))
        self.userspace_power = cpu_on_fwd
        self.vstate = [VcpuState(on=(v.index == 0 or not cpu_on_fwd)) for v in self.vm.vcpus]

    # ---- run -----------------------------------------------------------------------------------------
    def finish(self, outcome: str) -> None:
        with self.cond:
            if self.outcome is None:
                self.outcome = outcome
            self.stopping = True
            self.cond.notify_all()
        for v in self.vm.vcpus:
            v.kick()
        self.finished.set()

    def _pause_point(self, idx: int) -> None:
        with self.cond:
            self.paused.add(idx)
            self.cond.notify_all()
            while self.pausing and not self.stopping:
                self.cond.wait(0.05)
            self.paused.discard(idx)

    def _loop(self, v: Vcpu) -> None:
        idx = v.index
        st = self.vstate[idx]
        v.thread_ident = threading.get_ident()
        try:
            while not self.stopping and not st.done:
                v = self.vm.vcpus[idx]          # a restore (migrate) swaps in new vCPUs
                if self.pausing:
                    self._pause_point(idx)
                    continue
                if st.parked:
                    with self.cond:
                        while st.parked and st.pending_on is None and not self.stopping and not self.pausing:
                            self.cond.wait(0.1)
                        if self.stopping:
                            break
                        if self.pausing:
                            continue
                        entry, ctx = st.pending_on
                        st.pending_on = None
                    # Warm reset (re-INIT with the same features), then the entry point and context id.
                    v.init()
                    v.set_reg(kvm.REG_PC, entry)
                    if aarch32(self.spec):  # ---- AArch32: the secondary starts in AArch32, T32 if entry bit 0
                        pc, pstate = aarch32_entry(entry, False)
                        v.set_reg(kvm.REG_PSTATE, pstate)
                        v.set_reg(kvm.REG_PC, pc)
                    v.set_x(0, ctx)
                    st.parked = False
                    self.trace.add("psci", v.index, effect="powered_on", entry=entry, context_id=ctx)
                    continue
                try:
                    reason = v.enter()
                except kvm.KvmError as e:
                    if e.errno == errno.EINTR:
                        v.clear_kick()
                        if st.sample_due and not self.stopping and not self.pausing:
                            self._sample(v, st)
                        continue
                    raise
                self.exits += 1
                st.exits += 1
                st.samples.clear()
                if self.exits > self.max_exits:     # an exit storm: bounded, reported with the count
                    self.trace.add("exit_storm", v.index, exits=self.exits, max_exits=self.max_exits, pc=v.pc,
                                   reason=kvm.EXIT_NAMES.get(reason, str(reason)))
                    self.finish("exit_storm")
                    break
                self._dispatch(v, st, reason)
        except Exception as e:  # noqa: BLE001 - reported to the host, never swallowed
            self.errors.append(f"vcpu{v.index}: {type(e).__name__}: {e}")
            self.trace.add("error", v.index, message=f"{type(e).__name__}: {e}")
            self.finish("error")
        finally:
            for vc in (v, self.vm.vcpus[idx]):
                vc.release_thread()         # never signal a thread that has exited

    # ---- progress watchdog (module docstring) -----------------------------------------------------------
    def _word(self, addr: int, align: int = 4) -> int | None:
        """The instruction word at guest physical ``addr``, read through the VMM's mapping (None outside RAM)."""
        if addr % align or not self.mem.contains(addr, 4):
            return None
        return int.from_bytes(self.mem.read(addr, 4), "little")

    def _sample(self, v: Vcpu, st: VcpuState) -> None:
        """In the vCPU's own thread, after a watchdog kick: record its PC, and end the run if it is livelocked."""
        st.sample_due = False
        if v.get_mp_state() != kvm.KVM_MP_STATE_RUNNABLE:
            st.samples.clear()          # STOPPED / SUSPENDED: waiting inside KVM_RUN, not running
            return
        pc = v.pc
        st.samples.append((round(time.monotonic() - self.t_run, 6), pc))
        del st.samples[:-2 * watchdog.SAMPLES]
        window, any_insn = self.watch
        isa = watchdog.isa(v.pstate)        # ---- AArch32 payloads: A32/T32 words (watchdog.py)
        if isa == "t32":                    # T32: 2-aligned; KVM reports PC past a 16-bit (PC-2) or 32-bit WFI
            word_at, word_before = self._word(pc, 2), self._word(pc - 2, 2)
            if not watchdog.waits(word_before, isa):
                word_before = self._word(pc - 4, 2)
        else:
            word_at, word_before = self._word(pc), self._word(pc - 4)
        why = watchdog.verdict(st.samples, word_at, word_before, any_insn=any_insn,
                               min_span_s=window * (watchdog.SAMPLES - 1) / watchdog.SAMPLES * 0.9, isa=isa)
        if why is None:
            return
        run = watchdog.still_run(st.samples)
        insn = watchdog.decode(word_at, isa)
        self.livelock = {"vcpu": v.index, "pc": pc, "pstate": v.pstate, "word": word_at, "insn": insn,
                         "why": why, "kicks": len(run), "still_s": round(run[-1][0] - run[0][0], 3),
                         "window_s": window, "any_insn": any_insn, "samples": [list(x) for x in st.samples],
                         "message": f"livelock at pc={pc:#x} ({insn})"}
        self.trace.add("livelock", v.index, pc=pc, insn=insn, word=word_at, why=why, kicks=len(run),
                       still_s=self.livelock["still_s"])
        self.finish("livelock")

    def _watch(self, threads: list[threading.Thread]) -> None:
        """In the controller thread: kick every vCPU that has been in KVM_RUN without an exit for a period."""
        window = self.watch[0]
        period = window / watchdog.SAMPLES
        now = time.monotonic()
        for v in self.vm.vcpus:
            st = self.vstate[v.index]
            if st.parked or st.done or not threads[v.index].is_alive():
                st.seen_exits = -1      # not in KVM_RUN: nothing to watch
                continue
            if st.exits != st.seen_exits:
                st.seen_exits, st.next_kick = st.exits, now + period
            elif now >= st.next_kick:     # (again if a sample was skipped: a kick that met a pause or a stop)
                st.sample_due, st.next_kick = True, now + period
                st.kicks += 1
                v.kick()

    def _dispatch(self, v: Vcpu, st: VcpuState, reason: int) -> None:
        if reason == kvm.KVM_EXIT_HYPERCALL:
            self._hypercall(v, st)
            if not (st.done or st.parked or self.stopping):
                self.sdei_run.deliver(v)        # ---- SDEI: a pending event is delivered at an exit
        elif reason == kvm.KVM_EXIT_MMIO:
            self._mmio(v, st)
            if not (st.done or st.parked or self.stopping):
                self.sdei_run.deliver(v)        # ---- SDEI
        elif reason == kvm.KVM_EXIT_SYSTEM_EVENT:
            typ, data = v.system_event()
            self.trace.add("system_event", v.index, type=typ, name=kvm.SYSTEM_EVENT_NAMES.get(typ, str(typ)),
                           data=data, by="kvm")
            self.finish("system_event")
        elif reason == kvm.KVM_EXIT_INTR:
            pass
        else:
            self.trace.add("exit", v.index, reason=reason, name=kvm.EXIT_NAMES.get(reason, str(reason)),
                           raw=base64.b64encode(v.raw_union()).decode(), pc=v.pc)
            self.finish("error")

    def _hypercall(self, v: Vcpu, st: VcpuState) -> None:
        nr, flags = v.hypercall()
        fid = nr & 0xFFFF_FFFF
        args = v.get_xs(18)
        pc, pstate = v.pc, v.pstate
        reply, by, effect = None, "none", None
        sdei_effect = None
        if fid in self.replies:
            reply, by = self.replies[fid], "reply"
        elif self.spec["handler"] == "psci" and is_sdei(fid):     # ---- SDEI (harness/guest/sdei_run.py)
            out = self.sdei_run.call(v, fid, args, pstate)
            reply, by, sdei_effect = out.regs, "sdei", out.effect
        elif self.spec["handler"] == "psci":
            if smccc.owner(fid) == smccc.OWNER_STANDARD and smccc.func_num(fid) <= 0x1F:
                with self.psci_lock:        # vCPU threads race on CPU_ON/AFFINITY_INFO: one decision at a time
                    out = self.psci.call(v.index, fid, args[1:4], aarch32=bool(pstate & kvm.PSR_MODE32_BIT))
                # Results are NOT truncated for 32-bit ids: KVM writes (unsigned long)-1 etc. in full (the
                # differential caught kvmtool's truncation convention disagreeing; SMCCC leaves the upper
                # halves to the implementation, and we follow KVM).
                reply = out.regs
                effect, by = out.effect, "psci"
            else:
                reply, by = [smccc.to_u64(smccc.SMCCC_RET_NOT_SUPPORTED)], "psci"
        if reply is not None:
            for i, val in enumerate(reply):
                v.set_x(i, val)
        extra = {}
        if pstate & kvm.PSR_MODE32_BIT and reply is not None:   # ---- AArch32: what KVM kept of the reply
            extra["readback"] = v.get_xs(len(reply))   # (set_core_reg narrows r0-r14.. to 32 bits)
        self.trace.add("hypercall", v.index, nr=nr, flags=flags, conduit=smccc.conduit(flags), pc=pc,
                       pstate=pstate, el=kvm.pstate_el(pstate), args=args, reply=reply, by=by,
                       name=sdei.name(fid) if is_sdei(fid) else psci.name(fid), **extra)
        self.sdei_run.apply(v, sdei_effect)     # ---- SDEI: COMPLETE / COMPLETE_AND_RESUME
        if effect:
            self._apply(v, st, effect)
        self.hypercall_count += 1
        if self.migrate and self.hypercall_count == self.migrate.get("after_hypercalls", 0) and not self.migrations:
            with self.cond:
                self.pausing = True
            for other in self.vm.vcpus:
                if other is not v:
                    other.kick()

    def _migrate(self) -> None:
        """All vCPU threads are parked at their pause point: save, restore into a new VM, swap."""
        from .migrate import restore_vm, save_vm
        t0 = time.monotonic()
        state = save_vm(self.vm, self.filter.ranges, self.psci.affinity_state())
        t1 = time.monotonic()
        replay = self.migrate.get("replay_filter", True)
        new_vm, report = restore_vm(self.sys_fd, state, replay_filter=replay, gic=(P.GICD_BASE, P.GICR_BASE))
        for c, on in zip(self.psci.cpus, state["psci_on"], strict=True):
            c.on = on
        old, self.vm, self.mem = self.vm, new_vm, new_vm.memory[0]
        if self.spec["el2"]:
            GRAVEYARD.append(old)
        else:
            old.close()
        rec = dict(report, save_s=round(t1 - t0, 6), restore_s=round(time.monotonic() - t1, 6),
                   regs_per_vcpu=[len(v["regs"]) for v in state["vcpus"]], replay_filter=replay,
                   filter=[list(r) for r in state["filter"]])
        self.migrations.append(rec)
        self.trace.add("migrate", None, **rec)
        with self.cond:
            self.pausing = False
            self.cond.notify_all()

    def _apply(self, v: Vcpu, st: VcpuState, effect: tuple) -> None:
        kind = effect[0]
        if kind == "cpu_on":
            _, target, entry, ctx = effect
            self.trace.add("psci", v.index, effect="cpu_on", target=target, entry=entry, context_id=ctx)
            with self.cond:
                self.vstate[target].pending_on = (entry, ctx)
                self.cond.notify_all()
            os.sched_yield()    # let the target's thread power on before this vCPU re-enters KVM_RUN (smp=1 L1)
        elif kind == "cpu_off":
            self.trace.add("psci", v.index, effect="cpu_off")
            v.set_mp_state(kvm.KVM_MP_STATE_STOPPED)
            st.parked = True
            if v.index == 0 and not any(not s.parked for s in self.vstate):
                self.finish("all_off")
        elif kind == "suspend":
            self.trace.add("psci", v.index, effect="suspend")
        elif kind == "system_event":
            _, typ, flags = effect
            self.trace.add("system_event", v.index, type=typ, name=kvm.SYSTEM_EVENT_NAMES.get(typ, str(typ)),
                           data=[flags], by="psci")
            self.finish("system_event")

    def _mmio(self, v: Vcpu, st: VcpuState) -> None:
        addr, data, length, is_write = v.mmio()
        value = int.from_bytes(data, "little")
        if P.REPORT_BASE <= addr < P.REPORT_BASE + P.REPORT_SIZE and is_write:
            off = addr - P.REPORT_BASE
            if off == P.REPORT_DONE:
                self.trace.add("done", v.index, code=value, pc=v.pc)
                st.done = True
                if v.index == 0:
                    self.exit_code = value
                    self.finish("done")
                return
            self.trace.add("report", v.index, slot=off // 8, value=value)
            return
        if not is_write:
            v.set_mmio_read_data(0, length)
        self.trace.add("mmio", v.index, addr=addr, len=length, is_write=is_write, data=value, pc=v.pc)

    def _run_vcpus(self) -> tuple[list[str], list[dict]]:
        """One thread per vCPU until the outcome or the deadline (stopping the world to migrate when asked).

        Returns the names of threads that did not stop, and each vCPU's final state (empty if any is stuck:
        its registers cannot be read while it is inside KVM_RUN).
        """
        ensure_kick_handler()
        threads = [threading.Thread(target=self._loop, args=(v,), name=f"vcpu{v.index}", daemon=True)
                   for v in self.vm.vcpus]
        self.watch = watchdog.mode(self.spec)
        self.t_run = time.monotonic()
        for t in threads:
            t.start()
        end = time.monotonic() + self.spec["deadline_s"]
        while not self.finished.is_set():
            if time.monotonic() > end:
                self.finish("deadline")
                break
            if self.watch[0] > 0 and not self.pausing:
                self._watch(threads)
            with self.cond:
                live = {i for i, t in enumerate(threads) if t.is_alive()}
                ready = self.pausing and live <= self.paused
            if ready:
                try:
                    self._migrate()
                except Exception as e:  # noqa: BLE001 - reported to the host
                    self.errors.append(f"migrate: {type(e).__name__}: {e}")
                    self.trace.add("error", None, message=f"migrate: {type(e).__name__}: {e}")
                    self.finish("error")
                continue
            self.finished.wait(0.01 if self.pausing else 0.05)
        for t in threads:
            t.join(5.0)
        stuck = [t.name for t in threads if t.is_alive()]
        vcpus = []
        if not stuck:
            for v in self.vm.vcpus:
                vcpus.append({"index": v.index, "pc": v.pc, "pstate": v.pstate, "x": v.get_xs(31),
                              "mpidr": v.mpidr, "mp_state": v.get_mp_state(), "parked": self.vstate[v.index].parked})
            if self.outcome == "deadline":
                for d in vcpus:
                    self.trace.add("deadline", d["index"], pc=d["pc"], pstate=d["pstate"])
        return stuck, vcpus

    # ---- top level -------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.monotonic()
        try:
            self.setup()
        except kvm.KvmError as e:
            self._cleanup()
            return {"name": self.spec["name"], "outcome": "setup_error", "error": str(e), "errno": e.errname,
                    "events": self.trace.records}
        t1 = time.monotonic()
        stuck, vcpus = self._run_vcpus()
        t2 = time.monotonic()
        late = install_filters(self.filter, self.vm.fd, self.spec.get("late_filters", [])) if not stuck else []
        block = self.mem.read(P.RESULT_BASE, P.RESULT_BLOCK_SIZE).rstrip(b"\0")
        result = {
            "name": self.spec["name"], "outcome": self.outcome, "exit_code": self.exit_code,
            "events": self.trace.export(), "filters": self.filter_results, "late_filters": late,
            "probes": self.probe_results, "migrations": self.migrations,
            "exits": self.exits, "trace_dropped": self.trace.dropped,
            "vcpus": vcpus, "stuck_threads": stuck, "errors": self.errors,
            "result_block": base64.b64encode(block).decode(),
            "psci_state": self.psci.affinity_state(), "sdei_state": self.sdei_run.state(),
            "livelock": self.livelock, "watchdog": self._watchdog_summary(),
            "timing": {"setup_s": round(t1 - t0, 6), "run_s": round(t2 - t1, 6)},
        }
        self._cleanup(keep=bool(stuck))
        result["timing"]["total_s"] = round(time.monotonic() - t0, 6)
        return result

    def _watchdog_summary(self) -> dict:
        window, any_insn = self.watch
        return {"window_s": window, "any_insn": any_insn,
                "vcpus": [{"index": i, "kicks": st.kicks, "samples": [list(x) for x in st.samples[-watchdog.SAMPLES:]]}
                          for i, st in enumerate(self.vstate)]}

    def _cleanup(self, keep: bool = False) -> None:
        vm = getattr(self, "vm", None)
        if vm is None:
            return
        if keep or self.spec["el2"]:
            GRAVEYARD.append(vm)
        else:
            vm.close()


def run_scenario(spec: dict, sys_fd: int) -> dict:
    return ScenarioRun(spec, sys_fd).run()
