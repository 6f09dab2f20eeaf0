"""``pytest --reuse-vm`` end to end (docs/reuse-vm.md): a guest VM that outlives one pytest run.

One results dir for the module; the tests run in order and share its reusable VM: a first pytest run boots
it and leaves it running, a second attaches to the same QEMU; changed guest code is pushed and the agent
reloaded; the idle timeout powers a forgotten VM off; a VM killed with SIGKILL is replaced; ``smccc-harness vm
stop`` leaves no QEMU and no socket.  Whatever happens, the fixture kills every QEMU of the results dir.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import paths
from harness.images.kernel import resolve_kernel
from harness.machine import leftovers, reuse, reuse_state
from harness.machine.detached import reap_detached_children

pytestmark = pytest.mark.infra  # the harness's own plumbing (harness/plugin/tiers.py)

SELECTION = "tests/system/test_forwarding_el1.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    try:
        yield root
    finally:
        for d in reuse_state.all_vm_dirs(root):
            reuse.kill(d)
        stop = time.monotonic() + 10
        while (procs := _live_qemus(root)) and time.monotonic() < stop:
            for p in procs:
                os.kill(p.pid, signal.SIGKILL)
            time.sleep(0.1)
        assert _live_qemus(root) == []


def _live_qemus(root: Path) -> list:
    """QEMUs of ``root`` that run (zombies are not: the ones this process started are reaped here)."""
    reap_detached_children()
    return [p for p in leftovers.qemu_processes(root) if p.state != "Z"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMCCC_REUSE_VM", "PYTEST_XDIST"))}
    env["PYTHONPATH"] = str(paths.REPO_ROOT)
    return env


def _pytest(results: Path, *extra: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pytest", "--reuse-vm", "--results-dir", str(results),
                        "-p", "no:cacheprovider", "-q", *extra, SELECTION],
                       cwd=paths.REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=180, check=False)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t0


def _cli(results: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "vm", *args, "--results-dir", str(results)],
                          cwd=paths.REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)


def _attach(results: Path, **kw):
    k = resolve_kernel(os.environ.get("SMCCC_KERNEL", "default"))
    want = reuse_state.wanted(k.image)
    return reuse.attach(want, reuse_state.vm_dir("default", results), paths.new_run_dir("guest", results), **kw)


def _state(results: Path) -> reuse_state.VmState:
    st = reuse_state.read_state(reuse_state.vm_dir("default", results))
    assert st is not None
    return st


def test_second_run_attaches_to_the_vm_the_first_left_running(results, record_property):
    rc, out, t1 = _pytest(results)
    assert rc == 0, out
    m = re.search(r"started reusable VM pid (\d+)", out)
    assert m, out
    pid = int(m.group(1))
    assert _state(results).pid == pid
    rc, out, t2 = _pytest(results)
    assert rc == 0 and " passed" in out and "failed" not in out, out
    m = re.search(r"reused VM pid (\d+) \(up \d+ s, attached in ([\d.]+) s\)", out)
    assert m and int(m.group(1)) == pid, out
    assert "started reusable VM" not in out
    assert _state(results).pid == pid
    record_property("first_run_s", round(t1, 2))
    record_property("second_run_s", round(t2, 2))
    record_property("attach_s", float(m.group(2)))


def test_changed_guest_code_is_pushed_and_the_agent_reloaded(results, tmp_path, monkeypatch, record_property):
    host = reuse.host_code()
    target = "/opt/smccc/harness/guest/trace.py"
    edited = tmp_path / "trace.py"
    edited.write_bytes(host[target].read_bytes() + f"\nREUSE_VM_MARK = {time.time_ns()}\n".encode())
    pid = _state(results).pid
    monkeypatch.setattr(reuse, "host_code", lambda: {**host, target: edited})
    s = _attach(results)
    try:
        assert s.reuse["how"] == "attached" and s.reuse["pid"] == pid, s.reuse
        assert s.reuse["pushed"] == [target]
        code = s.request("code")
        assert code["hashes"][target] == hashlib.sha256(edited.read_bytes()).hexdigest(), "the agent runs old code"
        record_property("push_s", s.reuse["push_s"])
        record_property("reload_s", s.reuse["reload_s"])
    finally:
        s.close()
    monkeypatch.undo()
    s = _attach(results)          # back to the checked-out code
    try:
        assert s.reuse["pushed"] == [target] and s.reuse["pid"] == pid
    finally:
        s.close()


def test_an_idle_vm_powers_itself_off(results):
    st = _state(results)
    s = _attach(results, idle_s=1)
    s.close()
    stop = time.monotonic() + 15
    while reuse_state.process_problem(st) is None and time.monotonic() < stop:
        time.sleep(0.1)
    assert reuse_state.process_problem(st) is not None, "the idle VM is still running"
    assert "powering the guest off" in Path(st.console_log).read_text(errors="replace")


def test_a_dead_or_killed_vm_is_replaced(results):
    s = _attach(results)            # the idle one is gone: a new VM
    try:
        assert s.reuse["how"] == "started" and "is gone" in s.reuse["replaced"], s.reuse
        pid = s.reuse["pid"]
    finally:
        s.close()
    os.kill(pid, signal.SIGKILL)
    rc, out, _ = _pytest(results)
    assert rc == 0, out
    m = re.search(r"started reusable VM pid (\d+) in [\d.]+ s \(its QEMU \(pid (\d+)\) is gone\)", out)
    assert m and int(m.group(2)) == pid and int(m.group(1)) != pid, out


def test_changed_code_with_nested_vms_alive_replaces_the_vm_instead_of_reloading(results, tmp_path, monkeypatch):
    """A nested (vEL2) scenario leaves its VM in the agent's graveyard (never destroyed); a reload would close
    its fds, i.e. destroy it: changed guest code then gets a new VM, with the reason."""
    from harness.images.payloads import get_payload
    from harness.model.scenarios import scenario
    s = _attach(results)
    try:
        if not s.caps.get("KVM_CAP_ARM_EL2"):
            pytest.skip(f"kernel {s.caps.get('uname')}: KVM_CAP_ARM_EL2 is 0, no nested VM to keep")
        p = get_payload("el2_hello")
        r = s.run(scenario("reuse_el2_hello", p, el2=True), payload=p)
        assert r.outcome == "done", r.describe()
        assert s.request("stats")["graveyard_vms"] >= 1
        pid = s.reuse["pid"]
    finally:
        s.close()
    host = reuse.host_code()
    target = "/opt/smccc/harness/guest/trace.py"
    edited = tmp_path / "trace.py"
    edited.write_bytes(host[target].read_bytes() + b"\n# changed while nested VMs are alive\n")
    monkeypatch.setattr(reuse, "host_code", lambda: {**host, target: edited})
    s = _attach(results)
    try:
        assert s.reuse["how"] == "started" and s.reuse["pid"] != pid, s.reuse
        assert "nested VM(s) alive (a reload would destroy them)" in s.reuse["replaced"], s.reuse
    finally:
        s.close()


def test_vm_status_and_stop_leave_nothing_but_logs(results):
    st = _state(results)
    p = _cli(results, "status")
    assert p.returncode == 0 and f"pid            {st.pid}" in p.stdout and "console log" in p.stdout, p.stdout
    p = _cli(results, "stop")
    assert p.returncode == 0 and "QEMU killed" in p.stdout, p.stdout + p.stderr
    assert _live_qemus(results) == []
    assert leftovers.sockets(results) == []
    d = reuse_state.vm_dir("default", results)
    assert not (d / reuse_state.STATE_FILE).exists() and (d / "console.log").stat().st_size > 0
    assert not reuse_state.socket_dir(d, create=False).exists() or reuse_state.socket_dir(d, create=False) == d
    assert _cli(results, "status").returncode == 1
