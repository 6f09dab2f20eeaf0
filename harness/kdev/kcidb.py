"""The results as KernelCI's KCIDB JSON (schema v5.3), read from the JUnit files pytest and the matrix write.

    smccc-harness matrix ... --kcidb FILE         every kernel of the matrix (DIR/<kernel>/junit.xml)
    pytest ... --kcidb FILE                       one pytest run (its --junitxml file; one is made if not given)
    python -m harness.kdev.kcidb validate FILE    check a KCIDB file with the kcidb-io package
    python -m harness.kdev.kcidb from-junit DIR/<kernel>/junit.xml ... -o FILE

The source is always the JUnit XML (so ``matrix --report-only DIR --kcidb FILE`` works on an earlier matrix).
Per JUnit file (one kernel's run), with ``RUN = <kernel label>@<testsuite timestamp>``:

* one checkout and one build, both with id ``smccc_harness:RUN`` (ids are unique per object type).  The
  harness tests prebuilt kernels, so the build is the kernel as the run got it (``status`` PASS,
  ``architecture`` arm64, ``config_name`` the Debian flavour, e.g. ``cloud-arm64``, taken from the kernel version;
  ``unknown`` for other kernels).  Both carry the JUnit suite properties (:func:`harness.kdev.report.suite_properties`)
  in ``misc``: ``kernel_version``, ``kernel_sha256``, ``kernel_package``, ``kernel_image``, ``config``,
  ``qemu_version``, ``accel``, ``kvm_mode``, ``initramfs_sha256``, ``harness_commit``..., the ``deb:NAME``
  properties as ``misc.packages[NAME]`` and ``kernel_deb:SPEC`` as ``misc.kernel_debs[SPEC]`` ("VERSION sha256:HEX").
* a kernel whose run left no JUnit file (the matrix's pytest died, or never started its tests) still gets its
  checkout and a build, ``smccc_harness:<label>@broken`` with ``status`` ERROR, the run's note as comment, the end
  of its pytest.log as ``log_excerpt`` and no tests (:func:`broken_build`): a nightly shows it as broken, not absent.
* one test per JUnit test case, id ``smccc_harness:RUN:<classname>::<name>``, and a dotted ``path`` (KCIDB paths
  allow only ``[A-Za-z0-9_-]`` between the dots): ``smccc.`` + the classname without its leading
  ``tests.system.`` / ``tests.`` + the test function + the parametrization, each character outside
  ``[A-Za-z0-9_-]`` made ``_``.  ``tests.system.test_psci_el1`` + ``test_cpu_on[hvc-0]`` ->
  ``smccc.test_psci_el1.test_cpu_on.hvc-0``.  Should two test cases of a run end up with the same path, the later
  ones get ``_2``, ``_3``...; the JUnit classname and name stay in ``misc``.

Status mapping (:data:`STATUS`): passed PASS, failed FAIL, error ERROR, skipped SKIP, and xfailed (a known kernel
bug from harness/model/known_bad.py, run as a strict xfail) FAIL plus an *incident* of an *issue*.  Schema v5
has no ``waived`` flag any more (v4 had one; ``kcidb_io.schema.LATEST`` rejects it, ``additionalProperties`` is
false); it says that a known problem is an issue (``issues``, here ``smccc_harness:known_bad:<KNOWN_BAD key>``
with ``culprit.code`` true: the kernel is at fault) and each test that shows it an incident (``incidents``,
``present`` true, linking the test id to the issue), which KernelCI's triage uses to tell known failures from new
ones.  The test itself did fail: the kernel has the bug, so FAIL is its honest status (SKIP or PASS would hide a
real defect in the summary); ``misc.known_issue`` is true and ``log_excerpt`` has the xfail reason.  An xfail
that names no KNOWN_BAD entry gets an issue of its own test path (``smccc_harness:xfail:<path>``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from ..errors import HarnessError
from ..model.known_bad import KNOWN_BAD
from .report import KernelRun, TestResult, read_junit, scenario_name

ORIGIN = "smccc_harness"
SCHEMA_VERSION = {"major": 5, "minor": 3}
STATUS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP", "xfailed": "FAIL"}
PATH_ROOT = "smccc"
ISSUE_VERSION = 1
LOG_EXCERPT_MAX = 16384     # the schema's maxLength


class KcidbInvalid(HarnessError):
    """A document that does not fit the KCIDB schema (kcidb-io names the field)."""


JUNIT_HINT = ("give a JUnit XML file written by pytest --junitxml; the matrix writes one per kernel as "
              "OUT/<kernel>/junit.xml (a run killed while writing it leaves a truncated file: run that kernel again)")


# ---- input -----------------------------------------------------------------------------------------
def read_checked(path: Path, label: str) -> tuple[KernelRun, ET.Element]:
    """One kernel's results (:func:`harness.kdev.report.read_junit`) and the parsed JUnit tree; a missing,
    unparsable or non-JUnit file is a :class:`HarnessError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"KCIDB: no JUnit file {path}", JUNIT_HINT)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise HarnessError(f"KCIDB: {path} is not XML ({e})", JUNIT_HINT) from None
    if root.tag not in ("testsuites", "testsuite"):
        raise HarnessError(f"KCIDB: {path} is not a JUnit report: its root element is <{root.tag}>, expected "
                           "<testsuites> or <testsuite>", JUNIT_HINT)
    return read_junit(path, label), root


# ---- mapping ---------------------------------------------------------------------------------------
def _segment(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"


def test_path(classname: str, name: str) -> str:
    """The KCIDB dotted path of a JUnit test case (see the module docstring)."""
    cls = re.sub(r"^tests\.(system\.)?", "", classname)
    func, _, param = name.partition("[")
    parts = [PATH_ROOT, *(_segment(p) for p in cls.split(".") if p), _segment(func)]
    if param:
        parts.append(_segment(param.removesuffix("]")))
    return ".".join(parts)


def config_name(kernel_version: str) -> str:
    """The Debian kernel flavour in a Debian kernel's version: '7.3.4+deb13-cloud-arm64' -> 'cloud-arm64',
    '6.1.0-28-arm64' -> 'arm64'; 'unknown' for anything else."""
    m = re.match(r"^\d+\.\d+(?:\.\d+)*(?:\+deb\d+|-\d+)-([a-z][a-z0-9-]*)$", kernel_version or "")
    return m.group(1) if m else "unknown"


def run_misc(run: KernelRun) -> dict:
    """A run's JUnit suite properties for ``misc``: the plain ones as they are, ``deb:NAME`` under ``packages``,
    ``kernel_deb:SPEC`` under ``kernel_debs``; plus ``kernel_label`` and ``config``."""
    misc: dict = {"kernel_label": run.label}
    packages: dict[str, str] = {}
    kernel_debs: dict[str, str] = {}
    for k, v in run.properties.items():
        if k.startswith("deb:"):
            packages[k[4:]] = v
        elif k.startswith("kernel_deb:"):
            kernel_debs[k[len("kernel_deb:"):]] = v
        else:
            misc[k] = v
    misc["config"] = config_name(run.properties.get("kernel_version", ""))
    misc["packages"] = packages
    misc["kernel_debs"] = kernel_debs
    return misc


def _text(s: str) -> str:
    return s.replace("\0", "")


def known_bad_key(message: str) -> str | None:
    """The KNOWN_BAD entry an xfail reason names (harness/model/known_bad.py KnownBad.reason), if any."""
    for key, kb in KNOWN_BAD.items():
        if kb.what in message or key in message:
            return key
    return None


def _start_time(root: ET.Element) -> str:
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    ts = suite.get("timestamp", "") if suite is not None else ""
    return ts if re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)$", ts) else ""


def build_document(runs: list[tuple[KernelRun, ET.Element]]) -> dict:
    """The KCIDB document of one or more kernels' runs (from :func:`read_checked`)."""
    doc: dict = {"version": dict(SCHEMA_VERSION), "checkouts": [], "builds": [], "tests": [], "issues": [],
                 "incidents": []}
    issues: dict[str, dict] = {}
    for run, root in runs:
        start = _start_time(root)
        run_key = f"{run.label}@{start or run.properties.get('kernel_sha256', 'unknown')}"
        rid = f"{ORIGIN}:{run_key}"
        misc = run_misc(run)
        comment = f"kernel {run.label}: {run.properties.get('kernel_version', 'unknown version')}"
        checkout = {"id": rid, "origin": ORIGIN, "valid": True, "comment": comment, "misc": misc}
        build = {"id": rid, "checkout_id": rid, "origin": ORIGIN, "architecture": "arm64",
                 "config_name": misc["config"], "status": "PASS", "comment": comment, "misc": dict(misc)}
        if start:
            checkout["start_time"] = build["start_time"] = start
        doc["checkouts"].append(checkout)
        doc["builds"].append(build)
        env = {"comment": f"QEMU {run.properties.get('qemu_version', 'unknown')}, accel "
                          f"{run.properties.get('accel', 'unknown')}",
               "misc": {k: run.properties[k] for k in ("qemu_version", "accel", "kvm_mode") if k in run.properties}}
        used: dict[str, int] = {}
        for tc in root.iter("testcase"):
            cls, name = tc.get("classname", ""), tc.get("name", "")
            result = run.results.get(scenario_name(cls, name))
            if result is None:
                continue
            path = test_path(cls, name)
            used[path] = used.get(path, 0) + 1
            if used[path] > 1:
                path = f"{path}_{used[path]}"
            test = _test(rid, cls, name, path, result, env)
            doc["tests"].append(test)
            if result.outcome == "xfailed":
                key = known_bad_key(result.message)
                issue = _issue(key, path, result.message)
                issues.setdefault(issue["id"], issue)
                doc["incidents"].append({"id": f"{test['id']}:{issue['id']}", "origin": ORIGIN,
                                         "issue_id": issue["id"], "issue_version": ISSUE_VERSION,
                                         "test_id": test["id"], "build_id": rid, "present": True,
                                         "comment": _text(result.message)[:1000]})
    doc["issues"] = list(issues.values())
    return doc


def _test(build_id: str, cls: str, name: str, path: str, r: TestResult, env: dict) -> dict:
    test = {"id": f"{build_id}:{cls}::{name}", "build_id": build_id, "origin": ORIGIN, "path": path,
            "status": STATUS[r.outcome], "duration": r.time, "comment": scenario_name(cls, name),
            "environment": env,
            "misc": {"junit_classname": cls, "junit_name": name, "outcome": r.outcome,
                     "known_issue": r.outcome == "xfailed", **r.properties}}
    if r.message:
        test["log_excerpt"] = _text(r.message)[:LOG_EXCERPT_MAX]
    return test


def _issue(key: str | None, path: str, message: str) -> dict:
    if key is not None:
        kb = KNOWN_BAD[key]
        return {"id": f"{ORIGIN}:known_bad:{key}", "version": ISSUE_VERSION, "origin": ORIGIN,
                "comment": _text(kb.what), "culprit": {"code": True},
                "misc": {"series": [f"{a}.{b}" for a, b in kb.series], "evidence": kb.evidence,
                         "table": "harness/model/known_bad.py"}}
    return {"id": f"{ORIGIN}:xfail:{path}", "version": ISSUE_VERSION, "origin": ORIGIN,
            "comment": _text(message)[:1000] or "expected failure", "culprit": {"code": True}}


# ---- validation and output -------------------------------------------------------------------------
def validate(doc: dict, what: str = "KCIDB document", required: bool = True) -> str:
    """Check ``doc`` against the KCIDB schema with kcidb-io; a :class:`HarnessError` naming the failing field
    when it does not fit.  Returns what was checked.  Without kcidb-io installed: an error when ``required``,
    else a note that nothing was checked."""
    try:
        import jsonschema
        from kcidb_io import schema
    except ImportError:
        if required:
            raise HarnessError("KCIDB: cannot validate: the kcidb-io package is not installed",
                               "pip install kcidb-io (it is in the test extra: pip install -e '.[test]')") from None
        return "not validated (kcidb-io not installed)"
    try:
        schema.LATEST.validate(doc)
    except jsonschema.exceptions.ValidationError as e:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".")
        raise KcidbInvalid(f"KCIDB: {what} does not fit the KCIDB schema v{schema.LATEST.major}."
                           f"{schema.LATEST.minor}: at {where or 'the top level'}: {e.message}",
                           "a document the harness wrote is a bug in harness/kdev/kcidb.py; otherwise fix the "
                           "named field") from None
    return f"valid KCIDB v{schema.LATEST.major}.{schema.LATEST.minor} (kcidb-io)"


def broken_build(run: KernelRun, log: Path | None = None) -> tuple[dict, dict]:
    """The checkout and build of a kernel whose run left no JUnit file (the guest never booted, pytest died, a
    usage error): the build is ``ERROR`` with the run's note as comment and the end of its pytest log as
    ``log_excerpt``, and it has no tests -- so a nightly's KCIDB shows the kernel as broken, not as missing."""
    rid = f"{ORIGIN}:{run.label}@broken"
    comment = f"kernel {run.label}: the run wrote no JUnit file ({run.note or 'no note'})"
    misc = {"kernel_label": run.label, "note": run.note}
    checkout = {"id": rid, "origin": ORIGIN, "valid": True, "comment": comment, "misc": misc}
    build = {"id": rid, "checkout_id": rid, "origin": ORIGIN, "architecture": "arm64", "status": "ERROR",
             "comment": comment, "misc": dict(misc)}
    if log is not None and log.is_file():
        tail = log.read_bytes()[-LOG_EXCERPT_MAX:].decode("utf-8", "replace")
        build["log_excerpt"] = _text(tail)[-LOG_EXCERPT_MAX:]
    return checkout, build


def write_kcidb(junits: list[tuple[Path, str]], out: Path,
                broken: list[tuple[KernelRun, Path | None]] = ()) -> str:
    """Read the JUnit files ((path, kernel label) pairs), write their KCIDB document to ``out`` (validated with
    kcidb-io when it is installed), with an ``ERROR`` build (:func:`broken_build`) for each run in ``broken``
    ((run, its pytest log) pairs: runs that left no JUnit file).  Returns a line saying what was written."""
    doc = build_document([read_checked(p, label) for p, label in junits])
    for run, log in broken:
        checkout, build = broken_build(run, log)
        doc["checkouts"].append(checkout)
        doc["builds"].append(build)
    note = validate(doc, str(out), required=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    errors = f", {len(broken)} without results (build ERROR)" if broken else ""
    return (f"KCIDB: {out} ({len(doc['builds'])} build(s){errors}, {len(doc['tests'])} test(s), "
            f"{len(doc['incidents'])} known-issue incident(s); {note})")


def validate_file(path: Path) -> str:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise HarnessError(f"KCIDB: cannot read {path}: {e.strerror}", "give an existing KCIDB JSON file") from None
    except json.JSONDecodeError as e:
        raise HarnessError(f"KCIDB: {path} is not JSON ({e})", "give a KCIDB JSON file") from None
    return f"{path}: " + validate(doc, str(path))


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.kdev.kcidb``: exit 0 done/valid, 1 an invalid KCIDB document, 2 bad input."""
    ap = argparse.ArgumentParser(prog="python -m harness.kdev.kcidb", description=__doc__.split("\n", 1)[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a KCIDB JSON file against the schema (kcidb-io)")
    p.add_argument("file")
    p = sub.add_parser("from-junit", help="JUnit XML files -> one KCIDB JSON file")
    p.add_argument("junit", nargs="+", help="JUnit files; each one's kernel label is its directory's name")
    p.add_argument("-o", "--out", required=True, help="the KCIDB JSON file to write")
    args = ap.parse_args(argv)
    try:
        if args.command == "validate":
            print(validate_file(Path(args.file)))
        else:
            print(write_kcidb([(Path(j), Path(j).resolve().parent.name) for j in args.junit], Path(args.out)))
        return 0
    except KcidbInvalid as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
