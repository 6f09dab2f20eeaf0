"""``smccc-harness bisect``: one ``git bisect run`` step inside a kernel tree.

    git bisect start BAD GOOD
    git bisect run smccc-harness bisect -- -k "test_hypercall_flags_name_the_conduit and smc"

Each step builds the checked-out tree (harness/kdev/kbuild.py: persistent O=, ccache; incremental after a
checkout), boots it, runs the selected tests in a pytest subprocess, and exits with the code ``git bisect run``
understands (git-bisect(1), "Bisect run": 0 good, 1-127 except 125 bad, 125 skip, anything else aborts the
bisect).  ``OUTCOMES`` below is the only place outcomes map to exit codes (the table in harness/plugin/__init__.py's
docstring and the README's "Outcomes" are checked against it by tests/unit/test_bisect.py):

| outcome   | what happened                                                         | exit |
|-----------|-----------------------------------------------------------------------|------|
| good      | every selected test ran and passed or xfailed (console clean); with --skips-ok some may have skipped | 0 |
| bad       | a selected test failed: an assertion, or an Oops/WARNING/BUG/panic/lockdep splat attributed to it | 1 |
| crash     | a selected test errored because the guest kernel crashed (splat or panic on the console) in a fixture, its teardown, or between tests; or the kernel printed one after the last test | 1 |
| build     | the kernel did not build                                              | 125  |
| skipped   | a selected test was skipped (a capability is missing) and --skips-ok was not given, or every selected test skipped | 125 |
| boot      | the guest did not come up at all (panic at boot, no agent banner in time): setup errors only | 125 |
| infra     | harness/infrastructure failure (QEMU missing, asset download, pytest killed, no JUnit report) | 125 |
| no_tests  | pytest collected nothing (exit 5): the selection is wrong             | 128  |
| usage     | pytest usage error, internal error or interrupt (exit 2, 3, 4)        | 128  |

Why a skip is not "good": a kernel that lost KVM_CAP_ARM_EL2, E2H0 or the SMCCC filter turns the tests that
need it into skips; calling that step good would let a regression that removes a capability bisect as good.
``--skips-ok`` is for selections that are expected to skip part of their parametrisation on every commit.
How a setup error is told apart: the plugin records a ``smccc_error`` property on the test case (JUnit)
naming ``kernel_crash`` (a console finding, harness/plugin/scanning.py ``_error_kind``), ``boot`` or ``error``; output
after the last test is the suite property ``smccc_after_last_test``.

A test failure is never 128+ or 255 (which would abort the bisect), and "no tests collected" is never good.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from .. import paths
from ..errors import HarnessError

GOOD, BAD, SKIP, ABORT = 0, 1, 125, 128

OUTCOMES: dict[str, int] = {
    "good": GOOD,
    "bad": BAD,
    "crash": BAD,
    "build": SKIP,
    "skipped": SKIP,
    "boot": SKIP,
    "infra": SKIP,
    "no_tests": ABORT,
    "usage": ABORT,
}

# pytest.ExitCode values (kept as ints so this module imports without pytest)
PYTEST_OK, PYTEST_FAILED, PYTEST_INTERRUPTED, PYTEST_INTERNAL, PYTEST_USAGE, PYTEST_NO_TESTS = range(6)


@dataclass
class Counts:
    """What a JUnit XML file says happened (pytest --junitxml)."""

    passed: int = 0
    failed: int = 0  # a <failure>: the test's call phase failed (assertion, console splat)
    errors: int = 0  # an <error>: setup/teardown failed (the guest did not come up)
    skipped: int = 0
    xfailed: int = 0  # a <skipped type="pytest.xfail">: known-bad behaviour, gated per version, that held
    crashes: int = 0  # errors whose test case carries smccc_error=kernel_crash (a console finding)
    after_last_test: str = ""  # suite property smccc_after_last_test: a splat printed after the last test
    failed_names: list[str] = field(default_factory=list)
    error_names: list[str] = field(default_factory=list)
    skipped_names: list[str] = field(default_factory=list)


def parse_junit(path: Path) -> Counts:
    c = Counts()
    root = ET.parse(path).getroot()
    for suite in root.iter("testsuite"):
        for prop in suite.findall("properties/property"):
            if prop.get("name") == "smccc_after_last_test":
                c.after_last_test = prop.get("value", "")
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        kinds = {child.tag: child for child in tc}
        props = {p.get("name"): p.get("value") for p in tc.findall("properties/property")}
        if "failure" in kinds:
            c.failed += 1
            c.failed_names.append(name)
        elif "error" in kinds:
            c.errors += 1
            c.error_names.append(name)
            if props.get("smccc_error") == "kernel_crash":
                c.crashes += 1
        elif "skipped" in kinds:
            if kinds["skipped"].get("type") == "pytest.xfail":
                c.xfailed += 1
            else:
                c.skipped += 1
                c.skipped_names.append(name)
        else:
            c.passed += 1
    return c


def classify(pytest_rc: int, counts: Counts | None, *, skips_ok: bool = False) -> str:
    """The outcome (a key of OUTCOMES) of one pytest run, from its exit code and its JUnit counts.

    ``skips_ok`` (``bisect --skips-ok``): a step where some selected tests skipped and the rest passed is good.
    """
    if pytest_rc == PYTEST_NO_TESTS:
        return "no_tests"
    if pytest_rc in (PYTEST_INTERRUPTED, PYTEST_INTERNAL, PYTEST_USAGE):
        return "usage"
    if pytest_rc not in (PYTEST_OK, PYTEST_FAILED) or counts is None:
        return "infra"  # pytest died (signal, crash) or wrote no report: not evidence about the kernel
    if counts.failed:
        return "bad"
    if counts.crashes or counts.after_last_test:
        return "crash"
    if counts.errors:
        return "boot"
    if pytest_rc == PYTEST_FAILED:
        return "infra"  # pytest failed the session yet no test case says why: not evidence about the kernel
    if counts.skipped and (not skips_ok or not (counts.passed or counts.xfailed)):
        return "skipped"
    if counts.passed or counts.xfailed:
        return "good"
    return "no_tests"


def exit_code(outcome: str) -> int:
    return OUTCOMES[outcome]


def has_path_arg(args: list[str]) -> bool:
    """Does a pytest argument list name a file/dir/node id?  (If not, the bisect runs tests/system.)"""
    takes_value = {"-k", "-m", "-p", "-c", "-o", "--kernel", "--accel", "--qemu-bin", "--junitxml", "--junit-xml",
                   "--results-dir", "--boot-timeout", "--smp", "--memory", "--append", "--rootdir", "-n",
                   "--deselect", "--ignore", "--kernel-pkg", "--timeout"}
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in takes_value:
            skip = True
            continue
        if not a.startswith("-"):
            return True
    return False


def pytest_argv(selection: list[str], kernel: str, junit: Path, extra: list[str] = ()) -> list[str]:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--kernel", kernel,
            f"--junitxml={junit}", *extra, *selection]
    if not has_path_arg(selection):
        argv.append("tests/system")
    return argv


def _say(msg: str) -> None:
    print(f"[smccc-harness bisect] {msg}", flush=True)


def run_step(selection: list[str], *, src: Path, build: bool = True, out: Path | None = None,
             kernel: str | None = None, jobs: int | None = None, timeout_s: float = 1800.0,
             extra_pytest: list[str] = (), skips_ok: bool = False) -> tuple[str, str]:
    """One bisect step; returns (outcome, one-line explanation).  Never raises for a kernel problem."""
    from . import kbuild, make
    t0 = time.monotonic()
    if build:
        try:
            res = kbuild.build(src, out, jobs=jobs, progress=_say)
        except make.KernelBuildError as e:
            return "build", str(e).splitlines()[0]
        except HarnessError as e:
            return "infra", str(e).splitlines()[0]
        kernel = str(res.image)
        _say(f"built {res.version} in {res.seconds:.1f} s: {res.image}")
    elif kernel is None:
        uses_llvm = os.environ.get("LLVM", "").strip() not in ("", "0")
        image = kbuild.resolve_out_dir(src, out, flavour=kbuild.out_flavour(llvm=uses_llvm)) / "arch" / "arm64" / "boot" / "Image"
        if not image.is_file():
            return "infra", f"--no-build: no {image}; build first or pass --kernel"
        kernel = str(image)
    # the step's JUnit file and guest run directories stay (runs/bisect-*), never in the kernel tree or /tmp
    step_dir = paths.new_run_dir("bisect", Path(os.environ.get("SMCCC_HARNESS_RESULTS") or paths.REPO_ROOT / "runs"))
    junit = step_dir / "junit.xml"
    argv = pytest_argv(selection, kernel, junit, ["--results-dir", str(step_dir), *extra_pytest])
    _say("$ " + " ".join(shlex.quote(a) for a in argv))
    try:
        # every bisect step boots a different kernel once: a warm-start snapshot would never be reused
        env = dict(os.environ, SMCCC_NO_SNAPSHOT=os.environ.get("SMCCC_NO_SNAPSHOT", "1"))
        rc = subprocess.run(argv, cwd=paths.REPO_ROOT, check=False, timeout=timeout_s, env=env,
                            stdin=subprocess.DEVNULL).returncode
    except subprocess.TimeoutExpired:
        return "infra", f"pytest did not finish within {timeout_s:.0f} s"
    counts = parse_junit(junit) if junit.is_file() else None
    outcome = classify(rc, counts, skips_ok=skips_ok)
    c = counts or Counts()
    detail = (f"pytest exit {rc}: {c.passed} passed, {c.failed} failed, {c.errors} errors "
              f"({c.crashes} kernel crashes), {c.skipped} skipped, {c.xfailed} xfailed "
              f"({time.monotonic() - t0:.1f} s)")
    if c.failed_names:
        detail += "; failed: " + ", ".join(c.failed_names[:3])
    if c.crashes:
        detail += "; kernel crashed in: " + ", ".join(c.error_names[:3])
    if c.after_last_test:
        detail += f"; after the last test the kernel printed: {c.after_last_test}"
    if outcome == "skipped" and c.skipped_names:
        detail += ("; skipped: " + ", ".join(c.skipped_names[:3])
                   + ("" if skips_ok else " (a skip is not good: pass --skips-ok if these skips are expected)"))
    return outcome, detail + f"; logs: {step_dir}"


def main(args) -> int:
    """CLI entry (harness/cli.py): run one step and exit with OUTCOMES[outcome]."""
    src = Path(args.src or os.getcwd()).resolve()
    selection = list(args.pytest_args)
    if not selection:
        _say("no test selection after '--' (e.g. -- -k 'test_hypercall_flags_name_the_conduit and smc')")
        return ABORT
    try:
        outcome, detail = run_step(selection, src=src, build=args.build, out=Path(args.out) if args.out else None,
                                   kernel=args.image, jobs=args.jobs, skips_ok=args.skips_ok)
    except Exception as e:  # noqa: BLE001 - the harness broke: never let a traceback become exit 1 (bad)
        outcome, detail = "infra", f"{type(e).__name__}: {e}"
    code = exit_code(outcome)
    head = _head(src)
    _say(f"{head or src}: {outcome} -> exit {code} ({detail})")
    return code


def _head(src: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, check=False, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def add_cli(sub) -> None:
    p = sub.add_parser("bisect", help="one 'git bisect run' step in a kernel tree: build, boot, run the selection; "
                                      "exit 0 good / 1 bad / 125 skip / 128 abort")
    p.add_argument("--build", dest="build", action="store_true", default=True,
                   help="build the tree first (default; a build failure exits 125)")
    p.add_argument("--no-build", dest="build", action="store_false", help="use --image, or the last build in --out")
    p.add_argument("--src", default=None, help="kernel tree (default: the current directory, as in git bisect run)")
    p.add_argument("--out", default=os.environ.get("SMCCC_BISECT_OUT"),
                   help="build directory O= (default: a persistent one per tree in the cache) [env SMCCC_BISECT_OUT]")
    p.add_argument("--image", default=None, help="with --no-build: the kernel to test")
    p.add_argument("-j", "--jobs", type=int, default=None)
    p.add_argument("--skips-ok", action="store_true",
                   help="a step where some selected tests skipped (missing capability) and the rest passed is good "
                        "(default: 125, a skip is not evidence that the commit is good)")
    p.add_argument("pytest_args", nargs="*", help="the pytest selection, after '--' (e.g. -k 'flags and smc')")
    p.set_defaults(func=main)
