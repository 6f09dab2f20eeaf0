"""One QEMU machine: a frozen, validated :class:`MachineConfig` -> argv, and :class:`Machine`, its process.

``MachineConfig`` is the single source of the command line (labgrid's ``QEMUDriver`` style): it validates
everything up front, and renders :meth:`MachineConfig.argv` / :meth:`MachineConfig.shell_command` (for
``smccc-harness boot --print-cmd``, and written to ``<run_dir>/qemu-cmd.sh`` for every run, so a failure can
be reproduced by hand).

``Machine`` runs QEMU under a pty (pexpect), the serial console on QEMU's stdio, and owns the process group:
``stop()`` always kills and reaps it, and QEMU gets ``PR_SET_PDEATHSIG=SIGKILL`` so it dies with the host
process even if the harness is killed with SIGKILL.

``DetachedMachine`` (``pytest --reuse-vm``, harness/machine/reuse.py) is the other kind: a QEMU in its own session
that outlives this process (no PDEATHSIG, stdin /dev/null, output to ``qemu.out``), its serial console on a
unix socket (``MachineConfig.console_socket``) that QEMU itself logs to ``console.log``; a later process
attaches to it by pid.  ``detach()`` lets go of it, ``stop()`` kills it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pexpect
from pexpect.fdpexpect import fdspawn

from ..errors import BootError, SetupError
from ..protocol import PORT_NAME
from .console import Console

log = logging.getLogger(__name__)

ACCELS = ("tcg", "kvm")
SMP_RANGE = (1, 8)
MEMORY_RANGE_MB = (256, 16384)
GIC_VERSIONS = (2, 3, 4)
SUN_PATH_MAX = 107            # sizeof(sockaddr_un.sun_path) - 1
STARTUP_CHECK_S = 1.0         # QEMU exiting this early is a command-line / host problem: BootError
BASE_CMDLINE = "console=ttyAMA0 rdinit=/init kvm-arm.mode=nested panic=-1 loglevel=5"

# Options that have a MachineConfig field: refused inside extra_args, with the field to use instead.
_OWNED_OPTIONS = {
    "append": "cmdline", "kernel": "kernel", "initrd": "initrd", "accel": "accel", "enable-kvm": "accel",
    "cpu": "cpu", "smp": "smp", "m": "memory_mb", "incoming": "incoming", "qmp": "qmp_socket",
    "serial": "console_socket",
}


def default_cmdline(extra: str = "") -> str:
    """The kernel command line: serial console, our /init, nested KVM, reboot (= QEMU exit) on panic.

    Not ``quiet``: that hides ``WARNING:`` lines, which must fail tests; ``loglevel=5`` keeps warnings and
    drops the info chatter.  ``extra`` is appended (e.g. ``"smccc.shell"``, ``"smccc.debug"``).
    """
    extra = extra.strip()
    return f"{BASE_CMDLINE} {extra}" if extra else BASE_CMDLINE


def _as_path(name: str, value: object, *, optional: bool) -> Path | None:
    if value is None and optional:
        return None
    if isinstance(value, str) and value:
        value = Path(value)
    if isinstance(value, Path):
        return value.absolute()     # qemu-cmd.sh must work from any directory
    raise SetupError(f"MachineConfig.{name} must be a path{' or None' if optional else ''}, got {value!r}")


def _qopt(path: Path) -> str:
    """A path as the value of a QEMU ``-chardev`` option: a comma is written as two."""
    return str(path).replace(",", ",,")


def truncated_image(path: Path) -> str | None:
    """Why an arm64 Image (``ARM\\x64`` at 0x38) with a PE/EFI header is shorter than its own section table
    says (a truncated copy or download), else None.  Other formats are not judged here (harness.kernel)."""
    import struct
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if len(head) < 0x40 or head[0x38:0x3C] != b"ARM\x64" or head[:2] != b"MZ":
        return None
    pe = struct.unpack_from("<I", head, 0x3C)[0]
    if pe + 24 > len(head) or head[pe:pe + 4] != b"PE\0\0":
        return None
    nsec, optsz = struct.unpack_from("<H", head, pe + 6)[0], struct.unpack_from("<H", head, pe + 20)[0]
    table = pe + 24 + optsz
    if size < table + 40 * nsec:
        return f"the file ({size} bytes) ends inside its own PE header ({table + 40 * nsec} bytes)"
    need, last = 0, ""
    for i in range(nsec):
        off = table + 40 * i
        if off + 40 > len(head):
            break
        name, _vsz, _va, rawsz, rawptr = struct.unpack_from("<8sIIII", head, off)
        if rawptr + rawsz > need:
            need, last = rawptr + rawsz, name.rstrip(b"\0").decode(errors="replace")
    if size < need:
        return f"its PE section {last} ends at byte {need} but the file has only {size} bytes"
    return None


@dataclass(frozen=True)
class MachineConfig:
    """Everything that defines one QEMU machine; validated at construction (raises ``SetupError``)."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = field(default_factory=default_cmdline)
    accel: str = "tcg"
    cpu: str | None = None            # default: "max" with tcg, "host" with kvm
    smp: int = 1
    memory_mb: int = 1024
    virtualization: bool = True
    gic_version: int = 3
    qemu_bin: str = "qemu-system-aarch64"
    control_socket: Path | None = None   # unix socket of the virtio-serial port PORT_NAME (QEMU listens)
    qmp_socket: Path | None = None       # unix socket of a QMP monitor (QEMU listens)
    incoming: str | None = None          # "defer": wait for migrate-incoming (snapshot restore)
    ssh_port: int | None = None          # opt-in SSH (harness/machine/ssh.py): virtio-net user NIC, 127.0.0.1:PORT -> :22
    extra_args: tuple[str, ...] = ()
    # The serial console on a unix socket (QEMU listens) instead of stdio: a detached QEMU (--reuse-vm,
    # harness/machine/reuse.py); QEMU itself appends everything the guest prints to console_logfile, attached or not.
    console_socket: Path | None = None
    console_logfile: Path | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "kernel", _as_path("kernel", self.kernel, optional=False))
        for name in ("initrd", "control_socket", "qmp_socket", "console_socket", "console_logfile"):
            set_(self, name, _as_path(name, getattr(self, name), optional=True))
        if isinstance(self.extra_args, list):
            set_(self, "extra_args", tuple(self.extra_args))
        if self.cpu is None:
            set_(self, "cpu", "host" if self.accel == "kvm" else "max")
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str, hint: str = "") -> SetupError:
            return SetupError(f"invalid machine configuration: {msg}", hint=hint)

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.accel not in ACCELS:
            raise bad(f"accel must be one of {', '.join(ACCELS)}, got {self.accel!r}")
        if not isinstance(self.cpu, str) or not self.cpu or any(c.isspace() for c in self.cpu):
            raise bad(f"cpu must be a QEMU CPU model such as 'max', got {self.cpu!r}")
        if self.cpu.split(",")[0] == "host" and self.accel != "kvm":
            raise bad(f"cpu 'host' needs accel 'kvm' (accel is {self.accel!r})", hint="use cpu 'max' with TCG")
        if not is_int(self.smp) or not SMP_RANGE[0] <= self.smp <= SMP_RANGE[1]:
            raise bad(f"smp must be an integer in {SMP_RANGE[0]}..{SMP_RANGE[1]}, got {self.smp!r}")
        if not is_int(self.memory_mb) or not MEMORY_RANGE_MB[0] <= self.memory_mb <= MEMORY_RANGE_MB[1]:
            raise bad(f"memory_mb must be an integer in {MEMORY_RANGE_MB[0]}..{MEMORY_RANGE_MB[1]}, "
                      f"got {self.memory_mb!r}")
        if not isinstance(self.virtualization, bool):
            raise bad(f"virtualization must be a bool, got {self.virtualization!r}")
        if not is_int(self.gic_version) or self.gic_version not in GIC_VERSIONS:
            raise bad(f"gic_version must be one of {GIC_VERSIONS}, got {self.gic_version!r}")
        if not isinstance(self.qemu_bin, str) or not self.qemu_bin:
            raise bad(f"qemu_bin must be a program name or path, got {self.qemu_bin!r}")
        if not isinstance(self.cmdline, str) or "\n" in self.cmdline or "\0" in self.cmdline:
            raise bad(f"cmdline must be a one-line string, got {self.cmdline!r}")
        if self.incoming is not None and (not isinstance(self.incoming, str) or not self.incoming):
            raise bad(f"incoming must be a migration URI such as 'defer', or None, got {self.incoming!r}")
        if self.ssh_port is not None and (not is_int(self.ssh_port) or not 1 <= self.ssh_port <= 65535):
            raise bad(f"ssh_port must be a TCP port in 1..65535, or None, got {self.ssh_port!r}")
        if not all(isinstance(a, str) for a in self.extra_args):
            raise bad(f"extra_args must be a tuple of strings, got {self.extra_args!r}")
        for a in self.extra_args:
            opt = a.lstrip("-").split("=", 1)[0] if a.startswith("-") else None
            if opt in _OWNED_OPTIONS:
                raise bad(f"{a!r} in extra_args: use MachineConfig.{_OWNED_OPTIONS[opt]} instead"
                          if not _OWNED_OPTIONS[opt].startswith("(") else
                          f"{a!r} in extra_args is not allowed {_OWNED_OPTIONS[opt]}")
        if not self.kernel.is_file():
            raise bad(f"kernel {self.kernel} does not exist or is not a file",
                      hint="run 'smccc-harness fetch' to download and extract the pinned kernel")
        if self.incoming is None and (why := truncated_image(self.kernel)):   # (a restore uses a stub kernel)
            raise bad(f"kernel {self.kernel} is truncated: {why}",
                      hint="copy or rebuild the Image again (a cached Debian kernel: 'smccc-harness cache verify', "
                           "then 'smccc-harness cache clean' and 'smccc-harness setup')")
        if self.initrd is not None and not self.initrd.is_file():
            raise bad(f"initrd {self.initrd} does not exist or is not a file",
                      hint="run 'smccc-harness build' to build the initramfs")
        for name in ("control_socket", "qmp_socket", "console_socket"):
            p = getattr(self, name)
            if p is not None and len(os.fsencode(str(p))) > SUN_PATH_MAX:
                raise bad(f"{name} path is {len(str(p))} bytes long; unix socket paths must fit in "
                          f"{SUN_PATH_MAX} bytes: {p}", hint="use a shorter --results-dir")
        socks = [p for p in (self.control_socket, self.qmp_socket, self.console_socket) if p is not None]
        if len(set(socks)) != len(socks):
            raise bad("control_socket, qmp_socket and console_socket must differ")
        if self.console_logfile is not None and self.console_socket is None:
            raise bad("console_logfile needs console_socket (with the console on stdio the harness keeps the log)")
        if self.console_logfile is not None and self.console_logfile in socks:
            raise bad("console_logfile must not be one of the sockets")

    # -- rendering ------------------------------------------------------------------------------------
    def machine_arg(self) -> str:
        opts = ["virt"]
        if self.virtualization:
            opts.append("virtualization=on")
        opts.append(f"gic-version={self.gic_version}")
        return ",".join(opts)

    def nic_args(self) -> list[str]:
        """No NIC, unless SSH was asked for: QEMU user networking with one forward, bound to 127.0.0.1 only."""
        if self.ssh_port is None:
            return ["-nic", "none"]
        # romfile= : no PXE option ROM (the kernel boots directly; Debian's QEMU may not ship efi-virtio.rom)
        return ["-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device", "virtio-net-pci,netdev=net0,romfile="]

    def serial_args(self) -> list[str]:
        """The serial console: QEMU's stdio (the default), or a listening unix socket that QEMU logs itself."""
        if self.console_socket is None:
            return ["-serial", "stdio"]
        opts = f"socket,id=con0,path={_qopt(self.console_socket)},server=on,wait=off"
        if self.console_logfile is not None:
            opts += f",logfile={_qopt(self.console_logfile)},logappend=on"
        return ["-chardev", opts, "-serial", "chardev:con0"]

    def argv(self) -> list[str]:
        """The exact QEMU command line (argv[0] is ``qemu_bin``)."""
        a = [self.qemu_bin,
             "-M", self.machine_arg(),
             "-accel", self.accel,
             "-cpu", self.cpu,
             "-smp", str(self.smp),
             "-m", str(self.memory_mb),
             "-display", "none", "-monitor", "none", *self.serial_args(),
             "-no-reboot", *self.nic_args(),
             "-kernel", str(self.kernel)]
        if self.initrd is not None:
            a += ["-initrd", str(self.initrd)]
        a += ["-append", self.cmdline]
        if self.control_socket is not None:
            a += ["-chardev", f"socket,id=ctl,path={self.control_socket},server=on,wait=off",
                  "-device", "virtio-serial-pci,id=vser0",
                  "-device", f"virtserialport,bus=vser0.0,chardev=ctl,name={PORT_NAME}"]
        if self.qmp_socket is not None:
            a += ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        if self.incoming is not None:
            a += ["-incoming", self.incoming]
        a += list(self.extra_args)
        return a

    def shell_command(self) -> str:
        """:meth:`argv` as one shell-quoted line (``shlex.split`` gives :meth:`argv` back)."""
        return shlex.join(self.argv())


# ---- the process -----------------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1
_libc = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _pdeathsig_preexec(parent: int, libc: ctypes.CDLL | None):
    """preexec_fn for the child: SIGKILL when the parent dies (and die now if it already has)."""
    def preexec() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(127)
    return preexec


def _gone(pid: int) -> bool:
    """True if ``pid`` (our child) has exited; does not reap it (WNOWAIT), so its pgid stays reserved."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class Machine:
    """A running QEMU for ``config``, its artifacts in ``run_dir`` (console.log, qemu-cmd.sh).

    Use as a context manager, or call :meth:`start` / :meth:`stop`.  After :meth:`start`: ``pid``,
    ``console`` (a :class:`harness.console.Console`), :meth:`alive`, :meth:`qmp`.
    """

    TERM_GRACE_S = 2.0   # SIGTERM -> SIGKILL
    KILL_WAIT_S = 5.0

    def __init__(self, config: MachineConfig, run_dir: Path) -> None:
        if not isinstance(config, MachineConfig):
            raise TypeError(f"config must be a MachineConfig, got {type(config).__name__}")
        self.config = config
        self.run_dir = Path(run_dir)
        self.console: Console | None = None
        self._child: pexpect.spawn | None = None
        self._qmp = None
        self._stopped = False
        self.exit_status: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def log_path(self) -> Path:
        return self.run_dir / "console.log"

    def alive(self) -> bool:
        if self._child is None or self._stopped:
            return False
        try:
            return bool(self._child.isalive())
        except (OSError, pexpect.ExceptionPexpect):
            return False

    def start(self, startup_check_s: float = STARTUP_CHECK_S) -> Self:
        """Spawn QEMU; raise ``BootError`` (with QEMU's output) if it exits within ``startup_check_s``.

        Returns early, before ``startup_check_s``, once the guest has printed something on the console.
        """
        if self._child is not None:
            raise RuntimeError("Machine.start() called twice")
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for sock in (cfg.control_socket, cfg.qmp_socket):
            if sock is not None and sock.is_socket():
                sock.unlink()     # stale, from an earlier run in the same directory
        argv = cfg.argv()
        script = self.run_dir / "qemu-cmd.sh"
        script.write_text("#!/bin/sh\n# The QEMU command line of this run; the serial console is on stdio.\n"
                          f"exec {cfg.shell_command()} \"$@\"\n")
        script.chmod(0o755)
        t0 = time.monotonic()
        try:
            child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace", timeout=None,
                                  maxread=65536, echo=False, use_poll=True,
                                  preexec_fn=_pdeathsig_preexec(os.getpid(), _load_libc()))
        except pexpect.ExceptionPexpect as e:
            raise SetupError(f"cannot run {argv[0]}: {e}",
                             hint="install QEMU (smccc-harness setup) or pass --qemu-bin") from None
        self._child = child
        self.console = Console(child, self.log_path, name="QEMU", started=t0)
        self._startup_check(startup_check_s)
        return self

    def _startup_check(self, startup_check_s: float) -> None:
        assert self.console is not None and self._child is not None
        stop = time.monotonic() + startup_check_s
        while time.monotonic() < stop:
            self.console.drain(timeout=0.05, max_s=0.0)
            if self.console.eof or not self.alive():
                self.console.drain(timeout=0.2, max_s=1.0)    # whatever QEMU printed before it died
                output = self.console.text.strip()
                status = self._reap()
                self.stop()
                st = "unknown status" if status is None else (
                    f"signal {-status}" if status < 0 else f"status {status}")
                raise BootError(f"QEMU exited with {st} right after starting: "
                                f"{output[-2000:] or '(no output)'}",
                                hint=f"the command line is in {self.run_dir / 'qemu-cmd.sh'}")
            if self._guest_talking():
                return    # QEMU got past its command line and machine setup

    def _guest_talking(self) -> bool:
        """A complete console line that is not one of QEMU's own messages ("qemu-system-aarch64: ...")."""
        assert self.console is not None
        prefix = os.path.basename(self.config.qemu_bin) + ":"
        lines = self.console.text.split("\n")[:-1]
        return any(ln.strip() and not ln.startswith(prefix) for ln in lines)

    def _reap(self) -> int | None:
        """Reap QEMU if it has exited; its exit status (negative = signal), else None."""
        child = self._child
        if child is None:
            return self.exit_status
        with contextlib.suppress(OSError, pexpect.ExceptionPexpect):
            if not child.isalive():
                self.exit_status = -child.signalstatus if child.signalstatus is not None else child.exitstatus
        return self.exit_status

    def stop(self) -> int | None:
        """Kill QEMU's whole process group (SIGTERM, then SIGKILL), reap it, close the pty, remove sockets.

        Idempotent, never raises.  Returns QEMU's exit status (negative = signal), if known.
        """
        if self._stopped:
            return self.exit_status
        self._stopped = True
        child = self._child
        try:
            if self._qmp is not None:
                with contextlib.suppress(Exception):
                    self._qmp.close()
                self._qmp = None
            if child is not None:
                self._kill_group(child.pid)
                if self.console is not None:
                    with contextlib.suppress(Exception):
                        self.console.drain(timeout=0.0, max_s=1.0)
                self._reap()
                with contextlib.suppress(Exception):
                    child.close(force=True)
                if self.exit_status is None and child.signalstatus is not None:
                    self.exit_status = -child.signalstatus
                elif self.exit_status is None:
                    self.exit_status = child.exitstatus
        except Exception:   # stop() runs in finally/__exit__ paths and must not mask errors
            log.warning("error while stopping QEMU (pid %s)", child.pid if child else None, exc_info=True)
        finally:
            if self.console is not None:
                with contextlib.suppress(Exception):
                    self.console.close()
            for sock in (self.config.control_socket, self.config.qmp_socket):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        if sock.is_socket():
                            sock.unlink()
        return self.exit_status

    def _kill_group(self, pid: int) -> None:
        """SIGTERM the process group, wait, SIGKILL it; QEMU's pgid is its pid (pexpect's pty: setsid)."""
        if self._child is not None and self._child.terminated:
            return     # already reaped: its pgid may be someone else's by now
        for sig, wait_s in ((signal.SIGTERM, self.TERM_GRACE_S), (signal.SIGKILL, self.KILL_WAIT_S)):
            if _gone(pid):
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            stop = time.monotonic() + wait_s
            while time.monotonic() < stop and not _gone(pid):
                time.sleep(0.01)
        # The leader is a zombie (not reaped), so the pgid is still ours: kill any stragglers in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        if self._child is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- QMP ------------------------------------------------------------------------------------------
    def qmp(self, timeout_s: float = 10.0):
        """A connected, negotiated ``qemu.qmp.legacy.QEMUMonitorProtocol`` (sync) on ``qmp_socket``.

        Command timeout ``timeout_s``; e.g. ``m.qmp().cmd("query-status")``.  Closed by :meth:`stop`.
        """
        if self.config.qmp_socket is None:
            raise SetupError("this machine has no QMP socket (MachineConfig.qmp_socket)")
        if self._qmp is not None:
            return self._qmp
        from qemu.qmp.legacy import QEMUMonitorProtocol

        sock = self.config.qmp_socket
        stop = time.monotonic() + timeout_s
        while not sock.is_socket():
            if not self.alive():
                raise BootError("QEMU exited before its QMP socket appeared",
                                hint=f"console log: {self.log_path}")
            if time.monotonic() > stop:
                raise BootError(f"QMP socket {sock} did not appear within {timeout_s:g} s")
            time.sleep(0.02)
        q = QEMUMonitorProtocol(str(sock))
        try:
            q.connect(negotiate=True)
        except Exception as e:
            q.close()
            raise BootError(f"cannot connect to QMP at {sock}: {e}") from e
        q.settimeout(timeout_s)
        self._qmp = q
        return q


# ---- a QEMU that outlives this process (--reuse-vm) ------------------------------------------------
def proc_identity(pid: int) -> tuple[int, str] | None:
    """``(start time in clock ticks since boot, state letter)`` of ``pid`` from /proc/PID/stat, or None if
    there is no such process.  The start time tells a pid that was reused by another process apart."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    rest = stat[stat.rindex(")") + 2:].split()
    try:
        return int(rest[19]), rest[0]       # fields 22 (starttime) and 3 (state) of proc_pid_stat(5)
    except (IndexError, ValueError):
        return None


def proc_argv(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]] if raw else []


class _SocketChild(fdspawn):
    """The console socket as a pexpect child for :class:`harness.console.Console`; "alive" is the QEMU's.

    A thread pumps the socket into a pipe that the Console reads (buffering in memory while the pipe is full):
    QEMU's PL011 writes the console byte by byte, every byte is an skb on the unix socket, and the socket's
    send buffer fills after a few hundred bytes: a host that is attached but busy on the control channel would
    stall the guest's console output, and the guest with it (seen: the agent's hello after a reload).
    """

    MAX_PENDING = 64 << 20

    def __init__(self, sock: socket.socket, machine: DetachedMachine) -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        super().__init__(r, encoding="utf-8", codec_errors="replace", timeout=None, maxread=65536, use_poll=True)
        self._sock, self._pipe_w, self._machine = sock, w, machine
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._pump, name="console-pump", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        pending = bytearray()
        sock, w = self._sock, self._pipe_w
        eof = False
        try:
            while True:
                rd = [self._stop_r] + ([] if eof else [sock])
                r, wr, _ = select.select(rd, [w] if pending else [], [])
                if self._stop_r in r:
                    return
                if sock in r:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        eof = True
                    elif len(pending) < self.MAX_PENDING:
                        pending += data
                if w in wr or (pending and not wr):
                    with contextlib.suppress(BlockingIOError):
                        del pending[:os.write(w, pending)]
                if eof and not pending:
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                os.close(w)

    def isalive(self) -> bool:
        return self._machine.alive()

    def send(self, s) -> int:
        data = s.encode() if isinstance(s, str) else bytes(s)
        self._sock.sendall(data)
        return len(data)

    def close(self, force: bool = True) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(2.0)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(Exception):
            super().close()


# Detached QEMUs this process started: kept referenced (a Popen that is garbage-collected while its process
# runs warns "subprocess N is still running") and polled now and then, so that one that exited while this
# process lives is reaped instead of staying a zombie.
_DETACHED_CHILDREN: list[subprocess.Popen] = []


def reap_detached_children() -> None:
    _DETACHED_CHILDREN[:] = [p for p in _DETACHED_CHILDREN if p.poll() is None]


class DetachedMachine(Machine):
    """A QEMU in its own session that this process may not outlive (``pytest --reuse-vm``, harness/machine/reuse.py).

    :meth:`start` spawns it: ``start_new_session``, no PDEATHSIG, stdin /dev/null, stdout+stderr appended to
    ``<run_dir>/qemu.out``, the serial console on ``config.console_socket`` (QEMU logs it to
    ``config.console_logfile`` itself, attached or not).  Built with ``pid``/``pid_start`` (from a state file),
    :meth:`attach` connects the console of a QEMU that an earlier process started.  ``console`` is a
    :class:`harness.console.Console` over the socket; output printed while nobody was attached is only in the
    log.  :meth:`detach` closes the console and QMP and leaves QEMU running; :meth:`stop` kills its process
    group (after checking that ``pid`` is still that QEMU) and removes its sockets.  ``on_release``: callables
    run once by whichever of the two comes first.
    """

    CONSOLE_CONNECT_S = 5.0

    def __init__(self, config: MachineConfig, run_dir: Path, *, pid: int | None = None,
                 pid_start: int | None = None) -> None:
        super().__init__(config, run_dir)
        if config.console_socket is None:
            raise SetupError("a detached machine needs MachineConfig.console_socket (its serial console)")
        self._proc: subprocess.Popen | None = None
        self._pid, self.pid_start = pid, pid_start
        self.detached = False
        self.on_release: list = []

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def log_path(self) -> Path:
        return self.config.console_logfile or self.run_dir / "console.log"

    @property
    def out_path(self) -> Path:
        return self.run_dir / "qemu.out"

    def alive(self) -> bool:
        if self._pid is None or self._stopped:
            return False
        if self._proc is not None:
            return self._proc.poll() is None
        return not detached_gone(self._pid, self.pid_start)

    def start(self, startup_check_s: float = STARTUP_CHECK_S) -> Self:
        if self._pid is not None:
            raise RuntimeError("DetachedMachine.start() on a machine that already has a QEMU")
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for sock in (cfg.control_socket, cfg.qmp_socket, cfg.console_socket):
            if sock is not None and sock.is_socket():
                sock.unlink()
        argv = cfg.argv()
        script = self.run_dir / "qemu-cmd.sh"
        script.write_text("#!/bin/sh\n# The QEMU command line of the reusable VM (harness/machine/reuse.py): detached, the\n"
                          f"# serial console on {cfg.console_socket} (logged by QEMU to {self.log_path}).\n"
                          f"exec {cfg.shell_command()} \"$@\"\n")
        script.chmod(0o755)
        t0 = time.monotonic()
        with open(self.out_path, "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} QEMU started by pid {os.getpid()}\n".encode())
            out.flush()
            try:
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True, close_fds=True)
            except OSError as e:
                raise SetupError(f"cannot run {argv[0]}: {e}",
                                 hint="install QEMU (smccc-harness setup) or pass --qemu-bin") from None
        reap_detached_children()
        _DETACHED_CHILDREN.append(self._proc)
        self._pid = self._proc.pid
        ident = proc_identity(self._pid)
        self.pid_start = ident[0] if ident else None
        try:
            self._connect_console(self.CONSOLE_CONNECT_S, started=t0)
        except BootError:
            self.stop()
            raise
        self._startup_check(startup_check_s)
        return self

    def attach(self) -> Self:
        """Connect the console of the QEMU ``pid`` (started by an earlier process)."""
        if not self.alive():
            raise BootError(f"QEMU pid {self._pid} is not running any more", hint=f"console log: {self.log_path}")
        self._connect_console(self.CONSOLE_CONNECT_S)
        return self

    def _connect_console(self, deadline_s: float, started: float | None = None) -> None:
        path = str(self.config.console_socket)
        stop = time.monotonic() + deadline_s
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError as e:
                s.close()
                if not self.alive() or time.monotonic() > stop:
                    self._reap()
                    out = ""
                    with contextlib.suppress(OSError):
                        out = self.out_path.read_text(errors="replace")[-2000:].strip()
                    what = "exited" if not self.alive() else f"did not open it within {deadline_s:g} s"
                    raise BootError(f"no console socket {path}: QEMU {what} ({e}); QEMU said: {out or '(nothing)'}",
                                    hint=f"the command line is in {self.run_dir / 'qemu-cmd.sh'}") from None
                time.sleep(0.01)
        self._child = _SocketChild(s, self)
        self.console = Console(self._child, None, name="QEMU", started=started)

    def _reap(self) -> int | None:
        if self._proc is not None and self.exit_status is None:
            rc = self._proc.poll()
            if rc is not None:
                self.exit_status = rc       # negative = signal, as Machine reports it
        return self.exit_status

    def _release(self) -> None:
        hooks, self.on_release = self.on_release, []
        for fn in hooks:
            try:
                fn(self)
            except Exception:   # release runs in close paths and must not mask errors
                log.warning("release hook failed", exc_info=True)

    def _close_host_ends(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self.console is not None:
            with contextlib.suppress(Exception):
                self.console.close()
        if self._child is not None:
            with contextlib.suppress(Exception):
                self._child.close()

    def detach(self) -> None:
        """Close the console and QMP connections; QEMU keeps running for the next process."""
        if self._stopped or self.detached:
            return
        self.detached = True
        self._close_host_ends()
        self._release()

    def stop(self) -> int | None:
        """Kill the QEMU (its process group), remove its sockets.  Idempotent, never raises."""
        if self._stopped:
            return self.exit_status
        was_ours = self.alive() or (self._proc is not None)
        self._stopped = True
        try:
            if self._pid is not None and was_ours:
                self._kill_group(self._pid)
                self._reap()
        except Exception:   # stop() runs in finally/close paths and must not mask errors
            log.warning("error while stopping QEMU (pid %s)", self._pid, exc_info=True)
        finally:
            self._close_host_ends()
            for sock in (self.config.control_socket, self.config.qmp_socket, self.config.console_socket):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        if sock.is_socket():
                            sock.unlink()
            self._release()
        return self.exit_status

    def _gone(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is not None
        return detached_gone(self._pid, self.pid_start)

    def _kill_group(self, pid: int) -> None:
        kill_detached(pid, self.pid_start, gone=self._gone, term_s=self.TERM_GRACE_S, kill_s=self.KILL_WAIT_S)


def detached_gone(pid: int, pid_start: int | None) -> bool:
    """``pid`` exited (or is a zombie, or is now another process than the one that started at ``pid_start``)."""
    ident = proc_identity(pid)
    return ident is None or ident[1] in "ZX" or (pid_start is not None and ident[0] != pid_start)


def kill_detached(pid: int, pid_start: int | None, *, gone=None, term_s: float = 2.0, kill_s: float = 5.0) -> bool:
    """SIGTERM, then SIGKILL, a detached QEMU's process group (its pgid is its pid: start_new_session), never a
    pid that is no longer that process (its start time is checked before each signal).  True once it is gone."""
    gone = gone or (lambda: detached_gone(pid, pid_start))
    for sig, wait_s in ((signal.SIGTERM, term_s), (signal.SIGKILL, kill_s)):
        if gone():
            return True
        ident = proc_identity(pid)
        if ident is None or (pid_start is not None and ident[0] != pid_start):
            return True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        stop = time.monotonic() + wait_s
        while time.monotonic() < stop and not gone():
            time.sleep(0.01)
    return gone()
