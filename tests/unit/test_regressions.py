"""Regressions between two matrix output directories (harness/kdev/regressions.py), over recorded JUnit data:
the classification, ``smccc-harness compare`` in a subprocess, ``matrix --baseline`` and its report.html
section, and bad input."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import cli
from harness.errors import HarnessError
from harness.kdev import matrix as M
from harness.kdev import regressions as G

ROOT = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).parent / "data" / "junit" / "matrix_default.xml"    # a real matrix run, 4 tests, all pass

PSCI_HVC = "test_forwarding_el1::test_psci_version_exits_to_userspace_with_function_id[hvc]"
PSCI_SMC = "test_forwarding_el1::test_psci_version_exits_to_userspace_with_function_id[smc]"
FLAGS_HVC = "test_forwarding_el1::test_hypercall_flags_name_the_conduit[hvc-0]"
FLAGS_SMC = "test_forwarding_el1::test_hypercall_flags_name_the_conduit[smc-1]"
ADDED = "test_forwarding_el1::test_psci_version_exits_to_userspace_with_function_id[hvc-el2]"


def _case(root: ET.Element, scenario: str) -> ET.Element:
    name = scenario.split("::", 1)[1]
    return next(tc for tc in root.iter("testcase") if tc.get("name") == name)


def _write(kernel_dir: Path, fail=(), remove=(), add=(), skip=()) -> Path:
    """The recorded JUnit file as ``kernel_dir/junit.xml``, edited: ``fail``/``skip`` scenarios get a
    <failure>/<skipped>, ``remove`` ones are dropped, ``add`` (new name, copied from) pairs are added."""
    tree = ET.ElementTree(ET.fromstring(RECORDED.read_text().replace("@KERNEL_DIR@", str(kernel_dir))))
    root = tree.getroot()
    suite = next(root.iter("testsuite"))
    for s in fail:
        ET.SubElement(_case(root, s), "failure", message="AssertionError: flags = 0, expected KVM_HYPERCALL_EXIT_SMC")
    for s in skip:
        ET.SubElement(_case(root, s), "skipped", type="pytest.skip", message="no KVM_CAP_ARM_EL2")
    for s in remove:
        suite.remove(_case(root, s))
    for new, src in add:
        tc = copy.deepcopy(_case(root, src))
        tc.set("name", new.split("::", 1)[1])
        suite.append(tc)
    kernel_dir.mkdir(parents=True, exist_ok=True)
    tree.write(kernel_dir / "junit.xml", encoding="utf-8", xml_declaration=True)
    return kernel_dir / "junit.xml"


@pytest.fixture
def dirs(tmp_path):
    """OLD and NEW matrix dirs: on 'default' FLAGS_SMC passes -> fails, FLAGS_HVC fails -> passes, ADDED is new,
    PSCI_SMC is gone; '7.2' is the same on both sides."""
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "default", fail=[FLAGS_HVC])
    _write(new / "default", fail=[FLAGS_SMC], remove=[PSCI_SMC], add=[(ADDED, PSCI_HVC)])
    _write(old / "7.2")
    _write(new / "7.2")
    return old, new


# ---- classification ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("old, new, kind", [
    ("passed", "failed", "newly failing"), ("skipped", "error", "newly failing"), ("xfailed", "failed", "newly failing"),
    ("failed", "passed", "fixed"), ("error", "xfailed", "fixed"),
    (None, "passed", "new"), (None, "failed", "new"), ("passed", None, "gone"),
    ("skipped", "passed", "changed"), ("passed", "skipped", "changed"), ("passed", "xfailed", "changed"),
    ("failed", "error", "changed"), ("failed", "skipped", "changed"),
    ("passed", "passed", None), ("failed", "failed", None), (None, None, None),
])
def test_classify_each_change_of_outcome(old, new, kind):
    assert G.classify(old, new) == kind


def test_recorded_dirs_give_one_test_of_each_kind_and_a_regression(dirs):
    cmp = G.compare_dirs(*dirs)
    k72, default = cmp.kernels                          # in the order of their directory names
    assert (k72.kernel, default.kernel) == ("7.2", "default")
    got = {kind: [c.scenario for c in default.of_kind(kind)] for kind in G.KINDS}
    assert got == {"newly failing": [FLAGS_SMC], "fixed": [FLAGS_HVC], "new": [ADDED], "gone": [PSCI_SMC],
                   "changed": []}
    assert k72.changes == [] and k72.tests == 4
    assert [(k, c.scenario) for k, c in cmp.regressions] == [("default", FLAGS_SMC)]
    assert "KVM_HYPERCALL_EXIT_SMC" in default.of_kind("newly failing")[0].message
    assert cmp.exit_code() == G.EXIT["regressed"] == 1


def test_fixes_new_passing_tests_gone_tests_and_skip_flips_are_not_regressions(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "default", fail=[FLAGS_HVC], skip=[FLAGS_SMC])
    _write(new / "default", remove=[PSCI_SMC], add=[(ADDED, PSCI_HVC)])
    cmp = G.compare_dirs(old, new)
    assert [(c.scenario, c.kind) for c in cmp.kernels[0].changes] == [
        (PSCI_SMC, "gone"), (FLAGS_HVC, "fixed"), (FLAGS_SMC, "changed"), (ADDED, "new")]
    assert cmp.regressions == [] and cmp.exit_code() == 0


def test_a_new_test_that_fails_is_a_regression(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "default")
    _write(new / "default", add=[(ADDED, PSCI_HVC)])
    assert G.compare_dirs(old, new).exit_code() == 0            # new and passing
    tree = ET.parse(new / "default" / "junit.xml")
    ET.SubElement(_case(tree.getroot(), ADDED), "error", message="guest did not come up")
    tree.write(new / "default" / "junit.xml")
    cmp = G.compare_dirs(old, new)
    assert [(c.scenario, c.kind, c.new) for _, c in cmp.regressions] == [(ADDED, "new", "error")]
    assert cmp.exit_code() == 1 and "[REGRESSION]" in G.format_comparison(cmp)


def test_a_kernel_on_one_side_only_is_named_not_compared(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "6.12", fail=[FLAGS_SMC])
    _write(new / "default")
    cmp = G.compare_dirs(old, new)
    assert [(k.kernel, k.only_in, k.tests) for k in cmp.kernels] == [("default", "NEW", 4), ("6.12", "OLD", 4)]
    view = G.format_comparison(cmp)
    assert "kernel 6.12: only in OLD (4 tests), not compared" in view and cmp.exit_code() == 0


# ---- smccc-harness compare ---------------------------------------------------------------------------------
def _compare(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "compare", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_compare_command_prints_the_view_per_kernel_and_exits_1_on_a_regression(dirs):
    old, new = dirs
    r = _compare(old, new)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"regressions: {old} -> {new}"
    assert lines[1:] == [
        "kernel 7.2: no changes (4 tests)",
        "kernel default:",
        "  newly failing (1):",
        f"    {FLAGS_SMC}  PASS -> FAIL: AssertionError: flags = 0, expected KVM_HYPERCALL_EXIT_SMC",
        "  fixed (1):",
        f"    {FLAGS_HVC}  FAIL -> PASS",
        "  new (1):",
        f"    {ADDED}  PASS",
        "  gone (1):",
        f"    {PSCI_SMC}  was PASS",
        "1 regressed (1 newly failing, 1 fixed, 1 new, 1 gone, 0 changed)",
    ]


def test_compare_command_exits_0_when_nothing_regressed(dirs):
    old, _ = dirs
    r = _compare(old, old)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "nothing regressed (0 newly failing, 0 fixed, 0 new, 0 gone, 0 changed)"
    assert "kernel default: no changes (4 tests)" in r.stdout


def test_compare_command_on_a_directory_that_is_not_a_matrix_output_exits_2_with_a_hint(dirs, tmp_path):
    old, _ = dirs
    (tmp_path / "plain" / "sub").mkdir(parents=True)
    r = _compare(old, tmp_path / "plain")
    assert r.returncode == 2 and r.stdout == ""
    assert f"error: NEW {tmp_path / 'plain'} is not a matrix output directory: no <kernel>/junit.xml" in r.stderr
    assert "hint: pass the --out directory of `smccc-harness matrix`" in r.stderr
    assert "Traceback" not in r.stderr


def test_compare_command_on_unparseable_junit_exits_2_naming_the_file(dirs):
    old, new = dirs
    (old / "7.2" / "junit.xml").write_text("<testsuites><testsuite name='pytest'>")    # cut short
    r = _compare(old, new)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"error: cannot read {old / '7.2' / 'junit.xml'} as JUnit XML" in r.stderr and "hint:" in r.stderr


@pytest.mark.parametrize("content, message", [
    ('{"tests": []}', "as JUnit XML"),                                         # another format altogether
    ("<?xml version='1.0'?><report><case/></report>", "is XML but not JUnit (root element <report>"),
])
def test_a_baseline_in_another_format_is_bad_input(tmp_path, content, message):
    (tmp_path / "old" / "default").mkdir(parents=True)
    (tmp_path / "old" / "default" / "junit.xml").write_text(content)
    with pytest.raises(HarnessError, match=re.escape(message)) as e:
        G.read_matrix_dir(tmp_path / "old")
    assert "smccc-harness matrix" in e.value.hint


def test_missing_directory_is_bad_input(tmp_path):
    with pytest.raises(HarnessError, match="is not a directory") as e:
        G.read_matrix_dir(tmp_path / "nope", "OLD")
    assert e.value.hint


# ---- matrix --baseline ---------------------------------------------------------------------------------------
def test_matrix_report_only_with_baseline_puts_the_regressions_above_the_table(dirs, capsys):
    old, new = dirs
    rc = cli.main(["matrix", "--report-only", str(new), "--kernels", "default", "7.2", "--baseline", str(old)])
    assert rc == 1
    out = capsys.readouterr().out
    assert f"    {FLAGS_SMC}  PASS -> FAIL: AssertionError" in out and "1 regressed (1 newly failing" in out
    page = (new / "report.html").read_text()
    m = re.search(r'<section id="regressions">(.*?)</section>', page, re.DOTALL)
    assert m, page[:2000]
    assert page.index('id="regressions"') < page.index("<th>scenario</th>")      # above the full table
    section = m.group(1)
    rows = re.findall(r'<tr data-kind="([^"]+)"><td>[^<]*</td><td class=s>([^<]+)</td>', section)
    assert rows == [("newly failing", FLAGS_SMC), ("fixed", FLAGS_HVC), ("new", ADDED), ("gone", PSCI_SMC)]
    assert "1 regressed" in section and "7.2: no changes (4 tests)" in section


def test_matrix_report_only_without_baseline_has_no_regressions_section_and_keeps_its_exit(dirs):
    _, new = dirs
    assert cli.main(["matrix", "--report-only", str(new), "--kernels", "default", "7.2"]) == 1   # FLAGS_SMC fails
    assert 'id="regressions"' not in (new / "report.html").read_text()


def test_matrix_baseline_with_only_old_failures_exits_0(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "default", fail=[FLAGS_SMC])
    _write(new / "default", fail=[FLAGS_SMC])
    assert cli.main(["matrix", "--report-only", str(new), "--kernels", "default"]) == 1
    assert cli.main(["matrix", "--report-only", str(new), "--kernels", "default", "--baseline", str(old)]) == 0


def test_matrix_with_a_bad_baseline_exits_2_before_running_any_kernel(tmp_path, monkeypatch, capsys):
    def no_pytest(*a, **kw):
        raise AssertionError("a kernel's pytest ran despite the bad baseline")
    monkeypatch.setattr(M.subprocess, "run", no_pytest)
    (tmp_path / "prev").mkdir()
    rc = cli.main(["matrix", "--kernels", "default", "--out", str(tmp_path / "out"), "--baseline", str(tmp_path / "prev")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--baseline" in err and "is not a matrix output directory" in err and "hint:" in err
    assert not (tmp_path / "out").exists()


# ---- documentation ---------------------------------------------------------------------------------------------
def test_readme_and_module_docstring_have_the_same_exit_code_table():
    def rows(text):
        return [ln for ln in text.splitlines() if re.match(r"\| [^|]+ \| \d \|$", ln.strip())]
    doc = rows(G.__doc__)
    readme = (ROOT / "README.md").read_text()
    assert [int(r.strip().rsplit("|", 2)[1]) for r in doc] == sorted(G.EXIT.values())
    assert all(r.strip() in readme for r in doc), doc
