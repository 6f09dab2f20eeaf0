"""harness.model.filter_model: the errno KVM_ARM_VM_SMCCC_FILTER returns, by the check order of docs/kvm-smccc-abi.md §1.1.

The same model is property-tested against the real kernel in tests/system/test_filter_model.py.
"""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.errors import HarnessError
from harness.model import filter_model as fm

PSCI = 0x8400_0000


def test_a_fresh_range_is_accepted():
    m = fm.FilterModel()
    assert m.insert(PSCI, 0x20, "fwd") is None
    assert m.ranges == [(PSCI, PSCI + 0x1F, 2)]


@pytest.mark.parametrize("base,nr", [(PSCI, 0), (0xFFFF_FFFF, 2), (0x1000, 0xFFFF_FFFF)])
def test_zero_length_or_wrapping_range_is_einval(base, nr):
    assert fm.FilterModel().insert(base, nr) == "EINVAL"


def test_last_function_id_alone_is_accepted():
    assert fm.FilterModel().insert(0xFFFF_FFFF, 1) is None


@pytest.mark.parametrize("action", [3, 7, 255])
def test_unknown_action_is_einval(action):
    assert fm.FilterModel().insert(PSCI, 1, action) == "EINVAL"


def test_nonzero_pad_is_einval_even_for_an_otherwise_good_range():
    assert fm.FilterModel().insert(PSCI, 1, "fwd", [0] * 14 + [1]) == "EINVAL"


@pytest.mark.parametrize("base,nr", [(0x8000_0000, 1), (0x8000_FFFF, 1), (0x7FFF_FFFF, 2), (0xC000_0000, 0x10),
                                     (0xBFFF_0000, 0x2_0000), (0, 0xFFFF_FFFF)])
def test_range_touching_a_reserved_range_is_eexist_from_the_first_insert(base, nr):
    v = fm.FilterModel().check(base, nr)
    assert v.errno == "EEXIST"
    assert v.conflict in fm.RESERVED


@pytest.mark.parametrize("base", [0x7FFF_FFFF, 0x8001_0000, 0xBFFF_FFFF, 0xC001_0000])
def test_ranges_adjacent_to_the_reserved_ranges_are_accepted(base):
    assert fm.FilterModel().insert(base, 1) is None


def test_overlap_with_an_earlier_range_is_eexist_and_leaves_the_state_unchanged():
    m = fm.FilterModel()
    assert m.insert(PSCI, 0x20) is None
    assert m.insert(PSCI + 0x1F, 2) == "EEXIST"
    assert m.insert(PSCI, 0x20, "deny") == "EEXIST"
    assert m.insert(PSCI + 0x20, 1) is None
    assert len(m.ranges) == 2


def test_after_run_a_wellformed_range_is_ebusy_but_a_malformed_one_is_still_einval():
    m = fm.FilterModel()
    m.run()
    assert m.insert(0x8600_0000, 1) == "EBUSY"
    assert m.insert(0x8000_0000, 1) == "EBUSY"          # EBUSY is checked before the overlap
    assert m.insert(0x8600_0000, 0) == "EINVAL"
    assert m.insert(0x8600_0000, 1, 3) == "EINVAL"


@pytest.mark.parametrize("zero_zero", ["EINVAL", "EEXIST"])
def test_zero_zero_edge_follows_the_kernel_generation(zero_zero):
    m = fm.FilterModel(zero_zero=zero_zero)
    assert m.insert(0, 0) == zero_zero
    m.run()
    assert m.insert(0, 0) == ("EINVAL" if zero_zero == "EINVAL" else "EBUSY")


def test_for_kernel_uses_the_measured_zero_zero_answer():
    assert fm.FilterModel.for_kernel("7.3.4+deb13-cloud-arm64").zero_zero == fm.ZERO_ZERO_MEASURED["7.3.4"]


def test_predict_splits_before_and_after_the_run():
    before, after = fm.predict([{"base": PSCI, "nr": 0x20, "action": "fwd"}, {"base": PSCI, "nr": 1}],
                               [{"base": 0xC400_0000, "nr": 1}, {"base": 1, "nr": 0}])
    assert before == [None, "EEXIST"]
    assert after == ["EBUSY", "EINVAL"]


def test_check_filters_names_the_reserved_range():
    with pytest.raises(fm.FilterSpecError) as ei:
        fm.check_filters([{"base": 0x8000_0000, "nr": 2, "action": "fwd"}], what="--forward")
    msg = str(ei.value)
    assert "--forward #0 [0x80000000, 0x80000001]" in msg
    assert "EEXIST" in msg and "[0x80000000, 0x8000ffff]" in msg
    assert "hint:" in msg
    assert isinstance(ei.value, HarnessError)


def test_check_filters_names_the_earlier_overlapping_range():
    with pytest.raises(fm.FilterSpecError) as ei:
        fm.check_filters([{"base": PSCI, "nr": 0x20}, {"base": 0xC400_0000, "nr": 0x20},
                          {"base": PSCI + 0x10, "nr": 1}])
    assert ei.value.index == 2
    assert "overlaps range #0 [0x84000000, 0x8400001f]" in str(ei.value)


def test_check_filters_accepts_the_psci_ranges():
    from harness.model.scenarios import PSCI_FWD
    fm.check_filters(PSCI_FWD)


_u32 = st.integers(0, fm.U32)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_u32, st.integers(0, 0x1_0000), st.integers(0, 3)), max_size=8))
def test_accepted_ranges_never_overlap_each_other_or_the_reserved_ranges(ranges):
    m = fm.FilterModel()
    for r in ranges:
        m.insert(*r)
    spans = sorted([(s, e) for s, e, _ in m.ranges] + list(fm.RESERVED))
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
    assert all(a <= 2 for _, _, a in m.ranges)
