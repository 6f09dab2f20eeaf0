"""Regressions against an earlier matrix: ``smccc-harness compare OLD NEW`` and ``matrix --baseline OLD``.

Both sides are matrix output directories (``<dir>/<kernel>/junit.xml``, harness/kdev/matrix.py); kernels are
matched by their directory name, tests by scenario name (``test_module::test_name[param]``).  Per kernel
each test that differs falls in one kind (``KINDS``):

* ``newly failing`` — failed or errored now, did not before (passed, skipped or xfailed): a regression;
* ``fixed`` — failed or errored before, passes (or xfails) now;
* ``new`` — only in NEW; one that fails or errors is a regression too (nothing says it ever worked, but
  nightly CI must not stay green over it);
* ``gone`` — only in OLD;
* ``changed`` — any other change of outcome: skip <-> pass, pass <-> xfail, failed <-> error, failed -> skipped.

Known issues (images/known-issues.toml, harness/kdev/known_issues.py): a failure the file lists for that kernel is
shown as known and is no regression; a listed test that passes is reported ("known issue no longer fails: remove
the entry"); an expired entry fails the comparison (exit 1) naming it.

Exit codes (``EXIT``; README has the same table):

| outcome | exit |
|---|---|
| nothing regressed | 0 |
| a regression: a test newly fails, or a new test fails (not a listed known issue); or a known issue expired | 1 |
| bad input: not a matrix output directory (no `<kernel>/junit.xml`), a JUnit file that is not JUnit XML, or a bad known-issues file | 2 |

Several earlier directories (``compare NIGHT... NEW``, ``matrix --baseline`` repeated) are nights: they are placed
by their run time, the newest is the one compared, and all of them make the history strip (harness/kdev/history.py).

``classify()`` and ``compare_runs()`` are pure (outcomes in, a :class:`Comparison` out);
``read_matrix_dir()`` reads a directory; ``format_comparison()`` / ``render_html()`` show the result.
"""

from __future__ import annotations

import html
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HarnessError
from . import history
from .known_issues import KnownIssue, KnownIssues, failed_for_real
from .known_issues import add_option as add_known_issues_option
from .known_issues import for_cli as known_issues_for_cli
from .report import SYMBOL, KernelRun, read_junit

EXIT = {"ok": 0, "regressed": 1, "bad_input": 2}
KINDS = ("newly failing", "fixed", "new", "gone", "changed")
BAD = ("failed", "error")
GOOD = ("passed", "xfailed")
JUNIT = "junit.xml"


# ---- pure comparison ---------------------------------------------------------------------------------------
def classify(old: str | None, new: str | None) -> str | None:
    """The kind of change of one test from outcome ``old`` to ``new`` (None: absent on that side), or None
    when nothing changed."""
    if old is None and new is None:
        return None
    if old is None:
        return "new"
    if new is None:
        return "gone"
    if old == new:
        return None
    if new in BAD and old not in BAD:
        return "newly failing"
    if old in BAD and new in GOOD:
        return "fixed"
    return "changed"


@dataclass
class Change:
    scenario: str
    kind: str               # one of KINDS
    old: str | None         # outcome in OLD (None: not there)
    new: str | None         # outcome in NEW
    message: str = ""       # NEW's failure message, if any
    known: KnownIssue | None = None     # the known-issues entry that lists this failure

    @property
    def regressed(self) -> bool:
        return self.known is None and (self.kind == "newly failing" or (self.kind == "new" and self.new in BAD))


@dataclass
class KernelDiff:
    kernel: str
    changes: list[Change] = field(default_factory=list)
    only_in: str = ""       # "OLD" / "NEW": the kernel is on one side only (then changes is empty)
    tests: int = 0          # tests on the side(s) that has it
    known: list[tuple[str, str, KnownIssue]] = field(default_factory=list)   # (scenario, NEW outcome, entry)
    stale: list[tuple[str, str, KnownIssue]] = field(default_factory=list)   # listed, but passes now

    def of_kind(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]


@dataclass
class Comparison:
    kernels: list[KernelDiff] = field(default_factory=list)
    old: str = ""           # where the sides came from, for the header
    new: str = ""
    expired: list[KnownIssue] = field(default_factory=list)

    @property
    def regressions(self) -> list[tuple[str, Change]]:
        return [(k.kernel, c) for k in self.kernels for c in k.changes if c.regressed]

    def counts(self) -> dict[str, int]:
        return {kind: sum(len(k.of_kind(kind)) for k in self.kernels) for kind in KINDS}

    def exit_code(self) -> int:
        return EXIT["regressed"] if self.regressions or self.expired else EXIT["ok"]


def apply_known(diff: KernelDiff, new: KernelRun, known: KnownIssues) -> None:
    """Mark NEW's failures that ``known`` lists for this kernel (its ``kernel_version``, else its directory
    name) as known; note the listed tests that pass."""
    changes = {c.scenario: c for c in diff.changes}
    for issue in known.for_kernel(new.properties.get("kernel_version") or diff.kernel):
        r = new.results.get(issue.scenario)
        if r is None or r.outcome == "skipped":
            continue
        if failed_for_real(r.outcome, r.message) or r.outcome == "xfailed":
            diff.known.append((issue.scenario, r.outcome, issue))
            if issue.scenario in changes:
                changes[issue.scenario].known = issue
        else:       # passed, or a strict XPASS (a failure pytest makes of a pass)
            diff.stale.append((issue.scenario, r.outcome, issue))


def compare_kernel(kernel: str, old: KernelRun, new: KernelRun, known: KnownIssues | None = None) -> KernelDiff:
    diff = KernelDiff(kernel, tests=len(new.results))
    names = list(old.results) + [s for s in new.results if s not in old.results]
    for s in names:
        o, n = old.results.get(s), new.results.get(s)
        kind = classify(o.outcome if o else None, n.outcome if n else None)
        if kind:
            diff.changes.append(Change(s, kind, o.outcome if o else None, n.outcome if n else None,
                                       n.message if n is not None and n.outcome in BAD else ""))
    if known is not None:
        apply_known(diff, new, known)
    return diff


def compare_runs(old: dict[str, KernelRun], new: dict[str, KernelRun], old_name: str = "OLD",
                 new_name: str = "NEW", known: KnownIssues | None = None) -> Comparison:
    """Kernel directory name -> run, for both sides.  ``known``: the known issues (an entry whose test the
    runs have under other parameters only is a HarnessError)."""
    cmp = Comparison(old=old_name, new=new_name)
    if known is not None:
        known.check_against({s for side in (old, new) for run in side.values() for s in run.results})
        cmp.expired = known.expired
    for k in list(new) + [k for k in old if k not in new]:
        if k in old and k in new:
            cmp.kernels.append(compare_kernel(k, old[k], new[k], known))
        elif k in new:
            cmp.kernels.append(KernelDiff(k, only_in="NEW", tests=len(new[k].results)))
        else:
            cmp.kernels.append(KernelDiff(k, only_in="OLD", tests=len(old[k].results)))
    return cmp


# ---- reading a matrix directory ----------------------------------------------------------------------------
def read_run(path: Path, label: str) -> KernelRun:
    """One kernel's JUnit file; HarnessError when it cannot be read as pytest's JUnit XML."""
    hint = (f"{path.parent.parent} should be the --out directory of `smccc-harness matrix` (each kernel's "
            f"pytest writes <kernel>/{JUNIT}); rerun that matrix, or rebuild with `smccc-harness matrix --report-only`")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise HarnessError(f"cannot read {path} as JUnit XML: {e}", hint) from None
    if root.tag not in ("testsuites", "testsuite"):
        raise HarnessError(f"{path} is XML but not JUnit (root element <{root.tag}>, expected <testsuites>)", hint)
    return read_junit(path, label)


def read_matrix_dir(d: Path, side: str = "") -> dict[str, KernelRun]:
    """``d/<kernel>/junit.xml`` for every kernel directory: kernel directory name -> run."""
    d = Path(d)
    what = f"{side} " if side else ""
    if not d.is_dir():
        raise HarnessError(f"{what}{d} is not a directory",
                           "pass the --out directory of an earlier `smccc-harness matrix` run")
    junits = sorted(p for p in d.glob(f"*/{JUNIT}"))
    if not junits:
        raise HarnessError(f"{what}{d} is not a matrix output directory: no <kernel>/{JUNIT} in it",
                           f"pass the --out directory of `smccc-harness matrix` (it holds one directory per kernel "
                           f"with a {JUNIT}, next to report.html)")
    return {p.parent.name: read_run(p, p.parent.name) for p in junits}


def read_nights(dirs: list[Path], side: str = "") -> list[history.Night]:
    """Earlier matrix directories as nights, oldest first (harness/kdev/history.py ``order``); bad input (not a
    matrix output, a JUnit file without a run timestamp, a directory given twice) is a HarnessError."""
    return history.order([history.night(str(d), read_matrix_dir(Path(d), side)) for d in dirs])


def compare_dirs(old: Path, new: Path, known: KnownIssues | None = None) -> Comparison:
    return compare_runs(read_matrix_dir(old, "OLD"), read_matrix_dir(new, "NEW"), str(old), str(new), known)


# ---- showing it ------------------------------------------------------------------------------------------
def _sym(outcome: str | None) -> str:
    return SYMBOL.get(outcome, outcome or "-")


def _line(c: Change) -> str:
    if c.kind == "new":
        what = _sym(c.new)
    elif c.kind == "gone":
        what = f"was {_sym(c.old)}"
    else:
        what = f"{_sym(c.old)} -> {_sym(c.new)}"
    msg = c.message.strip().splitlines()[0][:160] if c.message.strip() else ""
    return f"{c.scenario}  {what}" + (f": {msg}" if msg else "") + (f"  [known: {c.known.where}]" if c.known else "")


STALE = "known issue no longer fails: remove the entry"


def _known_line(scenario: str, outcome: str, e: KnownIssue) -> str:
    return f"{scenario}  {_sym(outcome)}: {e.reason} ({e.link}; {e.where}, expires {e.expires.isoformat()})"


def _stale_line(scenario: str, outcome: str, e: KnownIssue) -> str:
    now = "XPASS(strict)" if outcome in BAD else _sym(outcome)
    return f"{scenario}  {now}: {STALE}: {e.where} ({e.test}, kernel {e.kernel})"


def _expired_line(e: KnownIssue) -> str:
    return (f"expired known issue {e.where}: {e.test} (kernel {e.kernel}) expired on {e.expires.isoformat()}: "
            "check whether it still fails, then renew its expires date or remove the entry")


def summary_line(cmp: Comparison) -> str:
    n = cmp.counts()
    counts = ", ".join(f"{n[k]} {k}" for k in KINDS)
    verdict = f"{len(cmp.regressions)} regressed" if cmp.regressions else "nothing regressed"
    if cmp.expired:
        verdict += f", {len(cmp.expired)} known issue(s) expired"
    known = [(sum(len(k.known) for k in cmp.kernels), "known"),
             (sum(len(k.stale) for k in cmp.kernels), "known no longer failing")]
    extra = ", ".join(f"{c} {what}" for c, what in known if c)
    return f"{verdict} ({counts})" + (f"; {extra}" if extra else "")


def format_comparison(cmp: Comparison) -> str:
    """The terminal view: per kernel, each kind with its tests; last line the verdict."""
    out = [f"regressions: {cmp.old} -> {cmp.new}"]
    for k in cmp.kernels:
        if k.only_in:
            out.append(f"kernel {k.kernel}: only in {k.only_in} ({k.tests} tests), not compared")
            continue
        if not k.changes:
            out.append(f"kernel {k.kernel}: no changes ({k.tests} tests)")
        else:
            out.append(f"kernel {k.kernel}:")
        for kind in KINDS:
            cs = k.of_kind(kind)
            if cs:
                out.append(f"  {kind} ({len(cs)}):")
                out += [f"    {_line(c)}" + ("  [REGRESSION]" if kind == "new" and c.regressed else "") for c in cs]
        if k.known:
            out.append(f"  known ({len(k.known)}):")
            out += [f"    {_known_line(*x)}" for x in k.known]
        if k.stale:
            out.append(f"  {STALE} ({len(k.stale)}):")
            out += [f"    {_stale_line(*x)}" for x in k.stale]
    out += [_expired_line(x) for x in cmp.expired]
    out.append(summary_line(cmp))
    return "\n".join(out)


def render_html(cmp: Comparison) -> str:
    """The same view as an HTML section, ``<section id="regressions">``, for report.html."""
    e = html.escape
    head = (f'<section id="regressions"><h2>Regressions</h2><p>against <code>{e(cmp.old)}</code>: '
            f"<b>{e(summary_line(cmp))}</b></p>")
    parts = [head]
    for k in cmp.kernels:
        if k.only_in:
            parts.append(f"<p>{e(k.kernel)}: only in {k.only_in} ({k.tests} tests), not compared</p>")
            continue
        if not k.changes and not k.known and not k.stale:
            parts.append(f"<p>{e(k.kernel)}: no changes ({k.tests} tests)</p>")
            continue
        parts.append(f'<h3>{e(k.kernel)}</h3><table class="regressions"><tr><th>change</th><th>scenario</th>'
                     "<th>before</th><th>now</th></tr>")
        for kind in KINDS:
            for c in k.of_kind(kind):
                tip = f' title="{e(c.message[:500])}"' if c.message else ""
                parts.append(f'<tr data-kind="{e(kind)}"><td>{e(kind)}</td><td class=s>{e(c.scenario)}</td>'
                             f"<td class={c.old or 'none'}>{_sym(c.old)}</td>"
                             f"<td class={c.new or 'none'}{tip}>{_sym(c.new)}</td></tr>")
        for kind, rows, line in (("known", k.known, _known_line), ("no longer fails", k.stale, _stale_line)):
            for scenario, outcome, entry in rows:
                parts.append(f'<tr data-kind="{kind}"><td>{kind}</td><td class=s>{e(scenario)}</td><td></td>'
                             f'<td class={outcome} title="{e(line(scenario, outcome, entry))}">{_sym(outcome)}</td></tr>')
        parts.append("</table>")
    parts += [f'<p class="expired"><b>{e(_expired_line(x))}</b></p>' for x in cmp.expired]
    return "".join(parts) + "</section>"


# ---- smccc-harness compare ---------------------------------------------------------------------------------
def main(args) -> int:
    known = known_issues_for_cli(getattr(args, "known_issues", None))     # bad file: exit 2 before reading runs
    olds = list(args.old) if isinstance(args.old, list) else [args.old]
    nights = read_nights([Path(d) for d in olds], "OLD") if len(olds) > 1 else None
    old = Path(nights[-1].name) if nights else Path(olds[0])
    cmp = compare_dirs(old, Path(args.new), known)
    print(format_comparison(cmp))
    if nights:      # NEW is the newest night, whenever it ran
        now = history.night(str(args.new), read_matrix_dir(Path(args.new), "NEW"), need_time=False)
        print(history.format_history(nights + [now], known))
    return cmp.exit_code()


def add_cli(sub) -> None:
    p = sub.add_parser("compare", help="regressions between two matrix output directories (exit 1 if any); "
                                       "with several earlier ones, also each test's history over them")
    p.add_argument("old", nargs="+", help="the earlier matrix's --out directory (e.g. last night's); several: "
                                          "nights in any order, the newest (by run time) is compared, and a history "
                                          "strip of the tests that moved is printed")
    p.add_argument("new", help="the later matrix's --out directory")
    add_known_issues_option(p)
    p.set_defaults(func=main)
