"""Faults the harness must survive: each gives a failure that names its cause, keeps the console log
and the trace, leaves no QEMU process, socket or temp dir behind, and the next user gets a fresh healthy guest.

These tests break guests on purpose, so they take the guest from ``guest_pool`` directly: the ``guest``
fixture's console scan would (rightly) fail a test during which the kernel panicked.
Payload contract (firmware/common.inc): REPORT/DONE through the MMIO report page; the SMCCC forwarding under
test is docs/kvm-smccc-abi.md §1.1-§1.2 (KVM_EXIT_HYPERCALL), the deadline is the runner's (vm.py immediate_exit).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import paths
from harness.errors import GuestError
from harness.images.payloads import get_payload
from harness.kdev.matrix import default_sigint
from harness.machine import leftovers
from harness.model.scenarios import PSCI_FWD, scenario

pytestmark = [pytest.mark.fault, pytest.mark.infra]
SYSRQ_CRASH = ["/bin/busybox", "sh", "-c", "echo c > /proc/sysrq-trigger"]


@pytest.fixture
def victim(guest_pool):
    """A booted guest this test may break, and the harness temp entries that existed before."""
    temp_before = leftovers.temp_entries()
    try:
        g = guest_pool.get()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"guest did not come up: {e}", pytrace=False)
    if not g.caps.get("kvm"):
        pytest.skip(f"kernel {g.caps.get('uname')}: {g.caps.get('reason', '/dev/kvm is absent')}")
    return g, temp_before


def _wait_gone(run_dir: Path, deadline_s: float = 10.0) -> list:
    stop = time.monotonic() + deadline_s
    while (procs := leftovers.qemu_processes(run_dir)) and time.monotonic() < stop:
        time.sleep(0.05)
    return procs


def assert_recovered(guest_pool, broken, temp_before: set) -> None:
    """The next user gets a fresh, healthy guest; nothing of the broken one is left."""
    fresh = guest_pool.get()
    assert fresh is not broken, "the pool handed out the broken guest again"
    assert not broken.alive()
    p = get_payload("psci_version")
    r = fresh.run(scenario("after_fault", p, filters=PSCI_FWD), payload=p)
    assert r.outcome == "done", r.describe()
    assert _wait_gone(broken.run_dir) == [], "QEMU of the broken guest still runs"
    assert leftovers.problems([broken.run_dir], temp_before) == []
    assert broken.console_log.is_file() and broken.console_log.stat().st_size > 0, "console log not kept"


def assert_trace_names(err: GuestError, text: str) -> None:
    path = getattr(err, "trace_path", None)
    assert path is not None and Path(path).is_file(), f"no trace kept for the failed scenario: {err}"
    summary = json.loads(Path(path).read_text().splitlines()[-1])
    assert summary["outcome"] == "harness_error" and text in summary["error"], summary


def test_qemu_killed_mid_scenario_fails_naming_the_signal(victim, guest_pool):
    g, temp_before = victim
    p = get_payload("spin")
    killer = threading.Timer(1.0, os.kill, (g.machine.pid, signal.SIGKILL))
    killer.start()
    try:
        with pytest.raises(GuestError, match=r"QEMU exited \(killed by signal 9\) while the agent was busy with "
                                             r"the 'run' request") as ei:
            g.run(scenario("spin_until_killed", p, deadline_s=30.0), payload=p)
    finally:
        killer.cancel()
    assert str(g.console_log) in str(ei.value)
    assert_trace_names(ei.value, "killed by signal 9")
    assert_recovered(guest_pool, g, temp_before)


def test_guest_kernel_panic_fails_naming_the_panic(victim, guest_pool):
    """sysrq-c (CONFIG_MAGIC_SYSRQ=y in the Debian cloud kernel): panic=-1 reboots, -no-reboot ends QEMU."""
    g, temp_before = victim
    with pytest.raises(GuestError, match="kernel panic") as ei:
        g.request("exec", {"argv": SYSRQ_CRASH, "timeout_s": 10}, deadline_s=30.0)
    assert "Kernel panic - not syncing: sysrq triggered crash" in str(ei.value)
    assert "Kernel panic - not syncing: sysrq triggered crash" in g.console_log.read_text()
    assert_recovered(guest_pool, g, temp_before)


def test_handler_exception_is_reported_with_its_traceback_and_the_guest_stays_usable(victim, guest_pool):
    g, temp_before = victim
    with pytest.raises(GuestError, match="injected fault: the handler raised") as ei:
        g.request("fault", {"kind": "raise"})
    assert "--- agent traceback ---" in str(ei.value) and "inject_fault" in str(ei.value)
    assert g.alive(), "an exception in one request must not cost the guest"
    assert guest_pool.get() is g
    p = get_payload("psci_version")
    r = g.run(scenario("after_raise", p, filters=PSCI_FWD), payload=p)
    assert r.outcome == "done", r.describe()
    assert leftovers.problems([], temp_before) == []


@pytest.mark.parametrize("kind,cause", [("exit", "exit status 3"), ("kill", "killed by signal 9")])
def test_agent_death_fails_naming_how_it_died(victim, guest_pool, kind, cause):
    g, temp_before = victim
    with pytest.raises(GuestError, match=rf"the guest agent died \({cause}\) while serving the 'fault' request"):
        g.request("fault", {"kind": kind})
    assert "SMCCC-AGENT EXITED" in g.console_log.read_text()
    assert_recovered(guest_pool, g, temp_before)


def test_stuck_agent_times_out_and_the_guest_is_replaced(victim, guest_pool):
    g, temp_before = victim
    t0 = time.monotonic()
    with pytest.raises(GuestError, match=r"did not answer the 'fault' request before the deadline: it is stuck"):
        g.request("fault", {"kind": "hang"}, deadline_s=2.0)
    assert time.monotonic() - t0 < 10, "the request deadline was not honoured"
    assert g.broken and not g.alive(), "a guest with a stuck agent must not be handed out again"
    assert_recovered(guest_pool, g, temp_before)


def test_payload_that_never_exits_ends_at_the_deadline_with_its_pc_symbolized(victim, guest_pool):
    g, temp_before = victim
    p = get_payload("spin")
    t0 = time.monotonic()
    r = g.run(scenario("spin_forever", p, deadline_s=1.0), payload=p)
    assert time.monotonic() - t0 < 10
    assert r.outcome == "deadline", r.describe()
    text = r.describe()
    assert "outcome=deadline" in text and "vcpu0: pc=spin_loop " in text, text
    assert [e["pc"] for e in r.events if e["kind"] == "deadline"] == [p.sym("spin_loop")], text
    assert r.reports == {0: 0x5B1}, text           # the lines before the spin are in the trace
    assert r.trace_path.is_file()
    assert guest_pool.get() is g and g.alive(), "a deadline must not cost the guest"
    q = get_payload("psci_version")
    assert g.run(scenario("after_spin", q, filters=PSCI_FWD), payload=q).outcome == "done"
    assert leftovers.problems([], temp_before) == []


def test_hypercall_storm_is_bounded_and_reported_with_the_count(victim, guest_pool):
    g, temp_before = victim
    p = get_payload("storm")
    r = g.run(scenario("storm", p, filters=PSCI_FWD, max_exits=150, max_trace=40, deadline_s=60.0), payload=p)
    assert r.outcome == "exit_storm", r.describe()
    assert r.exits == 151, r.describe()
    storm = [e for e in r.events if e["kind"] == "exit_storm"]
    assert storm and storm[0]["exits"] == 151 and storm[0]["max_exits"] == 150, r.describe()
    assert r.symbol(storm[0]["pc"]) == "storm_hvc+0x4"
    # the trace sent back is bounded: 40 records, a truncation marker, the last 32
    assert r.trace_dropped > 0 and len(r.events) <= 40 + 1 + 32, len(r.events)
    assert any(e["kind"] == "trace_truncated" for e in r.events)
    assert guest_pool.get() is g and g.alive()
    assert leftovers.problems([], temp_before) == []


def test_dropped_control_channel_fails_the_request_and_reconnect_recovers_the_guest(victim, guest_pool):
    g, temp_before = victim
    p = get_payload("spin")

    def drop():
        time.sleep(0.5)
        g.channel.sock.shutdown(2)

    t = threading.Thread(target=drop)
    t.start()
    with pytest.raises(GuestError, match="control channel"):
        g.run(scenario("spin_while_dropped", p, deadline_s=2.0), payload=p)
    t.join()
    assert g.broken, "a dropped channel must mark the guest unusable until it reconnects"
    # reconnect to the same QEMU: the late answer to the dropped 'run' is skipped, the guest serves again
    assert g.reconnect(10.0)["pong"] is True
    q = get_payload("psci_version")
    r = g.run(scenario("after_reconnect", q, filters=PSCI_FWD), payload=q)
    assert r.outcome == "done", r.describe()
    assert guest_pool.get() is g
    assert leftovers.problems([], temp_before) == []


# ---- the host pytest interrupted --------------------------------------------------------------------
CHILD_TEST = '''
import pathlib
from harness.images.payloads import get_payload
from harness.model.scenarios import scenario

def test_spin_until_interrupted(guest):
    p = get_payload("spin")
    pathlib.Path({started!r}).write_text("running")
    guest.run(scenario("spin_until_interrupted", p, deadline_s=120.0), payload=p)
'''


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_interrupted_pytest_leaves_no_qemu_and_keeps_the_console_log(tmp_path, sig):
    """A child pytest with a guest mid-scenario gets SIGINT / SIGTERM (torn down like Ctrl-C) / SIGKILL
    (QEMU dies with it: PR_SET_PDEATHSIG; its sockets are swept by the next pytest start)."""
    temp_before = leftovers.temp_entries()
    results = tmp_path / "runs"
    started = tmp_path / "started"
    test_file = tmp_path / "test_child_interrupted.py"
    test_file.write_text(CHILD_TEST.format(started=str(started)))
    env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT))
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-c", str(paths.REPO_ROOT / "pytest.ini"), "--rootdir", str(tmp_path),
         "-p", "no:cacheprovider", "-q", "--results-dir", str(results), str(test_file)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=default_sigint)  # noqa: PLW1509 - a background job (`cmd &`, bench/) has SIGINT ignored
    try:
        stop = time.monotonic() + 180
        while not started.exists():
            assert child.poll() is None, f"child pytest ended early:\n{child.stdout.read()}"
            assert time.monotonic() < stop, "the child's guest did not come up"
            time.sleep(0.1)
        time.sleep(0.5)
        assert leftovers.qemu_processes(results), "no QEMU of the child is running"
        child.send_signal(sig)
        try:
            out, _ = child.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            child.kill()
            pytest.fail(f"the child pytest did not exit within 90 s of {sig.name}:\n{child.communicate()[0]}")
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    if sig == signal.SIGKILL:
        assert child.returncode == -signal.SIGKILL
    else:
        assert child.returncode == 2, out            # pytest: interrupted
        assert "KeyboardInterrupt" in out or "Interrupted" in out, out
    assert _wait_gone(results) == [], "QEMU outlived the interrupted pytest"
    run_dirs = [d for d in results.iterdir() if d.is_dir()]
    assert run_dirs and all((d / "console.log").is_file() for d in run_dirs), "console log not kept"
    assert all((d / "console.log").stat().st_size > 0 for d in run_dirs)
    if sig == signal.SIGKILL:
        leftovers.sweep_stale_sockets(results)       # what the next pytest start does
    assert leftovers.problems(run_dirs, temp_before) == []
