"""Shards of the kernel matrix (harness/kdev/shards.py): the slicing (every test and kernel in exactly one of N
shards, the same on every call), ``--shard`` syntax, the pytest plugin on a tiny test file, merging recorded
JUnit data (the merged report and KCIDB file equal an unsharded directory's), the refusals (different harness
commits, a missing shard, a test in two shards), and the CI example files in ci-examples/."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import cli
from harness.errors import HarnessError
from harness.kdev import matrix as M
from harness.kdev import report as R
from harness.kdev import shards as S

ROOT = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).parent / "data" / "junit" / "matrix_default.xml"    # a real matrix run, 4 tests, all pass
SEL = S.selection(M.KERNEL_MARKERS, None, [])


# ---- slicing ---------------------------------------------------------------------------------------------
NODEIDS = [f"tests/system/test_m{m}.py::test_{t}[{p}]" for m in range(7) for t in range(13) for p in ("hvc", "smc")]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_every_test_is_in_exactly_one_of_n_shards(n):
    picked = [S.select(NODEIDS, S.Shard(i, n)) for i in range(1, n + 1)]
    flat = [x for p in picked for x in p]
    assert sorted(flat) == sorted(NODEIDS) and len(flat) == len(set(flat))
    if n > 1:
        assert all(picked), "each shard gets some of 182 tests"


def test_test_slicing_is_deterministic_and_independent_of_order_and_neighbours():
    first = S.select(NODEIDS, S.Shard(2, 3))
    assert S.select(NODEIDS, S.Shard(2, 3)) == first
    assert sorted(S.select(list(reversed(NODEIDS)), S.Shard(2, 3))) == sorted(first)
    assert S.select(NODEIDS[:20], S.Shard(2, 3)) == [x for x in first if x in NODEIDS[:20]]
    # the hash is fixed (sha256), not Python's per-process hash(): a known value stays put
    assert S.shard_of("tests/system/test_forwarding_el1.py::test_hypercall_flags_name_the_conduit[hvc-0]", 2) == 1
    assert S.shard_of("tests/system/test_forwarding_el1.py::test_hypercall_flags_name_the_conduit[smc-1]", 2) == 2


@pytest.mark.parametrize("kernels, n", [(["6.12", "7.2", "default"], 3), (["a", "b", "c", "d", "e"], 2),
                                        (["6.12", "7.2", "default"], 1)])
def test_with_at_least_n_kernels_each_kernel_goes_to_one_shard(kernels, n):
    plans = [S.plan(kernels, S.Shard(i, n)) for i in range(1, n + 1)]
    assert sorted(k for p in plans for k in p) == sorted(kernels)
    assert all(plans) and S.unit(kernels, n) == "kernel"
    assert all(S.extra_args(S.Shard(i, n), kernels) == [] for i in range(1, n + 1))


def test_with_fewer_kernels_than_shards_every_shard_runs_every_kernel_with_a_test_slice():
    kernels = ["7.2", "default"]
    assert S.unit(kernels, 3) == "test"
    assert [S.plan(kernels, S.Shard(i, 3)) for i in (1, 2, 3)] == [kernels] * 3
    assert S.extra_args(S.Shard(2, 3), kernels) == ["-p", "harness.kdev.shards", "--smccc-shard=2/3"]


@pytest.mark.parametrize("text, says", [("0/2", "between 1 and N=2"), ("3/2", "between 1 and N=2"),
                                        ("a/b", "expected i/N"), ("1/0", "N must be at least 1"),
                                        ("", "expected i/N"), ("1/2/3", "expected i/N"), ("-1/2", "expected i/N")])
def test_bad_shard_syntax_is_a_harness_error_with_a_hint(text, says):
    with pytest.raises(HarnessError, match=re.escape(says)) as e:
        S.parse_shard(text)
    assert "i/N" in e.value.hint
    assert S.parse_shard(" 2 / 4 ") == S.Shard(2, 4) and str(S.Shard(2, 4)) == "2/4"


@pytest.mark.parametrize("text", ["0/2", "3/2", "a/b", "1/0"])
def test_bad_shard_on_the_command_line_exits_2_naming_it(text, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["matrix", "--kernels", "default", "--shard", text])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --shard" in err and f"bad shard {text!r}" in err


def test_shard_with_merge_or_report_only_is_bad_input(tmp_path, capsys):
    assert cli.main(["matrix", "--shard", "1/2", "--merge", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--shard runs one slice" in capsys.readouterr().err


# ---- the pytest plugin -----------------------------------------------------------------------------------
def test_plugin_runs_a_disjoint_covering_slice_and_records_it(tmp_path):
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent("""
        import pytest
        @pytest.mark.parametrize("x", range(12))
        def test_a(x): pass
        @pytest.mark.parametrize("x", range(5))
        def test_other(x): pass
    """))
    ran, records = [], []
    for i in (1, 2, 3):
        d = tmp_path / f"s{i}"
        d.mkdir()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "/dev/null",
                            "--rootdir", str(tmp_path), "-p", "harness.kdev.shards", f"--smccc-shard={i}/3",
                            "-k", "test_a", f"--junitxml={d / 'junit.xml'}", "test_tiny.py"],
                           cwd=tmp_path, capture_output=True, text=True, check=False,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert r.returncode in (0, 5), r.stdout + r.stderr
        ran += [tc.get("name") for tc in ET.parse(d / "junit.xml").getroot().iter("testcase")]
        records.append(json.loads((d / S.SELECTION).read_text()))
    assert sorted(ran) == sorted(f"test_a[{x}]" for x in range(12)) and len(ran) == len(set(ran))
    everything = [f"test_tiny.py::test_a[{x}]" for x in range(12)]       # after -k, in pytest's order
    assert all(rec["all"] == everything for rec in records)
    assert [rec["selected"] for rec in records] == [S.select(everything, S.Shard(i, 3)) for i in (1, 2, 3)]


# ---- merging recorded JUnit data -------------------------------------------------------------------------
def _recorded(kernel: str) -> ET.ElementTree:
    """The recorded run as if made on a CI machine (absolute log paths that do not exist here)."""
    return ET.ElementTree(ET.fromstring(RECORDED.read_text().replace("@KERNEL_DIR@", f"/ci-machine/out/{kernel}")))


def _write(tree: ET.ElementTree, d: Path) -> None:
    """``d/junit.xml``, and the console logs it names under ``d/runs/`` (what a shard's directory holds)."""
    d.mkdir(parents=True, exist_ok=True)
    tree.write(d / "junit.xml", encoding="utf-8", xml_declaration=True)
    for p in tree.getroot().iter("property"):
        if p.get("name") == "test_console_log":
            log = d / "runs" / p.get("value").split("/runs/", 1)[1]
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"console of {log.name}\n")


def _nodeid(tc: ET.Element) -> str:
    return tc.get("classname").replace(".", "/") + ".py::" + tc.get("name")


def _unsharded(d: Path, kernels=("default",), fail=()) -> Path:
    for k in kernels:
        tree = _recorded(k)
        for tc in tree.getroot().iter("testcase"):
            if tc.get("name") in fail:
                ET.SubElement(tc, "failure", message="AssertionError: flags = 0")
        _write(tree, d / k)
    return d


def _sharded(base: Path, n: int, kernels=("default",), commit="c0ffee" * 6 + "abcd", fail=()) -> list[Path]:
    """The unsharded results as the ``--out`` dirs of ``n`` shard jobs, each with the tests the slicing gives it."""
    dirs = []
    for i in range(1, n + 1):
        shard, d = S.Shard(i, n), base / f"shard-{i}"
        d.mkdir(parents=True)
        for k in S.plan(list(kernels), shard):
            tree = _recorded(k)
            suite = next(tree.getroot().iter("testsuite"))
            cases = list(suite.iter("testcase"))
            order = [_nodeid(tc) for tc in cases]
            for tc in cases:
                if tc.get("name") in fail:
                    ET.SubElement(tc, "failure", message="AssertionError: flags = 0")
            if S.unit(list(kernels), n) == "test":
                for tc in cases:
                    if S.shard_of(_nodeid(tc), n) != i:
                        suite.remove(tc)
                (d / k).mkdir(parents=True)
                (d / k / S.SELECTION).write_text(json.dumps({"shard": str(shard), "all": order,
                                                             "selected": S.select(order, shard)}))
            _write(tree, d / k)
        S.write_manifest(d, shard, list(kernels), SEL, 0, commit=commit)
        dirs.append(d)
    return dirs


def _outputs(d: Path) -> tuple[str, str, dict]:
    doc = json.loads((d / "k.json").read_text())
    return ((d / "report.txt").read_text().replace(str(d), "OUT"), (d / "report.html").read_text(), doc)


def test_merged_shards_give_the_report_and_kcidb_of_the_unsharded_run(tmp_path, capsys):
    dirs = _sharded(tmp_path, 2)
    assert all(len(list((d / "default").glob("junit.xml"))) for d in dirs)
    counts = [len(list(ET.parse(d / "default" / "junit.xml").getroot().iter("testcase"))) for d in dirs]
    assert counts[0] and counts[1] and sum(counts) == 4           # a real split of the 4 recorded tests
    merged, whole = tmp_path / "merged", _unsharded(tmp_path / "whole")
    assert cli.main(["matrix", "--merge", *map(str, dirs), "--out", str(merged), "--kcidb", str(merged / "k.json")]) == 0
    assert cli.main(["matrix", "--report-only", str(whole), "--kernels", "default",
                     "--kcidb", str(whole / "k.json")]) == 0
    m_txt, m_html, m_doc = _outputs(merged)
    w_txt, w_html, w_doc = _outputs(whole)
    assert m_doc == w_doc and len(m_doc["tests"]) == 4
    assert m_txt == w_txt and m_txt.count("PASS") == 4
    assert m_html == w_html and m_html.count(">log</a>") == 4      # console log links into the copied runs/
    assert "merged 2 shards (tests; harness c0ffee" in capsys.readouterr().out
    suite = next(ET.parse(merged / "default" / "junit.xml").getroot().iter("testsuite"))
    assert suite.get("tests") == "4" and suite.get("failures") == "0"


def test_merged_kernel_shards_with_a_failure_equal_the_unsharded_run_and_its_regression_view(tmp_path, capsys):
    kernels = ("6.12", "7.2", "default")
    fail = ("test_hypercall_flags_name_the_conduit[smc-1]",)
    dirs = _sharded(tmp_path, 2, kernels, fail=fail)
    assert [S.plan(list(kernels), S.Shard(i, 2)) for i in (1, 2)] == [["6.12", "default"], ["7.2"]]
    merged, whole = tmp_path / "merged", _unsharded(tmp_path / "whole", kernels, fail=fail)
    before = _unsharded(tmp_path / "before", kernels)
    rc = cli.main(["matrix", "--merge", *map(str, dirs), "--out", str(merged), "--kcidb", str(merged / "k.json"),
                   "--baseline", str(before)])
    merged_out = capsys.readouterr().out
    assert rc == 1                                           # a test newly fails: a regression
    assert cli.main(["matrix", "--report-only", str(whole), "--kernels", *kernels, "--kcidb", str(whole / "k.json"),
                     "--baseline", str(before)]) == 1
    whole_out = capsys.readouterr().out
    m_txt, m_html, m_doc = _outputs(merged)
    w_txt, w_html, w_doc = _outputs(whole)
    assert m_doc == w_doc and len(m_doc["tests"]) == 12 and len(m_doc["builds"]) == 3
    assert m_txt == w_txt and m_txt.count("FAIL") == 3
    assert m_html.replace(str(merged), "OUT") == w_html.replace(str(whole), "OUT") and 'id="regressions"' in m_html
    regress = [ln for ln in merged_out.splitlines() if "regressed" in ln]
    assert regress == [ln for ln in whole_out.splitlines() if "regressed" in ln] and "3 regressed" in regress[0]


def test_shards_of_different_harness_commits_refuse_naming_both(tmp_path, capsys):
    a = _sharded(tmp_path / "a", 2, commit="1" * 40)
    b = _sharded(tmp_path / "b", 2, commit="2" * 40)
    assert cli.main(["matrix", "--merge", str(a[0]), str(b[1]), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "different harness commits" in err and "1" * 40 in err and "2" * 40 in err and "hint:" in err
    assert not (tmp_path / "m" / "report.html").exists()


def test_a_missing_shard_is_an_error_naming_it(tmp_path, capsys):
    dirs = _sharded(tmp_path, 3, kernels=("6.12", "7.2", "default"))
    assert cli.main(["matrix", "--merge", str(dirs[0]), str(dirs[2]), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "missing shard 2/3" in err and "have 1/3, 3/3" in err


def test_a_shard_given_twice_or_a_directory_without_a_manifest_is_refused(tmp_path, capsys):
    dirs = _sharded(tmp_path, 2)
    assert cli.main(["matrix", "--merge", str(dirs[0]), str(dirs[0]), "--out", str(tmp_path / "m")]) == 2
    assert "shard 1/2 given twice" in capsys.readouterr().err
    assert cli.main(["matrix", "--merge", str(dirs[0]), str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert f"{tmp_path} is not a shard directory" in capsys.readouterr().err


def test_a_test_in_two_shards_is_not_counted_twice(tmp_path):
    dirs = _sharded(tmp_path, 2)
    # shard 2 also reports a test of shard 1 (a stale junit.xml): refuse rather than count it twice
    extra = next(_recorded("default").getroot().iter("testcase"))
    extra_name = extra.get("name")
    owner = S.shard_of(_nodeid(extra), 2)
    other = dirs[2 - owner] / "default" / "junit.xml"
    tree = ET.parse(other)
    next(tree.getroot().iter("testsuite")).append(extra)
    tree.write(other)
    with pytest.raises(HarnessError, match=re.escape(extra_name) + ".* was run by shard 1/2 and by shard 2/2"):
        S.merge(dirs, tmp_path / "m", M.label_dir)


def test_a_selected_test_without_a_result_is_lost_and_refused(tmp_path):
    dirs = _sharded(tmp_path, 2)
    junit = dirs[0] / "default" / "junit.xml"
    tree = ET.parse(junit)
    suite = next(tree.getroot().iter("testsuite"))
    gone = next(suite.iter("testcase"))
    suite.remove(gone)
    tree.write(junit)
    with pytest.raises(HarnessError, match=r"shard 1/2 selected .*" + re.escape(gone.get("name")) + ".* no result"):
        S.merge(dirs, tmp_path / "m", M.label_dir)


def test_a_shard_run_writes_its_manifest_and_runs_its_kernels(tmp_path, monkeypatch):
    seen = {}

    def fake_run_matrix(kernels, out, **kw):
        seen.update(kernels=kernels, extra=kw["extra"])
        return [R.KernelRun(label=k, results={"m::t": R.TestResult("passed")}, junit=out / k / "junit.xml")
                for k in kernels]

    monkeypatch.setattr(M, "run_matrix", fake_run_matrix)
    (tmp_path / "p").mkdir()
    out = tmp_path / "o"
    out.mkdir()
    assert cli.main(["matrix", "--kernels", "6.12", "7.2", "default", "--shard", "2/2", "--out", str(out),
                     "-k", "psci"]) == 0
    assert seen == {"kernels": ["7.2"], "extra": []}
    man = json.loads((out / S.MANIFEST).read_text())
    assert {k: man[k] for k in ("shard", "index", "total", "unit", "kernels", "ran", "status")} == {
        "shard": "2/2", "index": 2, "total": 2, "unit": "kernel", "kernels": ["6.12", "7.2", "default"],
        "ran": ["7.2"], "status": 0}
    assert man["selection"] == {"markers": M.KERNEL_MARKERS, "k": "psci", "pytest_args": []}
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", man["harness_commit"])
    assert cli.main(["matrix", "--kernels", "default", "--shard", "1/3", "--out", str(tmp_path / "p")]) == 0
    assert seen["kernels"] == ["default"] and seen["extra"] == ["-p", "harness.kdev.shards", "--smccc-shard=1/3"]


def test_harness_commit_is_the_checkouts_head():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    assert S.git_commit() == (head.stdout.strip() if head.returncode == 0 else "unknown")


# ---- the CI examples -------------------------------------------------------------------------------------
CI = ROOT / "ci-examples"


def _harness_commands(doc) -> list[str]:
    """Every ``./smccc-harness ...`` line of a CI file's run:/script: entries."""
    out = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("run", "script") and isinstance(v, (str, list)):
                    for line in ([v] if isinstance(v, str) else v):
                        out.extend(ln.strip() for ln in str(line).splitlines() if ln.strip().startswith("./smccc-harness"))
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(doc)
    return out


def _parse(line: str, env: dict[str, str]):
    for k, v in env.items():
        line = line.replace(k, v)
    argv = shlex.split(line)[1:]
    if "--" in argv:
        argv = argv[:argv.index("--")]
    return cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("name, env", [
    ("github-actions.yml", {"${{ matrix.shard }}": "3", "$KERNELS": "6.12 7.2 default"}),
    ("gitlab-ci.yml", {"$CI_NODE_INDEX": "3", "$CI_NODE_TOTAL": "4", "$KERNELS": "6.12 7.2 default"}),
])
def test_ci_examples_parse_and_run_commands_the_cli_has(name, env):
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((CI / name).read_text())
    cmds = _harness_commands(doc)
    parsed = [_parse(c, env) for c in cmds]
    assert [p.command for p in parsed] == ["setup", "matrix", "matrix"], cmds
    _setup, shard, merge = parsed
    assert shard.shard == S.Shard(3, 4) and shard.kernels == ["6.12", "7.2", "default"] and shard.merge is None
    assert merge.merge == [shard.out.replace("3", str(i)) if "shards/" not in merge.merge[0]
                           else f"shards/{shard.out.replace('3', str(i))}" for i in (1, 2, 3, 4)]
    assert merge.out and merge.kcidb and merge.shard is None
    text = (CI / name).read_text()
    assert "images/lock.json" in text and ".cache/smccc-harness" in text


def test_github_example_fans_out_as_many_jobs_as_its_shard_count_and_caches_the_harness_cache():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((CI / "github-actions.yml").read_text())
    jobs = doc["jobs"]
    assert jobs["shard"]["strategy"]["matrix"]["shard"] == [1, 2, 3, 4]
    cache = next(s for s in jobs["shard"]["steps"] if str(s.get("uses", "")).startswith("actions/cache"))
    assert cache["with"]["path"] == "~/.cache/smccc-harness" and "hashFiles('images/lock.json')" in cache["with"]["key"]
    assert jobs["merge"]["needs"] == "shard" and "!cancelled()" in jobs["merge"]["if"]
    uploads = [s for j in jobs.values() for s in j["steps"] if str(s.get("uses", "")).startswith("actions/upload")]
    assert [u["with"]["path"] for u in uploads] == ["shard-${{ matrix.shard }}/", "merged/"]


def test_gitlab_example_fans_out_with_parallel_and_keeps_the_shards_for_the_merge():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    shard, merge = doc["matrix-shard"], doc["matrix-merge"]
    assert shard["parallel"] == 4 and shard["cache"]["key"]["files"] == ["images/lock.json"]
    assert doc["variables"]["XDG_CACHE_HOME"] + "/smccc-harness" == "$CI_PROJECT_DIR/.cache/smccc-harness"
    assert shard["cache"]["paths"] == [".cache/smccc-harness/"]
    assert shard["artifacts"]["when"] == "always" and shard["artifacts"]["paths"] == ["shard-$CI_NODE_INDEX/"]
    assert merge["needs"] == ["matrix-shard"] and merge["artifacts"]["paths"] == ["merged/"]


MISMATCHED = json.dumps({"shard": "1/2", "index": 2, "total": 2, "harness_commit": "x", "unit": "test", "kernels": [],
                         "selection": {}})


@pytest.mark.parametrize("manifest, says", [("{", "is not JSON"), ('{"shard": "1/2"}', "no index, total"),
                                            (MISMATCHED, "but index/total 2/2")])
def test_a_broken_manifest_is_bad_input_naming_the_file(tmp_path, manifest, says):
    (tmp_path / S.MANIFEST).write_text(manifest)
    with pytest.raises(HarnessError, match=re.escape(says)) as e:
        S.read_manifest(tmp_path)
    assert str(tmp_path / S.MANIFEST) in str(e.value)
