"""Real splats from a real debug kernel, caught and explained (slow: needs ``kernel build --debug``).

``smccc-harness kernel build --debug`` builds Debian's linux-source-7.3 with images/kernel.config +
images/kernel-debug.config (lockdep, DEBUG_ATOMIC_SLEEP, generic KASAN, DEBUG_LIST, DWARF, LKDTM built in).  An
inner pytest run (the real plugin, a real guest on that kernel) provokes one splat class per test:

* through LKDTM (drivers/misc/lkdtm, debugfs ``provoke-crash/DIRECT``, as tools/testing/selftests/lkdtm does):
  WARNING, BUG, EXCEPTION (an Oops), SLAB_LINEAR_OVERFLOW (KASAN), CORRUPT_LIST_ADD (DEBUG_LIST), PANIC;
* through KVM itself, on a second build of a patched copy of the source (tests/system/data/kvm-deliberate-bugs.patch:
  two deliberate bugs on the forwarded-hypercall path, off unless ``kvm.smccc_harness_bug`` is set): a lock order
  inversion (lockdep) and a GFP_KERNEL allocation under a spinlock (sleeping in atomic context).  LKDTM has no
  lockdep or might_sleep test in 7.3 (drivers/misc/lkdtm/bugs.c: its SPINLOCKUP returns to user space holding a
  spinlock, which reports "lock held when returning to user space" and then scheduling while atomic, two classes
  at once).

Each inner test must FAIL (not error) naming the class and quoting the splat, with pc/lr and the first call-trace
frames symbolized to function+offset and file:line (the vmlinux is known: ``--kernel .../vmlinux``), and the run
bisects bad (exit 1).  docs/debug-kernels.md has the table this checks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import paths
from harness.images.kernel import resolve_kernel
from harness.kdev import bisect as B
from harness.kdev import kbuild

pytestmark = pytest.mark.slow

PATCH = paths.REPO_ROOT / "tests" / "system" / "data" / "kvm-deliberate-bugs.patch"
LOCALVERSION = "-smccc-deliberate-bugs"

INNER = '''
import pytest
from harness.images.payloads import get_payload
from harness.model.scenarios import PSCI_FWD, scenario

def sh(g, cmd):
    return g.request("exec", {"argv": ["/bin/busybox", "sh", "-c", cmd], "timeout_s": 60}, deadline_s=120)

def lkdtm(g, what):
    d = "/sys/kernel/debug/provoke-crash/DIRECT"
    r = sh(g, f"grep -q ' /sys/kernel/debug ' /proc/mounts || mount -t debugfs none /sys/kernel/debug; "
              f"test -w {d} || exit 99; echo {what} > {d}")
    assert r["rc"] != 99, f"no LKDTM in this kernel ({d} missing): {r}"
    return r

def forwarded_psci_version(g):
    p = get_payload("psci_version")
    r = g.run(scenario("psci_version_fwd", p, filters=PSCI_FWD, psci_minor=1), payload=p)
    assert r.outcome == "done", r.describe()      # the scenario itself passes: only the console fails it

def test_a_clean(guest):
    forwarded_psci_version(guest)
'''

LKDTM_TESTS = '''
def test_b_warning(guest): lkdtm(guest, "WARNING")
def test_c_kasan(guest): lkdtm(guest, "SLAB_LINEAR_OVERFLOW")
def test_d_list_corruption(guest): lkdtm(guest, "CORRUPT_LIST_ADD")
def test_e_sleep_in_atomic(guest): lkdtm(guest, "SPINLOCKUP")     # once per boot: a second call deadlocks
def test_f_bug(guest): lkdtm(guest, "BUG")
def test_g_exception(guest): lkdtm(guest, "EXCEPTION")
'''

# A second boot, lockdep still on (KASAN's report taints BAD_PAGE, which turns lockdep off: add_taint(...,
# LOCKDEP_NOW_UNRELIABLE); so does an Oops): SPINLOCKUP returns to user space holding lock_me_up, and lockdep
# reports it at the write's return, before the next syscall sleeps with preempt_count raised.  Then a panic on
# an untainted-by-Oops kernel, which prints its call trace (a kernel tainted D does not).
LOCKDEP_TESTS = '''
def test_b_lock_held_to_user(guest): lkdtm(guest, "SPINLOCKUP")
def test_z_panic(guest): lkdtm(guest, "PANIC")
'''

KVM_BUG_TESTS = '''
def test_lockdep(guest):
    sh(guest, "echo 1 > /sys/module/kvm/parameters/smccc_harness_bug")
    forwarded_psci_version(guest)

def test_sleep_in_atomic(guest):
    sh(guest, "echo 2 > /sys/module/kvm/parameters/smccc_harness_bug")
    forwarded_psci_version(guest)
'''


def _cli(*args: str, timeout: float = 7200) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=paths.REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def _build_debug(tree: Path) -> Path:
    """``kernel build --debug TREE`` (its own O=, ccache): the vmlinux next to the printed Image."""
    r = _cli("kernel", "build", "--debug", str(tree))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    image = Path(r.stdout.strip().splitlines()[-1])
    vmlinux = image.parents[3] / "vmlinux"
    assert image.parents[3].name.endswith("-debug"), image
    assert resolve_kernel(vmlinux).image == image
    return vmlinux


@pytest.fixture(scope="module")
def debug_vmlinux() -> Path:
    return _build_debug(kbuild.source_tree())


@pytest.fixture(scope="module")
def buggy_vmlinux() -> Path:
    r = _cli("kernel", "source", "--patch", str(PATCH), f"--localversion={LOCALVERSION}", timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tree = Path(r.stdout.strip().splitlines()[-1])
    assert "smccc_harness_deliberate_bug" in (tree / "arch" / "arm64" / "kvm" / "hypercalls.c").read_text()
    return _build_debug(tree)


def _inner(tmp: Path, vmlinux: Path, tests: str, *extra: str):
    """Run the inner tests on the kernel; (pytest process, {test name: {failure|error: message}}, Counts)."""
    (tmp / "test_inner.py").write_text(INNER + tests)
    junit = tmp / "j.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-c",
                        "/dev/null", "-p", "harness.plugin", "-rA", f"--junitxml={junit}", "--no-snapshot",
                        "--boot-timeout", "600", "--kernel", str(vmlinux), "--results-dir", str(tmp / "runs"),
                        *extra, "test_inner.py"], cwd=tmp, capture_output=True, text=True, timeout=3600,
                       env={**os.environ, "PYTHONPATH": str(paths.REPO_ROOT)}, check=False)
    (tmp / "inner-output.txt").write_text(p.stdout + p.stderr)
    assert junit.is_file(), p.stdout[-3000:] + p.stderr[-3000:]
    cases: dict[str, dict] = {}
    for tc in ET.parse(junit).getroot().iter("testcase"):     # a teardown error is a second entry of the same name
        cases.setdefault(tc.get("name"), {}).update({c.tag: (c.get("message") or "") + (c.text or "") for c in tc
                                                     if c.tag in ("failure", "error", "skipped")})
    return p, cases, B.parse_junit(junit)


@pytest.fixture(scope="module")
def lkdtm_run(debug_vmlinux, tmp_path_factory):
    return _inner(tmp_path_factory.mktemp("lkdtm"), debug_vmlinux, LKDTM_TESTS, "--dump-on-splat")


@pytest.fixture(scope="module")
def lockdep_run(debug_vmlinux, tmp_path_factory):
    return _inner(tmp_path_factory.mktemp("lockdep"), debug_vmlinux, LOCKDEP_TESTS)


@pytest.fixture(scope="module")
def kvm_bug_run(buggy_vmlinux, tmp_path_factory):
    return _inner(tmp_path_factory.mktemp("kvmbug"), buggy_vmlinux, KVM_BUG_TESTS)


def _failure(cases, name: str, teardown_splat: bool = False) -> str:
    """The test's failure message; it must fail, not error (``teardown_splat``: its teardown may also be an error
    for a later splat, which names the kernel's)."""
    assert "failure" in cases[name], f"{name} must fail (not error, not pass): {cases[name]}"
    extra = set(cases[name]) - {"failure"}
    assert not extra or (teardown_splat and extra == {"error"} and "the guest kernel printed" in cases[name]["error"]
                         ), f"{name}: {cases[name]}"
    return cases[name]["failure"]


FILE_LINE = r" at [\w/.-]+\.[ch]:\d+"


def _assert_explained(msg: str, cls: str, quote: str, frames: list[str]) -> None:
    """The failure names the class, quotes the splat, and symbolizes pc (or the first frame) and the given
    call-trace functions to function+off/size and file:line."""
    assert f"the guest kernel printed {cls!r} while this test ran" in msg, msg[:3000]
    assert re.search(quote, msg), f"{quote!r} not quoted:\n{msg[:3000]}"
    assert "symbolized with " in msg and "/vmlinux:" in msg, msg[-3000:]
    sym = msg[msg.index("symbolized with "):]
    for fn in frames:
        assert re.search(rf"= {re.escape(fn)}\+0x[0-9a-f]+/0x[0-9a-f]+{FILE_LINE}", sym), f"{fn}:\n{sym}"


def test_lkdtm_debug_kernel_boots_and_a_clean_test_passes(lkdtm_run):
    _, cases, _ = lkdtm_run
    assert cases["test_a_clean"] == {}, cases["test_a_clean"]


def test_warning_fails_the_test_naming_it_with_file_and_line(lkdtm_run):
    msg = _failure(lkdtm_run[1], "test_b_warning")
    _assert_explained(msg, "kernel WARNING", r"WARNING: drivers/misc/lkdtm/bugs\.c:\d+ at lkdtm_WARNING\+0x",
                      ["lkdtm_WARNING", "direct_entry", "vfs_write"])
    assert re.search(r"\bpc 0x[0-9a-f]{16} = lkdtm_WARNING\+0x[0-9a-f]+/0x[0-9a-f]+ at drivers/misc/lkdtm/bugs\.c:\d+",
                     msg), msg[-2000:]
    assert re.search(r"\blr 0x[0-9a-f]{16} = lkdtm_do_action\+0x[0-9a-f]+/0x[0-9a-f]+ at drivers/misc/lkdtm/core\.c:\d+",
                     msg), msg[-2000:]


def test_kasan_out_of_bounds_fails_the_test_naming_it(lkdtm_run):
    msg = _failure(lkdtm_run[1], "test_c_kasan")
    _assert_explained(msg, "KASAN", r"BUG: KASAN: slab-out-of-bounds in lkdtm_SLAB_LINEAR_OVERFLOW",
                      ["lkdtm_SLAB_LINEAR_OVERFLOW"])


def test_list_corruption_fails_the_test(lkdtm_run):
    msg = _failure(lkdtm_run[1], "test_d_list_corruption")
    _assert_explained(msg, "kernel WARNING", r"WARNING: lib/list_debug\.c:\d+ at __list_add_valid_or_report\+",
                      ["__list_add_valid_or_report", "lkdtm_CORRUPT_LIST_ADD"])


def test_bug_fails_the_test_as_a_kernel_bug(lkdtm_run):
    msg = _failure(lkdtm_run[1], "test_f_bug", teardown_splat=True)   # its aftermath may land in the teardown
    _assert_explained(msg, "kernel BUG", r"kernel BUG at drivers/misc/lkdtm/bugs\.c:\d+!", ["lkdtm_BUG"])
    assert "Internal error: Oops - BUG" in msg, msg[:3000]


def test_exception_fails_the_test_as_an_oops(lkdtm_run):
    msg = _failure(lkdtm_run[1], "test_g_exception")
    # KASAN checks the NULL write's shadow first: "paging request at ... dfff800000000000", "KASAN: null-ptr-deref"
    _assert_explained(msg, "kernel oops", r"Unable to handle kernel (?:NULL pointer dereference|paging request)",
                      ["lkdtm_EXCEPTION"])
    assert "Internal error: Oops: " in msg, msg[:3000]
    assert re.search(r"\bpc 0x[0-9a-f]{16} = lkdtm_EXCEPTION\+", msg), msg[-2000:]


def test_warning_dumped_the_guest_memory_for_crash_or_drgn(lkdtm_run, debug_vmlinux):
    """--dump-on-splat: the first splat of the guest (the WARNING) left vmcore.elf, with the crash/drgn line."""
    msg = _failure(lkdtm_run[1], "test_b_warning")
    m = re.search(r"guest memory: (\S+/vmcore\.elf) \(\d+ MiB", msg)
    assert m and Path(m.group(1)).stat().st_size >= 1 << 30, msg[-1500:]
    assert f"crash {debug_vmlinux} {m.group(1)}" in msg, msg[-1500:]
    assert "guest memory" not in _failure(lkdtm_run[1], "test_c_kasan")


def test_sleeping_in_atomic_context_fails_the_test_naming_it(lkdtm_run):
    """SPINLOCKUP after KASAN turned lockdep off: the task returns to user space with preempt_count 1; either the
    return reschedules (scheduling while atomic) or the next syscall sleeps (the close's __fput), whichever comes
    first (need_resched decides)."""
    msg = _failure(lkdtm_run[1], "test_e_sleep_in_atomic")
    assert "the guest kernel printed 'sleep in atomic' while this test ran" in msg, msg[:3000]
    assert re.search(r"BUG: (?:sleeping function called from invalid context at |scheduling while atomic: )", msg)
    assert re.search(rf"= (?:__might_resched|__schedule_bug)\+0x[0-9a-f]+/0x[0-9a-f]+{FILE_LINE}", msg), msg[-3000:]


def test_lock_held_on_return_to_user_space_fails_the_test_as_lockdep(lockdep_run):
    """lockdep's report comes first, at the write's return; DEBUG_ATOMIC_SLEEP's follows.  With no separator
    between them they are one incident, named after the more severe class ('sleep in atomic' when its BUG line
    falls inside lockdep's report, else 'lockdep'); the lockdep report is quoted either way."""
    _, cases, _ = lockdep_run
    assert cases["test_a_clean"] == {}, cases["test_a_clean"]
    msg = _failure(cases, "test_b_lock_held_to_user")
    named = re.search(r"the guest kernel printed '([\w ]+)' while this test ran", msg)
    assert named and named.group(1) in ("lockdep", "sleep in atomic"), msg[:3000]
    assert "WARNING: lock held when returning to user space!" in msg and "(lock_me_up)" in msg, msg[:3000]
    assert re.search(rf"at 0x[0-9a-f]{{16}} = lkdtm_SPINLOCKUP\+0x[0-9a-f]+/0x[0-9a-f]+{FILE_LINE}", msg), msg[-3000:]


def test_panic_fails_the_test_that_caused_it(lockdep_run):
    msg = _failure(lockdep_run[1], "test_z_panic")
    _assert_explained(msg, "kernel panic", r"Kernel panic - not syncing: dumptest", ["vpanic", "lkdtm_do_action"])
    # panic() does not return: the return address is the next function's first byte; the call is in lkdtm_PANIC
    assert re.search(rf"\(the call is in lkdtm_PANIC\+0x[0-9a-f]+/0x[0-9a-f]+\){FILE_LINE}", msg), msg[-3000:]


@pytest.mark.parametrize("run", ["lkdtm_run", "lockdep_run"])
def test_the_runs_bisect_bad(run, request):
    p, _, counts = request.getfixturevalue(run)
    assert p.returncode == 1, p.stdout[-3000:]
    assert B.classify(p.returncode, counts) == "bad" and B.OUTCOMES["bad"] == 1


def test_lock_order_inversion_on_the_forwarding_path_fails_the_test_as_lockdep(kvm_bug_run):
    _, cases, _ = kvm_bug_run
    assert cases["test_a_clean"] == {}, cases["test_a_clean"]
    msg = _failure(cases, "test_lockdep")
    _assert_explained(msg, "lockdep", r"WARNING: possible circular locking dependency detected",
                      ["kvm_prepare_hypercall_exit"] if "= kvm_prepare_hypercall_exit+" in msg
                      else ["smccc_harness_deliberate_bug"])
    assert "smccc_harness_lock" in msg and "config_lock" in msg, msg[:4000]


def test_allocation_under_a_spinlock_fails_the_test_as_sleep_in_atomic(kvm_bug_run):
    msg = _failure(kvm_bug_run[1], "test_sleep_in_atomic")
    _assert_explained(msg, "sleep in atomic", r"BUG: sleeping function called from invalid context at ",
                      ["smccc_harness_deliberate_bug"])


def test_the_kvm_bug_run_bisects_bad(kvm_bug_run):
    p, _, counts = kvm_bug_run
    assert p.returncode == 1 and counts.errors == 0, p.stdout[-3000:]
    assert B.classify(p.returncode, counts) == "bad"
