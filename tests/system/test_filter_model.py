"""harness.model.filter_model against the real kernel: the harness's own filter validation must agree with KVM.

docs/kvm-smccc-abi.md §1.1: KVM_SET_DEVICE_ATTR(KVM_ARM_VM_SMCCC_CTRL, KVM_ARM_VM_SMCCC_FILTER) checks pad -> EINVAL,
nr == 0 / wrap / action >= 3 -> EINVAL, a vCPU already ran -> EBUSY, overlap (with earlier ranges or the
reserved Arm Architecture Calls ranges) -> EEXIST.  Hypothesis generates lists of ranges biased toward the
PSCI/SMCCC bases, the reserved ranges and their edges, and overlaps with earlier ranges; each list goes to the
kernel in one scenario (filters before the run, ``late_filters`` after it) and every errno must match the model.
"""

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harness.images.payloads import get_payload
from harness.model import filter_model as fm
from harness.model.known_bad import zero_zero_errno
from harness.model.scenarios import scenario

MAX_EXAMPLES = 60
PAD0 = [0] * 15
BASES = [0, 1, 0x7FFF_FFFF, 0x8000_0000, 0x8000_0001, 0x8000_FFFF, 0x8001_0000, 0x8400_0000, 0x8400_001F,
         0x8400_0020, 0xBFFF_FFFF, 0xC000_0000, 0xC000_FFFF, 0xC001_0000, 0xC200_0000, 0xC400_0000,
         0xC600_0000, 0xFFFF_0000, 0xFFFF_FFFE, 0xFFFF_FFFF]
NRS = [0, 1, 2, 0x10, 0x1F, 0x20, 0xFFFF, 0x1_0000, 0x1_0001, 0x8000_0000, 0xFFFF_FFFF]


@st.composite
def filter_lists(draw, min_size=0, max_size=8):
    out: list[dict] = []
    for _ in range(draw(st.integers(min_size, max_size))):
        kind = draw(st.sampled_from(["edge", "edge", "near_prev", "random"]))
        if kind == "near_prev" and out:
            prev = draw(st.sampled_from(out))
            base = (prev["base"] + draw(st.integers(-2, 0x21))) & fm.U32
        elif kind == "random":
            base = draw(st.integers(0, fm.U32))
        else:
            base = draw(st.sampled_from(BASES))
        nr = draw(st.one_of(st.sampled_from(NRS), st.integers(0, 0x2_0000)))
        action = draw(st.sampled_from([0, 1, 2, 2, 2, 3, 255]))
        pad = list(PAD0)
        if draw(st.integers(0, 9)) == 0:
            pad[draw(st.integers(0, 14))] = draw(st.integers(1, 255))
        out.append({"base": base, "nr": nr, "action": action, "pad": pad})
    return out


def _f(base, nr, action=2):
    return {"base": base, "nr": nr, "action": action, "pad": PAD0}


@pytest.fixture(scope="module")
def kernel_runs():
    return {"examples": 0, "ranges": 0}


def _run(g, filters, late):
    p = get_payload("psci_version")
    r = g.run(scenario("filter_model", p, filters=filters, late_filters=late, deadline_s=10.0), payload=p)
    assert r.outcome == "done", r.describe()
    return [f["errno"] for f in r.filters], [f["errno"] for f in r.late_filters], r


@pytest.mark.filter
@pytest.mark.bad_input
def test_zero_zero_edge_matches_the_measured_table(guest):
    """(base 0, nr 0): end wraps to 0xFFFFFFFF; the answer per version (harness/model/known_bad.py zero_zero_errno)
    agrees with what was measured (filter_model.ZERO_ZERO_MEASURED) and with this kernel."""
    release = guest.caps["uname"].split("+")[0].split("-")[0]
    before, _, r = _run(guest, [_f(0, 0)], [])
    assert before[0] == zero_zero_errno(guest.caps["uname"]), r.describe()
    if release in fm.ZERO_ZERO_MEASURED:
        assert before[0] == fm.ZERO_ZERO_MEASURED[release], r.describe()


@pytest.mark.filter
@pytest.mark.bad_input
def test_filter_model_predicts_every_kernel_errno(guest, kernel_runs, capsys):
    """Property: for any list of ranges, model errno == kernel errno, before (EINVAL/EEXIST) and after the
    run (EBUSY) — docs/kvm-smccc-abi.md §1.1.  Bounded: MAX_EXAMPLES generated lists plus the explicit examples."""
    # the model's answer to the (0, 0) edge comes from the version table, never from this kernel
    zero_zero = zero_zero_errno(guest.caps["uname"])
    assert zero_zero is not None, f"kernel {guest.caps['uname']}: no SMCCC filter before 6.4"

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(filters=filter_lists(), late=filter_lists(max_size=3))
    @example(filters=[_f(0x8000_0000, 1)], late=[])
    @example(filters=[_f(0xC000_FFFF, 2)], late=[])
    @example(filters=[_f(0x8400_0000, 0x20), _f(0x8400_001F, 1), _f(0x8400_0020, 1)], late=[_f(0x8600_0000, 1)])
    @example(filters=[_f(0xFFFF_FFFF, 2), _f(0xFFFF_FFFF, 1), _f(0, 0xFFFF_FFFF)], late=[_f(5, 0), _f(5, 1, 3)])
    @example(filters=[_f(0, 0x8000_0000), _f(0x8001_0000, 0x3FFF_0000), _f(0xC001_0000, 0x3FFF_0000)],
             late=[{"base": 1, "nr": 1, "action": 2, "pad": [1] + PAD0[1:]}])
    def prop(filters, late):
        kernel_runs["examples"] += 1
        kernel_runs["ranges"] += len(filters) + len(late)
        want_before, want_after = fm.predict(filters, late, zero_zero=zero_zero)
        got_before, got_after, r = _run(guest, filters, late)
        rows = "\n".join(f"  #{i} base={f['base']:#x} nr={f['nr']:#x} action={f['action']} pad={any(f['pad'])}: "
                         f"kernel {k} model {m}"
                         for i, (f, k, m) in enumerate(zip(filters + late, got_before + got_after,
                                                           want_before + want_after, strict=True)))
        assert (got_before, got_after) == (want_before, want_after), \
            f"filter model disagrees with the kernel ({len(filters)} before the run, {len(late)} after):\n{rows}\n" \
            f"trace: {r.trace_path}"

    prop()
    with capsys.disabled():
        print(f"\n[filter_model] {kernel_runs['examples']} hypothesis examples "
              f"({kernel_runs['ranges']} ranges) run against kernel {guest.caps['uname']}: model == kernel")
    assert kernel_runs["examples"] >= MAX_EXAMPLES
