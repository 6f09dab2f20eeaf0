"""Every byte of the console is scanned once and attributed (harness/plugin/scanning.py).

An inner pytest run (the real plugin, a real guest) writes real kernel log records through /dev/kmsg (the
agent's ``kmsg`` op): a WARNING and an Oops-looking record, at each point a splat can appear: between tests,
inside a module fixture, during a teardown, after the last test; and a guest that crashes between tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.kdev import bisect as B

pytestmark = pytest.mark.infra
REPO = Path(__file__).resolve().parents[2]

INNER = '''
import re, time
import pytest

WARN = "<4>WARNING: CPU: 0 PID: 1 at smccc-harness/kmsg.c:1 {}"
OOPS = "<1>Unable to handle kernel NULL pointer dereference at virtual address 0000000000000000 ({})"

def kmsg(g, line, delay=0):
    g.request("kmsg", {"lines": [line], "delay_s": delay})
    if not delay:   # on the console before the caller goes on: the window it lands in is deterministic
        g.machine.console.expect(re.escape(line.split(">", 1)[1]), 20, watch_failures=False)

def test_a_clean(guest): pass
def test_b_clean(guest): pass
def test_c_no_guest_writes(request):
    # not a guest test (no guest_pool in its closure): what it makes the guest print is "between tests"
    from harness.plugin import POOL_KEY
    kmsg(request.config.stash[POOL_KEY].session, WARN.format("between"))
def test_d_next_guest_test(guest): pass

@pytest.fixture(scope="module")
def modfix(guest_pool):
    kmsg(guest_pool.get(), OOPS.format("modfix"))
    return 1

def test_e_uses_modfix(guest, modfix): pass
def test_f_uses_modfix_too(guest, modfix): pass

class TestTeardown:
    @pytest.fixture(scope="class")
    def cls_fix(self, guest_pool):
        yield
        kmsg(guest_pool.get(), WARN.format("teardown"))
    def test_g(self, guest, cls_fix): pass

def test_h_clean(guest): pass

def test_i_crash_later(guest):
    guest.request("exec", {"argv": ["/bin/busybox", "sh", "-c",
                                    "(sleep 1; echo c > /proc/sysrq-trigger) >/dev/null 2>&1 &"]})
def test_j_no_guest_waits(): time.sleep(6)
def test_k_after_the_death(guest): pass

@pytest.fixture(scope="session")
def late(guest_pool):
    yield
    kmsg(guest_pool.get(), WARN.format("afterlast"))

def test_z_last(guest, late): pass
'''


@pytest.fixture(scope="module")
def inner(tmp_path_factory, pytestconfig):
    d = tmp_path_factory.mktemp("scan")
    (d / "test_inner.py").write_text(INNER)
    junit = d / "j.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-c",
                        "/dev/null", "-p", "harness.plugin", "-rA", f"--junitxml={junit}",
                        "--kernel", pytestconfig.getoption("--kernel"), "--results-dir", str(d / "runs"),
                        "test_inner.py"], cwd=d, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert junit.is_file(), p.stdout[-3000:] + p.stderr[-3000:]
    cases = {}
    for tc in ET.parse(junit).getroot().iter("testcase"):
        kinds = {c.tag: (c.get("message") or "") + (c.text or "") for c in tc if c.tag != "properties"}
        cases[tc.get("name")] = kinds
    return p, cases, B.parse_junit(junit)


def _only(cases, name, kind):
    assert kind in cases[name], f"{name}: {cases[name]}"
    return cases[name][kind]


def test_clean_tests_pass(inner):
    _, cases, _ = inner
    for name in ("test_a_clean", "test_b_clean", "test_c_no_guest_writes", "test_h_clean",
                 "test_i_crash_later", "test_j_no_guest_waits"):
        assert not ({"failure", "error"} & set(cases[name])), f"{name}: {cases[name]}"


def test_output_between_tests_fails_the_next_guest_test_naming_it(inner):
    msg = _only(inner[1], "test_d_next_guest_test", "failure")
    assert "'kernel WARNING' before this test began" in msg and "between" in msg, msg


def test_output_in_a_module_fixture_fails_every_test_using_it(inner):
    e = _only(inner[1], "test_e_uses_modfix", "failure")
    assert "'kernel fault'" in e and "fixture 'modfix' (module)" in e and "modfix" in e, e
    f = _only(inner[1], "test_f_uses_modfix_too", "failure")
    assert "'kernel fault'" in f and "the setup of an earlier test" in f, f


def test_output_during_teardown_is_a_teardown_error(inner):
    msg = _only(inner[1], "test_g", "error")
    assert "'kernel WARNING' during this test's teardown" in msg and "teardown" in msg, msg


def test_a_guest_that_died_between_tests_is_an_error_naming_the_panic(inner):
    msg = _only(inner[1], "test_k_after_the_death", "error")
    assert "'kernel panic'" in msg and "sysrq" in msg, msg
    assert "the guest died between tests" in msg, msg


def test_output_after_the_last_test_fails_the_session(inner):
    p, cases, counts = inner
    assert not ({"failure", "error"} & set(cases["test_z_last"])), cases["test_z_last"]
    assert p.returncode == 1
    assert "after the last test" in p.stdout and "afterlast" in p.stdout, p.stdout[-3000:]
    assert counts.after_last_test.startswith("the guest kernel printed 'kernel WARNING' after the last test")


def test_the_run_bisects_bad(inner):
    p, _, counts = inner
    assert B.classify(p.returncode, counts) == "bad"
