"""harness.kdev.tap: the TAP 13 / KTAP 1 parser, on recorded kselftest output and on KTAP from the spec.

Recorded under tests/unit/data/tap/:
* smccc_filter_pass.tap, set_id_regs_nested.tap, kvm_binary_stats_nested.tap (7.3.4 selftests on 7.3.4),
  hello_el2_skip.tap and psci_test_assert_fail.tap (7.3.4 selftests on the 6.12.117 kernel: no
  KVM_CAP_ARM_EL2; PSCI 1.1 < 1.3), smccc_filter_timeout.tap (el2 with a 5 s deadline): real runs of
  upstream's arm64 KVM selftests in the guest, written up by harness.kdev.selftests.runner_tap the way
  kselftest's runner.sh does;
* ktap_nested_indented.ktap: KTAP 1 with indented subtests (Documentation/dev-tools/ktap.rst layout);
* bail_out.tap, missing_plan.tap, directives_plan_last.tap: small documents for the edge cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.kdev import selftests
from harness.kdev.tap import parse, parse_result

DATA = Path(__file__).parent / "data" / "tap"


def load(name: str):
    return parse((DATA / name).read_text())


# ---- result lines --------------------------------------------------------------------------------
@pytest.mark.parametrize("line, ok, number, name, directive, reason", [
    ("ok 1 selftests: kvm: smccc_filter", True, 1, "selftests: kvm: smccc_filter", None, ""),
    ("not ok 3 - foo bar", False, 3, "foo bar", None, ""),
    ("ok 101 # SKIP ID_AA64PFR0_EL1.MPAM is not writable, nothing to test", True, 101, "", "SKIP",
     "ID_AA64PFR0_EL1.MPAM is not writable, nothing to test"),
    ("ok 1 selftests: kvm: hello_el2 # SKIP", True, 1, "selftests: kvm: hello_el2", "SKIP", ""),
    ("ok 4 in_ci_only # skipped: needs a GICv5", True, 4, "in_ci_only", "SKIP", "needs a GICv5"),
    ("not ok 2 flaky # TODO not fixed yet", False, 2, "flaky", "TODO", "not fixed yet"),
    ("not ok 6 slow # TIMEOUT 45 seconds", False, 6, "slow", "TIMEOUT", "45 seconds"),
    ("ok 5 known # XFAIL errata 1234", True, 5, "known", "XFAIL", "errata 1234"),
    ("ok", True, None, "", None, ""),
])
def test_result_line_fields(line, ok, number, name, directive, reason):
    r = parse_result(line)
    assert (r.ok, r.number, r.name, r.directive, r.reason) == (ok, number, name, directive, reason)


@pytest.mark.parametrize("line", ["okay then", "ok, this works", "# ok 1 prefixed", "not okay", "1..3"])
def test_non_result_lines_are_not_results(line):
    assert parse_result(line) is None


def test_a_non_directive_comment_is_kept_as_comment():
    r = parse_result("not ok 7 broken # exit=254")
    assert (r.directive, r.comment, r.outcome) == (None, "exit=254", "failed")


# ---- whole documents -----------------------------------------------------------------------------
def test_runner_output_of_a_passing_program_is_one_passed_result_with_its_output():
    doc = load("smccc_filter_pass.tap")
    assert (doc.version, doc.plan, doc.errors) == ("TAP 13", 1, [])
    (r,) = doc.results
    assert (r.name, r.outcome, r.subtests) == ("selftests: kvm: smccc_filter", "passed", None)
    assert "selftests: kvm: smccc_filter" in r.diagnostics and any(d.startswith("Random seed:") for d in r.diagnostics)


def test_kselftest_hash_prefixed_ktap_becomes_nested_subtests():
    doc = load("kvm_binary_stats_nested.tap")
    (r,) = doc.results
    sub = r.subtests
    assert sub is not None and (sub.version, sub.plan, sub.errors) == ("TAP 13", 4, [])
    assert [x.name for x in sub.results] == ["vm0", "vm1", "vm2", "vm3"]
    assert sub.diagnostics == ["Totals: pass:4 fail:0 xfail:0 xpass:0 skip:0 error:0"]


def test_nested_skips_carry_their_reasons_and_are_counted():
    doc = load("set_id_regs_nested.tap")
    sub = doc.results[0].subtests
    assert sub.plan == len(sub.results) and sub.errors == []
    skips = [x for x in sub.results if x.outcome == "skipped"]
    assert sub.counts() == {"passed": len(sub.results) - len(skips), "skipped": len(skips)}
    assert "MTE capability not supported, nothing to test" in [x.reason for x in skips]
    assert sub.ok and doc.ok


def test_assertion_failure_of_a_program_is_a_failed_result_with_the_assertion_text():
    doc = load("psci_test_assert_fail.tap")
    (r,) = doc.results
    assert (r.outcome, r.comment, r.subtests) == ("failed", "exit=254", None)
    assert "==== Test Assertion Failure ====" in r.diagnostics
    assert "  Unexpected PSCI version 1.1" in r.diagnostics
    assert doc.errors == [] and not doc.ok


def test_hash_prefixed_nested_failure_fails_the_nested_document_only_where_it_failed():
    text = ("TAP version 13\n1..1\n# selftests: kvm: demo\n# TAP version 13\n# 1..3\n# ok 1 a\n"
            "# # b: expected 1, got 0\n# not ok 2 b\n# ok 3 c # SKIP no SVE\n"
            "# # Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0\nnot ok 1 selftests: kvm: demo # exit=1\n")
    r = parse(text).results[0]
    sub = r.subtests
    assert [x.outcome for x in sub.results] == ["passed", "failed", "skipped"] and not sub.ok
    assert sub.results[1].diagnostics == ["b: expected 1, got 0"]
    assert r.diagnostics == ["selftests: kvm: demo"]


def test_skip_all_plan_gives_the_reason_of_the_program():
    doc = load("hello_el2_skip.tap")
    r = doc.results[0]
    assert r.outcome == "skipped"
    assert r.subtests.plan == 0 and r.subtests.skip_all.startswith("Requirement not met: ")


def test_timeout_is_a_failure_with_the_timeout_directive():
    doc = load("smccc_filter_timeout.tap")
    r = doc.results[0]
    assert (r.ok, r.directive, r.outcome) == (False, "TIMEOUT", "failed")


def test_ktap_indented_subtests_nest_two_levels_with_subtest_names():
    doc = load("ktap_nested_indented.ktap")
    assert (doc.version, doc.plan, [r.outcome for r in doc.results]) == ("KTAP 1", 2, ["failed", "passed"])
    example = doc.results[0].subtests
    assert example.subtest_name == "example" and example.plan == 3
    assert [r.outcome for r in example.results] == ["passed", "skipped", "failed"]
    assert example.results[1].reason == "this test should be skipped"
    params = example.results[2].subtests
    assert params.subtest_name == "example_params_test" and params.plan == 2 and params.errors == []
    assert [r.outcome for r in params.results] == ["skipped", "failed"]
    assert example.results[2].diagnostics == ["example_params_test: pass:0 fail:1 skip:1 total:2"]


def test_todo_failure_does_not_fail_its_document():
    doc = load("ktap_nested_indented.ktap")
    todo = doc.results[1].subtests
    assert [r.outcome for r in todo.results] == ["todo", "passed"] and todo.ok


def test_walk_yields_children_before_parents_with_paths():
    paths = [p for p, _ in load("ktap_nested_indented.ktap").walk()]
    assert paths.index(("example", "example_params_test", "example value 2")) < paths.index(
        ("example", "example_params_test")) < paths.index(("example",))


def test_bail_out_stops_parsing_and_is_an_error():
    doc = load("bail_out.tap")
    assert doc.bail_out == "lost /dev/kvm"
    assert [r.name for r in doc.results] == ["first", "second"]
    assert not doc.ok and any("Bail out!" in e for e in doc.errors)


def test_missing_plan_is_an_error_not_an_exception():
    doc = load("missing_plan.tap")
    assert doc.plan is None and len(doc.results) == 2
    assert any("no plan" in e for e in doc.errors) and not doc.ok
    assert doc.diagnostics == ["beta: expected 0, got -22"]


def test_plan_at_the_end_and_every_directive():
    doc = load("directives_plan_last.tap")
    assert doc.plan == 7 and doc.version is None and doc.errors == []
    assert [r.outcome for r in doc.results] == ["passed", "todo", "xpass", "skipped", "xfail", "failed", "failed"]
    assert doc.results[0].name == "plain - described"


def test_plan_count_mismatch_is_an_error():
    doc = parse("1..3\nok 1 a\nok 2 b\n")
    assert doc.errors == ["plan says 3 test(s), 2 reported"]


def test_out_of_order_numbers_are_an_error():
    assert parse("1..2\nok 2 a\nok 1 b\n").errors == ["result 1 is numbered 2"]


def test_diagnostics_without_tap_do_not_become_subtests():
    doc = parse("TAP version 13\n1..1\n# Random seed: 0x1\n# ok, that went well\nok 1 x\n")
    r = doc.results[0]
    assert r.subtests is None and r.diagnostics == ["Random seed: 0x1", "ok, that went well"]


# ---- runner write-up and outcomes (harness.kdev.selftests, pure) ---------------------------------------
def _run(rc: int, output: str, timed_out: bool = False) -> selftests.SelftestRun:
    text = selftests.runner_tap("psci_test", rc, output, 300, timed_out)
    return selftests.SelftestRun(test="psci_test", variant="el1", rc=rc, output=output, seconds=1.0,
                                 timed_out=timed_out, tap_text=text, tap=parse(text))


def test_exit_4_with_a_skip_plan_is_skipped_with_the_programs_reason():
    run = _run(4, "Random seed: 0x1\n1..0 # SKIP - Requirement not met: kvm_has_cap(KVM_CAP_ARM_SYSTEM_SUSPEND)\n")
    assert selftests.outcome(run) == ("skipped", "Requirement not met: kvm_has_cap(KVM_CAP_ARM_SYSTEM_SUSPEND)")


def test_exit_4_after_results_takes_the_last_skip_reason():
    run = _run(4, "TAP version 13\n1..2\nok 1 a\nok 2 # SKIP no vGICv3 here\n")
    assert selftests.outcome(run) == ("skipped", "no vGICv3 here")


def test_exit_4_without_any_reason_says_so():
    assert selftests.outcome(_run(4, ""))[1] == "upstream exited with KSFT_SKIP (4) without a reason"


def test_assertion_failure_exit_code_is_a_failure():
    out = "==== Test Assertion Failure ====\n  arm64/psci_test.c:100: !r\n  pid=1 tid=1 errno=22 - Invalid argument\n"
    run = _run(254, out)
    assert selftests.outcome(run) == ("failed", "exit code 254")
    assert run.result.comment == "exit=254" and "==== Test Assertion Failure ====" in run.result.lines


def test_timeout_outcome_names_the_deadline():
    assert selftests.outcome(_run(-9, "Random seed: 0x1\n", timed_out=True)) == (
        "failed", "timed out after 300 seconds")


def test_exit_0_passes_and_exit_2_is_xfail():
    assert selftests.outcome(_run(0, ""))[0] == "passed"
    assert selftests.outcome(_run(2, ""))[0] == "xfail"
