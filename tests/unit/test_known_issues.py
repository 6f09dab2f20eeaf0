"""Known issues for nightly runs (images/known-issues.toml, harness/kdev/known_issues.py) over recorded JUnit data:
a listed failure is known, not a regression; an expired entry fails naming it; a listed test that passes is
reported; bad files exit 2 through ``smccc-harness compare``; the repo's file agrees with known_bad.py."""

from __future__ import annotations

import ast
import datetime as dt
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import cli
from harness.errors import HarnessError
from harness.kdev import known_issues as K
from harness.kdev import matrix as M
from harness.kdev import regressions as G
from harness.kdev.report import read_junit
from harness.model.known_bad import KNOWN_BAD

ROOT = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).parent / "data" / "junit" / "matrix_default.xml"    # kernel 7.3.4, 4 tests, all pass

FLAGS_SMC = "test_forwarding_el1::test_hypercall_flags_name_the_conduit[smc-1]"
PSCI_HVC = "test_forwarding_el1::test_psci_version_exits_to_userspace_with_function_id[hvc]"
FLAGS_SMC_ID = "tests/system/test_forwarding_el1.py::test_hypercall_flags_name_the_conduit[smc-1]"
PSCI_HVC_ID = "tests/system/test_forwarding_el1.py::test_psci_version_exits_to_userspace_with_function_id[hvc]"
TODAY = dt.date(2026, 12, 3)


def _write(kernel_dir: Path, fail: dict[str, str] | None = None, xfail=()) -> Path:
    """The recorded JUnit file as ``kernel_dir/junit.xml``; ``fail``: scenario -> failure message."""
    root = ET.fromstring(RECORDED.read_text().replace("@KERNEL_DIR@", str(kernel_dir)))
    for tc in root.iter("testcase"):
        s = f"{tc.get('classname', '').rsplit('.', 1)[-1]}::{tc.get('name')}"
        if s in (fail or {}):
            ET.SubElement(tc, "failure", message=(fail or {})[s])
        if s in xfail:
            ET.SubElement(tc, "skipped", type="pytest.xfail", message="known bad on 7.3")
    kernel_dir.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(kernel_dir / "junit.xml", encoding="utf-8", xml_declaration=True)
    return kernel_dir / "junit.xml"


def _entry(test=FLAGS_SMC_ID, kernel="7.3", expires="2099-12-31", **more) -> str:
    fields = {"kernel": f'"{kernel}"', "test": f'"{test}"', "reason": '"flags are 0 on smc"',
              "link": '"https://lore.kernel.org/kvmarm/flags"', "expires": expires, **more}
    return "[[issue]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items() if v is not None)


def _known(tmp_path: Path, *entries: str, header: str = "# known issues\n") -> Path:
    p = tmp_path / "known-issues.toml"
    p.write_text(header + "\n".join(entries))
    return p


@pytest.fixture
def dirs(tmp_path):
    """OLD: all pass on 'default' (7.3.4); NEW: FLAGS_SMC fails there."""
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "default")
    _write(new / "default", fail={FLAGS_SMC: "AssertionError: flags = 0, expected KVM_HYPERCALL_EXIT_SMC"})
    return old, new


def _compare(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "compare", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


# ---- matching ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern, version, hit", [
    ("7.3", "7.3.4+deb13-cloud-arm64", True), ("7.3", "7.3", True), ("7.3", "7.3-rc2", True),
    ("7.3", "7.30.1", False), ("7.3", "7.2.13+deb13-cloud-arm64", False), ("7.3.4", "7.3.4+deb13-cloud-arm64", True),
    ("7.3.4", "7.3.40", False), ("7.3.*", "7.3.4+deb13-cloud-arm64", True), ("7.3.*", "7.3", False),
    ("7.[23].*", "7.2.13", True), ("*", "default", True), ("default", "default", True),
])
def test_kernel_patterns_are_a_series_prefix_or_fnmatch(pattern, version, hit):
    assert K.kernel_matches(pattern, version) is hit


def test_node_ids_map_to_the_scenario_names_of_the_junit_files(tmp_path):
    run = read_junit(_write(tmp_path / "default"), "default")
    assert K.scenario_of(FLAGS_SMC_ID) == FLAGS_SMC and FLAGS_SMC in run.results
    assert K.scenario_of("tests/system/test_x.py::TestC::test_y[a]") == "TestC::test_y[a]"


# ---- the comparison ----------------------------------------------------------------------------------------
def test_a_listed_failure_is_known_not_a_regression(dirs, tmp_path):
    old, new = dirs
    assert G.compare_dirs(old, new).exit_code() == 1                     # without the file: a regression
    known = K.load(_known(tmp_path, _entry()), today=TODAY)
    cmp = G.compare_dirs(old, new, known)
    assert cmp.regressions == [] and cmp.exit_code() == 0
    (default,) = cmp.kernels
    assert [(s, o, e.test) for s, o, e in default.known] == [(FLAGS_SMC, "failed", FLAGS_SMC_ID)]
    view = G.format_comparison(cmp)
    where = f"{tmp_path / 'known-issues.toml'}:2"
    assert f"    {FLAGS_SMC}  PASS -> FAIL: AssertionError: flags = 0, expected KVM_HYPERCALL_EXIT_SMC  [known: {where}]" \
        in view.splitlines()
    assert "  known (1):" in view and f"flags are 0 on smc (https://lore.kernel.org/kvmarm/flags; {where}" in view
    assert view.splitlines()[-1].startswith("nothing regressed (1 newly failing") and "; 1 known" in view


def test_an_entry_for_another_kernel_covers_nothing(dirs, tmp_path):
    cmp = G.compare_dirs(*dirs, K.load(_known(tmp_path, _entry(kernel="7.2")), today=TODAY))
    assert [(k, c.scenario) for k, c in cmp.regressions] == [("default", FLAGS_SMC)] and cmp.exit_code() == 1
    assert cmp.kernels[0].known == []


def test_a_known_failure_that_also_failed_last_night_is_listed_as_known(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        _write(d / "default", fail={FLAGS_SMC: "AssertionError: flags = 0"})
    cmp = G.compare_dirs(old, new, K.load(_known(tmp_path, _entry()), today=TODAY))
    view = G.format_comparison(cmp).splitlines()
    assert view[1:3] == ["kernel default: no changes (4 tests)", "  known (1):"] and cmp.exit_code() == 0


def test_an_expired_entry_fails_naming_it_and_covers_nothing(dirs, tmp_path):
    old, new = dirs
    path = _known(tmp_path, _entry(test=PSCI_HVC_ID), _entry(expires="2020-01-31"))
    cmp = G.compare_dirs(old, new, K.load(path, today=TODAY))
    assert [e.test for e in cmp.expired] == [FLAGS_SMC_ID]
    assert [c.scenario for _, c in cmp.regressions] == [FLAGS_SMC]        # the failure is a regression again
    assert cmp.exit_code() == 1
    r = _compare(old, old, "--known-issues", path)                        # nothing changed: the entry alone fails
    assert r.returncode == 1, r.stdout + r.stderr
    assert (f"expired known issue {path}:9: {FLAGS_SMC_ID} (kernel 7.3) expired on 2020-01-31: check whether it "
            "still fails, then renew its expires date or remove the entry") in r.stdout.splitlines()
    assert r.stdout.splitlines()[-1] == ("nothing regressed, 1 known issue(s) expired (0 newly failing, 0 fixed, 0 new, "
                                         "0 gone, 0 changed); 1 known no longer failing")


def test_the_expiry_day_itself_still_holds():
    e = K.parse(_entry(expires="2026-12-03"), today=TODAY).entries[0]
    assert not e.expired(TODAY) and e.expired(TODAY + dt.timedelta(days=1))


def test_a_listed_test_that_passes_is_reported_for_removal(dirs, tmp_path):
    old, new = dirs
    path = _known(tmp_path, _entry(), _entry(test=PSCI_HVC_ID))
    r = _compare(old, new, "--known-issues", path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    i = lines.index("  known issue no longer fails: remove the entry (1):")
    assert lines[i + 1] == (f"    {PSCI_HVC}  PASS: known issue no longer fails: remove the entry: {path}:9 "
                            f"({PSCI_HVC_ID}, kernel 7.3)")
    assert lines[-1] == ("nothing regressed (1 newly failing, 0 fixed, 0 new, 0 gone, 0 changed); 1 known, "
                         "1 known no longer failing")


def test_a_strict_xpass_is_not_covered_and_is_reported_as_no_longer_failing(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "default", xfail=[FLAGS_SMC])
    _write(new / "default", fail={FLAGS_SMC: "[XPASS(strict)] known bad on 7.3 (harness/model/known_bad.py)"})
    cmp = G.compare_dirs(old, new, K.load(_known(tmp_path, _entry()), today=TODAY))
    assert [c.scenario for _, c in cmp.regressions] == [FLAGS_SMC] and cmp.exit_code() == 1
    assert [(s, o) for s, o, _ in cmp.kernels[0].stale] == [(FLAGS_SMC, "failed")]
    assert "XPASS(strict): known issue no longer fails: remove the entry" in G.format_comparison(cmp)


def test_an_xfail_of_a_listed_test_is_known_not_a_failure_and_not_stale(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _write(old / "default", xfail=[FLAGS_SMC])
    _write(new / "default", xfail=[FLAGS_SMC])
    cmp = G.compare_dirs(old, new, K.load(_known(tmp_path, _entry()), today=TODAY))
    assert [(s, o) for s, o, _ in cmp.kernels[0].known] == [(FLAGS_SMC, "xfailed")]
    assert cmp.kernels[0].stale == [] and cmp.exit_code() == 0


def test_matrix_baseline_uses_the_file_in_its_output_and_report(dirs, tmp_path, capsys):
    old, new = dirs
    argv = ["matrix", "--report-only", str(new), "--kernels", "default", "--baseline", str(old)]
    assert cli.main(argv + ["--known-issues", str(tmp_path / "empty.toml")]) == 2     # a missing file: bad input
    (tmp_path / "empty.toml").write_text("# nothing known\n")
    assert cli.main(argv + ["--known-issues", str(tmp_path / "empty.toml")]) == 1
    capsys.readouterr()
    assert cli.main(argv + ["--known-issues", str(_known(tmp_path, _entry()))]) == 0
    assert "  known (1):" in capsys.readouterr().out
    section = re.search(r'<section id="regressions">(.*?)</section>', (new / "report.html").read_text(), re.DOTALL)
    assert section and f'<tr data-kind="known"><td>known</td><td class=s>{FLAGS_SMC}</td>' in section.group(1)


def test_matrix_with_a_bad_known_issues_file_exits_2_before_running_any_kernel(dirs, tmp_path, monkeypatch, capsys):
    def no_pytest(*a, **kw):
        raise AssertionError("a kernel's pytest ran despite the bad known-issues file")
    monkeypatch.setattr(M.subprocess, "run", no_pytest)
    bad = _known(tmp_path, _entry(expires='"soon"'))
    rc = cli.main(["matrix", "--kernels", "default", "--out", str(tmp_path / "out"), "--baseline", str(dirs[0]),
                   "--known-issues", str(bad)])
    assert rc == 2 and "expires = 'soon' is not a date" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- bad input: exit 2 through the CLI -------------------------------------------------------------------------
BAD = [
    ("invalid-toml", "[[issue]]\nkernel = 7.3.x\n", "is not valid TOML"),
    ("missing-field", _entry(link=None), ":1: entry without link"),
    ("bad-date", _entry(expires='"2027-02-30"'), ":1: expires = '2027-02-30' is not a date: give YYYY-MM-DD"),
    ("bad-date-literal", _entry(expires="2027-13-01"), "is not valid TOML"),
    ("datetime", _entry(expires="2027-01-01T10:00:00"), "has a time: give a date"),
    ("unknown-file", _entry(test="tests/system/test_nope.py::test_x"),
     ":1: unknown test id 'tests/system/test_nope.py::test_x': no file"),
    ("unknown-function", _entry(test="tests/system/test_forwarding_el1.py::test_flags[smc-1]"),
     "defines no test_flags"),
    ("unknown-param", _entry(test="tests/system/test_forwarding_el1.py::test_hypercall_flags_name_the_conduit[smc-9]"),
     "ran test_forwarding_el1::test_hypercall_flags_name_the_conduit only as [hvc-0], [smc-1]"),
    ("not-a-node-id", _entry(test="test_hypercall_flags_name_the_conduit"), "is not a pytest node id"),
    ("unknown-field", _entry(owner='"me"'), "unknown field 'owner'"),
    ("empty-reason", _entry(reason='""'), "reason must be a non-empty string"),
    ("known-bad-key", _entry(known_bad='"no_such_bug"'), "known_bad = 'no_such_bug' is not in harness/model/known_bad.py"),
    ("known-bad-series", _entry(known_bad='"hcd_undef_elr_after_hvc"', kernel="6.12"),
     "known_bad 'hcd_undef_elr_after_hvc' is measured on 7.2, 7.3"),
]


@pytest.mark.parametrize("text, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_known_issues_file_exits_2_with_a_clear_message(dirs, tmp_path, text, message):
    old, new = dirs
    path = tmp_path / "known-issues.toml"
    path.write_text(text)
    r = _compare(old, new, "--known-issues", path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: known issues: ") and message in r.stderr, r.stderr
    assert "hint: fix the entry; the format is in the header comment of images/known-issues.toml" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_a_missing_known_issues_file_exits_2(dirs, tmp_path):
    r = _compare(*dirs, "--known-issues", tmp_path / "nope.toml")
    assert r.returncode == 2 and f"cannot read {tmp_path / 'nope.toml'}" in r.stderr


def test_an_unknown_parametrisation_is_not_checked_when_the_runs_did_not_run_that_function(dirs, tmp_path):
    entry = _entry(test="tests/system/test_nested_el2.py::test_hcd_undef_at_vel2_returns_to_the_hvc_itself[e2h7]")
    assert G.compare_dirs(*dirs, K.load(_known(tmp_path, entry), today=TODAY)).exit_code() == 1   # only FLAGS_SMC
    with pytest.raises(HarnessError, match=re.escape("defines no test_hcd_undef")):
        K.parse(entry.replace("test_hcd_undef_at", "test_hcd_undef"), today=TODAY)


# ---- the repo's file ---------------------------------------------------------------------------------------
def test_the_repo_file_lists_the_hcd_undef_bug_on_7_2_and_7_3_for_both_variants():
    known = K.load(K.FILE, today=TODAY)
    hcd = [e for e in known.entries if e.known_bad == "hcd_undef_elr_after_hvc"]
    base = "tests/system/test_nested_el2.py::test_hcd_undef_at_vel2_returns_to_the_hvc_itself"
    assert sorted((e.kernel, e.test) for e in hcd) == [(k, f"{base}[{v}]") for k in ("7.2", "7.3")
                                                         for v in ("e2h0", "e2h")]
    assert all(e.reason and e.link for e in hcd)
    assert all(re.fullmatch(r"images/known-issues\.toml:\d+", e.where) for e in hcd)


def test_a_kernel_that_carries_the_fix_has_no_known_hcd_issue():
    """7.3.4 built with patches/linux (release 7.3.4-kvm-nv-hcd-elr, harness/model/known_bad.py fixed_by): the HCD
    entries do not cover it, so its passing test is not reported as "known issue no longer fails"."""
    known = K.load(K.FILE, today=TODAY)
    assert {e.known_bad for e in known.for_kernel("7.3.4")} == {"hcd_undef_elr_after_hvc"}
    assert [e for e in known.for_kernel("7.3.4-kvm-nv-hcd-elr") if e.known_bad == "hcd_undef_elr_after_hvc"] == []


def test_every_known_bad_entry_is_listed_for_its_series_by_the_tests_that_use_it():
    """One kernel bug, two places: known_bad.py makes the test a strict xfail on its series, the file says the
    failure is known there.  They must agree: same series, and the listed tests are the ones using the entry."""
    entries = K.load(K.FILE, today=TODAY).entries
    for key, kb in KNOWN_BAD.items():
        listed = [e for e in entries if e.known_bad == key]
        assert {e.kernel for e in listed} == {f"{a}.{b}" for a, b in kb.series}, key
        for e in listed:
            source = (ROOT / e.test.split("::")[0]).read_text()
            fn = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)
                      and n.name == e.test.split("::")[1].split("[")[0])
            assert f'KNOWN_BAD["{key}"]' in ast.get_source_segment(source, fn), (key, e.test)


def test_readme_documents_the_file_and_its_kernel_patterns():
    readme = (ROOT / "README.md").read_text()
    para = next(p for p in readme.split("\n\n") if p.startswith("**Known issues for nightly runs.**"))
    assert "images/known-issues.toml" in para and '"7.3"' in para and '"7.3.*"' in para and "--known-issues" in para
