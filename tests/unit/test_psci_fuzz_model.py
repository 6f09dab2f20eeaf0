"""harness/model/psci_fuzz.py: the parameter-block layout of firmware/psci_fuzz.S, the refusal of programs that do
not fit, decoding, and the comparison with its table of allowed differences (pure: no guest)."""

import struct

import pytest

from harness import protocol as P
from harness.errors import PayloadError
from harness.model import psci_fuzz as pf
from harness.model.psci_fuzz import Program, Step
from harness.model.results import ScenarioResult

MPIDRS = (0x8000_0000, 0x8001_0100, 0x01_8002_0000)
ON64 = 0xC400_0003


def prog(steps, mpidrs=MPIDRS):
    return Program(mpidrs=mpidrs, steps=tuple(steps))


def test_encode_layout_matches_the_payload_header():
    steps = [Step(0, "hvc", (ON64, 0x100, 0x4000_0010, 0xC0FFEE)),
             Step(1, "smc", (0xC400_0004, 0, 0, 0), until=1, max_calls=7, advance=True),
             Step(2, "smc", (ON64, 1, 2, 3), joined=True, arm_timer=True)]
    w = pf.encode(prog(steps), ticks=1234)
    assert w[:4] == [pf.P_MAGIC, 3, 3, 1234 | pf.IDLE_WFIT]
    assert w[4:8] == [*MPIDRS, 0]
    assert w[8:16] == [0, pf.OP_HVC, ON64, 0x100, 0x4000_0010, 0xC0FFEE, 0, 1]
    assert w[16:24] == [1, pf.OP_POLL_SMC | pf.F_ADVANCE << 8, 0xC400_0004, 0, 0, 0, 1, 7]
    assert w[24:26] == [2, pf.OP_SMC | (pf.F_JOINED | pf.F_ARM_TIMER) << 8]
    assert len(w) == pf.HEADER_WORDS + 3 * pf.STEP_WORDS


def test_firmware_constants_match_the_model():
    consts = {}
    import re

    from harness.paths import FIRMWARE_DIR
    for m in re.finditer(r"^\s*\.equ\s+(\w+),\s*(\(?[0-9xXa-fA-F <]+\)?)", (FIRMWARE_DIR / "psci_fuzz.S").read_text(),
                         re.MULTILINE):
        consts[m.group(1)] = eval(m.group(2))
    assert (consts["MAX_CPUS"], consts["MAX_STEPS"], consts["MAX_ARRIVALS"]) == (pf.MAX_CPUS, pf.MAX_STEPS,
                                                                                   pf.MAX_ARRIVALS)
    assert (consts["P_MAGIC"], consts["R_MAGIC"], consts["BOOT_PAD"]) == (pf.P_MAGIC, pf.R_MAGIC, pf.BOOT_PAD)
    assert (consts["R_RECS"], consts["R_ARR"], consts["P_STEPS"]) == (pf.R_RECS, pf.R_ARR, pf.HEADER_WORDS * 8)
    assert consts["F_JOINED"] >> 8 == pf.F_JOINED and consts["F_ADVANCE"] >> 8 == pf.F_ADVANCE
    assert consts["F_ARM_TIMER"] >> 8 == pf.F_ARM_TIMER and consts["HWID_MASK"] == pf.MPIDR_HWID_MASK
    # the result block the payload writes fits what the VMM returns
    assert pf.R_RECS + pf.MAX_STEPS * pf.REC_SIZE <= pf.R_ARR
    assert pf.R_ARR + pf.MAX_CPUS * pf.ARR_STRIDE <= P.RESULT_BLOCK_SIZE
    assert 0x40 + pf.MAX_ARRIVALS * pf.ARR_SIZE <= pf.ARR_STRIDE


@pytest.mark.bad_input
@pytest.mark.parametrize("program, words", [
    (prog([Step(0, "hvc", (0x8400_0000, 0, 0, 0))] * (pf.MAX_STEPS + 1)), "steps do not fit"),
    (prog([], mpidrs=(0, 1, 2, 3, 4)), "5 vCPUs"),
    (prog([Step(3, "hvc", (0, 0, 0, 0))]), "belongs to vCPU 3"),
    (prog([], mpidrs=(0x8000_0001, 0x1)), "share an affinity"),
    (prog([Step(0, "hvc", (0, 0, 0, 0), joined=True)]), "step 0 cannot join"),
])
def test_a_program_that_does_not_fit_is_refused_before_it_is_sent(program, words):
    with pytest.raises(PayloadError) as e:
        pf.encode(program)
    assert words in str(e.value) and e.value.hint, str(e.value)


def test_the_largest_program_fits_the_parameter_block():
    w = pf.encode(prog([Step(0, "hvc", (0x8400_0000, 0, 0, 0))] * pf.MAX_STEPS))
    assert len(w) <= pf.PARAM_WORDS_MAX and len(w) <= 4096     # protocol.validate_scenario's params limit


def _block(records, arrivals):
    b = bytearray(P.RESULT_BLOCK_SIZE)
    struct.pack_into("<3Q", b, 0, pf.R_MAGIC, len(records), 4)
    for i, (x, status) in enumerate(records):
        struct.pack_into("<8Q", b, pf.R_RECS + i * pf.REC_SIZE, *x, status, 1, 0, 0)
    for k, recs in arrivals.items():
        base = pf.R_ARR + k * pf.ARR_STRIDE
        struct.pack_into("<Q", b, base, len(recs))
        for a, r in enumerate(recs):
            struct.pack_into("<8Q", b, base + 0x40 + a * pf.ARR_SIZE, *r)
    return bytes(b)


def _result(block, outcome="done", events=()):
    return ScenarioResult(raw={"outcome": outcome, "exit_code": 0, "events": list(events),
                               "result_block": P.b64(block.rstrip(b"\0"))})


RACE = prog([Step(0, "hvc", (ON64, 0x8002_0000, 0x4000_0010, 7)),
             Step(1, "hvc", (ON64, 0x8002_0000, 0x4000_0010, 7), joined=True)])
ARR = {0: [(0, 0, 0, 0, pf.BOOT_PAD, 0x3C5, MPIDRS[0], 0)], 2: [(7, 0, 0, 0, 0, 0x3C5, MPIDRS[2], 0)]}
ALREADY_ON = (1 << 64) - 4


def test_race_winner_is_compared_as_a_multiset():
    a = _result(_block([((0, 0, 0, 0), 1), ((ALREADY_ON, 0, 0, 0), 1)], ARR))
    b = _result(_block([((ALREADY_ON, 0, 0, 0), 1), ((0, 0, 0, 0), 1)], ARR))
    assert pf.compare(pf.guest_view(a, RACE), pf.guest_view(b, RACE)) == []
    c = _result(_block([((0, 0, 0, 0), 1), ((0, 0, 0, 0), 1)], ARR))      # two winners: a real difference
    assert pf.compare(pf.guest_view(a, RACE), pf.guest_view(c, RACE))


def test_a_difference_outside_a_race_is_reported_with_the_step():
    p = prog([Step(0, "smc", (0xC400_0015, 0x1_0000_0001, 0, 0))])
    a = _result(_block([], ARR), outcome="system_event",
                events=[{"kind": "system_event", "vcpu": 0, "name": "SHUTDOWN", "data": [1], "t": 0}])
    b = _result(_block([(((1 << 64) - 2, 0, 0, 0), 1)], ARR))
    diffs = pf.compare(pf.guest_view(a, p), pf.guest_view(b, p))
    assert any(d.startswith("outcome:") for d in diffs) and any(d.startswith("step 0:") for d in diffs), diffs
    text = pf.side_by_side(p, pf.guest_view(a, p), pf.guest_view(b, p))
    assert "!!" in text and "0xfffffffffffffffe" in text


def test_arrivals_are_compared_field_by_field():
    other = {0: ARR[0], 2: [(7, 0, 0, 0, 1, 0x3C5, MPIDRS[2], 0)]}       # landed on another pad
    a, b = _result(_block([], ARR)), _result(_block([], other))
    diffs = pf.compare(pf.guest_view(a, RACE), pf.guest_view(b, RACE))
    assert diffs == [(f"vcpu2 arrival 0: in-kernel pad=fuzz_entry0 x0..x3=0x7 0x0 0x0 0x0 pstate=0x3c5 "
                     f"mpidr={MPIDRS[2]:#x} sctlr=0x0, userspace pad=fuzz_entry1 x0..x3=0x7 0x0 0x0 0x0 pstate=0x3c5 "
                     f"mpidr={MPIDRS[2]:#x} sctlr=0x0")]


def test_payload_faults_carry_the_syndrome():
    events = [{"kind": "report", "vcpu": 1, "slot": s, "value": v, "t": 0}
              for s, v in ((504, 0x200), (505, 0x8A00_0000), (506, 0x4000_0021), (507, 0), (508, 0x3C5))]
    events.append({"kind": "done", "vcpu": 1, "code": pf.DONE_UNEXPECTED, "t": 0})
    (f,) = pf.payload_faults(_result(b"", events=events))
    assert (f["vcpu"], f["ec"], f["elr"]) == (1, 0x22, 0x4000_0021)      # EC 0x22: PC alignment fault
    assert "ESR=0x8a000000 (EC 0x22" in pf.describe_fault(f)


def test_to_python_is_a_program_again():
    pads = [0x4000_0010, 0x4000_0020, 0x4000_0030, 0x4000_0040]
    p = Program(mpidrs=MPIDRS, psci_minor=1, steps=(
        Step(0, "hvc", (ON64, 0x100, pads[1] + 2, (0xAB << 32) | pads[3]), until=1, max_calls=5, label="x"),
        Step(1, "smc", (0x8400_0003, 1, (0xDEAD << 32) | pads[0], 0), joined=True, advance=True)))
    src = p.to_python(pads)
    assert "pad(1) + 2" in src and "(0xdead << 32) | pad(0)" in src
    again = eval(src, {"Program": Program, "Step": Step})(lambda k: pads[k])
    assert again == p


def test_every_allowed_difference_names_its_reason():
    keys = [d.key for d in pf.ALLOWED_DIFFERENCES]
    assert len(keys) == len(set(keys))
    for d in pf.ALLOWED_DIFFERENCES:
        assert d.what and d.rule and ("DEN0022" in d.why or "psci.c" in d.why), d


def test_set_regs_give_every_vcpu_its_mpidr_and_the_vm_its_psci_version():
    assert prog([]).set_regs() == [{"reg": "mpidr_el1", "value": m, "vcpu": k} for k, m in enumerate(MPIDRS)]
    regs = Program(mpidrs=MPIDRS, steps=(), psci_minor=2).set_regs()
    assert regs[-1] == {"reg": "psci_version", "value": 0x10002, "vcpu": 0}
