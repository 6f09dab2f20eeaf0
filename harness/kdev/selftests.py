"""Upstream's own arm64 KVM selftests (``tools/testing/selftests/kvm``): build on the host, run in the guest.

Build (``smccc-harness selftests build [SRC]``)
    SRC is a kernel tree, or nothing: Debian's ``linux-source-X.Y`` whose version equals the kernel under test
    (``7.3.4-1~bpo13+1`` for the default kernel), fetched through the harness's private apt and unpacked once
    under ``<cache>/ksrc/<sha16>/`` (the layout harness.kdev.kbuild uses, so the two share one tree).  Nothing is
    written into the tree when it is clean: the UAPI headers are installed with ``O=`` into the build
    directory, the selftests are built with ``OUTPUT=`` there.  A tree that was built in place (it has a
    ``.config``) cannot take ``O=``; its headers are then made in place, as ``make kselftest`` would.

    Then ``make -C tools/testing/selftests/kvm ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-
    USERLDFLAGS=-static <the test targets>``, only the tests asked for (default :data:`DEFAULT_TESTS`).
    The stripped static binaries land in ``<cache>/selftests/<key>/bin/``; ``key`` hashes the recipe, the
    cross compiler and the source (a Debian source: its .deb's sha256; a tree: the content of what the
    build reads, see :func:`hash_tree`).  One file lock per key; binaries and the manifest are renamed into
    place, so a killed build leaves nothing half-written that a later run would trust.

Run (``smccc-harness selftests run``, ``tests/system/test_upstream_selftests.py``)
    Each binary is sent once per booted guest through the agent's ``put`` op into ``/tmp/selftests/<key>/``
    and run by the ``exec`` op under ``busybox timeout`` with a deadline, stdout and stderr merged.  Its exit
    code and output are written up the way kselftest's ``runner.sh`` does (``ok 1 selftests: kvm: NAME``,
    ``# SKIP`` for exit 4, ``# TIMEOUT``, ``# exit=N``, the program's output ``# ``-prefixed), and that KTAP
    document is parsed by :mod:`harness.kdev.tap`: a program that prints its own KTAP gets one result per case.

Variants: upstream's library gives every vCPU ``KVM_ARM_VCPU_HAS_EL2`` when ``KVM_CAP_ARM_EL2`` is present,
unless ``NV=0`` is in the environment (lib/arm64/processor.c ``vm_supports_el2()``).  Tests whose vCPUs come
from that default run twice: ``el2`` (no NV: the guest code runs at vEL2) and ``el1`` (``NV=0``).
``hello_el2`` asks for EL2 itself and runs once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from .selftest_build import (
    DEFAULT_TESTS,
    Build,
    SelftestError,
    Source,
    available_tests,
    build,
    progress_default,
    resolve_source,
    resolve_tests,
)
from .tap import TapDocument
from .tap import parse as parse_tap

KSFT_PASS, KSFT_FAIL, KSFT_XFAIL, KSFT_XPASS, KSFT_SKIP = 0, 1, 2, 3, 4


GUEST_DIR = "/tmp/selftests"


# tests whose vCPUs take upstream's default (HAS_EL2 when KVM_CAP_ARM_EL2): worth running with and without NV
NV_SENSITIVE = ("smccc_filter", "psci_test", "hypercalls", "kvm-uuid", "set_id_regs", "mmio_sign_ext")


# per-test deadline under TCG (seconds); nested VMs make teardown slow
DEFAULT_TIMEOUT_S = 300.0


# ==== run =========================================================================================
@dataclass
class Variant:
    name: str  # "el2" | "el1"
    env: dict[str, str]
    note: str


EL2 = Variant("el2", {}, "upstream default: vCPUs get KVM_ARM_VCPU_HAS_EL2 when KVM_CAP_ARM_EL2 is present")
EL1 = Variant("el1", {"NV": "0"}, "NV=0: upstream's library does not ask for HAS_EL2")
VARIANTS = {v.name: v for v in (EL2, EL1)}


def variants_of(test: str) -> list[Variant]:
    """hello_el2 asks for EL2 itself: one run.  NV-sensitive tests: el2 and el1."""
    return [EL2, EL1] if test in NV_SENSITIVE else [EL2]


@dataclass
class SelftestRun:
    test: str  # "smccc_filter"
    variant: str
    rc: int
    output: str  # stdout+stderr, merged
    seconds: float
    timed_out: bool
    tap_text: str  # runner.sh-style KTAP document
    tap: TapDocument

    @property
    def name(self) -> str:
        return self.test

    @property
    def result(self):
        """The TapResult of the binary (kselftest's one line per program)."""
        return self.tap.results[0]


def runner_tap(test: str, rc: int, output: str, timeout_s: float, timed_out: bool) -> str:
    """What kselftest's runner.sh prints for one program: header, ``# ``-prefixed output, one result line."""
    hdr = f"selftests: kvm: {test}"
    lines = ["TAP version 13", "1..1", f"# timeout set to {timeout_s:g}", f"# {hdr}"]
    lines += [f"# {ln}" if ln else "#" for ln in output.splitlines()]
    if timed_out:
        lines.append(f"not ok 1 {hdr} # TIMEOUT {timeout_s:g} seconds")
    elif rc == KSFT_PASS:
        lines.append(f"ok 1 {hdr}")
    elif rc == KSFT_SKIP:
        lines.append(f"ok 1 {hdr} # SKIP")
    elif rc == KSFT_XFAIL:
        lines.append(f"ok 1 {hdr} # XFAIL")
    else:
        lines.append(f"not ok 1 {hdr} # exit={rc}")
    return "\n".join(lines) + "\n"


_SENT: dict[str, set[str]] = {}  # guest run dir -> guest paths already put there


def send_binary(session, build: Build, test: str) -> str:
    """Put the binary into the guest once per booted guest; its guest path."""
    local = build.binaries[test]
    gpath = f"{GUEST_DIR}/{build.key}/{test}"
    sent = _SENT.setdefault(str(session.run_dir), set())
    if gpath not in sent:
        from .. import protocol as P
        data = local.read_bytes()
        r = session.request("put", {"path": gpath, "data": P.b64(data), "mode": 0o755}, deadline_s=60.0)
        if r.get("sha256") != hashlib.sha256(data).hexdigest():
            raise SelftestError(f"put {gpath}: the guest wrote sha256 {r.get('sha256')}, not the file's")
        sent.add(gpath)
    return gpath


def run_in_guest(session, build: Build, test: str, variant: Variant = EL2,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> SelftestRun:
    """Run one selftest binary in the booted guest, with a deadline; its KTAP written up like runner.sh."""
    gpath = send_binary(session, build, test)
    env = [f"{k}={v}" for k, v in variant.env.items()]
    # cd to the binary's directory like runner.sh; stderr into stdout; busybox timeout kills at the deadline
    script = 'cd "${1%/*}" && exec /bin/busybox timeout -s KILL "$0" "$@" 2>&1'
    argv = ["/bin/busybox", "env", *env, "/bin/busybox", "sh", "-c", script, f"{int(timeout_s)}", gpath]
    t0 = time.monotonic()
    r = session.request("exec", {"argv": argv, "timeout_s": timeout_s + 30}, deadline_s=timeout_s + 60)
    dt = time.monotonic() - t0
    rc = r["rc"]
    output = (r.get("stdout") or "") + (r.get("stderr") or "")
    timed_out = rc in (-9, 137) and dt >= timeout_s * 0.95
    text = runner_tap(test, rc, output, timeout_s, timed_out)
    return SelftestRun(test=test, variant=variant.name, rc=rc, output=output, seconds=round(dt, 3),
                       timed_out=timed_out, tap_text=text, tap=parse_tap(text))


def outcome(run: SelftestRun) -> tuple[str, str]:
    """("passed" | "failed" | "skipped" | "xfail", reason) of a whole program, reasons from its own output."""
    res = run.result
    if res.directive == "SKIP":
        return "skipped", skip_reason(run)
    if res.directive == "XFAIL":
        return "xfail", res.reason or "upstream reported XFAIL (exit 2)"
    if res.ok:
        return "passed", ""
    if run.timed_out:
        return "failed", f"timed out after {res.reason}"
    return "failed", f"exit code {run.rc}"


def skip_reason(run: SelftestRun) -> str:
    """The program's own skip reason: ``1..0 # SKIP reason`` or its last ``ok N # SKIP reason`` line."""
    res = run.result
    sub = res.subtests
    if sub is not None:
        if sub.skip_all is not None:
            return sub.skip_all or "upstream skipped every case (no reason given)"
        for r in reversed(sub.results):
            if r.directive == "SKIP" and r.reason:
                return r.reason
    return res.reason or f"upstream exited with KSFT_SKIP ({KSFT_SKIP}) without a reason"


def save_run(run: SelftestRun, run_dir: Path) -> Path:
    """``<run_dir>/selftests/<name>-<variant>.tap`` (the KTAP) next to a JSON summary."""
    d = Path(run_dir) / "selftests"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{run.name}-{run.variant}.tap"
    p.write_text(run.tap_text)
    o, why = outcome(run)
    (d / f"{run.name}-{run.variant}.json").write_text(json.dumps(
        {"test": run.test, "variant": run.variant, "rc": run.rc, "seconds": run.seconds, "outcome": o,
         "reason": why, "timed_out": run.timed_out}, indent=2) + "\n")
    return p


def _tests_arg(args, source: Source) -> list[str]:
    """The tests asked for that the tree has (explicit --tests: all must exist; the default set: a note)."""
    if args.all:
        return [t.rsplit("/", 1)[-1] for t in available_tests(source.tree)]
    if args.tests:
        return list(args.tests)
    present, missing = resolve_tests(source.tree, DEFAULT_TESTS)
    if missing:
        progress_default(f"{source.label} has no {', '.join(missing)}: not built")
    return list(present)


def cmd_build(args) -> int:
    t0 = time.monotonic()
    source = resolve_source(args.src, args.kernel)
    t1 = time.monotonic()
    b = build(source, _tests_arg(args, source), jobs=args.jobs)
    progress_default(f"source {source.label} ({source.version}) in {t1 - t0:.1f} s; "
                      f"build {'cached' if b.cached else 'compiled'} in {b.seconds:.1f} s; key {b.key}")
    for t, p in b.binaries.items():
        print(f"{t:<32} {p}")
    return 0


def cmd_run(args) -> int:
    from ..machine.guests import GuestOptions, new_session
    source = resolve_source(args.src, args.kernel)
    tests = _tests_arg(args, source)
    b = build(source, tests, jobs=args.jobs)
    progress_default(f"selftests of {source.label}: {'cached' if b.cached else 'built'} in {b.seconds:.1f} s")
    root = Path(args.results_dir).resolve() if getattr(args, "results_dir", None) else None
    s = new_session(GuestOptions.from_args(args), paths.new_run_dir("selftests_run", root), progress=progress_default)
    failed = 0
    with s:
        progress_default(f"guest ready in {s.timings.get('ready_s')} s; kernel {s.caps.get('uname')}; "
                          f"KVM_CAP_ARM_EL2={s.caps.get('KVM_CAP_ARM_EL2')}")
        for t in tests:
            for v in [VARIANTS[n] for n in args.variants] if args.variants else variants_of(t):
                if v is EL2 and t in NV_SENSITIVE and not s.caps.get("KVM_CAP_ARM_EL2"):
                    print(f"{t:<28} {v.name:<4} {'SKIPPED':<8} {0:7.2f}s  KVM_CAP_ARM_EL2 is 0: upstream's "
                          "default is EL1 here, the el1 run covers it", flush=True)
                    continue
                r = run_in_guest(s, b, t, v, timeout_s=args.timeout)
                save_run(r, s.run_dir)
                o, why = outcome(r)
                failed += o == "failed"
                print(f"{t:<28} {v.name:<4} {o.upper():<8} {r.seconds:7.2f}s  {why}", flush=True)
                if o == "failed" or args.verbose:
                    print(r.tap_text)
        progress_default(f"KTAP and summaries: {s.run_dir / 'selftests'}; console log: {s.console_log}")
    return 1 if failed else 0


def add_cli(sub) -> None:
    p = sub.add_parser("selftests", help="upstream's arm64 KVM selftests: build (static, cross) and run in the guest")
    ss = p.add_subparsers(dest="selftests_command", required=True)

    def common(q):
        q.add_argument("--kernel", default=os.environ.get("SMCCC_KERNEL", "default"),
                       help="the kernel under test; without SRC, Debian's linux-source of its version is built")
        q.add_argument("--tests", nargs="+", default=None,
                       help=f"tests to build/run, e.g. smccc_filter (default: {' '.join(DEFAULT_TESTS)})")
        q.add_argument("--all", action="store_true", help="every arm64 test of the tree")
        q.add_argument("-j", "--jobs", type=int, default=None)

    q = ss.add_parser("build", help="build the selftests from SRC (default: Debian's linux-source for --kernel)")
    q.add_argument("src", nargs="?", default=os.environ.get("SMCCC_SELFTESTS_SRC"))
    common(q)
    q.set_defaults(func=cmd_build)

    q = ss.add_parser("run", help="build (cached), boot the guest, run each test; KTAP under the run directory")
    q.add_argument("--src", default=os.environ.get("SMCCC_SELFTESTS_SRC"))
    common(q)
    q.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                   help="el2: upstream default (HAS_EL2 when KVM_CAP_ARM_EL2), el1: NV=0 (default: both for "
                        f"{', '.join(NV_SENSITIVE)}; el2 for the others)")
    q.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline per test run (s)")
    q.add_argument("-v", "--verbose", action="store_true", help="print every test's KTAP")
    q.add_argument("--accel", default=os.environ.get("SMCCC_ACCEL", "auto"), choices=("auto", "tcg", "kvm"))
    q.add_argument("--qemu-bin", default=paths.default_qemu_bin())
    q.add_argument("--boot-timeout", type=float, default=120.0)
    q.add_argument("--no-snapshot", action="store_true", help="cold-boot the guest")
    q.set_defaults(func=cmd_run, command="selftests-run")


# ==== per-case results of programs that print their own KTAP =======================================
def cases_of(run: SelftestRun) -> list[tuple[str, object]]:
    """(case name, TapResult) of the program's own KTAP (empty when it prints none); unnamed results
    (``ok 101 # SKIP reason``) are named ``case<N>``."""
    sub = run.result.subtests
    if sub is None:
        return []
    return [(r.name or f"case{r.number or i}", r) for i, r in enumerate(sub.results, 1)]


CASES_SNAPSHOT = paths.REPO_ROOT / "tests" / "system" / "data" / "selftest_cases.json"


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("_") or "source"


def _cases_path(test: str, variant: str, source_label: str) -> Path:
    return paths.cache_dir() / "selftests" / "cases" / _safe(source_label) / f"{test}-{variant}.json"


def record_cases(run: SelftestRun, source_label: str) -> None:
    """Remember the program's case names, so the next collection makes one pytest item per case."""
    names = [n for n, _ in cases_of(run)]
    sub = run.result.subtests
    if not names or sub is None or sub.errors:  # a partial list (the program died mid-plan) would hide cases
        return
    p = _cases_path(run.test, run.variant, source_label)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"test": run.test, "variant": run.variant, "source": source_label,
                               "cases": names}, indent=1) + "\n")
    os.replace(tmp, p)


def known_cases(test: str, variant: str, source_label: str | None) -> list[str]:
    """Case names of ``test`` built from ``source_label``: from its last run here (the cache), else from the
    snapshot committed in tests/system/data/selftest_cases.json (so a cold CI gets the items too)."""
    if not source_label:
        return []
    try:
        return list(json.loads(_cases_path(test, variant, source_label).read_text())["cases"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        snap = json.loads(CASES_SNAPSHOT.read_text())
    except (OSError, ValueError):
        return []
    return list(snap.get(source_label, {}).get(f"{test}-{variant}", []))


def expected_source_label(kernel_spec: str) -> str | None:
    """The label :func:`debian_source` will give for ``kernel_spec``, from images/lock.json alone (no apt):
    for naming pytest items at collection time.  None when the kernel is not locked (or is a file)."""
    from ..images.store import Store
    try:
        lock = Store(lambda *_: None).read_lock()
    except Exception:  # noqa: BLE001 - collection must not fail on a broken lock: no per-case items then
        return None
    names = lock.kernels.get(kernel_spec or "default")
    if not names or names[0] not in lock.packages:
        return None
    e = lock.packages[names[0]]
    m = re.search(r"-(\d+\.\d+)(?:\.\d+)?\+", e.name)
    return f"linux-source-{m.group(1)} {e.version}" if m else None


def case_outcome(run: SelftestRun, case: str) -> tuple[str, str]:
    """("passed" | "failed" | "skipped" | "xfail" | "missing", reason) of one case of the program's KTAP."""
    prog, why = outcome(run)
    sub = run.result.subtests
    if prog == "skipped" and (sub is None or sub.skip_all is not None or not sub.results):
        return "skipped", why  # the whole program skipped: every case does
    for name, r in cases_of(run):
        if name == case:
            o = {"todo": "xfail", "xpass": "passed"}.get(r.outcome, r.outcome)
            text = r.reason or "\n".join(r.diagnostics[-20:])
            return o, text
    if sub is not None and not sub.errors and not run.timed_out and run.rc in (KSFT_PASS, KSFT_SKIP):
        return "missing", f"{run.test} completed its plan ({sub.plan} cases) without a case {case!r}"
    return "failed", (f"{run.test} did not report case {case!r}: "
                      + ("; ".join(sub.errors) if sub is not None and sub.errors else f"exit code {run.rc}"))


def snapshot_cases(out: Path = CASES_SNAPSHOT) -> dict:
    """Merge every recorded case list of the cache into the committed snapshot (refresh it after new runs:
    ``python3 -c 'from harness.kdev.selftests import snapshot_cases; snapshot_cases()'``)."""
    snap = json.loads(out.read_text()) if out.exists() else {}
    for p in sorted((paths.cache_dir() / "selftests" / "cases").glob("*/*.json")):
        d = json.loads(p.read_text())
        snap.setdefault(d["source"], {})[f"{d['test']}-{d['variant']}"] = d["cases"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    return snap
