"""harness.kdev.selftests without a guest or a compiler: test discovery in a tree, the tree hash, labels, case lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.kdev import selftest_build, selftests
from harness.kdev.tap import parse

MAKEFILE_KVM_73 = """\
TEST_GEN_PROGS_COMMON = demand_paging_test
TEST_GEN_PROGS_COMMON += kvm_binary_stats_test
TEST_GEN_PROGS_x86 = $(TEST_GEN_PROGS_COMMON)
TEST_GEN_PROGS_x86 += x86/cpuid_test
TEST_GEN_PROGS_arm64 = $(TEST_GEN_PROGS_COMMON)
TEST_GEN_PROGS_arm64 += arm64/hello_el2
TEST_GEN_PROGS_arm64 += arm64/smccc_filter
TEST_GEN_PROGS_arm64 += steal_time
"""
MAKEFILE_612 = """\
TEST_GEN_PROGS_x86_64 += x86_64/cpuid_test
TEST_GEN_PROGS_aarch64 += aarch64/smccc_filter
TEST_GEN_PROGS_aarch64 += aarch64/psci_test
TEST_GEN_PROGS_aarch64 += kvm_binary_stats_test
"""


def tree(tmp_path: Path, name: str, text: str) -> Path:
    d = tmp_path / "linux" / selftest_build.KVM_DIR
    d.mkdir(parents=True)
    (d / name).write_text(text)
    (tmp_path / "linux" / "Makefile").write_text("VERSION = 7\nPATCHLEVEL = 3\nSUBLEVEL = 4\nEXTRAVERSION =\n")
    return tmp_path / "linux"


def test_arm64_tests_of_a_7x_tree_include_the_common_ones_and_no_x86(tmp_path):
    t = tree(tmp_path, "Makefile.kvm", MAKEFILE_KVM_73)
    assert selftest_build.available_tests(t) == ["demand_paging_test", "kvm_binary_stats_test", "arm64/hello_el2",
                                            "arm64/smccc_filter", "steal_time"]


def test_basenames_resolve_to_aarch64_paths_in_a_612_tree_and_missing_ones_are_named(tmp_path):
    t = tree(tmp_path, "Makefile", MAKEFILE_612)
    found, missing = selftest_build.resolve_tests(t, ["smccc_filter", "arm64/psci_test", "hello_el2"])
    assert found == {"smccc_filter": "aarch64/smccc_filter", "psci_test": "aarch64/psci_test"}
    assert missing == ["hello_el2"]


def test_build_refuses_a_test_the_tree_lacks_before_compiling(tmp_path):
    t = tree(tmp_path, "Makefile", MAKEFILE_612)
    src = selftest_build.Source(tree=t, key="x", label="linux-source-6.12 test", version="6.12.0")
    with pytest.raises(selftest_build.SelftestError, match="has no arm64 KVM selftest hello_el2"):
        selftest_build.build(src, ["hello_el2"])


def test_tree_version_reads_the_top_makefile(tmp_path):
    assert selftest_build.tree_version(tree(tmp_path, "Makefile", MAKEFILE_612)) == "7.3.4"


def test_tree_hash_changes_with_a_source_file_but_not_with_build_artifacts(tmp_path):
    t = tree(tmp_path, "Makefile.kvm", MAKEFILE_KVM_73)
    h0 = selftest_build.hash_tree(t)
    kvm = t / selftest_build.KVM_DIR
    (kvm / "smccc_filter.o").write_bytes(b"obj")
    (kvm / "smccc_filter.d").write_text("deps")
    (kvm / "smccc_filter").write_bytes(b"\x7fELF" + b"\0" * 60)
    assert selftest_build.hash_tree(t) == h0
    (kvm / "smccc_filter.c").write_text("int main(void) { return 0; }\n")
    assert selftest_build.hash_tree(t) != h0


def test_a_directory_without_kvm_selftests_is_refused_with_a_hint(tmp_path):
    with pytest.raises(selftest_build.SelftestError, match="not a kernel tree with KVM selftests"):
        selftest_build.tree_source(tmp_path)


def test_the_debian_source_label_follows_the_locked_kernel():
    # images/lock.json pins 'default' to linux-binary-7.3.4+deb13-cloud-arm64 7.3.4-1~bpo13+1
    label = selftests.expected_source_label("default")
    assert label is not None and label.startswith("linux-source-7.3 7.3.4-")
    assert selftests.expected_source_label("no-such-spec") is None


def test_a_file_kernel_without_a_source_tree_is_refused():
    with pytest.raises(selftest_build.SelftestError, match="is a file"):
        selftest_build.resolve_source(None, "/boot/Image")


def _run(text_out: str, rc: int) -> selftests.SelftestRun:
    text = selftests.runner_tap("set_id_regs", rc, text_out, 300, False)
    return selftests.SelftestRun(test="set_id_regs", variant="el1", rc=rc, output=text_out, seconds=1.0,
                                 timed_out=False, tap_text=text, tap=parse(text))


def test_case_outcomes_come_from_the_programs_own_ktap():
    run = _run("TAP version 13\n1..3\nok 1 ID_A\n# ID_B: 0 != 0xf0\nnot ok 2 ID_B\nok 3 # SKIP no MTE\n", 1)
    assert [n for n, _ in selftests.cases_of(run)] == ["ID_A", "ID_B", "case3"]
    assert selftests.case_outcome(run, "ID_A") == ("passed", "")
    assert selftests.case_outcome(run, "ID_B") == ("failed", "ID_B: 0 != 0xf0")
    assert selftests.case_outcome(run, "case3") == ("skipped", "no MTE")


def test_a_case_the_program_never_reached_fails_and_a_skipped_program_skips_every_case():
    died = _run("TAP version 13\n1..3\nok 1 ID_A\n==== Test Assertion Failure ====\n", 254)
    why = "set_id_regs did not report case 'ID_C': plan says 3 test(s), 1 reported"
    assert selftests.case_outcome(died, "ID_C") == ("failed", why)
    skipped = _run("1..0 # SKIP - Requirement not met: kvm_has_cap(KVM_CAP_ARM_WRITABLE_IMP_ID_REGS)\n", 4)
    assert selftests.case_outcome(skipped, "ID_A") == (
        "skipped", "Requirement not met: kvm_has_cap(KVM_CAP_ARM_WRITABLE_IMP_ID_REGS)")


def test_case_lists_are_recorded_only_from_a_complete_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("SMCCC_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr(selftests, "CASES_SNAPSHOT", tmp_path / "none.json")
    selftests.record_cases(_run("TAP version 13\n1..3\nok 1 ID_A\n", 254), "src 1")
    assert selftests.known_cases("set_id_regs", "el1", "src 1") == []
    selftests.record_cases(_run("TAP version 13\n1..2\nok 1 ID_A\nok 2 ID_B\n", 0), "src 1")
    assert selftests.known_cases("set_id_regs", "el1", "src 1") == ["ID_A", "ID_B"]
    assert selftests.known_cases("set_id_regs", "el1", "src 2") == []
