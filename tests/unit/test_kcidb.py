"""KCIDB output (harness/kdev/kcidb.py): built from the JUnit files, validated with kcidb-io."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import cli
from harness.errors import HarnessError
from harness.kdev import kcidb as K
from harness.model.known_bad import KNOWN_BAD

kcidb_io = pytest.importorskip("kcidb_io", reason="pip install -e '.[test]' installs kcidb-io")
SCHEMA = kcidb_io.schema.LATEST

RECORDED = Path(__file__).parent / "data" / "junit" / "matrix_default.xml"    # a real matrix run, 4 tests
PSCI_HVC = "smccc.test_forwarding_el1.test_psci_version_exits_to_userspace_with_function_id.hvc"
PSCI_SMC = "smccc.test_forwarding_el1.test_psci_version_exits_to_userspace_with_function_id.smc"
FLAGS_HVC = "smccc.test_forwarding_el1.test_hypercall_flags_name_the_conduit.hvc-0"
FLAGS_SMC = "smccc.test_forwarding_el1.test_hypercall_flags_name_the_conduit.smc-1"
XFAIL_REASON = KNOWN_BAD["hcd_undef_elr_after_hvc"].reason("7.3.4+deb13-cloud-arm64")


def _matrix_dir(tmp: Path, outcomes: bool = False) -> Path:
    """A matrix --out directory with the recorded JUnit file as ``default/junit.xml``; with ``outcomes`` the
    last three test cases failed, were skipped and xfailed (a KNOWN_BAD reason), and an errored one is added."""
    text = RECORDED.read_text().replace("@KERNEL_DIR@", str(tmp / "default"))
    if outcomes:
        root = ET.fromstring(text)
        cases = list(root.iter("testcase"))
        ET.SubElement(cases[1], "failure", message="AssertionError: flags = 0, expected KVM_HYPERCALL_EXIT_SMC")
        ET.SubElement(cases[2], "skipped", type="pytest.skip", message="kernel lacks KVM_CAP_ARM_EL2")
        ET.SubElement(cases[3], "skipped", type="pytest.xfail", message=XFAIL_REASON)
        err = ET.SubElement(root.find("testsuite"), "testcase", classname="tests.system.test_psci_el2",
                            name="test_cpu_on[smc]", time="0.5")
        ET.SubElement(err, "error", message="failed on setup with BootError: no agent banner")
        text = ET.tostring(root, encoding="unicode")
    (tmp / "default").mkdir(parents=True, exist_ok=True)
    (tmp / "default" / "junit.xml").write_text(text)
    return tmp


def _doc(tmp: Path, outcomes: bool = False) -> dict:
    d = _matrix_dir(tmp, outcomes)
    return K.build_document([K.read_checked(d / "default" / "junit.xml", "default")])


def _by_path(doc: dict) -> dict[str, dict]:
    return {t["path"]: t for t in doc["tests"]}


def test_recorded_matrix_junit_is_valid_kcidb_with_the_run_properties_in_misc(tmp_path):
    doc = _doc(tmp_path)
    SCHEMA.validate(doc)       # raises on any schema violation
    assert doc["version"] == {"major": 5, "minor": 3}
    (checkout,), (build,) = doc["checkouts"], doc["builds"]
    assert checkout["id"] == build["id"] == build["checkout_id"] == "smccc_harness:default@2026-12-03T13:32:05.769130+00:00"
    assert {checkout["origin"], build["origin"]} == {"smccc_harness"}
    for misc in (checkout["misc"], build["misc"]):
        assert misc["kernel_version"] == "7.3.4+deb13-cloud-arm64"
        assert misc["kernel_sha256"] == "2187a5783e663d94a1f12901d0efbb554a288172a9ba77979f12b10d84e41dd1"
        assert misc["kernel_package"] == "linux-binary-7.3.4+deb13-cloud-arm64 7.3.4-1~bpo13+1"
        assert misc["config"] == build["config_name"] == "cloud-arm64"
        assert misc["qemu_version"] == "10.0.2" and misc["accel"] == "tcg"
        assert misc["initramfs_sha256"].startswith("8f5b2b715fe0")
        assert misc["packages"]["libc6"] == ("2.41-12+deb13u5 sha256:0966fc3da1a26cc57647c68b5736f791b6e7eb498173a7"
                                             "993f63b6c89b4ed4f5")
        assert misc["kernel_debs"]["default"].endswith("sha256:34dc0e1a6320440cc3f6e34d12ae099041a2e10555061d50ff4e5af602121788")
    tests = _by_path(doc)
    assert sorted(tests) == sorted([PSCI_HVC, PSCI_SMC, FLAGS_HVC, FLAGS_SMC])
    assert {t["status"] for t in tests.values()} == {"PASS"}
    t = tests[PSCI_HVC]
    assert t["build_id"] == build["id"]
    assert t["id"] == (f"{build['id']}:tests.system.test_forwarding_el1::"
                       "test_psci_version_exits_to_userspace_with_function_id[hvc]")
    assert t["duration"] == pytest.approx(12.34)
    assert t["misc"]["test_console_log"].endswith("_hvc_.console.log")
    assert t["environment"]["misc"] == {"qemu_version": "10.0.2", "accel": "tcg",
                                        "kvm_mode": "VHE+NV2 mode initialized successfully"}
    assert doc["issues"] == [] and doc["incidents"] == []


def test_outcomes_map_to_kcidb_statuses_and_an_xfail_is_a_fail_with_a_known_issue_incident(tmp_path):
    doc = _doc(tmp_path, outcomes=True)
    SCHEMA.validate(doc)
    tests = _by_path(doc)
    assert {p: t["status"] for p, t in tests.items()} == {
        PSCI_HVC: "PASS", PSCI_SMC: "FAIL", FLAGS_HVC: "SKIP", FLAGS_SMC: "FAIL",
        "smccc.test_psci_el2.test_cpu_on.smc": "ERROR"}
    assert tests[PSCI_SMC]["log_excerpt"].startswith("AssertionError: flags = 0")
    assert tests[PSCI_SMC]["misc"]["known_issue"] is False
    xf = tests[FLAGS_SMC]
    assert xf["misc"]["outcome"] == "xfailed" and xf["misc"]["known_issue"] is True
    assert xf["log_excerpt"] == XFAIL_REASON
    (issue,) = doc["issues"]
    assert issue["id"] == "smccc_harness:known_bad:hcd_undef_elr_after_hvc"
    assert issue["culprit"] == {"code": True} and issue["misc"]["series"] == ["7.2", "7.3"]
    (incident,) = doc["incidents"]
    assert (incident["test_id"], incident["issue_id"], incident["present"]) == (xf["id"], issue["id"], True)
    assert incident["issue_version"] == issue["version"]


@pytest.mark.parametrize("classname, name, path", [
    ("tests.system.test_psci_el1", "test_cpu_on_secondary[hvc]", "smccc.test_psci_el1.test_cpu_on_secondary.hvc"),
    ("tests.system.test_filter", "test_range[0x0-fwd]", "smccc.test_filter.test_range.0x0-fwd"),
    ("tests.system.test_selftests", "test_selftest[arm64/psci_test.c]", "smccc.test_selftests.test_selftest.arm64_psci_test_c"),
    ("tests.system.test_x.TestNested", "test_y", "smccc.test_x.TestNested.test_y"),
    ("test_k", "test_z[a b]", "smccc.test_k.test_z.a_b"),
])
def test_node_ids_become_dotted_paths_the_schema_accepts(classname, name, path):
    assert K.test_path(classname, name) == path
    assert SCHEMA.test_path_re.match(path)


def test_test_cases_that_map_to_one_path_get_distinct_paths(tmp_path):
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite name="pytest" timestamp="2026-12-03T13:32:05+00:00">'
        '<testcase classname="tests.system.test_a" name="test_p[a.b]" time="1"/>'
        '<testcase classname="tests.system.test_a" name="test_p[a/b]" time="1"/></testsuite></testsuites>')
    doc = K.build_document([K.read_checked(tmp_path / "junit.xml", "7.2")])
    SCHEMA.validate(doc)
    assert [t["path"] for t in doc["tests"]] == ["smccc.test_a.test_p.a_b", "smccc.test_a.test_p.a_b_2"]
    assert len({t["id"] for t in doc["tests"]}) == 2


@pytest.mark.parametrize("version, config", [("7.3.4+deb13-cloud-arm64", "cloud-arm64"), ("6.1.0-28-arm64", "arm64"),
                                             ("6.15.0-rc1-dirty", "unknown"), ("", "unknown")])
def test_config_is_the_debian_flavour(version, config):
    assert K.config_name(version) == config


@pytest.mark.parametrize("content, says", [
    ('<testsuites><testsuite name="pytest"><testcase classname="a" name=', "is not XML"),
    ("<html><body>nightly</body></html>", "is not a JUnit report: its root element is <html>"),
])
def test_bad_junit_input_is_a_harness_error_with_a_hint(tmp_path, content, says):
    (tmp_path / "junit.xml").write_text(content)
    with pytest.raises(HarnessError, match=says) as e:
        K.read_checked(tmp_path / "junit.xml", "default")
    assert "junit.xml" in e.value.hint and "--junitxml" in e.value.hint
    with pytest.raises(HarnessError, match="no JUnit file") as e:
        K.read_checked(tmp_path / "missing.xml", "default")
    assert e.value.hint


def test_matrix_report_only_writes_valid_kcidb(tmp_path, capsys):
    out = _matrix_dir(tmp_path / "m")
    rc = cli.main(["matrix", "--report-only", str(out), "--kernels", "default", "--kcidb", str(tmp_path / "k.json")])
    assert rc == 0
    doc = json.loads((tmp_path / "k.json").read_text())
    SCHEMA.validate(doc)
    assert sorted(_by_path(doc)) == sorted([PSCI_HVC, PSCI_SMC, FLAGS_HVC, FLAGS_SMC])
    assert "valid KCIDB v5.3 (kcidb-io)" in capsys.readouterr().out


def test_matrix_kcidb_on_a_non_junit_file_exits_2_with_a_hint(tmp_path, capsys):
    (tmp_path / "m" / "default").mkdir(parents=True)
    (tmp_path / "m" / "default" / "junit.xml").write_text("<html><body>not a report</body></html>")
    rc = cli.main(["matrix", "--report-only", str(tmp_path / "m"), "--kernels", "default",
                   "--kcidb", str(tmp_path / "k.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "is not a JUnit report" in err and "hint:" in err
    assert not (tmp_path / "k.json").exists()


@pytest.mark.parametrize("corrupt, where, says", [
    (lambda d: d["tests"][1].__setitem__("status", "XFAIL"), "tests[1].status", "'XFAIL' is not one of"),
    (lambda d: d["tests"][0].__setitem__("path", "smccc.test_x[hvc]"), "tests[0].path",
     "'smccc.test_x[hvc]' does not match"),
    (lambda d: d["builds"][0].pop("checkout_id"), "builds[0]", "'checkout_id' is a required property"),
    (lambda d: d["tests"][2].__setitem__("waived", True), "tests[2]", "Additional properties are not allowed"),
], ids=["status", "path", "required", "v4-waived"])
def test_an_invalid_document_is_rejected_naming_the_failure(tmp_path, capsys, corrupt, where, says):
    doc = copy.deepcopy(_doc(tmp_path))
    corrupt(doc)
    with pytest.raises(K.KcidbInvalid, match=re.escape(f"at {where}: {says}")):
        K.validate(doc)
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    assert K.main(["validate", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    assert f"at {where}: {says}" in err and "KCIDB schema v5.3" in err


def test_kcidb_module_cli_converts_and_validates_and_exits_2_on_bad_input(tmp_path, capsys):
    junit = _matrix_dir(tmp_path / "m", outcomes=True) / "default" / "junit.xml"
    assert K.main(["from-junit", str(junit), "-o", str(tmp_path / "k.json")]) == 0
    assert K.main(["validate", str(tmp_path / "k.json")]) == 0
    assert json.loads((tmp_path / "k.json").read_text())["checkouts"][0]["misc"]["kernel_label"] == "default"
    (tmp_path / "not.json").write_text("{")
    assert K.main(["validate", str(tmp_path / "not.json")]) == 2
    (tmp_path / "bad.xml").write_text("<testsuites>")
    assert K.main(["from-junit", str(tmp_path / "bad.xml"), "-o", str(tmp_path / "x.json")]) == 2
    assert "is not XML" in capsys.readouterr().err


def test_pytest_kcidb_option_writes_kcidb_after_the_junit_file(tmp_path):
    (tmp_path / "test_k.py").write_text(textwrap.dedent(f"""
        import pytest
        @pytest.mark.parametrize("conduit", ["hvc", "smc"])
        def test_ok(conduit): pass
        def test_bad(): assert 0, "flags = 0"
        def test_skip(): pytest.skip("no KVM_CAP_ARM_EL2")
        @pytest.mark.xfail(reason={XFAIL_REASON!r}, strict=True)
        def test_xf(): assert 0
    """))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                        "-c", "/dev/null", "-p", "harness.plugin", "--results-dir", str(tmp_path / "runs"),
                        "--kernel", "7.3", "--kcidb", str(tmp_path / "k.json"), "test_k.py"],
                       cwd=tmp_path, capture_output=True, text=True, check=False)
    assert r.returncode == 1, r.stdout + r.stderr          # test_bad failed; the KCIDB file does not change that
    assert f"KCIDB: {tmp_path / 'k.json'}" in r.stdout
    assert (tmp_path / "k.json.junit.xml").is_file()       # no --junitxml given: one next to the KCIDB file
    doc = json.loads((tmp_path / "k.json").read_text())
    SCHEMA.validate(doc)
    assert {t["path"]: t["status"] for t in doc["tests"]} == {
        "smccc.test_k.test_ok.hvc": "PASS", "smccc.test_k.test_ok.smc": "PASS", "smccc.test_k.test_bad": "FAIL",
        "smccc.test_k.test_skip": "SKIP", "smccc.test_k.test_xf": "FAIL"}
    assert doc["checkouts"][0]["misc"]["kernel_label"] == "7.3"
    assert [i["issue_id"] for i in doc["incidents"]] == ["smccc_harness:known_bad:hcd_undef_elr_after_hvc"]


def test_matrix_report_only_on_truncated_junit_exits_2_with_a_hint(tmp_path):
    """A junit.xml cut short (pytest killed while writing it) is bad input, not a traceback."""
    import subprocess
    import sys
    d = tmp_path / "mx" / "default"
    d.mkdir(parents=True)
    (d / "junit.xml").write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest"><testcase')
    r = subprocess.run([sys.executable, "-m", "harness.cli", "matrix", "--kernels", "default", "--report-only",
                        str(tmp_path / "mx")], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "is not readable JUnit XML" in r.stderr and "hint:" in r.stderr and "Traceback" not in r.stderr


def test_a_kernel_run_without_junit_is_an_error_build_with_its_log_tail(tmp_path):
    d = _matrix_dir(tmp_path / "m")
    log = tmp_path / "pytest.log"
    log.write_text("collecting ...\nINTERNALERROR> qemu-system-aarch64: cannot set up guest memory 'mach-virt.ram'\n")
    dead = K.KernelRun(label="7.2", note="pytest exit 3 in 2 s; log " + str(log))
    line = K.write_kcidb([(d / "default" / "junit.xml", "default")], tmp_path / "k.json", [(dead, log)])
    doc = json.loads((tmp_path / "k.json").read_text())
    SCHEMA.validate(doc)
    builds = {b["misc"]["kernel_label"]: b for b in doc["builds"]}
    assert builds["7.2"]["status"] == "ERROR" and builds["default"]["status"] == "PASS", builds
    assert "pytest exit 3" in builds["7.2"]["comment"] and "INTERNALERROR" in builds["7.2"]["log_excerpt"]
    assert not [t for t in doc["tests"] if t["build_id"] == builds["7.2"]["id"]], "a broken run has no tests"
    assert "1 without results (build ERROR)" in line, line
