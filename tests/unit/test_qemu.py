"""harness.machine.config: MachineConfig validation and rendering; Machine lifecycle against the real QEMU binary."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import time
from pathlib import Path

import pytest

from harness.errors import BootError, HarnessError, SetupError
from harness.machine.config import MachineConfig, default_cmdline
from harness.machine.process import Machine
from harness.protocol import PORT_NAME

QEMU = shutil.which("qemu-system-aarch64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-aarch64 is not installed")


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(os.urandom(4096))    # QEMU loads an unknown format as a raw image; fine with -S
    return k


@pytest.fixture
def initrd(tmp_path: Path) -> Path:
    i = tmp_path / "initramfs.cpio"
    i.write_bytes(b"070701")
    return i


# ---- rendering -------------------------------------------------------------------------------------
def test_default_cmdline() -> None:
    c = default_cmdline()
    assert c == "console=ttyAMA0 rdinit=/init kvm-arm.mode=nested panic=-1 loglevel=5"
    assert "quiet" not in c.split()
    assert default_cmdline("smccc.shell") == c + " smccc.shell"
    assert default_cmdline("  ") == c


def test_argv_tcg_with_control_and_qmp(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    cfg = MachineConfig(kernel=kernel, initrd=initrd, control_socket=tmp_path / "ctl.sock",
                        qmp_socket=tmp_path / "qmp.sock")
    assert cfg.cpu == "max" and cfg.accel == "tcg" and cfg.smp == 1 and cfg.memory_mb == 1024
    assert cfg.argv() == [
        "qemu-system-aarch64",
        "-M", "virt,virtualization=on,gic-version=3",
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", "1024",
        "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-no-reboot", "-nic", "none",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", "console=ttyAMA0 rdinit=/init kvm-arm.mode=nested panic=-1 loglevel=5",
        "-chardev", f"socket,id=ctl,path={tmp_path / 'ctl.sock'},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", f"virtserialport,bus=vser0.0,chardev=ctl,name={PORT_NAME}",
        "-qmp", f"unix:{tmp_path / 'qmp.sock'},server=on,wait=off",
    ]
    assert PORT_NAME == "smccc.ctl"


def test_argv_minimal_incoming_and_extra(kernel: Path) -> None:
    cfg = MachineConfig(kernel=kernel, smp=2, memory_mb=2048, incoming="defer", extra_args=("-S",))
    a = cfg.argv()
    assert "-initrd" not in a and "-chardev" not in a and "-qmp" not in a
    assert a[a.index("-smp") + 1] == "2" and a[a.index("-m") + 1] == "2048"
    assert a[-3:] == ["-incoming", "defer", "-S"]


def test_argv_kvm(kernel: Path) -> None:
    cfg = MachineConfig(kernel=kernel, accel="kvm", virtualization=False)
    a = cfg.argv()
    assert cfg.cpu == "host"
    assert a[1:7] == ["-M", "virt,gic-version=3", "-accel", "kvm", "-cpu", "host"]
    nv = MachineConfig(kernel=kernel, accel="kvm")
    assert nv.argv()[2] == "virt,virtualization=on,gic-version=3"
    assert nv.argv()[6] == "host"


def test_shell_command_round_trips(tmp_path: Path) -> None:
    d = tmp_path / "dir with space"
    d.mkdir()
    k = d / "vmlinuz"
    k.write_bytes(b"x")
    cfg = MachineConfig(kernel=k, cmdline=default_cmdline("smccc.note='it''s' \"q\" $HOME"),
                        control_socket=d / "c.sock")
    assert shlex.split(cfg.shell_command()) == cfg.argv()
    assert cfg.shell_command().startswith("qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 ")


def test_paths_coerced_to_absolute(tmp_path: Path, kernel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = MachineConfig(kernel="vmlinuz", qmp_socket="q.sock", extra_args=["-S"])  # type: ignore[arg-type]
    assert cfg.kernel == kernel and cfg.kernel.is_absolute()
    assert cfg.qmp_socket == tmp_path / "q.sock"
    assert cfg.extra_args == ("-S",)


def test_frozen(kernel: Path) -> None:
    cfg = MachineConfig(kernel=kernel)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.smp = 2  # type: ignore[misc]
    assert dataclasses.replace(cfg, smp=2).smp == 2


# ---- validation ------------------------------------------------------------------------------------
def test_missing_kernel(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match=r"kernel .*vmlinuz-missing does not exist") as e:
        MachineConfig(kernel=tmp_path / "vmlinuz-missing")
    assert isinstance(e.value, HarnessError) and e.value.hint


def test_missing_initrd(tmp_path: Path, kernel: Path) -> None:
    with pytest.raises(SetupError, match="initrd .* does not exist"):
        MachineConfig(kernel=kernel, initrd=tmp_path / "nope.cpio")


@pytest.mark.parametrize(("arg", "field"), [
    ("-append", "cmdline"), ("--append", "cmdline"), ("-kernel", "kernel"), ("-initrd", "initrd"),
    ("-cpu", "cpu"), ("-smp", "smp"), ("-m", "memory_mb"), ("-enable-kvm", "accel"),
])
def test_owned_options_refused_in_extra_args(kernel: Path, arg: str, field: str) -> None:
    with pytest.raises(SetupError, match=rf"'{arg}' in extra_args: use MachineConfig\.{field} instead"):
        MachineConfig(kernel=kernel, extra_args=(arg, "x"))


@pytest.mark.parametrize("smp", [0, 9, -1, True, "2", 1.0])
def test_bad_smp(kernel: Path, smp: object) -> None:
    with pytest.raises(SetupError, match="smp must be an integer in 1..8"):
        MachineConfig(kernel=kernel, smp=smp)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "msg"), [
    ({"memory_mb": 128}, "memory_mb must be"),
    ({"memory_mb": 32768}, "memory_mb must be"),
    ({"accel": "hvf"}, "accel must be one of tcg, kvm"),
    ({"cpu": "host"}, "cpu 'host' needs accel 'kvm'"),
    ({"cpu": "max pauth"}, "cpu must be"),
    ({"gic_version": 5}, "gic_version"),
    ({"virtualization": "yes"}, "virtualization must be a bool"),
    ({"cmdline": "a\nb"}, "cmdline must be a one-line string"),
    ({"incoming": ""}, "incoming must be"),
    ({"extra_args": ("-S", 3)}, "extra_args must be a tuple of strings"),
    ({"kernel": 3}, "kernel must be a path"),
    ({"qemu_bin": ""}, "qemu_bin"),
])
def test_bad_fields(kernel: Path, kw: dict, msg: str) -> None:
    kw = {"kernel": kernel, **kw}
    with pytest.raises(SetupError, match=msg):
        MachineConfig(**kw)


def test_socket_path_too_long(kernel: Path) -> None:
    with pytest.raises(SetupError, match="unix socket paths must fit"):
        MachineConfig(kernel=kernel, qmp_socket=Path("/tmp") / ("x" * 120))


# ---- the process -----------------------------------------------------------------------------------
def test_machine_stop_without_start(tmp_path: Path, kernel: Path) -> None:
    m = Machine(MachineConfig(kernel=kernel), tmp_path / "run")
    assert m.pid is None and not m.alive()
    m.stop()
    m.stop()


@needs_qemu
def test_bogus_option_fails_fast(tmp_path: Path, kernel: Path) -> None:
    cfg = MachineConfig(kernel=kernel, qmp_socket=tmp_path / "q.sock", control_socket=tmp_path / "c.sock",
                        extra_args=("-no-such-option",))
    m = Machine(cfg, tmp_path / "run")
    # "fast" is what the message proves (the start-up check saw QEMU exit: "right after starting"), not a
    # wall-clock bound, which a loaded 2-core host would break
    with pytest.raises(BootError, match=r"QEMU exited with status 1 right after starting: .*-no-such-option"):
        m.start()
    assert m.pid is not None and not Path(f"/proc/{m.pid}").exists()
    assert not m.alive()
    assert m.exit_status == 1
    assert (tmp_path / "run" / "qemu-cmd.sh").read_text().count("-no-such-option") == 1
    assert "invalid option" in (tmp_path / "run" / "console.log").read_text()
    assert not (tmp_path / "q.sock").exists() and not (tmp_path / "c.sock").exists()
    m.stop()    # idempotent


@needs_qemu
def test_missing_binary(tmp_path: Path, kernel: Path) -> None:
    m = Machine(MachineConfig(kernel=kernel, qemu_bin="qemu-system-does-not-exist"), tmp_path / "run")
    with pytest.raises(SetupError, match="cannot run qemu-system-does-not-exist"):
        m.start()
    m.stop()


@needs_qemu
def test_lifecycle_paused_machine(tmp_path: Path, kernel: Path) -> None:
    """-S: QEMU stays up without guest output; QMP works; stop() kills and reaps it and removes the sockets."""
    cfg = MachineConfig(kernel=kernel, qmp_socket=tmp_path / "q.sock", control_socket=tmp_path / "c.sock",
                        extra_args=("-S",))
    with Machine(cfg, tmp_path / "run") as m:
        assert m.alive() and m.pid is not None
        pid = m.pid
        assert os.getpgid(pid) == pid     # session + group leader (pexpect's pty)
        assert m.qmp().cmd("query-status")["status"] == "prelaunch"
        assert (tmp_path / "c.sock").is_socket()
        script = (tmp_path / "run" / "qemu-cmd.sh").read_text()
        assert cfg.shell_command() in script
    assert not m.alive()
    assert not Path(f"/proc/{pid}").exists()
    assert not (tmp_path / "q.sock").exists() and not (tmp_path / "c.sock").exists()
    assert m.stop() == m.exit_status


@needs_qemu
def test_stop_kills_sigterm_resistant_group(tmp_path: Path, kernel: Path) -> None:
    """stop() escalates to SIGKILL and takes the whole process group down (a wrapper that ignores SIGTERM)."""
    wrapper = tmp_path / "qemu-wrapper"
    wrapper.write_text(f"#!/bin/sh\ntrap '' TERM\necho hello from the wrapper\n{QEMU} \"$@\" & wait\nsleep 60\n")
    wrapper.chmod(0o755)
    cfg = MachineConfig(kernel=kernel, qemu_bin=str(wrapper), extra_args=("-S",))
    m = Machine(cfg, tmp_path / "run")
    m.TERM_GRACE_S = 0.3
    m.start()
    pid = m.pid
    assert pid is not None
    time.sleep(0.3)
    members = [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pid]
    assert len(members) >= 2
    m.stop()        # bounded by its own waits (TERM_GRACE_S, KILL_WAIT_S); what matters is that all are gone:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in members):
        time.sleep(0.05)
    assert not [p for p in members if Path(f"/proc/{p}").exists() and not _zombie_of_init(p)]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _zombie_of_init(pid: int) -> bool:
    """A killed grandchild may linger briefly as a zombie until init reaps it: that is not a leak."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] == "Z"


@needs_qemu
def test_qemu_dies_with_its_host_process(tmp_path: Path, kernel: Path) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed harness process takes its QEMU with it (no stop() ever runs)."""
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from harness.machine.config import MachineConfig\n"
        "from harness.machine.process import Machine\n"
        f"m = Machine(MachineConfig(kernel=Path({str(kernel)!r}), extra_args=('-S',)), Path({str(tmp_path / 'run')!r}))\n"
        "m.start(startup_check_s=0.3)\n"
        "print(m.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline() if p.stdout else ""
        qemu_pid = int(line)
        assert Path(f"/proc/{qemu_pid}").exists()
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{qemu_pid}").exists() and not _zombie_of_init(qemu_pid):
        time.sleep(0.05)
    assert not Path(f"/proc/{qemu_pid}").exists() or _zombie_of_init(qemu_pid)


def test_pdeathsig_preexec_sets_sigkill() -> None:
    import ctypes
    import signal

    from harness.machine.process import _load_libc, _pdeathsig_preexec

    libc = _load_libc()
    assert libc is not None
    pid = os.fork()
    if pid == 0:    # pragma: no cover - child
        try:
            _pdeathsig_preexec(os.getppid(), libc)()
            v = ctypes.c_int(0)
            libc.prctl(2, ctypes.byref(v), 0, 0, 0)    # PR_GET_PDEATHSIG
            os._exit(v.value)
        finally:
            os._exit(255)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == signal.SIGKILL


# ---- QEMU's gdbstub (--gdb, docs/debug-kernels.md) ----------------------------------------------------
def test_gdb_stub_listens_on_loopback_only_and_wait_halts_the_vcpus(kernel: Path) -> None:
    a = MachineConfig(kernel=kernel, gdb_port=40123).argv()
    assert a[a.index("-gdb") + 1] == "tcp:127.0.0.1:40123" and "-S" not in a
    w = MachineConfig(kernel=kernel, gdb_port=40123, gdb_wait=True).argv()
    assert w[w.index("-gdb"):w.index("-gdb") + 3] == ["-gdb", "tcp:127.0.0.1:40123", "-S"]
    assert "-gdb" not in MachineConfig(kernel=kernel).argv()


@pytest.mark.parametrize(("over", "match"), [
    ({"gdb_port": 0}, "gdb_port must be a TCP port"),
    ({"gdb_port": "1234"}, "gdb_port must be a TCP port"),
    ({"gdb_wait": True}, "gdb_wait must be a bool and needs gdb_port"),
    ({"extra_args": ("-gdb", "tcp::1234")}, "use MachineConfig.gdb_port"),
    ({"extra_args": ("-s",)}, "use MachineConfig.gdb_port"),
])
def test_gdb_fields_are_validated(kernel: Path, over: dict, match: str) -> None:
    with pytest.raises(SetupError, match=match):
        MachineConfig(kernel=kernel, **over)


def test_gdb_port_taken_is_named_and_a_free_one_is_picked() -> None:
    import socket

    from harness.machine.config import gdb_command, gdb_port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(SetupError, match=f"--gdb-port {taken}: 127.0.0.1:{taken} is taken") as e:
            gdb_port(taken)
        assert "another --gdb-port" in e.value.hint
        assert gdb_port() != taken
    assert gdb_command(1234, Path("/o/vmlinux")) == "gdb-multiarch /o/vmlinux -ex 'target remote 127.0.0.1:1234'"
    assert "set architecture aarch64" in gdb_command(1234, None)


def test_a_gdb_session_boots_cold_with_kaslr_off(kernel: Path, tmp_path: Path) -> None:
    from harness.machine.session import GuestSession
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    s = GuestSession.create(kernel, initrd, tmp_path, snapshots=True, gdb_port=40123, gdb_wait=True)
    assert not s.snapshots and s.config.cmdline.split()[-1] == "nokaslr"
    assert s.config.argv()[-3:] == ["-gdb", "tcp:127.0.0.1:40123", "-S"]
    plain = GuestSession.create(kernel, initrd, tmp_path, snapshots=True)
    assert plain.snapshots and "nokaslr" not in plain.config.cmdline


def test_pytest_refuses_gdb_with_reuse_vm(tmp_path: Path) -> None:
    """--reuse-vm attaches to a VM started without a gdbstub: a usage error (exit 4) that says what to do."""
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "test_x.py").write_text("def test_x(): pass\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", "/dev/null", "-p", "harness.plugin",
                        "--reuse-vm", "--gdb", "--results-dir", str(tmp_path / "runs"), "test_x.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "PYTHONPATH": str(repo)})
    assert p.returncode == 4, p.stdout[-2000:] + p.stderr[-2000:]
    assert "--gdb cannot be combined with --reuse-vm" in p.stderr and "vm stop" in p.stderr, p.stderr[-2000:]
