"""Reports for nightly CI: JUnit suite properties, per-test console slices, the scenario x kernel matrix.

* ``suite_properties()`` — what the plugin writes as JUnit ``<properties>`` of the test suite (kernel
  version and image sha256, QEMU version, accel, initramfs and rootfs package hashes, harness commit).
* ``read_junit()`` — one kernel's results (per test: outcome, message, console log) and its properties.
* ``format_matrix()`` / ``render_html()`` — the same scenario x kernel table for the terminal and as
  ``report.html``, which also has, per kernel, the counts (known issues apart: ``outcome_counts()``) and the
  slowest tests as duration bars (``slowest()``, ``render_summary()``); ``write_html()`` writes it with links
  relative to the report's directory, copying the console logs that live elsewhere into ``<report dir>/logs/``,
  so that the directory works anywhere it is copied to (a CI artifact).
"""

from __future__ import annotations

import filecmp
import html
import re
import shutil
import subprocess
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from .. import paths
from ..errors import HarnessError

SYMBOL = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP", "xfailed": "XFAIL", None: "-"}


# ---- JUnit properties written by the plugin --------------------------------------------------------
def harness_commit() -> str:
    try:
        r = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, check=False, timeout=10)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def suite_properties(kernel=None, caps: dict | None = None, qemu_bin: str = "qemu-system-aarch64",
                     accel: str = "", initrd: Path | None = None) -> list[tuple[str, str]]:
    """(name, value) pairs describing the run; every value is a string, unknowns are 'unknown'."""
    from ..images import assets, store, sysdeps
    props: list[tuple[str, str]] = []
    caps = caps or {}
    if kernel is not None:
        props += [("kernel_version", caps.get("uname") or kernel.version), ("kernel_image", str(kernel.image)),
                  ("kernel_sha256", kernel.sha256), ("kernel_package", f"{kernel.package} {kernel.deb_version}".strip())]
        vm = getattr(kernel, "vmlinux", None)
        if vm:
            props.append(("kernel_vmlinux", str(vm)))
    if caps:
        props += [("kvm_mode", str(caps.get("kvm_mode"))), ("psci_version", str(caps.get("psci_version"))),
                  ("KVM_CAP_ARM_EL2", str(caps.get("KVM_CAP_ARM_EL2"))),
                  ("smccc_filter", str(caps.get("smccc_filter")))]
    try:
        props.append(("qemu_version", ".".join(map(str, sysdeps.qemu_version(qemu_bin)))))
    except Exception:  # noqa: BLE001 - a property must never fail the run
        props.append(("qemu_version", "unknown"))
    props.append(("accel", accel or "unknown"))
    if initrd is not None and Path(initrd).is_file():
        props.append(("initramfs_sha256", store.sha256_file(Path(initrd))))
    try:
        summary = assets.asset_summary()
    except Exception:  # noqa: BLE001 - a property must never fail the run
        summary = {}
    for name, e in sorted((summary.get("rootfs") or summary.get("packages") or {}).items()):
        props.append((f"deb:{name}", f"{e.get('version')} sha256:{e.get('sha256')}"))
    for spec, k in sorted((summary.get("kernels") or {}).items()):
        if isinstance(k, dict) and k.get("deb_sha256"):
            props.append((f"kernel_deb:{spec}", f"{k.get('package')} {k.get('deb_version')} sha256:{k['deb_sha256']}"))
    props.append(("harness_commit", harness_commit()))
    return props


def safe_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-150:]


def save_test_console(run_dir: Path, nodeid: str, text: str) -> Path:
    """The console output printed while one test ran, as ``<run_dir>/tests/<nodeid>.console.log``."""
    d = Path(run_dir) / "tests"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{safe_name(nodeid)}.console.log"
    p.write_text(text)
    return p


# ---- reading results -------------------------------------------------------------------------------
@dataclass
class TestResult:
    outcome: str  # passed | failed | error | skipped | xfailed
    message: str = ""
    time: float = 0.0
    properties: dict[str, str] = field(default_factory=dict)


@dataclass
class KernelRun:
    label: str  # the --kernel spec
    results: dict[str, TestResult] = field(default_factory=dict)  # scenario -> result
    properties: dict[str, str] = field(default_factory=dict)
    junit: Path | None = None
    note: str = ""  # e.g. "pytest exit 3"
    timestamp: str = ""  # when the run started: the earliest <testsuite timestamp=...> ("" if none)

    def counts(self) -> dict[str, int]:
        out = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0}
        for r in self.results.values():
            out[r.outcome] = out.get(r.outcome, 0) + 1
        return out


def scenario_name(classname: str, name: str) -> str:
    """'tests.system.test_forwarding_el1' + 'test_x[smc]' -> 'test_forwarding_el1::test_x[smc]'."""
    return f"{classname.rsplit('.', 1)[-1]}::{name}" if classname else name


def read_junit(path: Path, label: str) -> KernelRun:
    run = KernelRun(label=label, junit=Path(path))
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:      # a pytest killed while writing it, or not XML at all
        raise HarnessError(f"{path} is not readable JUnit XML ({e})",
                           hint="re-run that kernel's matrix entry, or leave it out with --kernels") from None
    stamps = sorted(s.get("timestamp") for s in root.iter("testsuite") if s.get("timestamp"))
    run.timestamp = stamps[0] if stamps else ""
    for suite in root.iter("testsuite"):
        for prop in suite.findall("properties/property"):
            run.properties[prop.get("name", "")] = prop.get("value", "")
    for tc in root.iter("testcase"):
        name = scenario_name(tc.get("classname", ""), tc.get("name", ""))
        outcome, msg = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                if child.tag == "skipped" and child.get("type") == "pytest.xfail":
                    outcome = "xfailed"
                msg = child.get("message", "") or (child.text or "")[:300]
                break
        props = {p.get("name", ""): p.get("value", "") for p in tc.findall("properties/property")}
        run.results[name] = TestResult(outcome, msg, float(tc.get("time", 0) or 0), props)
    return run


# ---- rendering -------------------------------------------------------------------------------------
def _scenarios(runs: list[KernelRun]) -> list[str]:
    seen: dict[str, None] = {}
    for r in runs:
        for s in r.results:
            seen.setdefault(s, None)
    return list(seen)


def column_title(run: KernelRun) -> str:
    label = Path(run.label).name if "/" in run.label and not run.label.startswith("pkg:") else run.label
    v = run.properties.get("kernel_version")
    return f"{label} ({v})" if v and v != label else label


def format_matrix(runs: list[KernelRun], brief: bool = False) -> str:
    """The scenario x kernel table, plain text, plus a totals row and each kernel's properties.
    ``brief``: only the scenarios that did not pass on every kernel."""
    scen = _scenarios(runs)
    if brief:
        scen = [s for s in scen if any(s not in r.results or r.results[s].outcome != "passed" for r in runs)]
    head = ["scenario"] + [column_title(r) for r in runs]
    body = [[s] + [SYMBOL[r.results[s].outcome] if s in r.results else "-" for r in runs] for s in scen]
    totals = ["total"] + ["{passed}P {failed}F {error}E {skipped}S {xfailed}X".format(**r.counts()) for r in runs]
    rows = [head, *body, totals]
    w = [max(len(row[i]) for row in rows) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{x}}}" for x in w)
    out = [fmt.format(*head), fmt.format(*("-" * x for x in w))]
    out += [fmt.format(*b) for b in body]
    out += [fmt.format(*("-" * x for x in w)), fmt.format(*totals)]
    for r in runs:
        p = r.properties
        out.append(f"{r.label}: kernel {p.get('kernel_version', '?')}, QEMU {p.get('qemu_version', '?')}, "
                   f"accel {p.get('accel', '?')}, KVM {p.get('kvm_mode', '?')}"
                   + (f"; {r.note}" if r.note else "") + (f"; junit {r.junit}" if r.junit else ""))
    return "\n".join(out)


_CSS = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;vertical-align:top}th{background:#eee}
.passed{background:#c8f0c8}.xfailed{background:#dde8f8}.failed{background:#f4b4b4}.error{background:#f7d08a}.skipped{background:#e4e4e4}
.known{background:#d9c8f0}.absent{background:#fff;color:#999}
td.s{font-family:monospace}small{color:#555}section{margin-bottom:1.5em}
table.counts td{text-align:right;min-width:3em}
table.slowest td{border:0;padding:1px 6px}td.track{width:420px}
div.bar{height:12px;background:#4a78b8;min-width:1px}td.secs{text-align:right;font-family:monospace}
table.history td.c{width:14px;height:14px;padding:0}table.history th.n{font-size:11px;font-weight:normal;white-space:nowrap}
span.key{display:inline-block;width:14px;height:14px;border:1px solid #bbb;vertical-align:middle;margin:0 3px 0 10px}"""


LOGS_DIR = "logs"   # console logs that live outside the report's directory are copied here


def test_log(t: TestResult) -> str:
    """The console log a report links for one test: its own slice, else the guest's whole console log."""
    return t.properties.get("test_console_log") or t.properties.get("console_log") or ""


def _find_log(path: str, run: KernelRun) -> Path | None:
    """``path`` as written into the JUnit file, or, when that is gone (the matrix directory was moved or
    copied), the same ``runs/...`` tail next to the JUnit file."""
    p = Path(path)
    if p.is_absolute() and p.is_file():
        return p
    if run.junit is not None:
        base = Path(run.junit).parent
        if not p.is_absolute() and (base / p).is_file():
            return base / p
        parts = p.parts
        for i in range(len(parts) - 1, -1, -1):
            if parts[i] == "runs" and (base / Path(*parts[i:])).is_file():
                return base / Path(*parts[i:])
    return None


def link_logs(runs: list[KernelRun], report_dir: Path) -> dict[str, str]:
    """Console log (as in the JUnit file) -> its href relative to ``report_dir``.  A log under ``report_dir``
    is linked where it is; one elsewhere is copied to ``report_dir/logs/<kernel>/``.  Logs that no longer
    exist get no link."""
    report_dir = Path(report_dir).resolve()
    links: dict[str, str] = {}
    for r in runs:
        for t in r.results.values():
            log = test_log(t)
            if not log or log in links:
                continue
            src = _find_log(log, r)
            if src is None:
                continue
            src = src.resolve()
            if not src.is_relative_to(report_dir):
                d = report_dir / LOGS_DIR / safe_name(r.label)
                d.mkdir(parents=True, exist_ok=True)
                dst, n = d / src.name, 1
                while dst.exists() and not filecmp.cmp(src, dst, shallow=False):
                    dst, n = d / f"{src.stem}.{n}{src.suffix}", n + 1
                if not dst.exists():
                    shutil.copyfile(src, dst)
                src = dst
            links[log] = urllib.parse.quote(src.relative_to(report_dir).as_posix())
    return links


# ---- per kernel: counts and the slowest tests ------------------------------------------------------------
COUNT_KINDS = ("passed", "failed", "error", "skipped", "xfailed", "known")
COUNT_TITLES = {"passed": "passed", "failed": "failed", "error": "error", "skipped": "skipped", "xfailed": "xfail",
                "known": "known"}
SLOWEST = 10     # duration bars per kernel


def outcome_counts(run: KernelRun, known: set[str] = frozenset()) -> dict[str, int]:
    """The six counts of one kernel (they add up to its number of tests): a test in ``known`` (the failures and
    xfails a known-issues entry lists for this kernel, harness/kdev/regressions.py ``known_scenarios``) counts
    as known instead of failed, error or xfailed."""
    out = dict.fromkeys(COUNT_KINDS, 0)
    for s, r in run.results.items():
        kind = "known" if s in known and r.outcome in ("failed", "error", "xfailed") else r.outcome
        out[kind] = out.get(kind, 0) + 1
    return out


def slowest(run: KernelRun, n: int = SLOWEST) -> list[tuple[str, TestResult]]:
    """The ``n`` slowest tests (JUnit ``time``), slowest first; equal times by scenario name."""
    return sorted(run.results.items(), key=lambda x: (-x[1].time, x[0]))[:n]


def bar_width(seconds: float, longest: float) -> float:
    """A duration bar's width in percent of the track: proportional, the longest test shown fills it."""
    return round(100.0 * seconds / longest, 1) if longest > 0 else 0.0


def render_summary(runs: list[KernelRun], known: dict[str, set[str]] | None = None, n: int = SLOWEST) -> str:
    """``<section id="summary">``: per kernel its counts (``data-kind`` per cell) and its ``n`` slowest tests as
    bars on one scale for the whole page (the slowest test shown anywhere is 100%), seconds printed."""
    e = html.escape
    known = known or {}
    top = {r.label: slowest(r, n) for r in runs}
    longest = max((t.time for rows in top.values() for _, t in rows), default=0.0)
    parts = ['<section id="summary"><h2>Per kernel</h2><table class="counts"><tr><th>kernel</th>']
    parts += [f"<th>{COUNT_TITLES[k]}</th>" for k in COUNT_KINDS] + ["<th>total</th></tr>"]
    for r in runs:
        c = outcome_counts(r, known.get(r.label, set()))
        parts.append(f'<tr data-kernel="{e(r.label)}"><th>{e(column_title(r))}</th>')
        parts += [f'<td data-kind="{k}"' + (f" class={k}" if c[k] else "") + f">{c[k]}</td>" for k in COUNT_KINDS]
        parts.append(f"<td>{len(r.results)}</td></tr>")
    parts.append("</table>")
    for r in runs:
        rows = top[r.label]
        if not rows:
            continue
        total = sum(t.time for t in r.results.values())
        parts.append(f"<h3>{e(column_title(r))}: the {len(rows)} slowest of {len(r.results)} tests "
                     f"<small>(all tests: {total:.1f} s)</small></h3><table class=\"slowest\">")
        for s, t in rows:
            w = bar_width(t.time, longest)
            parts.append(f'<tr class="dur"><td class=s>{e(s)}</td><td class=track><div class=bar '
                         f'style="width:{w}%" data-seconds="{t.time:.3f}"></div></td>'
                         f"<td class=secs>{t.time:.2f} s</td></tr>")
        parts.append("</table>")
    return "".join(parts) + "</section>"


def write_html(runs: list[KernelRun], report_dir: Path, title: str = "smccc-harness kernel matrix", *,
               regressions: str = "", history: str = "", known: dict[str, set[str]] | None = None) -> Path:
    """``report_dir/report.html`` with relative links only (see :func:`link_logs`)."""
    report_dir = Path(report_dir)
    path = report_dir / "report.html"
    path.write_text(render_html(runs, title, links=link_logs(runs, report_dir), base=report_dir,
                                regressions=regressions, history=history, known=known))
    return path


def render_html(runs: list[KernelRun], title: str = "smccc-harness kernel matrix", *,
                links: dict[str, str] | None = None, base: Path | None = None, regressions: str = "",
                history: str = "", known: dict[str, set[str]] | None = None) -> str:
    """The report as HTML, self-contained (inline CSS, no script).  ``links``: console log -> href
    (:func:`link_logs`; none without it).  ``base``: the report's directory (JUnit paths under it are shown
    relative to it).  ``regressions``: the section against a baseline (harness/kdev/regressions.py
    ``render_html``), then the per-kernel counts and duration bars (:func:`render_summary`; ``known``: kernel
    label -> its known-issue scenarios), then ``history``: the nights strip (harness/kdev/history.py
    ``render_html``), then the full table."""
    e = html.escape
    links = links or {}
    scen = _scenarios(runs)
    parts = [f"<!doctype html><meta charset=utf-8><title>{e(title)}</title><style>{_CSS}</style>",
             f"<h1>{e(title)}</h1>", regressions, render_summary(runs, known), history,
             '<h2 id="table">All tests</h2><table><tr><th>scenario</th>']
    parts += [f"<th>{e(column_title(r))}</th>" for r in runs]
    parts.append("</tr>")
    for s in scen:
        parts.append(f"<tr><td class=s>{e(s)}</td>")
        for r in runs:
            t = r.results.get(s)
            if t is None:
                parts.append("<td>-</td>")
                continue
            href = links.get(test_log(t))
            link = f' <a href="{e(href)}">log</a>' if href else ""
            tip = f' title="{e(t.message[:500])}"' if t.message else ""
            parts.append(f"<td class={t.outcome}{tip}>{SYMBOL[t.outcome]} <small>{t.time:.2f}s</small>{link}</td>")
        parts.append("</tr>")
    parts.append("<tr><th>total</th>")
    parts += ["<th>{passed} pass, {failed} fail, {error} error, {skipped} skip, {xfailed} xfail</th>".format(**r.counts())
              for r in runs]
    parts.append("</tr></table><h2>Runs</h2>")
    for r in runs:
        parts.append(f"<h3>{e(r.label)}</h3><table>")
        if r.note:
            parts.append(f"<tr><th>note</th><td>{e(r.note)}</td></tr>")
        if r.junit:
            junit = Path(r.junit).resolve()
            if base is not None and junit.is_relative_to(Path(base).resolve()):
                rel = junit.relative_to(Path(base).resolve()).as_posix()
                parts.append(f'<tr><th>junit</th><td><a href="{e(urllib.parse.quote(rel))}">{e(rel)}</a></td></tr>')
            else:
                parts.append(f"<tr><th>junit</th><td>{e(str(r.junit))}</td></tr>")
        parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in r.properties.items()]
        parts.append("</table>")
    failures = [(r.label, s, t) for r in runs for s, t in r.results.items() if t.outcome in ("failed", "error")]
    if failures:
        parts.append("<h2>Failures</h2>")
        for label, s, t in failures:
            parts.append(f"<h3>{e(label)}: {e(s)}</h3><pre>{e(t.message)}</pre>")
    return "".join(parts) + "\n"
