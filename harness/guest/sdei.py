"""A userspace SDEI 1.1 dispatcher (Arm DEN0054, Software Delegated Exception Interface), for calls KVM
forwarded with FWD_TO_USER (the SDEI range 0xC4000020..0xC400003F).

Like harness/guest/psci.py it is a pure state machine: :meth:`Sdei.call` takes the caller, the function id,
x1..x5, the caller's PSTATE and (for EVENT_CONTEXT) nothing else, and returns an :class:`Outcome`: the
registers to write back and an effect the VMM carries out on the caller's vCPU (restore a context,
resume as an IRQ).  Delivering an event is two calls: :meth:`Sdei.deliverable` (cheap, at every exit of a
vCPU) and :meth:`Sdei.enter` with the interrupted context the VMM read; it returns the handler's entry state.

Spec references are DEN0054 section titles (the function's own section, "Event states", "Event handler
entry", "Event completion"); where DEN0054 leaves the choice to the dispatcher this follows Trusted
Firmware-A's dispatcher (services/std_svc/sdei/sdei_main.c, docs/components/sdei.rst) and says so.

The platform's events (:data:`DEFAULT_EVENTS`): event 0, the software-signalled private event (DEN0054
"SDEI_EVENT_SIGNAL"); event 100, a shared event; event 200, a private event the host signals from the scenario
(key ``sdei``).  All are of normal priority: a handler runs to COMPLETE before the next one starts on its PE.
"""

from __future__ import annotations

from .. import protocol as P

# ---- function ids (include/uapi/linux/arm_sdei.h; SDEI 1.1 adds EVENT_SIGNAL and FEATURES) -------------
BASE = 0xC400_0020
NR = 0x20                               # the range the scenario forwards: 0xC4000020 .. 0xC400003F
VERSION = BASE + 0x00
EVENT_REGISTER = BASE + 0x01
EVENT_ENABLE = BASE + 0x02
EVENT_DISABLE = BASE + 0x03
EVENT_CONTEXT = BASE + 0x04
EVENT_COMPLETE = BASE + 0x05
EVENT_COMPLETE_AND_RESUME = BASE + 0x06
EVENT_UNREGISTER = BASE + 0x07
EVENT_STATUS = BASE + 0x08
EVENT_GET_INFO = BASE + 0x09
EVENT_ROUTING_SET = BASE + 0x0A
PE_MASK = BASE + 0x0B
PE_UNMASK = BASE + 0x0C
INTERRUPT_BIND = BASE + 0x0D
INTERRUPT_RELEASE = BASE + 0x0E
EVENT_SIGNAL = BASE + 0x0F
FEATURES = BASE + 0x10
PRIVATE_RESET = BASE + 0x11
SHARED_RESET = BASE + 0x12

NAMES = {v: "SDEI_" + k for k, v in dict(globals()).items()
         if isinstance(v, int) and k.isupper() and BASE <= v < BASE + NR and k != "BASE"}

# ---- return values (DEN0054 "Return codes") ------------------------------------------------------------
SUCCESS = 0
NOT_SUPPORTED = -1
INVALID_PARAMETERS = -2
DENIED = -3
PENDING = -5
OUT_OF_RESOURCE = -10

VERSION_1_1 = (1 << 48) | (1 << 32)     # major 1 [62:48], minor 1 [47:32], vendor 0 [31:0]

# EVENT_STATUS bits; EVENT_REGISTER routing mode; GET_INFO info ids and values
STATUS_REGISTERED, STATUS_ENABLED, STATUS_RUNNING = 1, 2, 4
RM_ANY, RM_PE = 0, 1
INFO_TYPE, INFO_SIGNALED, INFO_PRIORITY, INFO_ROUTING_MODE, INFO_ROUTING_AFF = 0, 1, 2, 3, 4
TYPE_PRIVATE, TYPE_SHARED = 0, 1
PRIORITY_NORMAL = 0

CONTEXT_REGS = 18                       # EVENT_CONTEXT: x0..x17 of the interrupted context
MPIDR_HWID_BITMASK = 0xFF_00FF_FFFF
PSTATE_DAIF = 0x3C0
PSTATE_EL1H, PSTATE_EL2H = 0x5, 0x9
PSR_MODE32_BIT = 0x10


class EventDesc:
    __slots__ = ("priority", "signalable", "type")

    def __init__(self, type: int, signalable: bool = False, priority: int = PRIORITY_NORMAL) -> None:
        self.type, self.signalable, self.priority = type, signalable, priority


DEFAULT_EVENTS = {0: EventDesc(TYPE_PRIVATE, signalable=True), 100: EventDesc(TYPE_SHARED),
                  200: EventDesc(TYPE_PRIVATE)}


def name(fid: int) -> str:
    return NAMES.get(fid, f"{fid:#010x}")


def _u64(v: int) -> int:
    return v & P.U64_MASK


class Context:
    """The interrupted context the dispatcher saves at delivery: x0..x17, PC and PSTATE (DEN0054 "Event
    handler entry": the context the handler can read with EVENT_CONTEXT and COMPLETE restores)."""
    __slots__ = ("pc", "pstate", "regs")

    def __init__(self, regs: list[int], pc: int, pstate: int) -> None:
        self.regs, self.pc, self.pstate = [_u64(r) for r in regs[:CONTEXT_REGS]], _u64(pc), _u64(pstate)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Context) and (self.regs, self.pc, self.pstate) == (other.regs, other.pc, other.pstate)

    def __repr__(self) -> str:
        return f"Context(pc={self.pc:#x}, pstate={self.pstate:#x}, x0..x3={[hex(r) for r in self.regs[:4]]})"


class Outcome:
    """``regs``: x0.. to write (None: leave them); ``effect``: None, ("complete", Context) or
    ("complete_and_resume", Context, resume_addr, client_el)."""
    __slots__ = ("effect", "regs")

    def __init__(self, regs: list[int] | None, effect: tuple | None = None) -> None:
        self.regs, self.effect = regs, effect

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Outcome) and (self.regs, self.effect) == (other.regs, other.effect)

    def __repr__(self) -> str:
        return f"Outcome(regs={self.regs!r}, effect={self.effect!r})"


class Entry:
    """Where and how a handler starts (DEN0054 "Event handler entry"): x0 = event number, x1 = the argument
    given at EVENT_REGISTER, x2 = the interrupted PC, x3 = the interrupted PSTATE; PSTATE = the client's EL
    with SP_ELx (ELxh) and D, A, I, F masked."""
    __slots__ = ("event", "pc", "pstate", "regs")

    def __init__(self, event: int, pc: int, pstate: int, regs: list[int]) -> None:
        self.event, self.pc, self.pstate, self.regs = event, pc, pstate, regs

    def __repr__(self) -> str:
        return f"Entry(event={self.event}, pc={self.pc:#x}, pstate={self.pstate:#x}, regs={self.regs})"


class Registration:
    __slots__ = ("affinity", "arg", "client_el", "enabled", "entry", "pending", "routing", "running",
                 "unregister_pending")

    def __init__(self, entry: int, arg: int, routing: int, affinity: int, client_el: int) -> None:
        self.entry, self.arg, self.routing, self.affinity, self.client_el = entry, arg, routing, affinity, client_el
        self.enabled = False
        self.pending = False            # signalled, not yet handled
        self.running: int | None = None     # the PE whose handler runs
        self.unregister_pending = False


class PeState:
    __slots__ = ("masked", "mpidr", "private", "running")

    def __init__(self, mpidr: int) -> None:
        self.mpidr = mpidr
        # A PE comes out of reset masked: a client unmasks it (Linux: drivers/firmware/arm_sdei.c sdei_cpuhp_up
        # -> sdei_unmask_local_cpu on every CPU; TF-A sdei_cpu_on_init masks a PE that powers on)
        self.masked = True
        self.private: dict[int, Registration] = {}
        self.running: tuple[int, Context] | None = None     # (event, interrupted context)


class Sdei:
    """SDEI state for one VM, PEs indexed like its vCPUs."""

    def __init__(self, mpidrs: list[int], ram: tuple[int, int] | None, events: dict | None = None) -> None:
        self.pes = [PeState(m & MPIDR_HWID_BITMASK) for m in mpidrs]
        # (base, size): where a handler / resume address may be -- for clients running with the MMU off (the
        # payloads: a guest physical address).  None: a client with the MMU on (Linux passes a kernel virtual
        # address), only the alignment is checked.
        self.ram = ram
        self.events = dict(DEFAULT_EVENTS if events is None else events)
        self.shared: dict[int, Registration] = {}

    # ---- helpers ------------------------------------------------------------------------------------
    def _valid_addr(self, addr: int) -> bool:
        if self.ram is None:
            return addr % 4 == 0
        base, size = self.ram
        return addr % 4 == 0 and base <= addr < base + size

    def _reg(self, caller: int, ev: int) -> Registration | None:
        d = self.events[ev]
        return self.pes[caller].private.get(ev) if d.type == TYPE_PRIVATE else self.shared.get(ev)

    def _pe_by_mpidr(self, mpidr: int) -> int | None:
        for i, pe in enumerate(self.pes):
            if pe.mpidr == mpidr & MPIDR_HWID_BITMASK and not mpidr & ~MPIDR_HWID_BITMASK:
                return i
        return None

    @staticmethod
    def _ret(x0: int) -> Outcome:
        return Outcome([_u64(x0)])

    def status(self, caller: int, ev: int) -> int:
        r = self._reg(caller, ev)
        if r is None:
            return 0
        return (STATUS_REGISTERED | (STATUS_ENABLED if r.enabled else 0)
                | (STATUS_RUNNING if r.running is not None else 0))

    # ---- the calls ----------------------------------------------------------------------------------
    def call(self, caller: int, fid: int, args: list[int], pstate: int = 0x3C5) -> Outcome:
        """One forwarded SDEI call from vCPU ``caller``: args = [x1, x2, x3, x4, x5]; ``pstate`` the caller's."""
        a = [_u64(x) for x in (list(args) + [0] * 5)[:5]]
        if pstate & PSR_MODE32_BIT:
            # SDEI ids are SMC64 only; an AArch32 caller cannot make an SMC64 call (DEN0028 "SMC64/HVC64")
            return self._ret(NOT_SUPPORTED)
        if fid == VERSION:
            return self._ret(VERSION_1_1)
        if fid == FEATURES:
            # DEN0054 "SDEI_FEATURES": feature 0 = BIND_SLOTS ([15:0] private, [31:16] shared): no interrupt
            # binding here, 0 slots; feature 1 = RELATIVE resume mode: not offered (0)
            return self._ret(0 if a[0] in (0, 1) else INVALID_PARAMETERS)
        if fid in (PE_MASK, PE_UNMASK):
            pe = self.pes[caller]
            was = pe.masked
            pe.masked = fid == PE_MASK
            # PE_MASK answers whether the call changed the mask (TF-A sdei_pe_mask: 1 changed, 0 already masked)
            return self._ret((0 if was else 1) if fid == PE_MASK else SUCCESS)
        if fid == PRIVATE_RESET:
            return self._ret(self._reset(self.pes[caller].private))
        if fid == SHARED_RESET:
            return self._ret(self._reset(self.shared))
        if fid == EVENT_CONTEXT:
            return self._context(caller, a[0])
        if fid == EVENT_COMPLETE:
            return self._complete(caller, None, pstate)
        if fid == EVENT_COMPLETE_AND_RESUME:
            return self._complete(caller, a[0], pstate)
        if fid in (INTERRUPT_BIND, INTERRUPT_RELEASE):
            # no binding slots (FEATURES(0) = 0): BIND -> OUT_OF_RESOURCE; none of our events is bound
            return self._ret(OUT_OF_RESOURCE if fid == INTERRUPT_BIND else INVALID_PARAMETERS)
        if fid not in (EVENT_REGISTER, EVENT_ENABLE, EVENT_DISABLE, EVENT_UNREGISTER, EVENT_STATUS,
                       EVENT_GET_INFO, EVENT_ROUTING_SET, EVENT_SIGNAL):
            return self._ret(NOT_SUPPORTED)
        ev = a[0] & 0xFFFF_FFFF         # event numbers are 32-bit
        if ev not in self.events or a[0] >> 32:
            return self._ret(INVALID_PARAMETERS)
        if fid == EVENT_SIGNAL:
            return self._ret(self._signal(ev, a[1]))
        if fid == EVENT_REGISTER:
            return self._ret(self._register(caller, ev, a[1], a[2], a[3], a[4], pstate))
        if fid == EVENT_STATUS:
            return self._ret(self.status(caller, ev))
        if fid == EVENT_GET_INFO:
            return self._ret(self._get_info(caller, ev, a[1]))
        reg = self._reg(caller, ev)
        if fid == EVENT_ROUTING_SET:
            return self._ret(self._routing_set(ev, reg, a[1], a[2]))
        if reg is None:
            return self._ret(DENIED)   # ENABLE/DISABLE/UNREGISTER of an unregistered event ("Event states")
        if reg.unregister_pending:
            return self._ret(PENDING if fid == EVENT_UNREGISTER else DENIED)
        if fid in (EVENT_ENABLE, EVENT_DISABLE):
            reg.enabled = fid == EVENT_ENABLE       # already in that state: no effect, SUCCESS
            return self._ret(SUCCESS)
        # EVENT_UNREGISTER: a running handler makes it pending until COMPLETE ("SDEI_EVENT_UNREGISTER")
        if reg.running is not None:
            reg.unregister_pending = True
            return self._ret(PENDING)
        self._drop(caller, ev)
        return self._ret(SUCCESS)

    def _register(self, caller, ev, entry, arg, flags, affinity, pstate) -> int:
        # DEN0054 "SDEI_EVENT_REGISTER": bad entry point, routing mode or affinity -> INVALID_PARAMETERS;
        # an event already registered (or with an unregister pending) -> DENIED
        if not self._valid_addr(entry):
            return INVALID_PARAMETERS
        if flags & ~1:
            return INVALID_PARAMETERS
        d = self.events[ev]
        if d.type == TYPE_SHARED and flags == RM_PE and self._pe_by_mpidr(affinity) is None:
            return INVALID_PARAMETERS
        if self._reg(caller, ev) is not None:
            return DENIED
        client_el = (pstate >> 2) & 3
        reg = Registration(entry, arg, flags if d.type == TYPE_SHARED else RM_PE,
                           affinity & MPIDR_HWID_BITMASK if d.type == TYPE_SHARED else self.pes[caller].mpidr,
                           client_el)
        if d.type == TYPE_PRIVATE:
            self.pes[caller].private[ev] = reg
        else:
            self.shared[ev] = reg
        return SUCCESS

    def _drop(self, caller: int, ev: int) -> None:
        if self.events[ev].type == TYPE_PRIVATE:
            self.pes[caller].private.pop(ev, None)
        else:
            self.shared.pop(ev, None)

    def _reset(self, table: dict) -> int:
        # DEN0054 "SDEI_PRIVATE_RESET" / "SDEI_SHARED_RESET": unregister every event of the table; one whose
        # handler runs is left unregister-pending (dropped at its COMPLETE)
        for ev in list(table):
            if table[ev].running is not None:
                table[ev].unregister_pending = True
            else:
                del table[ev]
        return SUCCESS

    def _get_info(self, caller, ev, info) -> int:
        d = self.events[ev]
        if info == INFO_TYPE:
            return d.type
        if info == INFO_SIGNALED:
            return int(d.signalable)
        if info == INFO_PRIORITY:
            return d.priority
        if info in (INFO_ROUTING_MODE, INFO_ROUTING_AFF):
            if d.type != TYPE_SHARED:
                return INVALID_PARAMETERS   # routing is a property of shared events only
            reg = self.shared.get(ev)
            if reg is None:
                return DENIED
            return reg.routing if info == INFO_ROUTING_MODE else reg.affinity
        return INVALID_PARAMETERS

    def _routing_set(self, ev, reg, mode, affinity) -> int:
        if self.events[ev].type != TYPE_SHARED or mode & ~1:
            return INVALID_PARAMETERS
        if mode == RM_PE and self._pe_by_mpidr(affinity) is None:
            return INVALID_PARAMETERS
        if reg is None or reg.enabled or reg.running is not None or reg.unregister_pending:
            return DENIED      # "SDEI_EVENT_ROUTING_SET": registered, disabled and not running only
        reg.routing, reg.affinity = mode, affinity & MPIDR_HWID_BITMASK
        return SUCCESS

    def _signal(self, ev, target_mpidr) -> int:
        # DEN0054 "SDEI_EVENT_SIGNAL": event 0 only, to a valid PE.  A signal to a PE where event 0 is not
        # registered is lost (TF-A raises an SGI the dispatcher then ignores); registered: pending until it
        # is enabled, the PE unmasked and no handler runs there.
        if not self.events[ev].signalable:
            return INVALID_PARAMETERS
        target = self._pe_by_mpidr(target_mpidr)
        if target is None:
            return INVALID_PARAMETERS
        self.raise_event(target, ev)
        return SUCCESS

    def raise_event(self, target: int, ev: int) -> bool:
        """The platform (the host's scenario, or EVENT_SIGNAL) signals ``ev`` at PE ``target``; False if lost."""
        reg = self._reg(target, ev)
        if reg is None or reg.unregister_pending:
            return False
        reg.pending = True
        return True

    def _context(self, caller, n) -> Outcome:
        pe = self.pes[caller]
        if pe.running is None:
            return self._ret(DENIED)        # "SDEI_EVENT_CONTEXT": only from inside a handler
        if n >= CONTEXT_REGS:
            return self._ret(INVALID_PARAMETERS)
        return self._ret(pe.running[1].regs[n])

    def _complete(self, caller, resume, pstate) -> Outcome:
        pe = self.pes[caller]
        if pe.running is None:
            return self._ret(DENIED)        # COMPLETE outside a handler
        ev, ctx = pe.running
        reg = self._reg(caller, ev)
        if resume is not None and not self._valid_addr(resume):
            return self._ret(INVALID_PARAMETERS)
        pe.running = None
        if reg is not None:
            reg.running = None
            if reg.unregister_pending:
                self._drop(caller, ev)
        if resume is None:
            return Outcome(None, ("complete", ctx))
        client_el = reg.client_el if reg is not None else (pstate >> 2) & 3
        return Outcome(None, ("complete_and_resume", ctx, resume, client_el))

    # ---- delivery -----------------------------------------------------------------------------------
    def deliverable(self, caller: int) -> int | None:
        """The event to deliver to PE ``caller`` now, or None (masked, a handler runs, nothing pending)."""
        pe = self.pes[caller]
        if pe.masked or pe.running is not None:
            return None
        for ev in sorted(pe.private):
            r = pe.private[ev]
            if r.pending and r.enabled and not r.unregister_pending:
                return ev
        for ev in sorted(self.shared):
            r = self.shared[ev]
            if (r.pending and r.enabled and r.running is None and not r.unregister_pending
                    and (r.routing == RM_ANY or r.affinity == pe.mpidr)):
                return ev
        return None

    def enter(self, caller: int, ev: int, ctx: Context) -> Entry:
        """Deliver ``ev`` on PE ``caller`` interrupting ``ctx``: the handler's entry state."""
        pe = self.pes[caller]
        reg = self._reg(caller, ev)
        reg.pending = False
        reg.running = caller
        pe.running = (ev, ctx)
        pstate = PSTATE_DAIF | (PSTATE_EL2H if reg.client_el == 2 else PSTATE_EL1H)
        return Entry(ev, reg.entry, pstate, [ev, reg.arg, ctx.pc, ctx.pstate])
