"""The VMM side of SDEI (harness/guest/sdei.py is the dispatcher's pure state machine): called by
harness/guest/runner.py from a vCPU's own thread for a forwarded SDEI id, and at every exit of that vCPU to
deliver a pending event.

* A forwarded call in 0xC4000020..0xC400003F goes to :meth:`SdeiRun.call` (the scenario forwards the range
  with its filters, e.g. harness/model/scenarios.py ``SDEI_FWD``).
* Delivery (DEN0054 "Event handler entry"): the interrupted context -- x0..x17, PC, PSTATE, read with
  KVM_GET_ONE_REG after KVM completed the exit (PC already past an HVC/SMC) -- is saved; x0..x3 = event,
  argument, interrupted PC, interrupted PSTATE; PC = the handler; PSTATE = the client's EL, SP_ELx, DAIF set.
* EVENT_COMPLETE restores that context (x0..x17, PC, PSTATE).  EVENT_COMPLETE_AND_RESUME restores it and then
  makes it look like an IRQ taken to the client's EL (DEN0054 "SDEI_EVENT_COMPLETE_AND_RESUME"): ELR_ELx = the
  interrupted PC, SPSR_ELx = the interrupted PSTATE, PC = the resume address, PSTATE = ELxh with DAIF masked
  (an AArch64 exception entry masks D, A, I and F).
* Host-signalled events: the scenario key ``sdei`` = {"signal": [{"event", "vcpu", "after_calls"}]} raises
  ``event`` at vCPU ``vcpu`` once that vCPU has made ``after_calls`` forwarded calls (0: before it first runs,
  delivered at its first exit).
"""

from __future__ import annotations

import threading

from . import kvm, sdei

REG_SPSR_EL1 = kvm.core_reg(8 * 36)             # struct kvm_regs: spsr[KVM_SPSR_EL1] after elr_el1
REG_ELR_EL2 = kvm.sys_reg(3, 4, 4, 0, 1)
REG_SPSR_EL2 = kvm.sys_reg(3, 4, 4, 0, 0)


def is_sdei(fid: int) -> bool:
    return sdei.BASE <= fid < sdei.BASE + sdei.NR


class SdeiRun:
    def __init__(self, spec: dict, mpidrs: list[int], ram: tuple[int, int] | None, trace) -> None:
        self.d = sdei.Sdei(mpidrs, ram)
        self.lock = threading.Lock()        # vCPU threads share the dispatcher (EVENT_SIGNAL, shared events)
        self.trace = trace
        self.calls = [0] * len(mpidrs)
        self.signals = [{"event": s["event"], "vcpu": s.get("vcpu", 0), "after_calls": s.get("after_calls", 0)}
                        for s in (spec.get("sdei") or {}).get("signal", [])]
        self._host_signals(None)

    def _host_signals(self, vcpu: int | None) -> None:
        for s in self.signals:
            if s.get("done") or (vcpu is not None and s["vcpu"] != vcpu):
                continue
            if self.calls[s["vcpu"]] >= s.get("after_calls", 0):
                s["done"] = True
                kept = self.d.raise_event(s["vcpu"], s["event"])
                self.trace.add("sdei", s["vcpu"], effect="host_signal", event=s["event"], kept=kept)

    def call(self, v, fid: int, args: list[int], pstate: int) -> sdei.Outcome:
        with self.lock:
            out = self.d.call(v.index, fid, args[1:6], pstate=pstate)
            self.calls[v.index] += 1
        return out

    def apply(self, v, effect: tuple | None) -> None:
        """After the call's trace record: carry out COMPLETE / COMPLETE_AND_RESUME on the caller's vCPU."""
        if effect is None:
            return
        ctx = effect[1]
        for i, val in enumerate(ctx.regs):
            v.set_x(i, val)
        if effect[0] == "complete":
            v.set_reg(kvm.REG_PSTATE, ctx.pstate)
            v.set_reg(kvm.REG_PC, ctx.pc)
            self.trace.add("sdei", v.index, effect="complete", pc=ctx.pc, pstate=ctx.pstate)
            return
        _, _, resume, client_el = effect
        if client_el == 2:
            v.set_reg(REG_ELR_EL2, ctx.pc)
            v.set_reg(REG_SPSR_EL2, ctx.pstate)
            pstate = sdei.PSTATE_DAIF | sdei.PSTATE_EL2H
        else:
            v.set_reg(kvm.REG_ELR_EL1, ctx.pc)
            v.set_reg(REG_SPSR_EL1, ctx.pstate)
            pstate = sdei.PSTATE_DAIF | sdei.PSTATE_EL1H
        v.set_reg(kvm.REG_PSTATE, pstate)
        v.set_reg(kvm.REG_PC, resume)
        self.trace.add("sdei", v.index, effect="complete_and_resume", resume=resume, elr=ctx.pc, spsr=ctx.pstate,
                       pstate=pstate)

    def deliver(self, v) -> None:
        """At an exit of vCPU ``v``, in its own thread: enter a handler if an event is deliverable now."""
        with self.lock:
            self._host_signals(v.index)
            ev = self.d.deliverable(v.index)
            if ev is None:
                return
            ctx = sdei.Context(v.get_xs(sdei.CONTEXT_REGS), v.pc, v.pstate)
            e = self.d.enter(v.index, ev, ctx)
        for i, val in enumerate(e.regs):
            v.set_x(i, val)
        v.set_reg(kvm.REG_PSTATE, e.pstate)
        v.set_reg(kvm.REG_PC, e.pc)
        self.trace.add("sdei", v.index, effect="deliver", event=ev, handler=e.pc, pstate=e.pstate, regs=e.regs,
                       interrupted_pc=ctx.pc, interrupted_pstate=ctx.pstate)

    def state(self) -> dict:
        with self.lock:
            return {"pes": [{"masked": pe.masked, "running": pe.running[0] if pe.running else None,
                             "private": {str(ev): self.d.status(i, ev) for ev in pe.private}}
                            for i, pe in enumerate(self.d.pes)],
                    "shared": {str(ev): self.d.status(0, ev) for ev in self.d.shared}}
