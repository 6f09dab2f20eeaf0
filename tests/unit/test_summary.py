"""The results table (harness/plugin/summary.py): one row per system test, its outcome as pytest decided it."""

from types import SimpleNamespace

from harness.plugin import summary as S


def _report(outcome, wasxfail=None, longrepr=None):
    r = SimpleNamespace(keywords={"smc": 1, "el2": 1}, nodeid="tests/system/t.py::test_x[smc]", outcome=outcome,
                        duration=1.5, skipped=outcome == "skipped", longrepr=longrepr)
    if wasxfail is not None:
        r.wasxfail = wasxfail
    return r


def test_an_xfail_and_an_xpass_are_named_as_such_not_skipped_or_passed():
    assert S._row(_report("skipped", wasxfail="known bad on 7.3"))["outcome"] == "xfail"
    assert S._row(_report("passed", wasxfail="known bad on 7.3"))["outcome"] == "xpass"
    skip = S._row(_report("skipped", longrepr=("t.py", 3, "Skipped: no KVM_CAP_ARM_EL2")))
    assert (skip["outcome"], skip["skip"]) == ("skipped", "Skipped: no KVM_CAP_ARM_EL2"), skip
    table = S.format_table([S._row(_report("skipped", wasxfail="x")), S._row(_report("passed"))])
    assert "XFAIL" in table and "PASSED" in table and "SKIPPED" not in table, table
    assert "test_x[smc]  smc      EL2" in table, table
