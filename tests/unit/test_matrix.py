"""``smccc-harness matrix``: per-kernel pytest command lines, JUnit reading, the scenario x kernel table
(terminal and HTML), and the exit status.  JUnit files come from real pytest runs of a tiny test file."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import matrix as M
from harness import report as R

TESTS = textwrap.dedent("""
    import pytest
    def test_psci_version(record_property):
        record_property("test_console_log", "/runs/x/tests/psci.console.log")
    def test_flags_smc(): assert {KERNEL!r} != "6.12", "flags = 0, expected KVM_HYPERCALL_EXIT_SMC"
    def test_nested():
        if {KERNEL!r} == "6.12":
            pytest.skip("kernel 6.12: KVM_CAP_ARM_EL2 is 0")
    def test_session(record_testsuite_property):
        record_testsuite_property("kernel_version", {KERNEL!r} + ".99-cloud-arm64")
        record_testsuite_property("qemu_version", "10.0.2")
        record_testsuite_property("accel", "tcg")
""")


def _junit(tmp: Path, kernel: str) -> Path:
    d = tmp / kernel
    d.mkdir()
    (d / "test_scen.py").write_text(TESTS.replace("{KERNEL!r}", repr(kernel)))
    junit = d / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-c", "/dev/null",
                    "-o", "junit_family=xunit1", f"--junitxml={junit}", str(d / "test_scen.py")],
                   cwd=d, capture_output=True, check=False)
    return junit


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    return [R.read_junit(_junit(tmp, k), k) for k in ("6.12", "default")]


def test_junit_results_and_suite_properties_are_read(runs):
    r612 = runs[0]
    assert {s.split("::")[-1]: t.outcome for s, t in r612.results.items()} == {
        "test_psci_version": "passed", "test_flags_smc": "failed", "test_nested": "skipped", "test_session": "passed"}
    assert r612.properties["kernel_version"] == "6.12.99-cloud-arm64"
    assert "KVM_HYPERCALL_EXIT_SMC" in next(t.message for t in r612.results.values() if t.outcome == "failed")


def test_terminal_table_has_one_row_per_scenario_and_one_column_per_kernel(runs):
    lines = R.format_matrix(runs).splitlines()
    assert lines[0].split() == ["scenario", "6.12", "(6.12.99-cloud-arm64)", "default", "(default.99-cloud-arm64)"]
    flags = next(line for line in lines if "test_flags_smc" in line)
    assert flags.split()[1:] == ["FAIL", "PASS"]
    nested = next(line for line in lines if "test_nested" in line)
    assert nested.split()[1:] == ["SKIP", "PASS"]
    assert next(line for line in lines if line.startswith("total")).split()[1:] == ["2P", "1F", "0E", "1S", "0X",
                                                                                     "4P", "0F", "0E", "0S", "0X"]
    assert any(line.startswith("6.12: kernel 6.12.99-cloud-arm64, QEMU 10.0.2, accel tcg") for line in lines)


def test_html_report_colours_cells_and_lists_failures(runs):
    html = R.render_html(runs)
    assert html.count("<td class=failed") == 1 and html.count("<td class=skipped") == 1
    assert "<h2>Failures</h2>" in html and "KVM_HYPERCALL_EXIT_SMC" in html
    assert 'href="file:///runs/x/tests/psci.console.log"' in html


def test_exit_status_is_1_on_a_failure_and_2_when_a_kernel_run_broke(runs):
    assert M.exit_status(runs) == 1
    assert M.exit_status([runs[1]]) == 0
    assert M.exit_status([runs[1], R.KernelRun(label="7.2", note="pytest exit 4 in 1 s")]) == 2


def test_per_kernel_pytest_command(tmp_path):
    argv = M.pytest_argv("7.2", tmp_path / "7.2", "not slow", "psci", 2, "tcg", ["-x"])
    assert argv[1:4] == ["-m", "pytest", "tests/system"]
    assert argv[argv.index("--kernel") + 1] == "7.2"
    assert f"--junitxml={tmp_path / '7.2' / 'junit.xml'}" in argv
    assert argv[argv.index("--results-dir") + 1] == str(tmp_path / "7.2" / "runs")
    assert argv[argv.index("-n") + 1] == "2" and argv[-1] == "-x"


@pytest.mark.parametrize("label,safe", [("default", r"default"), ("/srv/k/arch/arm64/boot/Image", r"Image-[0-9a-f]{8}"),
                                        ("pkg:linux-image-6.12.117+deb13-cloud-arm64/trixie",
                                         r"pkg_linux-image-6\.12\.117\+deb13-cloud-arm64_trixie")])
def test_kernel_labels_become_short_safe_directory_names(label, safe):
    assert re.fullmatch(safe, M.label_dir(label))
    assert len(M.label_dir("/" + "x" * 300 + "/Image")) < 20
