"""``smccc-harness bisect``: outcome -> exit code mapping for ``git bisect run`` (git-bisect(1), "Bisect run":
0 good, 1-127 except 125 bad, 125 skip, other codes abort)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import plugin
from harness.cli import main as cli_main
from harness.kdev import bisect as B

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rc,counts,outcome", [
    (0, B.Counts(passed=3), "good"),
    (0, B.Counts(passed=2, xfailed=1), "good"),          # an xfail is known-bad behaviour gated to this version
    (1, B.Counts(passed=2, failed=1), "bad"),
    (1, B.Counts(failed=1, errors=2), "bad"),           # a real failure wins over later boot errors
    (1, B.Counts(errors=2), "boot"),                     # setup errors only: the guest did not come up
    (1, B.Counts(passed=1, errors=1, crashes=1), "crash"),  # the kernel crashed in a fixture: bad, not 125
    (1, B.Counts(passed=3, after_last_test="kernel WARNING: x"), "crash"),  # splat after the last test
    (1, B.Counts(passed=3), "infra"),                    # pytest failed the session, no test case says why
    (0, B.Counts(skipped=4), "skipped"),                 # everything skipped: a missing capability
    (0, B.Counts(passed=1, skipped=3), "skipped"),       # a lost capability must not bisect as good
    (5, B.Counts(), "no_tests"),
    (2, None, "usage"), (3, None, "usage"), (4, None, "usage"),
    (1, None, "infra"),                                  # no JUnit file: pytest broke before reporting
    (-9, None, "infra"),                                 # pytest killed
    (0, B.Counts(), "no_tests"),                         # exit 0 with nothing run is not "good"
])
def test_pytest_result_classifies_to_outcome(rc, counts, outcome):
    assert B.classify(rc, counts) == outcome


@pytest.mark.parametrize("counts,outcome", [
    (B.Counts(passed=1, skipped=3), "good"),             # --skips-ok: the expected skips are accepted ...
    (B.Counts(skipped=3), "skipped"),                    # ... but nothing that ran is still not good
    (B.Counts(passed=1, skipped=1, failed=1), "bad"),
    (B.Counts(passed=1, skipped=1, errors=1, crashes=1), "crash"),
])
def test_skips_ok_accepts_skips_next_to_passes_only(counts, outcome):
    assert B.classify(0 if outcome in ("good", "skipped") else 1, counts, skips_ok=True) == outcome


@pytest.mark.parametrize("outcome,code", [("good", 0), ("bad", 1), ("crash", 1), ("build", 125), ("skipped", 125),
                                          ("boot", 125), ("infra", 125), ("no_tests", 128), ("usage", 128)])
def test_outcome_maps_to_git_bisect_code(outcome, code):
    assert B.exit_code(outcome) == code


def test_only_kernel_evidence_lands_in_the_bad_range_and_nothing_exceeds_128():
    bad_range = {c for c in range(1, 128) if c != 125}
    assert [o for o, c in B.OUTCOMES.items() if c in bad_range] == ["bad", "crash"]
    assert max(B.OUTCOMES.values()) == 128


def test_module_docstring_table_is_OUTCOMES():
    rows = {}
    for line in B.__doc__.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in B.OUTCOMES:
            rows[cells[0]] = int(cells[2])
    assert rows == B.OUTCOMES


def _table_codes(text: str) -> dict[str, int]:
    """Rows of a markdown table whose last cell starts with an exit code: first cell -> code."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (m := re.match(r"(\d+)\b", cells[-1])):
            out[cells[0]] = int(m.group(1))
    return out


def _expected_row(row: str) -> str:
    r = row.lower()
    for key, outcome in (("no test", "no_tests"), ("lacks a capability", "skipped"), ("did not boot", "boot"),
                         ("infrastructure", "infra"), ("kernel crashed", "crash"), ("after the last test", "crash"),
                         ("assertion fails", "bad"), ("assertions hold", "good")):
        if key in r:
            return outcome
    raise AssertionError(f"unknown outcome row {row!r}")


@pytest.mark.parametrize("doc", ["plugin", "README"])
def test_documented_outcome_tables_match_the_code(doc):
    text = plugin.__doc__ if doc == "plugin" else (REPO / "README.md").read_text().split("## Outcomes", 1)[1]
    rows = _table_codes(text.split("\n## ", 1)[0])
    assert len(rows) >= 7, rows
    for row, code in rows.items():
        assert code == B.OUTCOMES[_expected_row(row)], f"{doc}: {row!r} says {code}"


def test_junit_of_a_real_pytest_run_counts_each_kind(tmp_path):
    (tmp_path / "test_kinds.py").write_text(textwrap.dedent("""
        import pytest
        @pytest.fixture
        def broken():
            raise RuntimeError("guest did not come up")
        def test_ok(): pass
        def test_bad(): assert 1 == 2
        def test_skip(): pytest.skip("KVM_CAP_ARM_EL2 is 0")
        def test_setup_error(broken): pass
    """))
    junit = tmp_path / "j.xml"
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-c", "/dev/null",
                         f"--junitxml={junit}", str(tmp_path / "test_kinds.py")], cwd=tmp_path,
                        capture_output=True, check=False).returncode
    c = B.parse_junit(junit)
    assert (rc, c.passed, c.failed, c.errors, c.skipped) == (1, 1, 1, 1, 1)
    assert [n.rsplit("::", 1)[-1] for n in c.failed_names] == ["test_bad"]
    assert [n.rsplit("::", 1)[-1] for n in c.skipped_names] == ["test_skip"]
    assert B.classify(rc, c) == "bad"


def _run_with_plugin(tmp_path, body: str) -> tuple[int, B.Counts]:
    """A real pytest run with harness.plugin loaded (its setup-error classification), as bisect runs it."""
    (tmp_path / "test_x.py").write_text(textwrap.dedent(body))
    junit = tmp_path / "j.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                        "-p", "harness.plugin", "-c", "/dev/null", f"--junitxml={junit}", str(tmp_path / "test_x.py")],
                       cwd=tmp_path, capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert junit.is_file(), p.stdout + p.stderr
    return p.returncode, B.parse_junit(junit)


def test_a_kernel_crash_in_a_module_fixture_bisects_bad(tmp_path):
    """The fixture's scenario hit a panic (a GuestError carrying the console finding): 1, not 125."""
    rc, c = _run_with_plugin(tmp_path, """
        import pytest
        from harness.model.splats import scan_failures
        from harness.errors import GuestError
        @pytest.fixture(scope="module")
        def run():
            e = GuestError("guest kernel failure while running eof: kernel panic")
            e.finding = scan_failures("Kernel panic - not syncing: Oops: Fatal exception\\n")[0]
            raise e
        def test_uses_it(run): pass
        def test_other(): pass
    """)
    assert (rc, c.passed, c.errors, c.crashes) == (1, 1, 1, 1)
    assert (B.classify(rc, c), B.exit_code(B.classify(rc, c))) == ("crash", 1)


def test_a_guest_that_never_booted_bisects_skip(tmp_path):
    """A boot failure (the pool tags it smccc_phase=boot), even one whose console shows a panic: 125."""
    rc, c = _run_with_plugin(tmp_path, """
        import pytest
        from harness.machine.console import ConsoleFailure
        from harness.model.splats import scan_failures
        @pytest.fixture
        def booted():
            e = ConsoleFailure("kernel panic after 1.2 s", kind="failure",
                               finding=scan_failures("Kernel panic - not syncing: VFS\\n")[0])
            e.smccc_phase = "boot"
            try:
                raise e
            except ConsoleFailure as err:
                pytest.fail(f"guest did not come up: {err}", pytrace=False)
        def test_needs_a_guest(booted): pass
    """)
    assert (rc, c.errors, c.crashes) == (1, 1, 0)
    assert (B.classify(rc, c), B.exit_code(B.classify(rc, c))) == ("boot", 125)


def test_passed_plus_skipped_is_125_unless_skips_ok(tmp_path):
    rc, c = _run_with_plugin(tmp_path, """
        import pytest
        def test_ok(): pass
        def test_el2(): pytest.skip("kernel 7.3: KVM_CAP_ARM_EL2 is 0")
        @pytest.mark.xfail(strict=True, reason="known bad")
        def test_known(): assert 0
    """)
    assert (rc, c.passed, c.skipped, c.xfailed) == (0, 1, 1, 1)
    assert B.classify(rc, c) == "skipped"
    assert B.classify(rc, c, skips_ok=True) == "good"


def test_selection_without_a_path_runs_tests_system(tmp_path):
    argv = B.pytest_argv(["-k", "flags and smc"], "/k/Image", tmp_path / "j.xml")
    assert argv[-1] == "tests/system"
    assert argv[argv.index("--kernel") + 1] == "/k/Image"


def test_selection_with_a_node_id_is_used_as_given(tmp_path):
    sel = ["tests/system/test_forwarding_el1.py::test_hypercall_flags_name_the_conduit", "-k", "smc"]
    assert B.pytest_argv(sel, "/k/Image", tmp_path / "j.xml")[-3:] == sel


def test_missing_selection_aborts_the_bisect(capsys):
    assert cli_main(["bisect", "--no-build", "--image", "/nonexistent"]) == 128


def test_no_build_without_an_image_is_a_skip_not_bad(tmp_path):
    assert cli_main(["bisect", "--no-build", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--", "-k", "x"]) == 125


def test_build_failure_is_a_skip(tmp_path):
    """A tree that is not a kernel tree fails to build: 125, never 1."""
    assert cli_main(["bisect", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--", "-k", "x"]) == 125


def test_a_harness_crash_is_a_skip_not_bad(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise ZeroDivisionError("harness bug")
    monkeypatch.setattr(B, "run_step", boom)
    assert cli_main(["bisect", "--src", str(tmp_path), "--", "-k", "x"]) == 125


def test_no_tests_collected_against_a_real_kernel_file_aborts(tmp_path):
    """pytest exit 5 (the -k matched nothing) is 128 even though the kernel never booted."""
    img = tmp_path / "Image"
    img.write_bytes(b"\0" * 0x38 + b"ARM\x64" + b"\0" * 64)
    outcome, detail = B.run_step(["-k", "no_such_test_name_anywhere"], src=tmp_path, build=False, kernel=str(img))
    assert (outcome, B.exit_code(outcome)) == ("no_tests", 128), detail
