"""The nights strip of report.html: each test's outcome over the last nights, oldest to newest.

    smccc-harness matrix ... --baseline NIGHT1 --baseline NIGHT2 ...     (or --baseline NIGHT1 NIGHT2 ...)
    smccc-harness compare NIGHT1 NIGHT2 ... NEW

Every ``--baseline`` directory (an earlier matrix's ``--out``) is one night; this run is the newest.  The nights
are placed by when they ran: the earliest ``<testsuite timestamp=...>`` of their JUnit files (pytest writes it),
so they may be given in any order (a shell glob, CI artifacts); the newest baseline is the one the regressions
section compares against (harness/kdev/regressions.py).  Bad input is a HarnessError (exit 2): a directory that is
not a matrix output (regressions.py ``read_matrix_dir``), a JUnit file without a run timestamp (an older pytest
or another tool wrote it: the night cannot be placed), a time that is not ISO 8601, the same directory twice.

Per kernel (matched by directory name) each test gets one cell per night, ``CELLS``: passed, failed, error,
skipped, xfailed, known (a failure or xfail that images/known-issues.toml lists for that night's kernel) or
absent (the night did not run it).  Rows: the tests whose cell was not the same every night, or that failed or
errored (not known) in any night; the tests with one outcome every night are counted, not drawn (a nightly
report is about what moves).  ``strips()`` is pure; ``render_html()`` and ``format_history()`` show it.
"""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HarnessError
from .known_issues import KnownIssues, failed_for_real
from .report import KernelRun

CELLS = ("passed", "failed", "error", "skipped", "xfailed", "known", "absent")
LEGEND = {"passed": "pass", "failed": "fail", "error": "error", "skipped": "skip", "xfailed": "xfail",
          "known": "known issue", "absent": "not run"}
LETTER = {"passed": "P", "failed": "F", "error": "E", "skipped": "S", "xfailed": "X", "known": "K", "absent": "."}
HINT = ("pass the --out directories of earlier `smccc-harness matrix` runs (pytest's JUnit files, which carry "
        "each run's start time); rerun an old night, or leave it out")


@dataclass
class Night:
    name: str                          # the directory as given, or "this run"
    runs: dict[str, KernelRun]         # kernel directory name -> run
    when: dt.datetime | None = None    # the run's start (UTC)

    @property
    def label(self) -> str:
        return self.when.strftime("%m-%d %H:%M") if self.when else self.name


def parse_time(stamp: str, where: str) -> dt.datetime:
    """A JUnit ``timestamp`` (``2026-12-03T13:32:05.769130+00:00``; pytest before 7 wrote local time without
    an offset: taken as UTC) -> an aware datetime; HarnessError when it is not ISO 8601."""
    try:
        t = dt.datetime.fromisoformat(stamp)
    except ValueError:
        raise HarnessError(f"{where}: run timestamp {stamp!r} is not an ISO 8601 time", HINT) from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def night(name: str, runs: dict[str, KernelRun], need_time: bool = True) -> Night:
    """One night from its runs (kernel directory -> run).  ``need_time``: a baseline must say when it ran."""
    stamps = []
    for k, r in runs.items():
        where = str(r.junit or f"{name}/{k}")
        if r.timestamp:
            stamps.append(parse_time(r.timestamp, where))
        elif need_time:
            raise HarnessError(f"{where} has no run timestamp (<testsuite timestamp=...>): an older pytest or "
                               "another tool wrote it, so it cannot be placed among the nights", HINT)
    return Night(name, runs, min(stamps) if stamps else None)


def order(nights: list[Night]) -> list[Night]:
    """The baselines oldest first (equal times keep the order given); the same directory twice is an error."""
    seen: dict[str, str] = {}
    for n in nights:
        key = str(Path(n.name).resolve())
        if key in seen:
            raise HarnessError(f"{n.name} is given twice as a night (also as {seen[key]})",
                               "give each earlier matrix directory once")
        seen[key] = n.name
    return sorted(nights, key=lambda n: n.when or dt.datetime.min.replace(tzinfo=dt.UTC))


# ---- the strip (pure) ----------------------------------------------------------------------------------------
def known_for(run: KernelRun, kernel: str, known: KnownIssues | None) -> set[str]:
    """The scenarios of ``run`` whose failure or xfail an active known-issues entry lists for its kernel
    (``kernel_version``, else the directory name)."""
    if known is None:
        return set()
    out = set()
    for issue in known.for_kernel(run.properties.get("kernel_version") or kernel):
        r = run.results.get(issue.scenario)
        if r is not None and (failed_for_real(r.outcome, r.message) or r.outcome == "xfailed"):
            out.add(issue.scenario)
    return out


def cell(run: KernelRun | None, scenario: str, known: set[str]) -> str:
    """One cell's class (``CELLS``)."""
    r = run.results.get(scenario) if run is not None else None
    if r is None:
        return "absent"
    return "known" if scenario in known else r.outcome


@dataclass
class Strip:
    kernel: str
    rows: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)  # scenario, [(class, tooltip)]
    steady: dict[str, int] = field(default_factory=dict)   # class -> tests with that outcome every night


def shown(classes: list[str]) -> bool:
    """A row is drawn when its cells differ or it failed or errored (not known) in some night."""
    return len(set(classes)) > 1 or any(c in ("failed", "error") for c in classes)


def strips(nights: list[Night], known: KnownIssues | None = None) -> list[Strip]:
    """Per kernel (in the newest night's order, then the kernels only older nights ran) the rows."""
    kernels: dict[str, None] = {}
    for n in reversed(nights):
        kernels.update(dict.fromkeys(n.runs))
    out = []
    for k in kernels:
        runs = [n.runs.get(k) for n in nights]
        knowns = [known_for(r, k, known) if r is not None else set() for r in runs]
        scen: dict[str, None] = {}
        for r in reversed(runs):
            if r is not None:
                scen.update(dict.fromkeys(r.results))
        strip = Strip(k)
        for s in scen:
            classes = [cell(r, s, kn) for r, kn in zip(runs, knowns)]
            if not shown(classes):
                strip.steady[classes[0]] = strip.steady.get(classes[0], 0) + 1
                continue
            tips = []
            for n, r, c in zip(nights, runs, classes):
                msg = r.results[s].message.strip().splitlines()[0][:200] if c != "absent" and \
                    r.results[s].message.strip() else ""
                tips.append(f"{n.label} ({n.name}): {LEGEND[c]}" + (f": {msg}" if msg else ""))
            strip.rows.append((s, list(zip(classes, tips))))
        out.append(strip)
    return out


def _steady_line(st: Strip) -> str:
    if not st.steady:
        return ""
    what = ", ".join(f"{n} {LEGEND[c]}" for c, n in sorted(st.steady.items(), key=lambda x: CELLS.index(x[0])))
    return f"{sum(st.steady.values())} tests had one outcome every night ({what}): not drawn"


def render_html(nights: list[Night], known: KnownIssues | None = None) -> str:
    """``<section id="history">``: the legend, then per kernel a table, one column per night (oldest first;
    each cell ``class=<CELLS entry>`` with the night, the outcome and the failure message as its tooltip)."""
    e = html.escape
    parts = [f'<section id="history"><h2>History: last {len(nights)} nights</h2>',
             '<p class="legend">oldest to newest, one cell per night:']
    parts += [f'<span class="key {c}"></span>{e(LEGEND[c])}' for c in CELLS]
    parts.append("</p>")
    head = "".join(f'<th class=n title="{e(n.name)}">{e(n.label)}</th>' for n in nights)
    for st in strips(nights, known):
        parts.append(f"<h3>{e(st.kernel)}</h3>")
        if st.rows:
            parts.append(f'<table class="history" data-kernel="{e(st.kernel)}"><tr><th>scenario</th>{head}</tr>')
            for s, cells in st.rows:
                parts.append(f"<tr><td class=s>{e(s)}</td>")
                parts += [f'<td class="c {c}" title="{e(tip)}"></td>' for c, tip in cells]
                parts.append("</tr>")
            parts.append("</table>")
        else:
            parts.append("<p>no test changed or failed over these nights</p>")
        if st.steady:
            parts.append(f"<p><small>{e(_steady_line(st))}</small></p>")
    return "".join(parts) + "</section>"


def format_history(nights: list[Night], known: KnownIssues | None = None) -> str:
    """The terminal view: per kernel one line per drawn test, one letter per night (``LETTER``)."""
    key = " ".join(f"{LETTER[c]}={LEGEND[c]}" for c in CELLS)
    out = [f"history, {len(nights)} nights, oldest first ({key}):"]
    out += [f"  {i}. {n.label}  {n.name}" for i, n in enumerate(nights, 1)]
    for st in strips(nights, known):
        out.append(f"kernel {st.kernel}:")
        out += [f"  {''.join(LETTER[c] for c, _ in cells)}  {s}" for s, cells in st.rows]
        if st.steady:
            out.append(f"  {_steady_line(st)}")
    return "\n".join(out)
