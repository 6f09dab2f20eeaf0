"""``smccc-harness matrix``: the suite over several kernels, one pytest subprocess per kernel.

    smccc-harness matrix --kernels 6.12 7.2 default [--out DIR] [-n 2] [-- extra pytest args]

Per kernel ``K`` (a Debian spec, a package via ``pkg:NAME[/SUITE]``, or an Image path) it runs
``python3 -m pytest tests/system -m 'not slow and not infra' --kernel K --junitxml OUT/K/junit.xml --results-dir OUT/K/runs``;
the run directories keep each guest's console log, a per-test console slice (``tests/*.console.log``) and the
handler traces.  On stdout, as it goes: ``kernel 1/3 6.12: started``, then ``kernel 1/3 6.12: finished: 120
passed, 1 failed, 0 errors, 3 skipped, 0 xfailed (pytest exit 1, 95.2 s)``.  Then it writes ``OUT/report.html``
(links relative to OUT: the directory can be copied, e.g. as a CI artifact) and prints the same scenario x
kernel table.  Exit code:
0 when every kernel ran and nothing failed, 1 when a test failed or errored, 2 when a kernel's run broke
(pytest usage/internal error, no JUnit file, or no test selected: a kernel that ran nothing is not a green one).  With ``--baseline PREV_DIR`` (an earlier matrix's OUT) it also
prints and reports the regressions against it (harness/kdev/regressions.py), and the exit code is theirs: 0 nothing
regressed, 1 a regression, 2 a kernel's run broke or the baseline is not a matrix output.  Failures that
images/known-issues.toml lists (``--known-issues FILE``; harness/kdev/known_issues.py) are known, not regressions.
``--baseline`` may be repeated (or take several directories): they are the last nights, placed by their run time;
the newest is compared and report.html gets each test's history over all of them and this run
(harness/kdev/history.py).  report.html also shows per kernel the counts (known issues apart) and the slowest
tests as duration bars; ``--screenshot PNG`` photographs it with headless Chromium (harness/kdev/browser.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import paths
from ..errors import HarnessError
from . import history, regressions, shards
from .report import KernelRun, format_matrix, read_junit, write_html

DEFAULT_KERNELS = ("6.12", "7.2", "default")
# per kernel: the KVM behaviour suite and upstream's selftests; the harness's own plumbing (infra) is tested
# once, on the default kernel, by ./smccc-harness test (harness/plugin/tiers.py)
KERNEL_MARKERS = "not slow and not infra"
# tests of the harness's own commands (they start their own pytest/QEMU on the default kernel): not per kernel
NOT_PER_KERNEL = ("tests/system/test_kernel_workflow.py", "tests/system/test_bisect.py")


def default_sigint() -> None:
    """In the child: SIGINT back to default.  A CI job started in the background (``cmd &``) has SIGINT
    ignored, the pytest child would inherit that, and Ctrl-C-style teardown (tests/system/test_faults.py)
    could not be exercised."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def label_dir(label: str) -> str:
    """A short directory name for a kernel label (unix socket paths under it must stay < 108 bytes)."""
    if "/" in label and not label.startswith("pkg:"):
        return f"{Path(label).name}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"
    return (re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("_") or "kernel")[:64]


def pytest_argv(kernel: str, out: Path, markers: str, k: str | None, workers: int, accel: str,
                extra: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "pytest", "tests/system", *(f"--ignore={t}" for t in NOT_PER_KERNEL), "-m", markers,
            "-q", "-p", "no:cacheprovider",
            "--kernel", kernel, "--accel", accel, f"--junitxml={out / 'junit.xml'}",
            "--results-dir", str(out / "runs")]
    if k:
        argv += ["-k", k]
    if workers > 1:
        argv += ["-n", str(workers)]
    return argv + list(extra)


COUNT_WORDS = (("passed", "passed"), ("failed", "failed"), ("error", "errors"), ("skipped", "skipped"),
               ("xfailed", "xfailed"))


def kernel_started_line(i: int, n: int, spec: str) -> str:
    """The progress line printed when kernel ``i`` (1-based) of ``n`` starts."""
    return f"kernel {i}/{n} {spec}: started"


def kernel_finished_line(i: int, n: int, spec: str, run: KernelRun, rc: int, seconds: float) -> str:
    """The progress line printed when kernel ``i`` of ``n`` finished: its counts, pytest's exit, its time."""
    if run.junit is None:
        return f"kernel {i}/{n} {spec}: finished without results (pytest exit {rc}, {seconds:.1f} s)"
    c = run.counts()
    counts = ", ".join(f"{c.get(k, 0)} {word}" for k, word in COUNT_WORDS)
    return f"kernel {i}/{n} {spec}: finished: {counts} (pytest exit {rc}, {seconds:.1f} s)"


def run_matrix(kernels: list[str], out: Path, *, markers: str = KERNEL_MARKERS, k: str | None = None, workers: int = 1,
               accel: str = "auto", extra: list[str] = (), progress=print) -> list[KernelRun]:
    out.mkdir(parents=True, exist_ok=True)
    runs: list[KernelRun] = []
    for i, spec in enumerate(kernels, 1):
        progress(kernel_started_line(i, len(kernels), spec))
        d = out / label_dir(spec)
        d.mkdir(parents=True, exist_ok=True)
        junit = d / "junit.xml"
        if junit.exists():
            junit.unlink()
        argv = pytest_argv(os.path.abspath(spec) if os.path.exists(spec) else spec, d, markers, k, workers, accel,
                           list(extra))
        progress(f"[{spec}] $ {' '.join(shlex.quote(a) for a in argv)}")
        t0 = time.monotonic()
        with open(d / "pytest.log", "w") as log:
            rc = subprocess.run(argv, cwd=paths.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, check=False, preexec_fn=default_sigint).returncode
        dt = time.monotonic() - t0
        if junit.is_file():
            run = read_junit(junit, spec)
        else:
            run = KernelRun(label=spec)
        run.note = f"pytest exit {rc} in {dt:.0f} s; log {d / 'pytest.log'}"
        progress(kernel_finished_line(i, len(kernels), spec, run, rc, dt))
        runs.append(run)
    return runs


def exit_status(runs: list[KernelRun], *, empty_ok: bool = False) -> int:
    """0 all ran and passed, 1 a test failed or errored, 2 a kernel's run broke: no JUnit file, pytest exit 2-4,
    or exit 5 (nothing selected), unless ``empty_ok`` (a ``--shard`` slice by test may hold no test of a kernel)."""
    broke = (2, 3, 4) if empty_ok else (2, 3, 4, 5)
    if any(r.junit is None or any(f"pytest exit {rc} " in r.note for rc in broke) for r in runs):
        return 2
    if any(c["failed"] or c["error"] for c in (r.counts() for r in runs)):
        return 1
    return 0


def main(args) -> int:
    out = Path(args.out or (paths.results_root() / f"matrix-{time.strftime('%Y%m%d-%H%M%S')}")).resolve()

    def say(msg: str) -> None:
        print(f"[smccc-harness matrix] {msg}", flush=True)

    # the baselines are read first: a bad one fails before the runs (exit 2, with a hint); so does a bad
    # known-issues file (it also sorts the per-kernel counts)
    nights = regressions.read_nights([Path(d) for d in args.baseline], "--baseline") if args.baseline else []
    baseline = nights[-1].runs if nights else None
    known = regressions.known_issues_for_cli(args.known_issues)
    size = None
    if args.screenshot:      # a bad file name or window size fails before the runs too
        from . import browser
        browser.check_png_path(Path(args.screenshot))
        size = browser.parse_size(args.screenshot_size)
    if args.shard and (args.merge or args.report_only):
        raise HarnessError("--shard runs one slice of the matrix; --merge and --report-only run nothing",
                           "run each CI job with --shard i/N, then one job with --merge DIR... --out OUT")
    broken = False
    if args.merge:     # the --out directories of the N `--shard i/N` jobs -> one matrix directory (shards.py)
        manifests, junits = shards.merge([Path(d) for d in args.merge], out, label_dir)
        runs = [read_junit(j, label) for label, j in junits]
        broken = any(m.get("status") == 2 for m in manifests)
        say(f"merged {len(manifests)} shards ({manifests[0]['unit']}s; harness {manifests[0]['harness_commit']})")
    elif args.report_only:
        out = Path(args.report_only).resolve()
        runs = [read_junit(out / label_dir(k) / "junit.xml", k) for k in args.kernels
                if (out / label_dir(k) / "junit.xml").is_file()]
    else:
        kernels = shards.plan(list(args.kernels), args.shard) if args.shard else list(args.kernels)
        extra = shards.extra_args(args.shard, list(args.kernels)) if args.shard else []
        runs = run_matrix(kernels, out, markers=args.markers, k=args.k, workers=args.workers,
                          accel=args.accel, extra=extra + list(args.pytest_args), progress=say)
        if args.shard:   # OUT/shard.json: which slice, which harness commit (harness/kdev/shards.py)
            sel = shards.selection(args.markers, args.k, list(args.pytest_args))
            say(f"shard {args.shard}: {shards.write_manifest(out, args.shard, list(args.kernels), sel, exit_status(runs, empty_ok=True))}")
    table = format_matrix(runs)
    (out / "report.txt").write_text(table + "\n")
    cmp = None
    current = {label_dir(r.label): r for r in runs if r.junit is not None}
    if baseline is not None:
        cmp = regressions.compare_runs(baseline, current, str(Path(nights[-1].name).resolve()), str(out), known)
    strip = [*nights, history.night("this run", current, need_time=False)] if nights else []
    # links relative to out (logs from elsewhere copied under out/logs)
    page = write_html(runs, out, regressions=regressions.render_html(cmp) if cmp is not None else "",
                      history=history.render_html(strip, known) if strip else "",
                      known={r.label: history.known_for(r, label_dir(r.label), known) for r in runs})
    print(format_matrix(runs, brief=True) if args.brief else table)
    if cmp is not None:
        print(regressions.format_comparison(cmp))
    if len(strip) > 2:
        print(history.format_history(strip, known))
    say(f"report: {page} (text: {out / 'report.txt'})")
    if args.screenshot:     # headless Chromium from Debian's packages, installed through sysdeps when missing
        from . import browser
        browser.ensure_chromium(progress=say)
        png = browser.screenshot(page, Path(args.screenshot), size)
        say(f"screenshot: {png} ({png.stat().st_size // 1024} KB)")
    if args.kcidb:     # KCIDB JSON from the same JUnit files (harness/kdev/kcidb.py); bad input: exit 2
        from . import kcidb
        no_junit = [(r, out / label_dir(r.label) / "pytest.log") for r in runs if r.junit is None]
        say(kcidb.write_kcidb([(r.junit, r.label) for r in runs if r.junit is not None], Path(args.kcidb), no_junit))
    status = 2 if broken else exit_status(runs, empty_ok=bool(args.shard))
    return status if cmp is None or status == 2 else cmp.exit_code()


def add_cli(sub) -> None:
    p = sub.add_parser("matrix", help="run the suite over several kernels; JUnit XML per kernel + report.html")
    p.add_argument("--kernels", nargs="+", default=list(DEFAULT_KERNELS),
                   help=f"kernel specs or Image paths (default: {' '.join(DEFAULT_KERNELS)})")
    p.add_argument("--out", default=None, help="output directory (default: runs/matrix-<time>)")
    p.add_argument("-m", "--markers", default=KERNEL_MARKERS,
                   help=f"pytest -m expression (default: {KERNEL_MARKERS!r}: the KVM tests and upstream's selftests)")
    p.add_argument("-k", default=None, help="pytest -k expression")
    p.add_argument("-n", "--workers", type=int, default=1, help="pytest-xdist workers per kernel (each boots its VM)")
    p.add_argument("--accel", default=os.environ.get("SMCCC_ACCEL", "auto"), choices=("auto", "tcg", "kvm"))
    p.add_argument("--kcidb", metavar="FILE", default=None,
                   help="also write the results as KernelCI KCIDB JSON (from the JUnit files; harness/kdev/kcidb.py)")
    p.add_argument("--brief", action="store_true",
                   help="terminal table: only scenarios that did not pass everywhere (report.txt/html stay complete)")
    p.add_argument("--report-only", metavar="DIR", default=None,
                   help="no runs: rebuild the table and report.html from DIR/*/junit.xml of an earlier matrix")
    regressions.add_known_issues_option(p)      # with --baseline
    p.add_argument("--baseline", metavar="PREV_DIR", nargs="+", action="extend", default=[],
                   help="an earlier matrix's --out directory: print and report what newly fails, was fixed, is new "
                        "or gone; the exit code then says whether anything regressed (see `compare`).  Repeat it "
                        "(or give several) for the last nights: placed by run time, the newest is compared, and "
                        "report.html shows each test's history over them (harness/kdev/history.py)")
    p.add_argument("--screenshot", metavar="PNG", default=None,
                   help="also photograph report.html with headless Chromium (Debian's chromium, installed when "
                        "missing; harness/kdev/browser.py), e.g. docs/report.png")
    p.add_argument("--screenshot-size", metavar="WxH", default="1280x1600",
                   help="the browser window of --screenshot (default 1280x1600)")
    p.add_argument("--shard", metavar="i/N", type=shards.shard_arg, default=None,
                   help="run slice i of N (one CI job of N): whole kernels when there are >= N, else the tests "
                        "whose node id hashes to i; writes OUT/shard.json (harness/kdev/shards.py)")
    p.add_argument("--merge", metavar="DIR", nargs="+", default=None,
                   help="no runs: join the --out directories of all N --shard jobs into --out (one report, "
                        "--kcidb file and --baseline view)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p.set_defaults(func=main)
    regressions.add_cli(sub)     # smccc-harness compare OLD NEW
