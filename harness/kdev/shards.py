"""Shards of the kernel matrix for a CI engine's parallel jobs: ``matrix --shard i/N`` and ``matrix --merge``.

    smccc-harness matrix --kernels 6.12 7.2 default --shard 2/3 --out shard-2      (one CI job of three)
    smccc-harness matrix --merge shard-1 shard-2 shard-3 --out merged [--kcidb F] [--baseline PREV]

The CI engine fans the N jobs out (a GitHub Actions matrix, GitLab ``parallel:``; ci-examples/); the harness only
decides which part of kernels x tests job ``i`` runs, and joins the N output directories afterwards.

**The slicing unit** (:func:`plan`).  With at least N kernels, whole kernels: kernel number ``j`` (0-based, in
``--kernels`` order) goes to shard ``j % N + 1``.  A kernel is the costly unit (its guest boots, its snapshot
is made, once per pytest run), so a shard that owns a kernel runs it once and its JUnit file is complete.  With
fewer kernels than shards, every shard runs every kernel and takes the tests whose pytest node id hashes to it:
``sha256(node id) mod N == i - 1`` (:func:`shard_of`), applied by this module as a small pytest plugin
(``-p harness.kdev.shards --smccc-shard=i/N``) after ``-m``/``-k`` have selected.  A node id's hash does not
depend on the machine, the collection order or the other tests, so each selected test lands in exactly one
shard, on every run, even if two shards' machines were to collect differently; a ``-k`` list or a
``--collect-only`` round trip would need an extra pytest run per kernel and the same collection everywhere.
Each shard records, per kernel, the node ids its pytest selected and all the ones the selection had
(``<kernel>/shard-selection.json``), which the merge uses to check coverage and to keep pytest's order.

**The manifest** ``OUT/shard.json``: ``shard`` ("i/N"), ``index``, ``total``, ``harness_commit`` (``git
rev-parse HEAD`` of the checkout, "unknown" outside git), ``unit`` ("kernel" or "test"), ``kernels`` (all of
them), ``ran`` (the kernels this shard ran), ``selection`` (markers, ``-k``, extra pytest args) and ``status``
(the shard's matrix exit code).

**The merge** (:func:`merge`) reads N manifests and refuses (:class:`HarnessError`, exit 2) shards of different
harness commits (naming both), of different N, kernels or selection, a shard given twice, a missing one
(naming ``i/N``), and a test that two shards ran.  It writes ``OUT/<kernel>/junit.xml`` with every shard's test
cases of that kernel (pytest's order, the counts recomputed; the suite properties and the earliest timestamp of
the shards), copies each shard's ``<kernel>/runs`` next to it (so the report's console log links work), and
``OUT`` is then a matrix output directory like any other: ``report.html``, ``report.txt``, ``--kcidb``,
``--baseline`` and ``compare`` work on it exactly as on an unsharded run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from .. import paths
from ..errors import HarnessError
from .regressions import read_run

MANIFEST = "shard.json"
SELECTION = "shard-selection.json"
OPTION = "--smccc-shard"
RECORD_OPTION = "--smccc-shard-record"
SYNTAX_HINT = "write the shard as i/N with 1 <= i <= N, e.g. --shard 1/4 ... --shard 4/4"


# ---- the slicing (pure) ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    total: int

    def __str__(self) -> str:
        return f"{self.index}/{self.total}"


def parse_shard(text: str) -> Shard:
    """``"i/N"`` -> :class:`Shard`; anything else (``0/2``, ``3/2``, ``a/b``, ``1/0``) a HarnessError."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise HarnessError(f"bad shard {text!r}: expected i/N with whole numbers", SYNTAX_HINT)
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise HarnessError(f"bad shard {text!r}: N must be at least 1", SYNTAX_HINT)
    if not 1 <= i <= n:
        raise HarnessError(f"bad shard {text!r}: i must be between 1 and N={n}", SYNTAX_HINT)
    return Shard(i, n)


def shard_arg(text: str) -> Shard:
    """argparse ``type=``: the same check, as an argparse error (usage, message, exit 2)."""
    try:
        return parse_shard(text)
    except HarnessError as e:
        raise argparse.ArgumentTypeError(f"{e.args[0]} ({e.hint})") from None


def shard_of(nodeid: str, total: int) -> int:
    """The shard (1-based) of a pytest node id among ``total``: a stable hash, the same on every machine."""
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:8], "big") % total + 1


def unit(kernels: list[str], total: int) -> str:
    """The slicing unit: whole ``"kernel"``s when there are at least N of them, else ``"test"``s."""
    return "kernel" if len(kernels) >= total else "test"


def plan(kernels: list[str], shard: Shard) -> list[str]:
    """The kernels shard ``shard`` runs (all of them when slicing by test)."""
    if unit(kernels, shard.total) == "test":
        return list(kernels)
    return [k for j, k in enumerate(kernels) if j % shard.total == shard.index - 1]


def select(nodeids: list[str], shard: Shard) -> list[str]:
    """The node ids (in their order) that shard ``shard`` runs when slicing by test."""
    return [n for n in nodeids if shard_of(n, shard.total) == shard.index]


def extra_args(shard: Shard, kernels: list[str]) -> list[str]:
    """The extra pytest arguments of every kernel's run in shard ``shard`` (none when slicing by kernel).  The
    plugin records its selection next to the ``--junitxml`` file (``<kernel>/shard-selection.json``)."""
    if unit(kernels, shard.total) == "kernel":
        return []
    return ["-p", "harness.kdev.shards", f"{OPTION}={shard}"]


# ---- the pytest plugin (loaded with -p harness.kdev.shards) ---------------------------------------------------
def pytest_addoption(parser) -> None:
    g = parser.getgroup("smccc-shard", "smccc-harness matrix shards")
    g.addoption(OPTION, default=None, metavar="i/N", help="run only the tests whose node id hashes to shard i of N")
    g.addoption(RECORD_OPTION, default=None, metavar="FILE",
                help=f"write the selected and all node ids here (JSON; default: {SELECTION} next to --junitxml)")


def _modifyitems(config, items):
    text = config.getoption(OPTION.lstrip("-").replace("-", "_"), None)
    if not text:
        return
    shard = parse_shard(text)
    everything = [it.nodeid for it in items]
    keep = [it for it in items if shard_of(it.nodeid, shard.total) == shard.index]
    drop = [it for it in items if shard_of(it.nodeid, shard.total) != shard.index]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    record = config.getoption(RECORD_OPTION.lstrip("-").replace("-", "_"), None)
    xml = getattr(config.option, "xmlpath", None)
    if not record and xml:
        record = str(Path(xml).parent / SELECTION)
    if record:     # under xdist every worker writes the same content: write whole files only
        p = Path(record)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"shard": str(shard), "selected": [it.nodeid for it in keep],
                                   "all": everything}, indent=1) + "\n")
        tmp.replace(p)


@pytest.hookimpl(wrapper=True)   # after -m, -k and the tiers have deselected
def pytest_collection_modifyitems(config, items):
    result = yield
    _modifyitems(config, items)
    return result


# ---- a shard's output ---------------------------------------------------------------------------------------
def git_commit() -> str:
    """``git rev-parse HEAD`` of the harness checkout, or "unknown"."""
    try:
        r = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                           check=False, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


def selection(markers: str, k: str | None, extra: list[str]) -> dict:
    return {"markers": markers, "k": k, "pytest_args": list(extra)}


def write_manifest(out: Path, shard: Shard, kernels: list[str], sel: dict, status: int,
                   commit: str | None = None) -> Path:
    doc = {"shard": str(shard), "index": shard.index, "total": shard.total,
           "harness_commit": commit or git_commit(), "unit": unit(kernels, shard.total), "kernels": list(kernels),
           "ran": plan(kernels, shard), "selection": sel, "status": status}
    p = Path(out) / MANIFEST
    p.write_text(json.dumps(doc, indent=1) + "\n")
    return p


# ---- merging ------------------------------------------------------------------------------------------------
MERGE_HINT = "pass the --out directories of all N `smccc-harness matrix --shard i/N` jobs of one run"


def read_manifest(d: Path) -> dict:
    p = Path(d) / MANIFEST
    if not p.is_file():
        raise HarnessError(f"{d} is not a shard directory: no {MANIFEST} in it", MERGE_HINT)
    try:
        doc = json.loads(p.read_text())
    except ValueError as e:
        raise HarnessError(f"{p} is not JSON ({e})", MERGE_HINT) from None
    need = ("shard", "index", "total", "harness_commit", "unit", "kernels", "selection")
    missing = [k for k in need if k not in doc] if isinstance(doc, dict) else list(need)
    if missing:
        raise HarnessError(f"{p} is not a shard manifest: no {', '.join(missing)}", MERGE_HINT)
    if parse_shard(f"{doc['index']}/{doc['total']}") != parse_shard(str(doc["shard"])):
        raise HarnessError(f"{p} is not a shard manifest: shard {doc['shard']} but index/total "
                           f"{doc['index']}/{doc['total']}", MERGE_HINT)
    doc["dir"] = Path(d)
    return doc


def check_shards(manifests: list[dict]) -> list[dict]:
    """The manifests sorted by index; a HarnessError when they are not the N shards of one run."""
    if not manifests:
        raise HarnessError("nothing to merge", MERGE_HINT)
    first = manifests[0]
    for m in manifests[1:]:
        if m["harness_commit"] != first["harness_commit"]:
            raise HarnessError(f"shards of different harness commits: {first['dir']} ({first['shard']}) was run at "
                               f"{first['harness_commit']}, {m['dir']} ({m['shard']}) at {m['harness_commit']}",
                               "merge only the shards of one CI run (one checkout); rerun the stale ones")
        for key in ("total", "kernels", "selection"):
            if m[key] != first[key]:
                raise HarnessError(f"shards of different runs: {key} of {first['dir']} is {first[key]!r}, of "
                                   f"{m['dir']} {m[key]!r}", MERGE_HINT)
    by_index: dict[int, dict] = {}
    for m in manifests:
        if m["index"] in by_index:
            raise HarnessError(f"shard {m['shard']} given twice: {by_index[m['index']]['dir']} and {m['dir']}",
                               MERGE_HINT)
        by_index[m["index"]] = m
    n = first["total"]
    missing = [f"{i}/{n}" for i in range(1, n + 1) if i not in by_index]
    if missing:
        raise HarnessError(f"missing shard {', '.join(missing)} (have {', '.join(sorted(m['shard'] for m in manifests))})",
                           f"{MERGE_HINT}; a failed job still uploads its directory")
    return [by_index[i] for i in sorted(by_index)]


def _key(tc: ET.Element) -> tuple[str, str]:
    return tc.get("classname", ""), tc.get("name", "")


def nodeid_key(nodeid: str) -> tuple[str, str]:
    """A pytest node id -> its JUnit (classname, name): ``tests/system/m.py::C::t[p]`` ->
    ``("tests.system.m.C", "t[p]")``."""
    path, *rest = nodeid.split("::")
    mod = path.removesuffix(".py").replace("/", ".")
    return ".".join([mod, *rest[:-1]]), rest[-1] if rest else ""


def _suite(root: ET.Element) -> ET.Element:
    return root if root.tag == "testsuite" else root.find("testsuite")


def merge_junit(parts: list[tuple[str, Path]], order: list[str] | None = None) -> ET.ElementTree:
    """One kernel's JUnit files of several shards ((shard, path) pairs) -> one JUnit tree: every test case once
    (two shards with the same test case: HarnessError), in ``order`` (node ids) when known, the counts
    recomputed, the first shard's suite properties and the earliest timestamp."""
    suites, seen = [], {}
    for shard, path in parts:
        read_run(Path(path), Path(path).parent.name)   # a HarnessError with a hint for a file that is not JUnit
        suites.append((shard, _suite(ET.parse(path).getroot())))
    root = ET.Element("testsuites")
    merged = copy.deepcopy(suites[0][1])
    for tc in list(merged.findall("testcase")):
        merged.remove(tc)
    root.append(merged)
    cases = []
    for shard, suite in suites:
        for tc in suite.findall("testcase"):
            k = _key(tc)
            if k in seen:
                raise HarnessError(f"{'::'.join(k)} was run by shard {seen[k]} and by shard {shard}",
                                   "shards of one run select disjoint tests; rerun them from one checkout")
            seen[k] = shard
            cases.append(tc)
    if order:
        pos = {nodeid_key(n): i for i, n in enumerate(order)}
        cases.sort(key=lambda tc: pos.get(_key(tc), len(pos)))
    for tc in cases:
        merged.append(copy.deepcopy(tc))
    stamps = sorted(s.get("timestamp") for _, s in suites if s.get("timestamp"))
    if stamps:
        merged.set("timestamp", stamps[0])
    count = {"failures": "failure", "errors": "error", "skipped": "skipped"}
    merged.set("tests", str(len(cases)))
    for attr, tag in count.items():
        merged.set(attr, str(sum(1 for tc in cases if tc.find(tag) is not None)))
    merged.set("time", f"{sum(float(s.get('time', 0) or 0) for _, s in suites):.3f}")
    return ET.ElementTree(root)


def _check_coverage(label: str, parts: list[tuple[str, Path]], records: list[tuple[str, dict]]) -> list[str]:
    """Every node id a shard selected is in its JUnit file; the shards together selected each one of the
    selection once.  Returns pytest's order of the selection."""
    order = records[0][1].get("all", [])
    for shard, rec in records:
        if rec.get("all", []) != order:
            raise HarnessError(f"kernel {label}: shard {shard} collected other tests than shard {records[0][0]}",
                               "the shards must run one checkout with the same selection; rerun them")
    chosen: dict[str, str] = {}
    for shard, rec in records:
        for n in rec.get("selected", []):
            if n in chosen:
                raise HarnessError(f"kernel {label}: {n} was selected by shard {chosen[n]} and {shard}", MERGE_HINT)
            chosen[n] = shard
    lost = [n for n in order if n not in chosen]
    if lost:
        raise HarnessError(f"kernel {label}: no shard selected {lost[0]}" + (f" (and {len(lost) - 1} more)"
                           if len(lost) > 1 else ""), MERGE_HINT)
    for shard, path in parts:
        have = {_key(tc) for tc in _suite(ET.parse(path).getroot()).findall("testcase")}
        rec = dict(records)[shard]
        missing = [n for n in rec.get("selected", []) if nodeid_key(n) not in have]
        if missing:
            raise HarnessError(f"kernel {label}: shard {shard} selected {missing[0]} but its {path} has no result "
                               "for it (the run was cut short)", "rerun that shard")
    return order


def merge(dirs: list[Path], out: Path, label_dir) -> tuple[list[dict], list[tuple[str, Path]]]:
    """Join the shard directories into ``out``; returns the manifests (by index) and (kernel label, merged JUnit
    path) for each kernel that has results.  ``label_dir``: kernel label -> its directory name (matrix.py)."""
    manifests = check_shards([read_manifest(Path(d)) for d in dirs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    junits = []
    for label in manifests[0]["kernels"]:
        name = label_dir(label)
        parts, records = [], []
        for m in manifests:
            if label not in m.get("ran", plan(m["kernels"], Shard(m["index"], m["total"]))):
                continue
            j = m["dir"] / name / "junit.xml"
            if not j.is_file():
                if m.get("status") == 2:   # the shard's run of this kernel broke: its report says so
                    continue
                raise HarnessError(f"shard {m['shard']} ({m['dir']}) ran kernel {label} but has no {name}/junit.xml",
                                   "upload the whole --out directory of every shard")
            parts.append((m["shard"], j))
            rec = m["dir"] / name / SELECTION
            if m["unit"] == "test" and rec.is_file():
                records.append((m["shard"], json.loads(rec.read_text())))
        if not parts:
            continue
        order = _check_coverage(label, parts, records) if len(records) == len(parts) and records else None
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        tree = merge_junit(parts, order)
        for _, j in parts:   # the console logs the JUnit properties name: same runs/... tail as in the shard
            if (j.parent / "runs").is_dir():
                shutil.copytree(j.parent / "runs", d / "runs", dirs_exist_ok=True)
        tree.write(d / "junit.xml", encoding="utf-8", xml_declaration=True)
        junits.append((label, d / "junit.xml"))
    return manifests, junits
