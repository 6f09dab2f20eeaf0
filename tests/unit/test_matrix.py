"""``smccc-harness matrix``: per-kernel pytest command lines, JUnit reading, the scenario x kernel table
(terminal and HTML), and the exit status.  JUnit files come from real pytest runs of a tiny test file."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.kdev import matrix as M
from harness.kdev import report as R

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
    assert "file:" not in html and "/runs/x/tests/psci.console.log" not in html   # a log that does not exist: no link


def test_exit_status_is_1_on_a_failure_and_2_when_a_kernel_run_broke(runs):
    assert M.exit_status(runs) == 1
    assert M.exit_status([runs[1]]) == 0
    assert M.exit_status([runs[1], R.KernelRun(label="7.2", note="pytest exit 4 in 1 s")]) == 2


def test_a_kernel_run_that_selected_no_test_is_broken_unless_it_is_a_shard_slice(runs):
    empty = R.KernelRun(label="7.2", junit=Path("junit.xml"), note="pytest exit 5 in 9 s; log x")
    assert M.exit_status([runs[1], empty]) == 2, "a nightly kernel that ran nothing must not be green"
    assert M.exit_status([runs[1], empty], empty_ok=True) == 0, "a --shard slice by test may hold none of a kernel's tests"


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


# ---- report.html: relative links that survive a copy of the report directory ----------------------------
RECORDED = Path(__file__).parent / "data" / "junit" / "matrix_default.xml"    # a real matrix run, 4 tests


def _recorded_kernel(kernel_dir: Path, junit_dir: Path) -> Path:
    """The recorded JUnit file in ``junit_dir``, its console logs (created) under ``kernel_dir``."""
    junit_dir.mkdir(parents=True, exist_ok=True)
    text = RECORDED.read_text().replace("@KERNEL_DIR@", str(kernel_dir))
    (junit_dir / "junit.xml").write_text(text)
    for log in set(re.findall(r'name="(?:test_)?console_log" value="([^"]+)"', text)):
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(f"console of {Path(log).name}\n")
    return junit_dir / "junit.xml"


def _hrefs(html: str) -> list[str]:
    import html as h
    return [h.unescape(x) for x in re.findall(r'href="([^"]*)"', html)]


def test_report_links_are_relative_and_survive_copying_the_report_dir(tmp_path):
    import shutil
    import urllib.parse
    out = tmp_path / "matrix"
    elsewhere = tmp_path / "elsewhere"
    runs = [R.read_junit(_recorded_kernel(out / "default", out / "default"), "default"),        # logs under out
            R.read_junit(_recorded_kernel(elsewhere / "7.2", out / "7.2"), "7.2")]              # logs elsewhere
    R.write_html(runs, out)
    copy = tmp_path / "artifact" / "report"
    shutil.copytree(out, copy)
    shutil.rmtree(out)
    shutil.rmtree(elsewhere)
    html = (copy / "report.html").read_text()
    hrefs = _hrefs(html)
    logs = [h for h in hrefs if h.endswith(".console.log")]
    assert len(logs) == 8, hrefs                                    # 4 tests x 2 kernels, each with its slice
    for href in hrefs:
        assert "file:" not in href and not href.startswith("/") and "://" not in href, href
        target = (copy / urllib.parse.unquote(href)).resolve()
        assert target.is_file() and target.is_relative_to(copy.resolve()), href
    assert sum(h.startswith(f"{R.LOGS_DIR}/7.2/") for h in logs) == 4     # copied in: they lived elsewhere
    assert sum(h.startswith("default/runs/guest-") for h in logs) == 4    # linked where they are
    assert str(tmp_path) not in "".join(hrefs)


def test_report_only_on_a_moved_matrix_dir_finds_the_logs_next_to_the_junit_file(tmp_path):
    import shutil
    old = tmp_path / "old"
    _recorded_kernel(old / "default", old / "default")
    new = tmp_path / "new"
    shutil.move(old, new)
    run = R.read_junit(new / "default" / "junit.xml", "default")
    R.write_html([run], new)
    logs = [h for h in _hrefs((new / "report.html").read_text()) if h.endswith(".console.log")]
    assert len(logs) == 4 and all((new / h).is_file() and h.startswith("default/runs/") for h in logs), logs


# ---- progress on stdout ------------------------------------------------------------------------------------
def test_kernel_progress_lines(runs):
    assert M.kernel_started_line(2, 3, "6.12") == "kernel 2/3 6.12: started"
    line = M.kernel_finished_line(2, 3, "6.12", runs[0], 1, 12.34)
    assert line == "kernel 2/3 6.12: finished: 2 passed, 1 failed, 0 errors, 1 skipped, 0 xfailed (pytest exit 1, 12.3 s)"
    broken = M.kernel_finished_line(3, 3, "7.2", R.KernelRun(label="7.2"), 4, 1.0)
    assert broken == "kernel 3/3 7.2: finished without results (pytest exit 4, 1.0 s)"


def test_run_matrix_prints_each_kernel_starting_and_finishing_as_it_goes(tmp_path, monkeypatch, capsys):
    printed = []                            # stdout so far, read each time a kernel's pytest starts

    def fake_pytest(argv, **kw):            # one kernel's pytest: writes the recorded JUnit file
        printed.append(capsys.readouterr().out)
        junit = Path(next(a for a in argv if a.startswith("--junitxml=")).split("=", 1)[1])
        _recorded_kernel(junit.parent, junit.parent)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(M.subprocess, "run", fake_pytest)
    M.run_matrix(["default", "7.2"], tmp_path, progress=lambda m: print(f"[smccc-harness matrix] {m}", flush=True))
    printed.append(capsys.readouterr().out)
    status = [[ln.split("] ", 1)[1] for ln in chunk.splitlines() if ": started" in ln or ": finished" in ln]
              for chunk in printed]
    assert status[0] == ["kernel 1/2 default: started"]     # before its pytest ran
    assert status[1][0].startswith("kernel 1/2 default: finished: 4 passed, 0 failed, 0 errors, 0 skipped, 0 xfailed")
    assert status[1][1:] == ["kernel 2/2 7.2: started"]
    assert status[2][0].startswith("kernel 2/2 7.2: finished: 4 passed,") and len(status[2]) == 1
