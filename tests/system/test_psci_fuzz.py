"""Differential fuzzing: KVM's in-kernel PSCI against the userspace emulator, on generated multi-vCPU programs.

Hypothesis generates short programs (harness/model/psci_fuzz.py ``Program``) for 2-4 vCPUs whose MPIDRs the VMM
sets (non-zero Aff1..Aff3, reserved bits), calling every PSCI function id 0x00..0x1F in both conventions over HVC
and SMC with arguments from the whole space: targets that exist or not, affinity levels 0..past 3, aligned and
unaligned entry points, 64-bit context ids, power states, reset types, CPU_OFF / CPU_ON again, racing CPU_ONs.
firmware/psci_fuzz.S interprets them from the parameter block.  Each batch of up to 4 programs (one topology) runs
twice in the same guest: PSCI in the kernel (no filter) and forwarded to harness/guest/psci.py (PSCI ranges
FWD_TO_USER).  Every return value
and every secondary's arrival (x0..x3, entry pad, PSTATE, MPIDR, SCTLR) must match, up to the one table of
accepted differences (harness/model/psci_fuzz.py ``ALLOWED_DIFFERENCES``).  A mismatch is shrunk by hypothesis
and reported as a minimal program (Python, for ``REGRESSIONS`` below) with both runs side by side.  docs/psci-fuzz.md.

Budget: ``--psci-fuzz-examples N`` (default 100 at EL1, 30 at vEL2) and ``--psci-fuzz-seed S`` (default fixed;
``random`` for a fresh one, printed either way).
"""

from __future__ import annotations

import copy
import math
import time

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from harness.guest import psci
from harness.images.payloads import get_payload
from harness.model import psci_fuzz as pf
from harness.model.psci_fuzz import Program, Step
from harness.model.scenarios import PSCI_FWD, scenario

pytestmark = [pytest.mark.psci, pytest.mark.fuzz]  # fuzz: out of `smccc-harness run` (harness/cli.py RUN_MARKERS)

DEFAULT_EXAMPLES = {"el1": 100, "el2": 30}
DEFAULT_SEED = 0x5C1_F022
MAX_GEN_STEPS = 14                 # generated constructs per program (a construct is 1-4 steps)
POLL_FOREVER = 1 << 40             # polls are bounded by the scenario's deadline, not a count
DEADLINE_S = 20.0
U64 = pf.U64
HW = pf.MPIDR_HWID_MASK
AFF = [0, 0, 1, 2, 3, 0x7F, 0x80, 0xFE, 0xFF]
EDGE64 = [0, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32, 0x8000_0000_0000_0000, U64, 0x0123_4567_89AB_CDEF]
JUNK_HI = [0, 0, 0, 1, 0xFFFF_FFFF, 0x8000_0000, 0xDEAD]


# ---- the programs ------------------------------------------------------------------------------------------------
def u64s():
    return st.one_of(st.sampled_from(EDGE64), st.integers(0, U64))


def u32_with_hi(values):
    """A 32-bit parameter (reset or off type), often with junk in the upper half of its 64-bit register."""
    return st.builds(lambda lo, hi: (hi << 32) | lo, st.one_of(st.sampled_from(values), st.integers(0, 0xFFFF_FFFF)),
                     st.sampled_from(JUNK_HI[2:]))


@st.composite
def topology(draw, n):
    """n MPIDRs with distinct affinities, often sharing the upper levels (clusters) with vCPU 0."""
    def one(base):
        fields = [draw(st.sampled_from([base[i]] * 2 + AFF)) for i in range(4)]
        return fields[0] | fields[1] << 8 | fields[2] << 16 | fields[3] << 32
    base = [draw(st.sampled_from(AFF)) for _ in range(4)]
    hws: list[int] = []
    for _ in range(n):
        hw = one(base)
        while hw in hws:                            # distinct: bump Aff0 (shrinks fine, never loops forever)
            hw = (hw & ~0xFF) | (((hw & 0xFF) + 1) & 0xFF)
        hws.append(hw)
    # bits outside the affinity fields that a VMM may set: RES1 bit 31 (KVM's default), U (30), MT (24)
    return tuple(hw | draw(st.sampled_from([1 << 31, 1 << 31, 0, (1 << 31) | (1 << 30), (1 << 31) | (1 << 24)]))
                 for hw in hws)


@st.composite
def target(draw, mpidrs):
    """An MPIDR argument: an existing vCPU, one with bits outside the affinity fields, a neighbour, anything."""
    m = draw(st.sampled_from(mpidrs)) & HW
    kind = draw(st.sampled_from(["exists"] * 5 + ["extra", "neighbour", "random_aff", "random"]))
    if kind == "exists":
        return m
    if kind == "extra":
        return m | draw(st.sampled_from([1 << 24, 1 << 30, 1 << 31, 1 << 40, 1 << 63]))
    if kind == "neighbour":
        lvl = draw(st.sampled_from([0, 8, 16, 32]))
        return (m & ~(0xFF << lvl)) | (draw(st.sampled_from(AFF)) << lvl)
    if kind == "random_aff":
        return draw(st.integers(0, U64)) & HW
    return draw(u64s())


def levels():
    return st.one_of(st.sampled_from([0, 0, 1, 1, 2, 3, 4, 5, 0xFF, 1 << 32, 1 << 63]), st.integers(0, U64))


@st.composite
def entry(draw, pads):
    """A CPU_ON entry point: mostly an entry pad; unaligned, outside RAM or with high bits now and then."""
    pad = draw(st.sampled_from(pads))
    kind = draw(st.sampled_from(["pad"] * 24 + ["hi", "hi", "unaligned", "outside"]))
    if kind == "pad":
        return pad
    if kind == "hi":      # SMC32 narrows it back to the pad; SMC64 keeps it (an entry outside RAM)
        return (draw(st.sampled_from(JUNK_HI[3:])) << 32) | pad
    if kind == "unaligned":
        return pad + draw(st.integers(1, 3))
    return draw(st.sampled_from([0, 0x1000, 0x4020_0000, 0xFFFF_FFFF_FFFF_FFFC]))


def fid_of(base: int, n: int, hi: int = 0) -> int:
    return (hi << 32) | base | n


class Gen:
    """Builds a program step by step against a PSCI model, so that every step is given to a vCPU that is running
    the interpreter at that point of the global order (a vCPU that is off, or was sent to a bad entry point, never
    gets one: that would hang both runs).  The model is harness/guest/psci.py itself: a program it mispredicts
    hangs or ends early on the kernel's side, and that difference is reported like any other."""

    def __init__(self, draw, mpidrs, pads, minor, el2):
        self.draw, self.mpidrs, self.pads, self.el2 = draw, mpidrs, pads, el2
        self.sim = psci.Psci([psci.CpuState(m, k == 0) for k, m in enumerate(mpidrs)], minor=minor)
        self.running, self.stuck = {0}, set()
        self.steps: list[Step] = []
        self.ended = False
        self.allow_end = False

    def conduit(self):
        return "smc" if self.el2 else self.draw(st.sampled_from(["hvc", "smc"]))

    def apply(self, step: Step) -> None:
        out = self.sim.call(step.vcpu, step.x[0] & 0xFFFF_FFFF, list(step.x[1:]))
        eff = out.effect
        if eff and eff[0] == "cpu_on":
            _, idx, ent, _ctx = eff
            (self.running if ent in self.pads else self.stuck).add(idx)
        elif eff and eff[0] == "cpu_off":
            self.running.discard(step.vcpu)
        elif eff and eff[0] == "system_event":
            self.ended = True

    def add(self, step: Step) -> None:
        probe = copy.deepcopy(self.sim)
        eff = probe.call(step.vcpu, step.x[0] & 0xFFFF_FFFF, list(step.x[1:])).effect
        if eff and eff[0] == "system_event":
            if not self.allow_end:      # only the batch's last program may end the VM: ask about the call instead
                fid = step.x[0] & 0xFFFF_FFFF
                step = Step(step.vcpu, step.conduit, (psci.PSCI_FEATURES, fid, 0, 0),
                            label=f"PSCI_FEATURES({psci.name(fid)})")
            else:
                self.sync(exclude=(step.vcpu,))
        self.steps.append(step)
        self.apply(step)

    def sync(self, exclude=()):
        """Every running secondary makes a call of its own (PSCI_VERSION): it has arrived and recorded its arrival
        before what follows.  Without this a secondary started by the last CPU_ON may or may not have arrived when
        the run ends: timing, not behaviour."""
        for k in sorted(self.running - {0} - set(exclude)):
            self.steps.append(Step(k, self.conduit(), (psci.PSCI_VERSION, 0, 0, 0), label=f"PSCI_VERSION (cpu{k} sync)"))

    def owner(self, exclude=()):
        return self.draw(st.sampled_from(sorted(self.running - set(exclude))))

    # -- constructs --------------------------------------------------------------------------------------------
    def call(self):
        d = self.draw
        me = self.owner()
        wide = d(st.booleans())
        base = 0xC400_0000 if wide else 0x8400_0000
        # CPU_OFF (0x84000002) only through off(); 0xC4000002 is no function (NOT_SUPPORTED) and stays in
        nums = [n for n in range(0x20) if not (n == 2 and not wide)]
        weighted = [0, 3, 3, 3, 4, 4, 4, 0xA, 0xA, 6, 1, 0x12, 0x12, 0x12, 0x15, 0x15, 0x15, 0xE] + nums
        n = d(st.sampled_from(weighted))
        fid = fid_of(base, n, d(st.sampled_from(JUNK_HI)))
        if n == 3:      # CPU_ON
            x = (fid, d(target(self.mpidrs)), d(entry(self.pads)), d(u64s()))
        elif n == 4:    # AFFINITY_INFO
            x = (fid, d(target(self.mpidrs)), d(levels()), d(u64s()))
        elif n == 0xA:  # PSCI_FEATURES
            q = d(st.one_of(st.sampled_from([0x8400_0000 | k for k in range(0x20)] + [0xC400_0000 | k for k in range(
                0x20)] + [0x8000_0000, 0x8000_0001, 0x8000_7FFF, 0xC200_0000, 0x8600_0000]), st.integers(0, U64)))
            x = (fid, (d(st.sampled_from(JUNK_HI)) << 32) | (q & 0xFFFF_FFFF) if q < 1 << 32 else q, d(u64s()), 0)
        elif n == 1:    # CPU_SUSPEND: power_state, entry, context id; the armed timer wakes KVM's WFI
            x = (fid, d(st.one_of(st.sampled_from([0, 1, 0x1_0000, 0x4000_0000, 0x0101_0000]), u64s())),
                 d(entry(self.pads)), d(u64s()))
            step = Step(me, self.conduit(), x, arm_timer=True, label=f"{psci.name(fid & 0xFFFF_FFFF)}")
            return self.add(step)
        elif n == 0x12:  # SYSTEM_RESET2: reset type, cookie
            x = (fid, d(u32_with_hi([0, 1, 2, 0x7FFF_FFFF, 0x8000_0000, 0x8000_0001, 0xFFFF_FFFF])), d(u64s()), 0)
        elif n == 0x15:  # SYSTEM_OFF2: type, cookie
            x = (fid, d(u32_with_hi([0, 1, 2, 0xFFFF_FFFF])), d(st.sampled_from([0, 0, 1, U64, 1 << 32])), 0)
        else:
            x = (fid, d(u64s()), d(u64s()), d(u64s()))
        self.add(Step(me, self.conduit(), x, label=psci.name(fid & 0xFFFF_FFFF)))

    def cpu_on(self):
        d = self.draw
        me = self.owner()
        wide = d(st.booleans())
        tgt = d(st.sampled_from(range(len(self.mpidrs))))
        fid = 0xC400_0003 if wide else 0x8400_0003
        ctx = d(u64s())
        ent = d(entry(self.pads)) if d(st.integers(0, 4)) == 0 else d(st.sampled_from(self.pads))
        self.add(Step(me, self.conduit(), (fid, self.mpidrs[tgt] & HW, ent, ctx),
                      label=f"{psci.name(fid)}(cpu{tgt})"))

    def off(self, me: int | None = None):
        """A running secondary calls CPU_OFF; another running vCPU polls AFFINITY_INFO until it reads OFF."""
        d = self.draw
        cands = sorted(self.running - {0})
        if not cands:
            return self.cpu_on()
        if me is None:
            me = d(st.sampled_from(cands))
        junk = (d(u64s()), d(u64s()), d(u64s())) if d(st.integers(0, 3)) == 0 else (0, 0, 0)
        self.add(Step(me, self.conduit(), (fid_of(0x8400_0000, 2, d(st.sampled_from(JUNK_HI))), *junk),
                      advance=True, label="CPU_OFF"))
        w = self.owner()
        self.add(Step(w, self.conduit(), (psci.AFFINITY_INFO64, self.mpidrs[me] & HW, 0, 0),
                      until=psci.AFFINITY_OFF, max_calls=POLL_FOREVER, label=f"poll AFFINITY_INFO64(cpu{me})==OFF"))

    def race(self):
        """Two or three running vCPUs call CPU_ON for one target at the same time (same entry and context id)."""
        d = self.draw
        tgt = d(st.sampled_from(range(len(self.mpidrs))))
        if len(self.running - {tgt}) < 2:
            return self.cpu_on()
        racers = d(st.lists(st.sampled_from(sorted(self.running - {tgt})), min_size=2, max_size=3, unique=True))
        ent, ctx = d(st.sampled_from(self.pads)), d(st.integers(0, 0xFFFF_FFFF))
        for i, r in enumerate(racers):
            fid = d(st.sampled_from([0x8400_0003, 0xC400_0003]))
            self.add(Step(r, self.conduit(), (fid, self.mpidrs[tgt] & HW, ent, ctx), joined=i > 0,
                          label=f"race {psci.name(fid)}(cpu{tgt})"))

    def system(self):
        """A call that ends the VM (the program's last step)."""
        d = self.draw
        me = self.owner()
        choices = [(psci.SYSTEM_OFF, 0), (psci.SYSTEM_RESET, 0)]
        if self.sim.minor >= 1:
            choices += [(psci.SYSTEM_RESET2, d(st.sampled_from([0, 0x8000_0000, 0xFFFF_FFFF]))),
                        (psci.SYSTEM_RESET2_64, d(st.sampled_from([0, 0x8000_0001])))]
        if self.sim.minor >= 3:
            choices += [(psci.SYSTEM_OFF2, d(st.sampled_from([0, 1]))), (psci.SYSTEM_OFF2_64, 1)]
        fid, a1 = d(st.sampled_from(choices))
        self.add(Step(me, self.conduit(), (fid, a1, 0, 0), label=f"{psci.name(fid)}({a1:#x})"))

    def epilogue(self):
        """Every running secondary syncs, then vCPU 0 reads every vCPU's power state (unless the VM already ended)."""
        self.sync()
        for k, m in enumerate(self.mpidrs):
            self.add(Step(0, self.conduit(), (psci.AFFINITY_INFO64, m & HW, 0, 0), label=f"AFFINITY_INFO64(cpu{k})"))


    def reset(self):
        """Between two programs of a batch: every running secondary calls CPU_OFF (a secondary sent to a bad entry
        point cannot, and stays ON into the next program)."""
        for k in sorted(self.running - {0}):
            self.off(k)


STEP_BUDGET = pf.MAX_STEPS - 24    # a construct adds <= 4 steps; reset + sync + epilogue <= 3*2 + 3 + 4
PER_BATCH = 4       # programs per scenario pair: the ~0.2-0.5 s a scenario costs under TCG is paid once for four


@st.composite
def batches(draw, pads, minor, el2=False):
    """PER_BATCH programs (fewer when shrinking) on one vCPU topology, run in one scenario pair: each program is
    up to MAX_GEN_STEPS constructs, then every secondary is turned off again (the last program ends with an
    epilogue that reads every vCPU's power state instead); only the last program may end the VM with a SYSTEM_*
    call."""
    n = draw(st.integers(2, pf.MAX_CPUS))
    # the PSCI version the VMM selects (KVM_REG_ARM_PSCI_VERSION): KVM's default (None) or any 1.x up to it
    chosen = draw(st.sampled_from([None, None, *range(minor + 1)]))
    g = Gen(draw, draw(topology(n)), pads, minor if chosen is None else chosen, el2)
    count = draw(st.integers(0, 255).map(lambda v: min(v + 1, PER_BATCH)))
    kinds = ["call"] * 6 + ["cpu_on"] * 3 + ["off"] * 2 + ["race"]
    starts = []
    for p in range(count):
        starts.append(len(g.steps))
        g.allow_end = p == count - 1
        for _ in range(draw(st.integers(1, MAX_GEN_STEPS))):
            if len(g.steps) > STEP_BUDGET:      # what is left is for the resets, syncs and the epilogue
                break
            getattr(g, draw(st.sampled_from(kinds)))()
            if g.ended:
                break
        if not g.ended and g.allow_end and draw(st.integers(0, 9)) == 9:     # shrinks towards no SYSTEM_* call
            g.system()
        if g.ended:
            break
        if p < count - 1:
            g.reset()
        else:
            g.epilogue()
    return Program(mpidrs=g.mpidrs, steps=tuple(g.steps), el2=el2, psci_minor=chosen, meta={"starts": starts})


# ---- running and comparing ---------------------------------------------------------------------------------------
class PayloadProblem(AssertionError):
    """The payload faulted (or refused its parameters): not a PSCI mismatch."""


class Mismatch(AssertionError):
    """In-kernel and userspace PSCI disagree beyond ALLOWED_DIFFERENCES."""


class SetupFailed(AssertionError):
    """The VMM could not build the scenario's VM (e.g. EMFILE): neither a mismatch nor a payload problem."""


def run_both(guest, payload, program: Program, name: str = "psci_fuzz", plant_minor=None):
    """Run ``program`` with PSCI in the kernel, then forwarded; (kernel result, user result).

    ``plant_minor(minor) -> minor``: tell the emulator another PSCI minor than the VM's (a planted difference,
    for the test that the fuzzer finds and shrinks one)."""
    minor = guest.caps["psci_version_raw"] & 0xFFFF if program.psci_minor is None else program.psci_minor
    params = pf.encode(program)
    out = []
    for mode, filters in (("kernel", []), ("user", list(PSCI_FWD))):
        em = plant_minor(minor) if plant_minor and mode == "user" else minor
        out.append(guest.run(scenario(f"{name}_{mode}", payload, filters=filters, vcpus=program.vcpus,
                                      params=params, psci_minor=em, set_regs=program.set_regs(), el2=program.el2,
                                      deadline_s=DEADLINE_S), payload=payload))
    return out[0], out[1]


def check_program(guest, payload, program: Program, name: str = "psci_fuzz", plant_minor=None) -> tuple[dict, dict]:
    """Run both ways and assert: no payload fault, each run is what it claims, the guest views are equal."""
    rk, ru = run_both(guest, payload, program, name, plant_minor)
    pads = [payload.sym(f"fuzz_entry{k}") for k in range(pf.PADS)]
    both = ("\n--- in-kernel run ---\n" + rk.describe() + "\n--- userspace run ---\n" + ru.describe())
    for side, r in (("in-kernel", rk), ("userspace", ru)):
        if r.outcome == "setup_error":
            raise SetupFailed(f"the {side} run's VM could not be set up in the guest (not a PSCI mismatch): "
                              f"{r.raw.get('error')}" + both)
    faults = [("in-kernel", f) for f in pf.payload_faults(rk)] + [("userspace", f) for f in pf.payload_faults(ru)]
    if faults:
        raise PayloadProblem("payload problem (not a PSCI mismatch): " + "; ".join(
            f"{side} {pf.describe_fault(f, rk.symbol)}" for side, f in faults)
            + "\nprogram:\n" + program.to_python(pads) + both)
    assert rk.hypercalls == [], "the in-kernel run exited to userspace:" + both
    assert ru.filters and all(f["errno"] is None for f in ru.filters), "the forwarding filter was not installed" + both
    assert ru.hypercalls and all(h["by"] == "psci" for h in ru.hypercalls), \
        "the userspace run's calls were not all answered by the emulator:" + both
    kv, uv = pf.guest_view(rk, program), pf.guest_view(ru, program)
    if kv["outcome"] == uv["outcome"] == "deadline":
        raise PayloadProblem("both runs hit the deadline: the generator gave a step to a vCPU that never ran it "
                             "(tests/system/test_psci_fuzz.py Gen)\nprogram:\n" + program.to_python(pads) + both)
    diffs = pf.compare(kv, uv)
    if diffs:
        raise Mismatch("in-kernel and userspace PSCI differ (harness/model/psci_fuzz.py ALLOWED_DIFFERENCES "
                       "does not cover it):\n  " + "\n  ".join(diffs)
                       + "\nminimal program (paste into REGRESSIONS in tests/system/test_psci_fuzz.py):\n"
                       + program.to_python(pads) + "\n" + pf.side_by_side(program, kv, uv) + both)
    return kv, uv


def _budget(request, level: str) -> tuple[int, int]:
    n = request.config.getoption("--psci-fuzz-examples", None) or DEFAULT_EXAMPLES[level]
    s = request.config.getoption("--psci-fuzz-seed", None)
    if s in (None, ""):
        return n, DEFAULT_SEED
    if s == "random":
        import random
        return n, random.SystemRandom().randrange(1 << 32)
    return n, int(s, 0)


# Nested VMs are never destroyed inside a guest (harness/guest/runner.py GRAVEYARD): each keeps its VM, vCPU and vGIC
# fds, ~7 for 4 vCPUs, and the agent's 1024 ran out (KVM_CREATE_VM: EMFILE) after ~75 vEL2 scenario pairs
# (--psci-fuzz-examples 300).  The vEL2 test starts on a fresh guest and takes another one every this many pairs.
NESTED_PAIRS_PER_GUEST = 40


def _fuzz(guest, request, capsys, level: str, el2: bool, guest_pool=None):
    payload = get_payload("psci_fuzz")
    current = {"guest": guest_pool.fresh() if el2 else guest, "pairs": 0}
    pads = [payload.sym(f"fuzz_entry{k}") for k in range(pf.PADS)]
    minor = guest.caps["psci_version_raw"] & 0xFFFF
    wanted, the_seed = _budget(request, level)
    n_batches = math.ceil(wanted / PER_BATCH) + math.ceil(wanted / 40)     # a few batches hold fewer programs
    stats = {"batches": 0, "programs": 0, "steps": 0, "races": 0, "offs": 0, "arrivals": 0, "system": 0, "t": 0.0}
    with capsys.disabled():
        print(f"\n[psci_fuzz {level}] seed {the_seed:#x}: {n_batches} scenario pairs of up to {PER_BATCH} programs "
              f"(--psci-fuzz-seed {the_seed:#x} --psci-fuzz-examples {wanted} repeats this run)")

    @seed(the_seed)
    @settings(max_examples=n_batches, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(program=batches(pads, minor, el2=el2))
    def prop(program):
        if el2 and current["pairs"] and current["pairs"] % NESTED_PAIRS_PER_GUEST == 0:
            current["guest"] = guest_pool.fresh()
        current["pairs"] += 1
        t0 = time.monotonic()
        kv, _ = check_program(current["guest"], payload, program, name=f"psci_fuzz_{level}")
        stats["t"] += time.monotonic() - t0
        stats["batches"] += 1
        stats["programs"] += len(program.meta["starts"])
        stats["steps"] += len(program.steps)
        stats["races"] += len(program.race_groups())
        stats["offs"] += sum(1 for s in program.steps if s.advance)
        stats["arrivals"] += sum(kv["arrival_counts"].values()) - 1
        stats["system"] += bool(kv["system_events"])

    t0 = time.monotonic()
    prop()
    wall = time.monotonic() - t0
    with capsys.disabled():
        print(f"[psci_fuzz {level}] {stats['programs']} programs in {stats['batches']} scenario pairs "
              f"({stats['steps']} steps, {stats['races']} CPU_ON races, {stats['offs']} CPU_OFFs, {stats['arrivals']} "
              f"secondary arrivals, {stats['system']} ended by a SYSTEM_* call), each run in-kernel and forwarded on "
              f"kernel {guest.caps['uname']}: no difference; {wall:.1f} s, {stats['programs'] / wall:.2f} programs/s "
              f"({stats['t']:.1f} s in the guest)")
    assert stats["batches"] == n_batches, f"hypothesis ran {stats['batches']} of {n_batches} scenario pairs"


@pytest.mark.el1
@pytest.mark.hvc
@pytest.mark.smc
def test_psci_fuzz_el1_kernel_and_emulator_agree(guest, request, capsys):
    """Generated programs at EL1 over HVC and SMC: in-kernel PSCI == the emulator (ALLOWED_DIFFERENCES aside)."""
    _fuzz(guest, request, capsys, "el1", el2=False)


@pytest.mark.el2
@pytest.mark.smc
def test_psci_fuzz_vel2_kernel_and_emulator_agree(guest, guest_pool, request, capsys):
    """The same generator at vEL2 (HAS_EL2 vCPUs, SMC only: HVC stays in the guest there); for CPU_SUSPEND the
    payload enables the in-kernel vGIC's PPIs so that its timer wakes KVM's WFI (docs/psci-fuzz.md)."""
    _fuzz(guest, request, capsys, "el2", el2=True, guest_pool=guest_pool)


# ---- regressions: mismatches the fuzzer found, fixed, and kept -------------------------------------------------
# name -> lambda pad: Program(...)   (``pad(k)`` = address of fuzz_entry<k>; Program.to_python prints them so)
REGRESSIONS: dict = {
    # SYSTEM_OFF2_64 with a valid type (HIBERNATE_OFF) and junk in bits [63:32] of x1: the type is a uint32
    # (DEN0022F.b SYSTEM_OFF2), KVM reads it into a u32 (arch/arm64/kvm/psci.c:298,385) and powers off; the emulator
    # compared all 64 bits and answered INVALID_PARAMS.  Emulator fixed (harness/guest/psci.py).
    "system_off2_64_type_upper_bits": lambda pad: Program(mpidrs=(0x80000000, 0x80000001), el2=False, steps=(
        Step(0, 'smc', (0xc4000015, (0x1 << 32) | 0x1, 0x0, 0x0), label='SYSTEM_OFF2_64'),
    )),
}


@pytest.mark.el1
@pytest.mark.smc
@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_psci_fuzz_regression(guest, name):
    """A program the fuzzer once found a difference with: in-kernel and userspace must now agree."""
    payload = get_payload("psci_fuzz")
    pads = [payload.sym(f"fuzz_entry{k}") for k in range(pf.PADS)]
    check_program(guest, payload, REGRESSIONS[name](lambda k: pads[k]), name=f"psci_fuzz_reg_{name}")


@pytest.mark.el2
@pytest.mark.hvc
def test_a_payload_fault_is_reported_as_such_with_its_syndrome(guest):
    """An HVC at vEL2 goes to the guest's own EL2 vector (docs/nested-routing.md), where psci_fuzz.S's fatal vector
    ends the run: check_program must call that a payload problem with ESR (EC 0x16, HVC64) and ELR, not a PSCI
    mismatch."""
    payload = get_payload("psci_fuzz")
    program = Program(mpidrs=(0x8000_0000, 0x8000_0001), el2=True,
                      steps=(Step(0, "hvc", (psci.PSCI_VERSION, 0, 0, 0), label="PSCI_VERSION over HVC at vEL2"),))
    with pytest.raises(PayloadProblem) as e:
        check_program(guest, payload, program, name="psci_fuzz_fault")
    text = str(e.value)
    assert text.startswith("payload problem (not a PSCI mismatch)"), text
    assert "(EC 0x16," in text and f"ELR={payload.symbolize(payload.sym('fuzz_hvc') + 4)}" in text, text


@pytest.mark.infra
@pytest.mark.el1
def test_a_planted_difference_is_found_and_shrunk_to_a_minimal_program(guest):
    """The fuzzer's own plumbing: the emulator is told PSCI 1.<m-1> while the VM answers 1.<m> (``plant_minor``).
    Hypothesis must find the difference and shrink it to one PSCI_VERSION call (and the epilogue every program
    ends with), reported as a Mismatch with the
    program as Python and both views side by side (measured: 6 program runs, ~25 s under TCG)."""
    payload = get_payload("psci_fuzz")
    pads = [payload.sym(f"fuzz_entry{k}") for k in range(pf.PADS)]
    minor = guest.caps["psci_version_raw"] & 0xFFFF
    runs = []

    @seed(DEFAULT_SEED)
    @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(program=batches(pads, minor))
    def prop(program):
        runs.append(program)
        check_program(guest, payload, program, name="psci_fuzz_planted", plant_minor=lambda m: m - 1 if m else 1)

    with pytest.raises(Mismatch) as e:
        prop()
    text = str(e.value)
    minimal = text.split("minimal program (paste into REGRESSIONS in tests/system/test_psci_fuzz.py):\n")[1]
    program = eval(minimal.split("\n))\n")[0] + "\n))", {"Program": Program, "Step": Step})(lambda k: pads[k])
    first, *epilogue = program.steps
    assert first.x[0] == psci.PSCI_VERSION and all(s.label.startswith("AFFINITY_INFO64(cpu") for s in epilogue), \
        f"not shrunk to PSCI_VERSION and the epilogue ({len(runs)} runs):\n{text}"
    assert "!!  #0 cpu0" in text and "step 0: in-kernel [returned] 0x1000" in text, text
