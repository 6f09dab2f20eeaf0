"""harness.machine.reuse (the --reuse-vm state file, config matching, pid-reuse defence) and the detached QEMU's
command line (harness.machine.config console_socket); the agent's idle/code/put bits.  No QEMU is started."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.errors import SetupError
from harness.guest import agent
from harness.machine import leftovers, reuse, reuse_state
from harness.machine.config import MachineConfig, default_cmdline
from harness.machine.detached import DetachedMachine, kill_detached, proc_identity


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "Image"
    k.write_bytes(b"\0" * 4096)
    return k


def _state(tmp_path: Path, kernel: Path, **kw) -> reuse_state.VmState:
    d = tmp_path / "reuse-vm-default"
    cfg = MachineConfig(kernel=kernel, initrd=kernel, cmdline=reuse_state.with_idle(default_cmdline(), 1800),
                        control_socket=d / "ctl.sock", qmp_socket=d / "qmp.sock", console_socket=d / "console.sock",
                        console_logfile=d / "console.log")
    st = reuse_state.VmState(name="default", pid=os.getpid(), pid_start=proc_identity(os.getpid())[0], argv=cfg.argv(),
                       qemu_version="QEMU emulator version 10.0.2", kernel=str(kernel), kernel_sha256="a" * 64,
                       initrd=str(kernel), rootfs_key="r" * 32, init_sha256="i" * 64, cmdline=default_cmdline(),
                       idle_s=1800.0, accel="tcg", smp=1, memory_mb=1024, control_socket=str(d / "ctl.sock"),
                       qmp_socket=str(d / "qmp.sock"), console_socket=str(d / "console.sock"),
                       console_log=str(d / "console.log"), caps={"uname": "7.3.4"}, created=time.time(), boot_s=4.5)
    return dataclasses.replace(st, **kw)


def _want(st: reuse_state.VmState, **kw) -> reuse_state.Wanted:
    w = reuse_state.Wanted(kernel=Path(st.kernel), kernel_sha256=st.kernel_sha256, rootfs_key=st.rootfs_key,
                     init_sha256=st.init_sha256, cmdline=st.cmdline, accel="tcg", smp=1, memory_mb=1024,
                     qemu_bin=st.argv[0], qemu_version=st.qemu_version)
    return dataclasses.replace(w, **kw)


# ---- the command line -----------------------------------------------------------------------------
def test_console_socket_replaces_stdio_and_is_logged_by_qemu(tmp_path, kernel):
    cfg = MachineConfig(kernel=kernel, console_socket=tmp_path / "con,1.sock", console_logfile=tmp_path / "c.log")
    a = cfg.argv()
    assert "stdio" not in a
    i = a.index("-chardev")
    assert a[i + 1] == (f"socket,id=con0,path={tmp_path}/con,,1.sock,server=on,wait=off,"
                        f"logfile={tmp_path}/c.log,logappend=on")       # a comma in a path is doubled
    assert a[a.index("-serial") + 1] == "chardev:con0"
    assert shlex.split(cfg.shell_command()) == a
    assert MachineConfig(kernel=kernel).serial_args() == ["-serial", "stdio"]      # the default is unchanged


@pytest.mark.parametrize("kw, msg", [
    ({"console_socket": "/x/" + "s" * 120}, "console_socket path is"),
    ({"console_socket": "/tmp/a.sock", "control_socket": "/tmp/a.sock"}, "must differ"),
    ({"console_logfile": "/tmp/c.log"}, "needs console_socket"),
    ({"extra_args": ("-serial", "stdio")}, "console_socket"),
])
def test_console_socket_is_validated(kernel, kw, msg):
    with pytest.raises(SetupError, match=msg):
        MachineConfig(kernel=kernel, **kw)


def test_detached_machine_needs_a_console_socket(tmp_path, kernel):
    with pytest.raises(SetupError, match="console_socket"):
        DetachedMachine(MachineConfig(kernel=kernel), tmp_path)


# ---- the state file -------------------------------------------------------------------------------
def test_state_round_trip_is_atomic_and_private(tmp_path, kernel):
    st = _state(tmp_path, kernel, ssh_port=2222, ssh_dir=str(tmp_path / "ssh"))
    p = reuse_state.write_state(tmp_path / "vm", st)
    assert p.stat().st_mode & 0o777 == 0o600
    assert [x.name for x in p.parent.iterdir()] == ["state.json"]     # no temp file left
    assert reuse_state.read_state(tmp_path / "vm") == st
    assert reuse_state.read_state(tmp_path / "nothing") is None


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d.pop("pid"), "'pid' missing"),
    (lambda d: d.update(pid="12"), "'pid' missing or of the wrong type"),
    (lambda d: d.update(smp=True), "'smp'"),
    (lambda d: d.update(argv=[]), "argv"),
    (lambda d: d.update(format=99), "format 99"),
    (lambda d: d.update(pid=1), "pid 1"),
])
def test_bad_state_files_are_refused(tmp_path, kernel, mutate, msg):
    d = _state(tmp_path, kernel).to_dict()
    mutate(d)
    (tmp_path / "state.json").write_text(json.dumps(d))
    with pytest.raises(reuse_state.ReuseError, match=msg):
        reuse_state.read_state(tmp_path)


def test_state_that_is_not_json(tmp_path):
    (tmp_path / "state.json").write_text("{half")
    with pytest.raises(reuse_state.ReuseError, match="not JSON"):
        reuse_state.read_state(tmp_path)
    assert reuse_state.stale_state(tmp_path)


def test_config_of_a_state_renders_its_own_argv(tmp_path, kernel):
    st = _state(tmp_path, kernel)
    assert st.config().argv() == st.argv
    assert "smccc.idle=1800" in st.config().cmdline


def test_idle_parameter_is_not_part_of_the_match():
    assert reuse_state.strip_idle("a smccc.idle=60 b") == "a b"
    assert reuse_state.with_idle("a", 0) == "a"
    assert reuse_state.with_idle("a", 90.5) == "a smccc.idle=90"


# ---- matching -------------------------------------------------------------------------------------
def test_nothing_differs(tmp_path, kernel):
    st = _state(tmp_path, kernel)
    assert reuse_state.mismatches(st, _want(st)) == []


@pytest.mark.parametrize("change, reason", [
    ({"kernel_sha256": "b" * 64}, "the kernel changed (aaaaaaaaaaaa"),
    ({"rootfs_key": "x"}, "the rootfs packages changed"),
    ({"init_sha256": "x"}, "images/init changed"),
    ({"cmdline": default_cmdline("smccc.debug")}, "the kernel command line differs"),
    ({"accel": "kvm"}, "accel tcg -> kvm"),
    ({"smp": 2}, "smp 1 -> 2"),
    ({"memory_mb": 2048}, "memory 1024 -> 2048"),
    ({"qemu_version": "QEMU emulator version 10.1.0"}, "QEMU changed"),
    ({"ssh": True}, "SSH asked for, the VM has none"),
])
def test_mismatch_reasons(tmp_path, kernel, change, reason):
    st = _state(tmp_path, kernel)
    got = reuse_state.mismatches(st, _want(st, **change))
    assert len(got) == 1 and got[0].startswith(reason), got


def test_a_vm_with_ssh_serves_a_run_without(tmp_path, kernel):
    from harness.images.sshimage import SSH_CMDLINE
    st = _state(tmp_path, kernel, ssh_port=2222, cmdline=default_cmdline(SSH_CMDLINE))
    assert reuse_state.mismatches(st, _want(st, cmdline=default_cmdline())) == []


# ---- is it still that QEMU? ----------------------------------------------------------------------
def test_a_live_matching_process_has_no_problem(tmp_path, kernel):
    st = _state(tmp_path, kernel, argv=_own_argv())
    assert reuse_state.process_problem(st) is None


def _own_argv() -> list[str]:
    return Path(f"/proc/{os.getpid()}/cmdline").read_bytes().decode().split("\0")[:-1]


def test_pid_reuse_is_detected_by_start_time(tmp_path, kernel):
    st = _state(tmp_path, kernel, argv=_own_argv())
    st.pid_start -= 1
    assert "is now another process" in reuse_state.process_problem(st)


def test_another_command_line_is_not_the_vm(tmp_path, kernel):
    st = _state(tmp_path, kernel)        # our pid and start time, but QEMU's argv
    assert "another command line" in reuse_state.process_problem(st)


def test_a_dead_pid_is_gone(tmp_path, kernel):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    st = _state(tmp_path, kernel, pid=p.pid)
    assert "is gone" in reuse_state.process_problem(st)


def test_kill_detached_never_signals_a_reused_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        start = proc_identity(p.pid)[0]
        assert kill_detached(p.pid, start + 1, term_s=0.2, kill_s=0.2)   # "gone": not that process
        assert p.poll() is None, "a process with another start time was signalled"
        assert kill_detached(p.pid, start, gone=lambda: p.poll() is not None, term_s=2, kill_s=2)
        assert p.returncode == -15
    finally:
        p.kill()
        p.wait()


# ---- where -----------------------------------------------------------------------------------------
def test_vm_dir_names(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert reuse_state.vm_name() == "default"
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    assert reuse_state.vm_name() == "gw3"
    assert reuse_state.vm_dir("gw3", tmp_path) == tmp_path / "reuse-vm-gw3"
    for bad in ("", "../x", "a/b", ".."):
        with pytest.raises(reuse_state.ReuseError):
            reuse_state.vm_dir(bad, tmp_path)


def test_socket_dir_is_private_and_stable_for_deep_dirs(tmp_path):
    deep = tmp_path / ("d" * 100) / "reuse-vm-default"
    a, b = reuse_state.socket_dir(deep), reuse_state.socket_dir(deep)
    try:
        assert a == b and a.name.startswith(reuse_state.SOCK_DIR_PREFIX)
        assert a.stat().st_mode & 0o777 == 0o700
        assert reuse_state.socket_dir(tmp_path) == tmp_path.absolute()
    finally:
        a.rmdir()


def test_idle_default(monkeypatch):
    monkeypatch.delenv(reuse_state.IDLE_ENV, raising=False)
    assert reuse_state.idle_default() == 1800.0
    monkeypatch.setenv(reuse_state.IDLE_ENV, "90")
    assert reuse_state.idle_default() == 90.0
    monkeypatch.setenv(reuse_state.IDLE_ENV, "soon")
    with pytest.raises(reuse_state.ReuseError, match="not a number"):
        reuse_state.idle_default()


def test_sweep_keeps_a_live_reused_vms_sockets(tmp_path, kernel):
    import socket
    d = tmp_path / "reuse-vm-default"
    d.mkdir()
    socks = []
    for n in ("ctl.sock", "console.sock"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / n))
        socks.append(s)
    try:
        reuse_state.write_state(d, _state(tmp_path, kernel, argv=_own_argv()))    # "alive": this process
        assert leftovers.sweep_stale_sockets(tmp_path) == []
        assert (d / "ctl.sock").is_socket()
        st = _state(tmp_path, kernel, argv=_own_argv())
        st.pid_start -= 1                                                    # its QEMU is gone
        reuse_state.write_state(d, st)
        assert sorted(p.name for p in leftovers.sweep_stale_sockets(tmp_path)) == ["console.sock", "ctl.sock"]
        assert (d / "state.json").exists()          # kept: the next attach says what happened
    finally:
        for s in socks:
            s.close()


def test_stale_code_lists_only_changed_modules(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("A = 1\n")
    b.write_text("B = 1\n")
    loaded = {"/opt/smccc/harness/a.py": hashlib.sha256(b"A = 1\n").hexdigest(), "/opt/smccc/harness/b.py": "0"}
    assert reuse.stale_code(loaded, {"/opt/smccc/harness/a.py": a, "/opt/smccc/harness/b.py": b}) == {
        "/opt/smccc/harness/b.py": b"B = 1\n"}


# ---- the agent's side --------------------------------------------------------------------------------
def test_agent_reads_the_idle_timeout_from_the_kernel_command_line(tmp_path):
    p = tmp_path / "cmdline"
    p.write_text("console=ttyAMA0 smccc.idle=1800 loglevel=5\n")
    assert agent.idle_from_cmdline(str(p)) == 1800.0
    p.write_text("console=ttyAMA0 smccc.idle=0\n")
    assert agent.idle_from_cmdline(str(p)) is None
    p.write_text("console=ttyAMA0\n")
    assert agent.idle_from_cmdline(str(p)) is None
    assert agent.idle_from_cmdline(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("path, ok", [
    (agent.CODE_ROOT + "/guest/agent.py", True),
    (agent.CODE_ROOT + "/protocol.py", True),
    (agent.CODE_ROOT + "/guest/new_module.py", True),
    (agent.CODE_ROOT + "/guest/../../etc/x.py", False),
    (agent.CODE_ROOT + "/guest/__pycache__/agent.py", False),
    (agent.CODE_ROOT + "/guest/.hidden.py", False),
    (agent.CODE_ROOT + "/guest/agent.sh", False),
    (agent.CODE_ROOT + "/guest/a b.py", False),
    ("/etc/passwd.py", False),
    (agent.CODE_ROOT + "x/evil.py", False),
])
def test_put_into_the_guest_code_is_limited_to_py_modules(path, ok):
    assert agent._is_code_path(path) is ok


def test_put_refuses_other_paths():
    from harness import protocol as P
    with pytest.raises(P.ProtocolError, match="under /tmp"):
        agent.put_file({"path": "/etc/profile", "data": P.b64(b"x")})


def test_code_hashes(tmp_path):
    (tmp_path / "guest" / "__pycache__").mkdir(parents=True)
    (tmp_path / "guest" / "a.py").write_bytes(b"x")
    (tmp_path / "guest" / "__pycache__" / "a.cpython-313.pyc").write_bytes(b"y")
    assert agent.code_hashes(str(tmp_path)) == {str(tmp_path / "guest" / "a.py"): hashlib.sha256(b"x").hexdigest()}


def test_agent_reads_the_kvm_mode_from_kernel_log_records():
    from harness.guest import agent
    lines = ["Booting Linux on physical CPU 0x0000000000 [0x000f0510]",
             "kvm [1]: VHE+NV2 mode initialized successfully", "kvm [1]: something else"]
    assert agent.kvm_mode_from_dmesg(lines) == "VHE+NV2 mode initialized successfully"
    assert agent.kvm_mode_from_dmesg(["kvm [1]: Hyp nVHE mode initialized successfully"]) == \
        "Hyp nVHE mode initialized successfully"
    assert agent.kvm_mode_from_dmesg([]) is None
