"""The PSCI fuzz generator (tests/system/test_psci_fuzz.py ``batches``) without a guest: every program it makes
fits the payload, gives each step to a vCPU that is running the interpreter at that point (else both runs would
hang), and lets every started secondary make a call of its own before the run ends (else its arrival would be
timing)."""

from hypothesis import HealthCheck, given, seed, settings

from harness.guest import psci
from harness.model import psci_fuzz as pf
from tests.system.test_psci_fuzz import batches

PADS = [0x4000_0010, 0x4000_0020, 0x4000_0030, 0x4000_0040]


@seed(0x5C1F022)
@settings(max_examples=25, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(program=batches(PADS, 3))
def test_generated_programs_are_runnable(program):
    pf.encode(program)                                  # fits: never refused
    minor = 3 if program.psci_minor is None else program.psci_minor
    sim = psci.Psci([psci.CpuState(m, k == 0) for k, m in enumerate(program.mpidrs)], minor=minor)
    running, started_at = {0}, {}
    for i, s in enumerate(program.steps):
        assert s.vcpu in running, f"step {i} ({s.label}) given to cpu{s.vcpu}, running: {sorted(running)}"
        if s.joined:
            assert program.steps[i - 1].vcpu != s.vcpu
        eff = sim.call(s.vcpu, s.x[0] & 0xFFFF_FFFF, list(s.x[1:])).effect
        if eff and eff[0] == "cpu_on" and eff[2] in PADS:
            running.add(eff[1])
            started_at[eff[1]] = i
        elif eff and eff[0] == "cpu_off":
            running.discard(s.vcpu)
            nxt = program.steps[i + 1]
            assert s.advance and nxt.until == psci.AFFINITY_OFF and nxt.x[1] == program.mpidrs[s.vcpu] & pf.MPIDR_HWID_MASK
        elif eff and eff[0] == "system_event":
            assert i == len(program.steps) - 1, "a call that ends the VM must be the last step"
    for k, i in started_at.items():     # a started secondary runs a step of its own after its last CPU_ON
        assert any(s.vcpu == k for s in program.steps[i + 1:]) or k not in running, \
            f"cpu{k} started at step {i} never runs a step: its arrival would be timing"
