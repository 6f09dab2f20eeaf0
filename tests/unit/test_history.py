"""report.html's presentation over recorded JUnit data: per-kernel counts (known issues apart), the slowest tests
as duration bars, the nights strip (harness/kdev/history.py) from repeated ``--baseline`` / ``compare NIGHT...
NEW``, its bad input; and, in a real headless Chromium (``infra``: ./smccc-harness test installs it through
harness/images/sysdeps.py), the page as the browser builds it and a screenshot."""

from __future__ import annotations

import html as H
import os
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness import cli
from harness.errors import HarnessError
from harness.kdev import history as Y
from harness.kdev import known_issues as KI
from harness.kdev import regressions as G
from harness.kdev import report as R

ROOT = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).parent / "data" / "junit" / "matrix_default.xml"  # a real matrix run on 7.3.4, 4 tests

PSCI_HVC = "test_forwarding_el1::test_psci_version_exits_to_userspace_with_function_id[hvc]"
PSCI_SMC = "test_forwarding_el1::test_psci_version_exits_to_userspace_with_function_id[smc]"
FLAGS_HVC = "test_forwarding_el1::test_hypercall_flags_name_the_conduit[hvc-0]"
FLAGS_SMC = "test_forwarding_el1::test_hypercall_flags_name_the_conduit[smc-1]"
# recorded times: PSCI_HVC 12.340 s (it booted the guest), FLAGS_SMC 0.122, the other two 0.001
KNOWN = """
[[issue]]
kernel = "7.3"
test = "tests/system/test_forwarding_el1.py::test_hypercall_flags_name_the_conduit[hvc-0]"
reason = "recorded-data fixture: listed so the strip has a known cell"
link = "tests/unit/test_history.py"
expires = 2099-12-31
"""


def _night(out: Path, stamp: str | None, fail=(), skip=(), remove=(), times=None, kernel="default") -> Path:
    """The recorded JUnit file as ``out/<kernel>/junit.xml``: run at ``stamp`` (None: no timestamp attribute),
    ``fail``/``skip`` scenarios given a <failure>/<skipped>, ``remove`` ones dropped, ``times`` overriding
    durations."""
    root = ET.fromstring(RECORDED.read_text().replace("@KERNEL_DIR@", str(out / kernel)))
    suite = next(root.iter("testsuite"))
    if stamp is None:
        del suite.attrib["timestamp"]
    else:
        suite.set("timestamp", stamp)
    cases = {f"test_forwarding_el1::{tc.get('name')}": tc for tc in suite.iter("testcase")}
    for s in fail:
        ET.SubElement(cases[s], "failure", message=f"AssertionError: {s} broke")
    for s in skip:
        ET.SubElement(cases[s], "skipped", type="pytest.skip", message="no KVM_CAP_ARM_EL2")
    for s in remove:
        suite.remove(cases[s])
    for s, t in (times or {}).items():
        cases[s].set("time", str(t))
    (out / kernel).mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(out / kernel / "junit.xml", encoding="utf-8", xml_declaration=True)
    return out


@pytest.fixture
def nights(tmp_path):
    """Three earlier nights and this run, 'default' (7.3.4): FLAGS_HVC fails every night (listed: known);
    FLAGS_SMC passes, fails on night 2, skips on night 3, fails now; PSCI_SMC is new on night 2;
    PSCI_HVC passes every night (steady)."""
    n1 = _night(tmp_path / "n1", "2026-12-01T02:00:00+00:00", fail=[FLAGS_HVC], remove=[PSCI_SMC])
    n2 = _night(tmp_path / "n2", "2026-12-02T02:00:00+00:00", fail=[FLAGS_HVC, FLAGS_SMC])
    n3 = _night(tmp_path / "n3", "2026-12-03T02:00:00+00:00", fail=[FLAGS_HVC], skip=[FLAGS_SMC])
    now = _night(tmp_path / "now", "2026-12-04T02:00:00+00:00", fail=[FLAGS_HVC, FLAGS_SMC])
    known = tmp_path / "known-issues.toml"
    known.write_text(KNOWN)
    return n1, n2, n3, now, known


# ---- counts and duration bars ----------------------------------------------------------------------------------
def _run(out: Path) -> R.KernelRun:
    return R.read_junit(out / "default" / "junit.xml", "default")


def test_counts_put_listed_failures_under_known_and_add_up_to_the_tests(nights):
    *_, now, known = nights
    run = _run(now)
    listed = Y.known_for(run, "default", KI.load(known))
    assert listed == {FLAGS_HVC}
    assert R.outcome_counts(run, listed) == {"passed": 2, "failed": 1, "error": 0, "skipped": 0, "xfailed": 0,
                                             "known": 1}
    assert R.outcome_counts(run) == {"passed": 2, "failed": 2, "error": 0, "skipped": 0, "xfailed": 0, "known": 0}
    page = R.render_summary([run], {"default": listed})
    cells = dict(re.findall(r'<td data-kind="(\w+)"[^>]*>(\d+)</td>', page))
    assert cells == {"passed": "2", "failed": "1", "error": "0", "skipped": "0", "xfailed": "0", "known": "1"}
    assert '<td data-kind="known" class=known>1</td>' in page and '<td data-kind="error">0</td>' in page


def test_an_expired_or_other_kernels_entry_does_not_make_a_failure_known(nights):
    now = nights[3]
    run = _run(now)
    assert Y.known_for(run, "default", KI.parse(KNOWN.replace("2099-12-31", "2020-01-01"))) == set()   # expired
    assert Y.known_for(run, "default", KI.parse(KNOWN.replace('"7.3"', '"6.12"'))) == set()
    assert Y.known_for(run, "default", None) == set()


def _bars(page: str) -> list[tuple[str, float, str]]:
    """(scenario, width %, seconds text) of each duration bar, in page order."""
    return [(H.unescape(s), float(w), secs) for s, w, secs in re.findall(
        r'<tr class="dur"><td class=s>([^<]+)</td><td class=track><div class=bar style="width:([\d.]+)%"[^>]*>'
        r"</div></td><td class=secs>([^<]+)</td>", page)]


def test_duration_bars_are_the_slowest_tests_slowest_first_with_widths_proportional_to_seconds(tmp_path):
    run = _run(_night(tmp_path / "m", "2026-12-04T02:00:00+00:00"))
    bars = _bars(R.render_summary([run], n=3))
    assert bars == [(PSCI_HVC, 100.0, "12.34 s"), (FLAGS_SMC, 1.0, "0.12 s"), (FLAGS_HVC, 0.0, "0.00 s")]
    assert [s for s, _ in R.slowest(run, 10)] == [PSCI_HVC, FLAGS_SMC, FLAGS_HVC, PSCI_SMC]   # ties by name
    assert R.bar_width(3.0, 12.0) == 25.0 and R.bar_width(0.0, 0.0) == 0.0


def test_duration_bars_of_several_kernels_share_one_scale(tmp_path):
    m = tmp_path / "m"
    _night(m, "2026-12-04T02:00:00+00:00", kernel="default")
    _night(m, "2026-12-04T02:00:00+00:00", kernel="6.12", times={PSCI_HVC: 24.68, FLAGS_SMC: 6.17})
    runs = [R.read_junit(m / k / "junit.xml", k) for k in ("default", "6.12")]
    bars = _bars(R.render_summary(runs, n=2))
    assert bars == [(PSCI_HVC, 50.0, "12.34 s"), (FLAGS_SMC, 0.5, "0.12 s"),        # default, against 24.68 s
                    (PSCI_HVC, 100.0, "24.68 s"), (FLAGS_SMC, 25.0, "6.17 s")]      # 6.12


def test_the_page_has_regressions_summary_history_then_the_table(nights):
    n1, n2, n3, now, known = nights
    rc = cli.main(["matrix", "--report-only", str(now), "--kernels", "default", "--known-issues", str(known),
                   "--baseline", str(n1), str(n2), str(n3)])
    assert rc == 1                    # FLAGS_SMC: skipped on the newest night (n3), failed now
    page = (now / "report.html").read_text()
    order = [page.index(x) for x in ('id="regressions"', 'id="summary"', 'id="history"', 'id="table"')]
    assert order == sorted(order), order
    assert "<script" not in page and "http://" not in page and "https://" not in page      # self-contained


# ---- the nights strip ----------------------------------------------------------------------------------------
def _rows(section: str) -> dict[str, list[str]]:
    """scenario -> its cells' classes, from the history section's tables."""
    out = {}
    for row in re.findall(r"<tr><td class=s>(.*?)</tr>", section):
        name, _, cells = row.partition("</td>")
        out[H.unescape(name)] = re.findall(r'<td class="c (\w+)"', cells)
    return out


def test_strip_cells_per_night_oldest_first_and_steady_tests_counted_not_drawn(nights):
    n1, n2, n3, now, known = nights
    given = [n3, n1, n2]                             # any order: placed by their run time
    strip = G.read_nights(given, "--baseline") + [Y.night("this run", G.read_matrix_dir(now), need_time=False)]
    assert [Path(n.name).name for n in strip] == ["n1", "n2", "n3", "this run"]
    section = Y.render_html(strip, KI.load(known))
    rows = _rows(section)          # FLAGS_HVC, listed, is known every night: steady like PSCI_HVC
    assert rows == {FLAGS_SMC: ["passed", "failed", "skipped", "failed"],
                    PSCI_SMC: ["absent", "passed", "passed", "passed"]}
    assert "2 tests had one outcome every night (1 pass, 1 known issue): not drawn" in section
    assert re.findall(r"<th class=n [^>]*>([^<]+)</th>", section) == ["12-01 02:00", "12-02 02:00", "12-03 02:00",
                                                                      "12-04 02:00"]
    assert all(f'<span class="key {c}"></span>' in section for c in Y.CELLS)            # the legend
    tip = re.search(r'<td class="c failed" title="([^"]+)"', section).group(1)
    assert H.unescape(tip) == f"12-02 02:00 ({n2}): fail: AssertionError: {FLAGS_SMC} broke"


def test_a_failure_every_night_that_is_not_known_is_drawn(nights):
    n1, n2, n3, _, _ = nights
    strip = G.read_nights([n1, n2, n3], "--baseline")
    rows = _rows(Y.render_html(strip, None))                  # no known issues: FLAGS_HVC fails every night
    assert rows[FLAGS_HVC] == ["failed", "failed", "failed"]
    assert [Y.cell(None, FLAGS_HVC, set()), Y.shown(["passed", "passed"]), Y.shown(["error"]),
            Y.shown(["skipped", "skipped"]), Y.shown(["absent", "passed"])] == ["absent", False, True, False, True]


def test_repeated_baseline_compares_against_the_newest_night_whatever_the_order(nights, capsys):
    n1, n2, n3, now, known = nights
    rc = cli.main(["matrix", "--report-only", str(now), "--kernels", "default", "--known-issues", str(known),
                   "--baseline", str(n3), "--baseline", str(n1), "--baseline", str(n2)])
    assert rc == 1
    out = capsys.readouterr().out
    assert f"regressions: {n3.resolve()} -> {now.resolve()}" in out
    assert f"    {FLAGS_SMC}  SKIP -> FAIL: AssertionError" in out
    assert "history, 4 nights, oldest first" in out and f"  PFSF  {FLAGS_SMC}" in out and f"  .PPP  {PSCI_SMC}" in out
    page = (now / "report.html").read_text()
    assert "History: last 4 nights" in page


def test_one_baseline_works_as_before_and_draws_two_nights(nights):
    _, _, n3, now, known = nights
    assert cli.main(["matrix", "--report-only", str(now), "--kernels", "default", "--known-issues", str(known),
                     "--baseline", str(n3)]) == 1
    page = (now / "report.html").read_text()
    section = re.search(r'<section id="history">.*?</section>', page).group(0)
    assert _rows(section) == {FLAGS_SMC: ["skipped", "failed"]}


def test_compare_with_several_old_nights_prints_the_strip(nights):
    n1, n2, n3, now, known = nights
    r = subprocess.run([sys.executable, "-m", "harness.cli", "compare", str(n2), str(n1), str(n3), str(now),
                        "--known-issues", str(known)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"regressions: {n3} -> {now}"
    i = lines.index("history, 4 nights, oldest first (P=pass F=fail E=error S=skip X=xfail K=known issue .=not run):")
    assert lines[i + 1:i + 5] == [f"  1. 12-01 02:00  {n1}", f"  2. 12-02 02:00  {n2}", f"  3. 12-03 02:00  {n3}",
                                  f"  4. 12-04 02:00  {now}"]
    assert lines[i + 5:] == ["kernel default:", f"  .PPP  {PSCI_SMC}", f"  PFSF  {FLAGS_SMC}",
                             "  2 tests had one outcome every night (1 pass, 1 known issue): not drawn"]


# ---- bad input -------------------------------------------------------------------------------------------------
def test_a_baseline_without_a_run_timestamp_is_refused_with_exit_2(nights, tmp_path, capsys, monkeypatch):
    n1, _, _, now, _ = nights
    old = _night(tmp_path / "old-format", None)
    with pytest.raises(HarnessError, match="has no run timestamp") as e:
        G.read_nights([n1, old], "--baseline")
    assert "earlier `smccc-harness matrix` runs" in e.value.hint
    before = (now / "report.html").exists()
    assert cli.main(["matrix", "--report-only", str(now), "--kernels", "default", "--baseline", str(n1),
                     "--baseline", str(old)]) == 2
    err = capsys.readouterr().err
    assert f"error: {old / 'default' / 'junit.xml'} has no run timestamp" in err and "hint:" in err
    assert (now / "report.html").exists() == before                 # nothing written


@pytest.mark.parametrize("bad, message", [
    ("plain", "is not a matrix output directory"),
    ("twice", "is given twice as a night"),
    ("stamp", "run timestamp 'last tuesday' is not an ISO 8601 time"),
])
def test_bad_nights_exit_2_before_anything_runs(nights, tmp_path, capsys, bad, message):
    n1, n2, *_ = nights
    if bad == "plain":
        (tmp_path / "plain" / "x").mkdir(parents=True)
        extra = [str(tmp_path / "plain")]
    elif bad == "twice":
        extra = [str(n2), str(n2) + "/"]
    else:
        extra = [str(_night(tmp_path / "odd", "last tuesday"))]
    rc = cli.main(["matrix", "--kernels", "default", "--out", str(tmp_path / "out"), "--baseline", str(n1), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "hint:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_bad_screenshot_path_or_size_is_refused_before_anything_runs(nights, tmp_path, capsys):
    *_, now, _ = nights
    assert cli.main(["matrix", "--report-only", str(now), "--kernels", "default",
                     "--screenshot", str(tmp_path / "report.jpg")]) == 2
    assert "Chromium writes PNG" in capsys.readouterr().err
    assert cli.main(["matrix", "--kernels", "default", "--out", str(tmp_path / "out"), "--screenshot",
                     str(tmp_path / "r.png"), "--screenshot-size", "wide"]) == 2
    assert "bad window size 'wide'" in capsys.readouterr().err and not (tmp_path / "out").exists()
    from harness.kdev import browser
    with pytest.raises(HarnessError, match="bad window size"):
        browser.parse_size("wide")
    assert browser.parse_size("800x600") == (800, 600)


# ---- in a real browser ------------------------------------------------------------------------------------------
def _chromium() -> None:
    from harness.kdev import browser
    try:
        browser.binary()
    except HarnessError as e:
        if os.environ.get("CI"):        # CI's setup (./smccc-harness test) installs it: missing there is a bug
            pytest.fail(f"{e} under CI: harness/cli.py cmd_test must install it (sysdeps.ensure_report_packages)")
        pytest.skip(f"{e}: {e.hint}")


class _Dom(HTMLParser):
    """The elements of Chromium's serialised DOM: (tag, attributes)."""
    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **want) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and all(
            (v in a.get(k.rstrip("_"), "").split()) if k == "class_" else a.get(k) == v for k, v in want.items())]


@pytest.mark.infra
def test_chromium_renders_the_report_with_its_regressions_history_and_duration_bars(nights):
    _chromium()
    from harness.kdev import browser
    n1, n2, n3, now, known = nights
    cli.main(["matrix", "--report-only", str(now), "--kernels", "default", "--known-issues", str(known),
              "--baseline", str(n1), str(n2), str(n3)])
    dom = _Dom()
    dom.feed(browser.dump_dom(now / "report.html"))
    assert dom.find("section", id="regressions") and dom.find("section", id="history") \
        and dom.find("section", id="summary")
    kinds = [a["data-kind"] for a in dom.find("tr") if "data-kind" in a]
    assert kinds == ["newly failing", "known"], kinds      # against n3: FLAGS_SMC; FLAGS_HVC is listed
    cells = [a["class"].split()[1] for a in dom.find("td", class_="c")]
    assert cells == ["absent", "passed", "passed", "passed", "passed", "failed", "skipped", "failed"]   # PSCI_SMC, FLAGS_SMC
    widths = [a["style"] for a in dom.find("div", class_="bar")]
    assert widths == ["width:100.0%", "width:1.0%", "width:0.0%", "width:0.0%"], widths


@pytest.mark.infra
def test_chromium_screenshot_of_the_report_is_a_png_of_the_window(nights, tmp_path, capsys):
    _chromium()
    n1, n2, n3, now, known = nights
    png = tmp_path / "report.png"
    assert cli.main(["matrix", "--report-only", str(now), "--kernels", "default", "--known-issues", str(known),
                     "--baseline", str(n1), str(n2), str(n3), "--screenshot", str(png),
                     "--screenshot-size", "800x600"]) == 1
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (800, 600)
    assert f"screenshot: {png}" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*.tmp.png"))


def test_ci_setup_installs_the_browser_through_sysdeps(monkeypatch):
    """``./smccc-harness test`` (CI's .ci/run) installs Chromium with the selftest tools, so the two browser tests
    above run on a new machine instead of skipping."""
    from harness.images import sysdeps
    calls = []
    monkeypatch.setattr(cli, "cmd_setup", lambda args: 0)
    monkeypatch.setattr(cli, "_pytest", lambda argv: calls.append("pytest") or 0)
    monkeypatch.setattr(sysdeps, "ensure_selftest_packages", lambda progress: calls.append("selftest tools"))
    monkeypatch.setattr(sysdeps, "ensure_packages", lambda reqs, what, progress: calls.append(
        (what, [(r.package, r.probe) for r in reqs])))
    assert cli.main(["test"]) == 0
    assert calls == ["selftest tools", ("report browser", [("chromium", "chromium")]), "pytest"]
    calls.clear()
    assert cli.main(["test", "--no-system"]) == 0 and calls == ["pytest"]
