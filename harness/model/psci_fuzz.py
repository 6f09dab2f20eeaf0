"""Generated multi-vCPU PSCI programs for firmware/psci_fuzz.S, and how two runs of one are compared.

A :class:`Program` is the MPIDRs the VMM gives its 2-4 vCPUs (``set_regs`` ``mpidr_el1`` before the first run) and
a list of :class:`Step` s in one global order: each step is one PSCI call (or an AFFINITY_INFO poll) made by one
vCPU over one conduit; consecutive steps marked ``joined`` form a race group that their owners run at the same
time.  :func:`encode` lays it out in the parameter block (and refuses, before anything is sent, a program that
does not fit); :func:`guest_view` reduces a run to what the guest observed; :func:`compare` lists what differs
between the in-kernel and the forwarded run after the normalisations of :data:`ALLOWED_DIFFERENCES`, the one
table of differences the differential accepts.  tests/system/test_psci_fuzz.py generates the programs
(hypothesis) and runs them; docs/psci-fuzz.md explains the whole.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .. import protocol as P
from ..errors import PayloadError

# ---- the layouts of firmware/psci_fuzz.S (its header comment) -------------------------------------------------
MAX_CPUS = 4
MAX_STEPS = 112
MAX_ARRIVALS = 15
PADS = 4                        # fuzz_entry0..3
BOOT_PAD = 0xB0
P_MAGIC = 0x315A554649435350    # "PSCIFUZ1"
R_MAGIC = 0x315345525A5A5546    # "FUZZRES1"
HEADER_WORDS = 8
STEP_WORDS = 8
R_RECS = 0x40
REC_SIZE = 0x40
R_ARR = 0x2000
ARR_STRIDE = 0x400
ARR_SIZE = 0x40
OP_HVC, OP_SMC, OP_POLL_HVC, OP_POLL_SMC = range(4)
F_JOINED, F_ADVANCE, F_ARM_TIMER = 1, 2, 4
STATUS_NOT_RUN, STATUS_RETURNED, STATUS_ISSUED = 0, 1, 2
DONE_OK, DONE_UNEXPECTED, DONE_BAD_PARAMS, DONE_NO_CPU = 0, 0xE1, 0xE2, 0xE3
FATAL_SLOTS = {"vector": 504, "esr": 505, "elr": 506, "far": 507, "spsr": 508}   # firmware/common.inc
TIMER_TICKS = 0                 # CNTV_TVAL for F_ARM_TIMER; 0: the payload arms ~1 ms (CNTFRQ_EL0 / 1024), see psci_fuzz.S
IDLE_WFIT = 1 << 32             # header word 3: waiting vCPUs sleep in WFIT when the vCPU has FEAT_WFxT
VEL2_GIC = 1 << 33              # header word 3: at vEL2, enable the vGIC's PPIs (CPU_SUSPEND's timer wakes KVM's WFI)
MPIDR_HWID_MASK = 0xFF_00FF_FFFF
U64 = P.U64_MASK
PARAM_WORDS_MAX = (P.RESULT_BASE - P.PARAM_BASE) // 8
_CAPACITY_HINT = (f"firmware/psci_fuzz.S takes at most {MAX_STEPS} steps, {MAX_CPUS} vCPUs and {MAX_ARRIVALS} arrivals "
                  "per vCPU (its result block is fixed); split the program, or raise MAX_STEPS in psci_fuzz.S and "
                  "harness/model/psci_fuzz.py together")


@dataclass(frozen=True)
class Step:
    """One PSCI call by vCPU ``vcpu``: x0..x3 = ``x`` over ``conduit``.

    ``until``: repeat the call until x0 == until (at most ``max_calls`` calls): an AFFINITY_INFO poll.
    ``joined``: starts together with the step before it (a race group).  ``advance``: the global order moves on
    before the call (CPU_OFF, which does not return).  ``arm_timer``: arm the EL1 virtual timer before the call
    so that KVM's CPU_SUSPEND (a WFI) wakes up.
    """
    vcpu: int
    conduit: str
    x: tuple[int, int, int, int]
    until: int | None = None
    max_calls: int = 1
    joined: bool = False
    advance: bool = False
    arm_timer: bool = False
    label: str = ""

    @property
    def op(self) -> int:
        base = OP_SMC if self.conduit == "smc" else OP_HVC
        return base + (2 if self.until is not None else 0)

    @property
    def flags(self) -> int:
        return (F_JOINED if self.joined else 0) | (F_ADVANCE if self.advance else 0) | \
            (F_ARM_TIMER if self.arm_timer else 0)


@dataclass(frozen=True)
class Program:
    """MPIDR_EL1 per vCPU (set by the VMM before the first run) and the steps in their global order."""
    mpidrs: tuple[int, ...]
    steps: tuple[Step, ...]
    el2: bool = False
    psci_minor: int | None = None   # PSCI 1.<minor> set by the VMM (KVM_REG_ARM_PSCI_VERSION); None: KVM's default
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def vcpus(self) -> int:
        return len(self.mpidrs)

    def set_regs(self) -> list[dict]:
        """The scenario's ``set_regs``: every vCPU's MPIDR_EL1, written before the first KVM_RUN."""
        regs = [{"reg": "mpidr_el1", "value": m & U64, "vcpu": k} for k, m in enumerate(self.mpidrs)]
        if self.psci_minor is not None:     # a VM-wide firmware register, written through vCPU 0
            regs.append({"reg": "psci_version", "value": (1 << 16) | self.psci_minor, "vcpu": 0})
        return regs

    def race_groups(self) -> list[list[int]]:
        """Indices of the steps of each race group (two or more steps run at the same time)."""
        groups, cur = [], []
        for i, s in enumerate(self.steps):
            if s.joined and cur:
                cur.append(i)
            else:
                if len(cur) > 1:
                    groups.append(cur)
                cur = [i]
        if len(cur) > 1:
            groups.append(cur)
        return groups

    def to_python(self, pads: list[int] | None = None) -> str:
        """The program as Python source for tests/system/test_psci_fuzz.py ``REGRESSIONS`` (entry pads by number:
        ``pad(k)`` is the address of fuzz_entry<k>)."""
        def val(v: int) -> str:
            if pads:
                lo, hi = v & 0xFFFF_FFFF, v >> 32
                for k, a in enumerate(pads):
                    if 0 <= lo - a < 16:
                        off = lo - a
                        e = f"pad({k})" + (f" + {off}" if off else "")
                        return f"({hi:#x} << 32) | {e}" if hi else e
            return f"{v:#x}"
        minor = f", psci_minor={self.psci_minor}" if self.psci_minor is not None else ""
        lines = [(f"lambda pad: Program(mpidrs=({', '.join(f'{m:#x}' for m in self.mpidrs)},), el2={self.el2}{minor}, "
                 "steps=(")]
        for s in self.steps:
            extra = "".join([f", until={s.until:#x}, max_calls={s.max_calls:#x}" if s.until is not None else "",
                             ", joined=True" if s.joined else "", ", advance=True" if s.advance else "",
                             ", arm_timer=True" if s.arm_timer else ""])
            lines.append(f"    Step({s.vcpu}, {s.conduit!r}, ({', '.join(val(v) for v in s.x)}){extra}, "
                         f"label={s.label!r}),")
        lines.append("))")
        return "\n".join(lines)


def encode(program: Program, ticks: int = TIMER_TICKS, idle_wfit: bool = True) -> list[int]:
    """The parameter block (u64 words) for firmware/psci_fuzz.S; :class:`PayloadError` (never sent) if it does
    not fit or names a vCPU the program does not have."""
    n, steps = program.vcpus, program.steps
    if not 1 <= n <= MAX_CPUS:
        raise PayloadError(f"PSCI fuzz program: {n} vCPUs, psci_fuzz.S takes 1..{MAX_CPUS}", hint=_CAPACITY_HINT)
    if len(steps) > MAX_STEPS:
        raise PayloadError(f"PSCI fuzz program: {len(steps)} steps do not fit the parameter block "
                           f"(psci_fuzz.S takes {MAX_STEPS})", hint=_CAPACITY_HINT)
    hw = [m & MPIDR_HWID_MASK for m in program.mpidrs]
    if len(set(hw)) != n:
        raise PayloadError(f"PSCI fuzz program: two vCPUs share an affinity (MPIDR & {MPIDR_HWID_MASK:#x}): "
                           f"{[f'{m:#x}' for m in program.mpidrs]}",
                           hint="each vCPU finds its index by its MPIDR: give every vCPU a different affinity")
    words = [P_MAGIC, n, len(steps), (ticks & 0xFFFF_FFFF) | (IDLE_WFIT if idle_wfit else 0)
             | (VEL2_GIC if program.el2 else 0)]
    words += [m & U64 for m in program.mpidrs] + [0] * (MAX_CPUS - n)
    for i, s in enumerate(steps):
        if not 0 <= s.vcpu < n:
            raise PayloadError(f"PSCI fuzz program: step {i} belongs to vCPU {s.vcpu}, the program has {n}",
                               hint="a step's vcpu is an index into mpidrs")
        if s.conduit not in ("hvc", "smc") or len(s.x) != 4:
            raise PayloadError(f"PSCI fuzz program: step {i}: conduit {s.conduit!r}, {len(s.x)} registers",
                               hint="conduit 'hvc' or 'smc', x = (x0, x1, x2, x3)")
        if s.joined and i == 0:
            raise PayloadError("PSCI fuzz program: step 0 cannot join a race group", hint="joined=False on step 0")
        words += [s.vcpu, s.op | (s.flags << 8), *(v & U64 for v in s.x),
                  (s.until or 0) & U64, s.max_calls & U64]
    assert len(words) <= PARAM_WORDS_MAX
    return words


def _q(block: bytes, off: int, n: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{n}Q", block, off)


def decode(block: bytes, program: Program) -> dict:
    """The result block: header, one record per step, each vCPU's arrivals."""
    block = block + bytes(max(0, R_ARR + MAX_CPUS * ARR_STRIDE - len(block)))
    magic, cursor, boot_el = _q(block, 0, 3)
    records = []
    for i in range(len(program.steps)):
        x0, x1, x2, x3, status, calls, by, _ = _q(block, R_RECS + i * REC_SIZE, 8)
        records.append({"x": (x0, x1, x2, x3), "status": status, "calls": calls, "by": by})
    arrivals = {}
    for k in range(program.vcpus):
        base = R_ARR + k * ARR_STRIDE
        count = _q(block, base, 1)[0]
        recs = []
        for a in range(min(count, MAX_ARRIVALS)):
            x0, x1, x2, x3, pad, pstate, mpidr, sctlr = _q(block, base + 0x40 + a * ARR_SIZE, 8)
            recs.append({"pad": pad, "x": (x0, x1, x2, x3), "pstate": pstate, "el": (pstate >> 2) & 3,
                         "mpidr": mpidr, "sctlr": sctlr})
        arrivals[k] = {"count": count, "records": recs}
    return {"magic_ok": magic == R_MAGIC, "cursor": cursor, "boot_el": (boot_el >> 2) & 3, "records": records,
            "arrivals": arrivals}


def payload_faults(result) -> list[dict]:
    """vCPUs whose payload ended with an error code (an unexpected exception, bad parameters, an unknown MPIDR):
    a payload problem, never a PSCI mismatch.  Each: vcpu, code, and for 0xE1 the exception's vector, ESR (EC,
    ISS), ELR, FAR, SPSR from the fatal vectors' report slots."""
    out = []
    for e in result.events:
        if e["kind"] == "done" and e.get("code", 0) != DONE_OK:
            d = {"vcpu": e.get("vcpu"), "code": e["code"]}
            if e["code"] == DONE_UNEXPECTED:
                rep = result.reports_of(e.get("vcpu"))
                d.update({k: rep.get(slot) for k, slot in FATAL_SLOTS.items()})
                if d.get("esr") is not None:
                    d["ec"] = (d["esr"] >> 26) & 0x3F
                    d["iss"] = d["esr"] & 0x1FF_FFFF
            out.append(d)
    return out


def describe_fault(f: dict, symbol=lambda a: f"{a:#x}") -> str:
    why = {DONE_UNEXPECTED: "unexpected exception", DONE_BAD_PARAMS: "bad parameter block",
           DONE_NO_CPU: "MPIDR_EL1 not in the parameter block's table"}.get(f["code"], "error")
    s = f"vcpu{f['vcpu']}: DONE {f['code']:#x} ({why})"
    if f.get("esr") is not None:
        s += (f": vector +{f['vector']:#x} ESR={f['esr']:#x} (EC {f['ec']:#x}, ISS {f['iss']:#x}) "
              f"ELR={symbol(f['elr'])} FAR={f['far']:#x} SPSR={f['spsr']:#x}")
    return s


# ---- the one table of accepted differences ---------------------------------------------------------------------
@dataclass(frozen=True)
class AllowedDifference:
    key: str
    what: str          # which part of the guest's view
    rule: str          # how the comparison treats it
    why: str           # the reason (spec section or KVM source, file:line in the 7.3 tree)


ALLOWED_DIFFERENCES: tuple[AllowedDifference, ...] = (
    AllowedDifference(
        "race-winner", "x0..x3 of the steps of one race group (two or more vCPUs calling CPU_ON on one target at "
        "the same time)",
        "compared as a multiset: which racer gets SUCCESS and which ALREADY_ON is timing, not behaviour",
        "DEN0022 §5.6 (CPU_ON): concurrent CPU_ON calls for one core are resolved by the implementation in any "
        "order; KVM serialises them on the target's mp_state_lock (arch/arm64/kvm/psci.c:65-101), the emulator on "
        "the VMM's psci_lock (harness/guest/runner.py): the winner is whoever gets the lock first"),
    AllowedDifference(
        "poll-count", "how many calls an AFFINITY_INFO poll made before it saw OFF",
        "not compared; only the final x0..x3 of the poll are",
        "timing: a CPU_OFF takes effect when the vCPU's own thread runs the call (psci.c:236-238 "
        "kvm_arm_vcpu_power_off; runner _apply), not when the poller looks"),
    AllowedDifference(
        "suspend-latency", "when CPU_SUSPEND returns",
        "not compared (its x0..x3 are); the payload arms its virtual timer ~1 ms ahead before the call (at vEL2 "
        "with the vGIC's PPIs enabled)",
        "DEN0022 §5.4 (CPU_SUSPEND): a standby state may return on any wake-up event; KVM treats every power state "
        "as standby and waits in kvm_vcpu_wfi() for one (psci.c:24-42), the emulator returns at once "
        "(harness/guest/psci.py), both with SUCCESS"),
    AllowedDifference(
        "unlanded-secondary", "a secondary sent by CPU_ON to an entry point that is not a fuzz_entry pad "
        "(unaligned, outside RAM, high bits set)",
        "only 'did not arrive' is compared (both runs: no arrival record); its later state is not",
        "DEN0022 §5.6 leaves INVALID_ADDRESS to an implementation that knows the address is bad; KVM checks nothing "
        "(psci.c:77, kvm_reset_vcpu_psci in arch/arm64/include/asm/kvm_emulate.h:763-794) and the emulator follows: "
        "both return SUCCESS and the vCPU faults on its first fetch, in a loop of aborts to VBAR 0 outside RAM "
        "whose PC at the end of the run is timing"),
)


def _norm_step(rec: dict) -> dict:
    return {"status": rec["status"], "x": tuple(rec["x"])}


def guest_view(result, program: Program) -> dict:
    """What the guest observed in one run, normalised by :data:`ALLOWED_DIFFERENCES`; identical for in-kernel and
    forwarded PSCI when both are right."""
    d = decode(result.result_block, program)
    steps = [_norm_step(r) for r in d["records"]]
    for g in program.race_groups():     # race-winner
        ordered = sorted((steps[i]["status"], steps[i]["x"]) for i in g)
        for i, (status, x) in zip(g, ordered, strict=True):
            steps[i] = {"status": status, "x": x, "race": True}
    arrivals = {k: [{kk: r[kk] for kk in ("pad", "x", "pstate", "mpidr", "sctlr")} for r in a["records"]]
                for k, a in d["arrivals"].items()}
    counts = {k: a["count"] for k, a in d["arrivals"].items()}
    events = [(e.get("vcpu"), e["name"], tuple(e["data"][:1])) for e in result.events if e["kind"] == "system_event"]
    return {"outcome": result.outcome, "exit_code": result.exit_code, "magic_ok": d["magic_ok"],
            "steps": steps, "arrival_counts": counts, "arrivals": arrivals, "system_events": events}


def compare(kv: dict, uv: dict) -> list[str]:
    """The differences between two guest views, one line each ('' when none)."""
    out = []
    for k in ("outcome", "exit_code", "magic_ok", "system_events", "arrival_counts"):
        if kv[k] != uv[k]:
            out.append(f"{k}: in-kernel {kv[k]!r}, userspace {uv[k]!r}")
    for i, (a, b) in enumerate(zip(kv["steps"], uv["steps"], strict=True)):
        if a != b:
            out.append(f"step {i}: in-kernel {_fmt_rec(a)}, userspace {_fmt_rec(b)}")
    for k in sorted(set(kv["arrivals"]) | set(uv["arrivals"])):
        a, b = kv["arrivals"].get(k, []), uv["arrivals"].get(k, [])
        for j in range(max(len(a), len(b))):
            ra = a[j] if j < len(a) else None
            rb = b[j] if j < len(b) else None
            if ra != rb:
                out.append(f"vcpu{k} arrival {j}: in-kernel {_fmt_arr(ra)}, userspace {_fmt_arr(rb)}")
    return out


def _fmt_rec(r: dict) -> str:
    status = {STATUS_NOT_RUN: "not run", STATUS_RETURNED: "returned", STATUS_ISSUED: "issued, no return"}
    return f"[{status.get(r['status'], r['status'])}] " + " ".join(f"{v:#x}" for v in r["x"])


def _fmt_arr(r: dict | None) -> str:
    if r is None:
        return "(none)"
    pad = "_start" if r["pad"] == BOOT_PAD else f"fuzz_entry{r['pad']}"
    return (f"pad={pad} x0..x3={' '.join(f'{v:#x}' for v in r['x'])} pstate={r['pstate']:#x} "
            f"mpidr={r['mpidr']:#x} sctlr={r['sctlr']:#x}")


def side_by_side(program: Program, kv: dict, uv: dict) -> str:
    """Every step and arrival of both runs, one line each, differences marked '!!'."""
    lines = [f"{'':4}{'step':<44} {'in-kernel':<44} userspace"]
    for i, s in enumerate(program.steps):
        a, b = kv["steps"][i], uv["steps"][i]
        mark = "!!" if a != b else "  "
        what = f"#{i} cpu{s.vcpu} {s.conduit} {s.label or hex(s.x[0])}" + (" [race]" if s.joined else "")
        lines.append(f"{mark}  {what:<44} {_fmt_rec(a):<44} {_fmt_rec(b)}")
    for k in sorted(set(kv["arrivals"]) | set(uv["arrivals"])):
        a, b = kv["arrivals"].get(k, []), uv["arrivals"].get(k, [])
        for j in range(max(len(a), len(b))):
            ra = a[j] if j < len(a) else None
            rb = b[j] if j < len(b) else None
            mark = "!!" if ra != rb else "  "
            lines.append(f"{mark}  cpu{k} arrival {j}: in-kernel {_fmt_arr(ra)}")
            lines.append(f"{mark}  {'':>16} userspace {_fmt_arr(rb)}")
    for key in ("outcome", "exit_code", "system_events"):
        mark = "!!" if kv[key] != uv[key] else "  "
        lines.append(f"{mark}  {key}: in-kernel {kv[key]!r} / userspace {uv[key]!r}")
    return "\n".join(lines)
