"""Upstream's own arm64 KVM selftests, built from the kernel's own source, run in the same booted guest.

The kernel under test's source is Debian's ``linux-source-X.Y`` of the same version (or the tree in
``$SMCCC_SELFTESTS_SRC``); harness/selftests.py builds the programs statically with the cross compiler
(cached by source hash), sends each into the guest (agent ``put``) and runs it with a deadline (agent
``exec``).  The program's exit code and output become kselftest runner KTAP (harness/tap.py), and that
becomes one pytest result per upstream case: these programs report one case each (they print no KTAP of
their own), so a case is a program run, in a variant:

* ``el2``: upstream's default.  Its library gives every vCPU ``KVM_ARM_VCPU_HAS_EL2`` when the kernel has
  ``KVM_CAP_ARM_EL2`` (lib/arm64/processor.c ``vm_supports_el2()``; ../shared/docs/kvm-smccc-abi.md §1.3),
  so the guest code runs at vEL2 and smccc_filter's guest calls with SMC only (``test_runs_at_el2()``).
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

from harness import selftests

# program -> its variants, and the variants kept out of the default run for their TCG cost (docs/selftests.md)
PROGRAMS = {
    "smccc_filter": ("el2", "el1"),  # the filter ABI and FWD_TO_USER exits: kvm-smccc-abi.md §1.1, §1.2, §3.1
    "psci_test": ("el2", "el1"),  # KVM's PSCI: CPU_ON, SYSTEM_SUSPEND, SYSTEM_OFF2: kvm-smccc-abi.md §2.3, §3.2
    "hypercalls": ("el2", "el1"),  # firmware pseudo-register bitmaps hide SMCCC services: §1.4, §3.3
    "hello_el2": ("el2",),  # a HAS_EL2 vCPU enters at vEL2 with E2H set: kvm-smccc-abi.md §1.3, §3.3
}
SLOW = {("smccc_filter", "el2"), ("psci_test", "el2"), ("hypercalls", "el2")}


@pytest.fixture(scope="session")
def selftest_build(request):
    """The static binaries of PROGRAMS (those the tree has), built once per cache key."""
    spec = request.config.getoption("--kernel")
    src = os.environ.get("SMCCC_SELFTESTS_SRC")
    if not src and ("/" in spec or os.path.exists(spec)):
        pytest.skip(f"--kernel {spec} is a file and SMCCC_SELFTESTS_SRC is unset: no source to build the "
                    "selftests from")
    source = selftests.resolve_source(src, spec)
    present, _ = selftests.resolve_tests(source.tree, PROGRAMS)
    return selftests.build(source, list(present))


def _params(program: str):
    out = []
    for v in PROGRAMS[program]:
        marks = [getattr(pytest.mark, v)] if program in selftests.NV_SENSITIVE else []
        if (program, v) in SLOW:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(v, marks=marks, id=v))
    return out


def _run_program(program: str, variant: str, guest, selftest_build, record_property) -> None:
    if program not in selftest_build.binaries:
        pytest.skip(f"{selftest_build.source.label} has no arm64 KVM selftest {program!r}")
    run = selftests.run_in_guest(guest, selftest_build, program, selftests.VARIANTS[variant])
    tap_path = selftests.save_run(run, guest.run_dir)
    record_property("selftest_tap", str(tap_path))
    record_property("selftest_seconds", run.seconds)
    record_property("selftest_output", run.output[-8000:])
    record_property("selftest_source", selftest_build.source.label)
    outcome, why = selftests.outcome(run)
    if outcome == "skipped":
        pytest.skip(f"upstream {program}: {why}")
    if outcome == "xfail":
        pytest.xfail(f"upstream {program}: {why}")
    assert outcome == "passed", (f"upstream {program} ({variant}, {selftest_build.source.label}) failed: {why}\n"
                                 f"--- KTAP ({tap_path}) ---\n{run.tap_text}")


def _make_test(program: str):
    @pytest.mark.parametrize("variant", _params(program))
    def test(variant, guest, selftest_build, record_property):
        _run_program(program, variant, guest, selftest_build, record_property)

    test.__name__ = f"test_selftest_{program}"
    test.__doc__ = (f"Upstream's tools/testing/selftests/kvm {program} passes (or skips with its own reason) in "
                    f"the guest, per variant ({', '.join(PROGRAMS[program])}).")
    return test


test_selftest_smccc_filter = _make_test("smccc_filter")
test_selftest_psci_test = _make_test("psci_test")
test_selftest_hypercalls = _make_test("hypercalls")
test_selftest_hello_el2 = _make_test("hello_el2")
