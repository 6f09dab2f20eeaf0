"""Upstream's own arm64 KVM selftests, built from the kernel's own source, run in the same booted guest.

The kernel under test's source is Debian's ``linux-source-X.Y`` of the same version (or the tree in
``$SMCCC_SELFTESTS_SRC``); harness/kdev/selftests.py builds the programs statically with the cross compiler
(cached by source hash), sends each into the guest (agent ``put``) and runs it with a deadline (agent
``exec``).  The program's exit code and output become kselftest runner KTAP (harness/kdev/tap.py), and that
becomes one pytest result per upstream case: these programs report one case each (they print no KTAP of
their own), so a case is a program run, in a variant:

* ``el2``: upstream's default.  Its library gives every vCPU ``KVM_ARM_VCPU_HAS_EL2`` when the kernel has
  ``KVM_CAP_ARM_EL2`` (lib/arm64/processor.c ``vm_supports_el2()``; docs/kvm-smccc-abi.md §1.3),
  so the guest code runs at vEL2: smccc_filter's guest calls with SMC only (``test_runs_at_el2()``), and
  ``do_smccc()`` (psci_test, hypercalls, kvm-uuid) picks SMC at EL2, HVC at EL1.
  Every nested VM costs seconds of set-up and teardown under TCG, hence ``slow`` for the programs that
  create many (smccc_filter 8+, psci_test 3 with 2 vCPUs).
* ``el1``: ``NV=0``, a plain EL1 vCPU: smccc_filter's guest calls with HVC and SMC.

Node ids: ``tests/system/test_upstream_selftests.py::test_selftest_<program>[<variant>]``, so
``pytest -k selftest_smccc_filter`` runs one program.  A program that exits with KSFT_SKIP (4) is a skip whose
reason is the program's own (``1..0 # SKIP - Requirement not met: ...``); its KTAP file, the seconds it took
and its output are attached to the report (``user_properties``: selftest_tap, selftest_seconds,
selftest_output) and printed when it fails.  Documentation: docs/selftests.md.
"""

from __future__ import annotations

import os

import pytest

from harness.kdev import selftest_build as sb
from harness.kdev import selftests

# program -> its variants, and the variants kept out of the default run for their TCG cost (docs/selftests.md)
PROGRAMS = {
    "smccc_filter": ("el2", "el1"),  # the filter ABI and FWD_TO_USER exits: docs/kvm-smccc-abi.md §1.1, §1.2, §3.1
    "psci_test": ("el2", "el1"),  # KVM's PSCI: CPU_ON, SYSTEM_SUSPEND, SYSTEM_OFF2: docs/kvm-smccc-abi.md §2.3, §3.2
    "hypercalls": ("el2", "el1"),  # firmware pseudo-register bitmaps hide SMCCC services: §1.4, §3.3
    "hello_el2": ("el2",),  # a HAS_EL2 vCPU enters at vEL2 with E2H set: docs/kvm-smccc-abi.md §1.3, §3.3
    "kvm-uuid": ("el2", "el1"),  # VENDOR_HYP CALL_UID through do_smccc (SMC at vEL2, HVC at EL1): §3.3
    "set_id_regs": ("el1",),  # prints KTAP: one pytest item per ID register field (docs/kvm-smccc-abi.md §1.3)
}
SLOW = {("smccc_filter", "el2"), ("psci_test", "el2"), ("hypercalls", "el2")}
_RUNS: dict[tuple[str, str, str], selftests.SelftestRun] = {}  # (guest run dir, program, variant) -> its run


@pytest.fixture(scope="session")
def selftest_build(request):
    """The static binaries of PROGRAMS (those the tree has), built once per cache key."""
    spec = request.config.getoption("--kernel")
    src = os.environ.get("SMCCC_SELFTESTS_SRC")
    if not src and ("/" in spec or os.path.exists(spec)):
        pytest.skip(f"--kernel {spec} is a file and SMCCC_SELFTESTS_SRC is unset: no source to build the "
                    "selftests from")
    source = sb.resolve_source(src, spec)
    present, _ = sb.resolve_tests(source.tree, PROGRAMS)
    return sb.build(source, list(present))


def _marks(program: str, variant: str) -> list:
    marks = [pytest.mark.upstream]      # a tier of its own: harness/plugin/tiers.py
    if program in selftests.NV_SENSITIVE or variant == "el1":
        marks.append(getattr(pytest.mark, variant))
    if (program, variant) in SLOW:
        marks.append(pytest.mark.slow)
    return marks


def _attach(request, name: str, value) -> None:
    """A report property (JUnit <property>, report.user_properties) without record_property's xunit2 warning."""
    request.node.user_properties.append((name, value))


def _program_run(program: str, variant: str, guest, selftest_build, request) -> selftests.SelftestRun:
    """The program's run in this guest (one per guest, program and variant), attached to the report."""
    if program not in selftest_build.binaries:
        pytest.skip(f"{selftest_build.source.label} has no arm64 KVM selftest {program!r}")
    key = (str(guest.run_dir), program, variant)
    if key not in _RUNS:
        run = selftests.run_in_guest(guest, selftest_build, program, selftests.VARIANTS[variant])
        selftests.save_run(run, guest.run_dir)
        selftests.record_cases(run, selftest_build.source.label)
        _RUNS[key] = run
    run = _RUNS[key]
    _attach(request, "selftest_tap", str(guest.run_dir / "selftests" / f"{program}-{variant}.tap"))
    _attach(request, "selftest_seconds", run.seconds)
    _attach(request, "selftest_source", selftest_build.source.label)
    return run


def _make_test(program: str):
    @pytest.mark.parametrize("variant", [pytest.param(v, marks=_marks(program, v), id=v) for v in PROGRAMS[program]])
    def test(variant, guest, selftest_build, request):
        run = _program_run(program, variant, guest, selftest_build, request)
        _attach(request, "selftest_output", run.output[-8000:])
        outcome, why = selftests.outcome(run)
        if outcome == "skipped":
            pytest.skip(f"upstream {program}: {why}")
        if outcome == "xfail":
            pytest.xfail(f"upstream {program}: {why}")
        failed = [n for n, r in selftests.cases_of(run) if r.outcome == "failed"]
        assert outcome == "passed", (
            f"upstream {program} ({variant}, {selftest_build.source.label}) failed: {why}"
            + (f"; failed cases: {', '.join(failed)}" if failed else "") + f"\n--- KTAP ---\n{run.tap_text}")

    test.__name__ = f"test_selftest_{program.replace('-', '_')}"
    test.__doc__ = (f"Upstream's tools/testing/selftests/kvm {program} exits 0 (or skips with its own reason) in "
                    f"the guest: variants {', '.join(PROGRAMS[program])}.")
    return test


def _case_id(variant: str, case: str) -> str:
    return f"{variant}-" + "".join(c if c.isalnum() or c in "._=" else "_" for c in case)


def _make_case_test(program: str):
    """One item per case of a program that prints KTAP (names: pytest_generate_tests below); before any list
    of its cases is known, one item per variant that skips saying so."""
    def test(variant, case, guest, selftest_build, request):
        run = _program_run(program, variant, guest, selftest_build, request)
        if case is None:
            pytest.skip(f"no case list of upstream {program} ({variant}) for {selftest_build.source.label} yet: "
                        f"test_selftest_{program}[{variant}] records it; the next collection has one item per case")
        outcome, why = selftests.case_outcome(run, case)
        _attach(request, "selftest_case_output", why[-4000:])
        if outcome == "skipped":
            pytest.skip(f"upstream {program}: {case}: {why}")
        if outcome == "missing":
            pytest.skip(f"case list is from another build; {why}")
        if outcome == "xfail":
            pytest.xfail(f"upstream {program}: {case}: {why}")
        assert outcome == "passed", f"upstream {program} ({variant}) case {case!r} failed:\n{why}\n--- KTAP ---\n" \
                                    f"{run.tap_text}"

    test.__name__ = f"test_selftest_{program}_case"
    test.__doc__ = f"Each KTAP case of upstream's {program} passes, or skips with upstream's reason."
    test.selftest_program = program
    return test


def pytest_generate_tests(metafunc):
    """Case names of KTAP programs: from their last run on this kernel's source, or the committed snapshot."""
    program = getattr(metafunc.function, "selftest_program", None)
    if program is None:
        return
    spec = metafunc.config.getoption("--kernel")
    label = None if os.environ.get("SMCCC_SELFTESTS_SRC") else selftests.expected_source_label(spec)
    params = []
    for v in PROGRAMS[program]:
        cases = selftests.known_cases(program, v, label)
        params += [pytest.param(v, c, marks=_marks(program, v), id=_case_id(v, c)) for c in cases]
        if not cases:
            params.append(pytest.param(v, None, marks=_marks(program, v), id=f"{v}-cases_unknown"))
    metafunc.parametrize("variant, case", params)


test_selftest_smccc_filter = _make_test("smccc_filter")
test_selftest_psci_test = _make_test("psci_test")
test_selftest_hypercalls = _make_test("hypercalls")
test_selftest_hello_el2 = _make_test("hello_el2")
test_selftest_kvm_uuid = _make_test("kvm-uuid")
test_selftest_set_id_regs = _make_test("set_id_regs")
test_selftest_set_id_regs_case = _make_case_test("set_id_regs")
