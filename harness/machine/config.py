"""One QEMU machine's configuration: a frozen, validated :class:`MachineConfig` -> argv.

``MachineConfig`` is the single source of the command line (labgrid's ``QEMUDriver`` style): it validates
everything up front, and renders :meth:`MachineConfig.argv` / :meth:`MachineConfig.shell_command` (for
``smccc-harness boot --print-cmd``, and written to ``<run_dir>/qemu-cmd.sh`` for every run, so a failure can
be reproduced by hand).  The process that runs it: harness/machine/process.py (``Machine``) or
harness/machine/detached.py (``DetachedMachine``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SetupError
from ..protocol import PORT_NAME

ACCELS = ("tcg", "kvm")
SMP_RANGE = (1, 8)
MEMORY_RANGE_MB = (256, 16384)
GIC_VERSIONS = (2, 3, 4)
SUN_PATH_MAX = 107            # sizeof(sockaddr_un.sun_path) - 1
BASE_CMDLINE = "console=ttyAMA0 rdinit=/init kvm-arm.mode=nested panic=-1 loglevel=5"
GDB_CMDLINE = "nokaslr"      # with --gdb: the vmlinux's symbol addresses are where the kernel runs


# Options that have a MachineConfig field: refused inside extra_args, with the field to use instead.
_OWNED_OPTIONS = {
    "append": "cmdline", "kernel": "kernel", "initrd": "initrd", "accel": "accel", "enable-kvm": "accel",
    "cpu": "cpu", "smp": "smp", "m": "memory_mb", "incoming": "incoming", "qmp": "qmp_socket",
    "serial": "console_socket", "gdb": "gdb_port", "s": "gdb_port",
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
    says (a truncated copy or download), else None.  Other formats are not judged here (harness.images.kernel)."""
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
    # QEMU's gdbstub (--gdb, docs/debug-kernels.md): -gdb tcp:127.0.0.1:PORT, loopback only; gdb_wait adds -S
    # (the vCPUs stay halted until gdb continues them).  The kernel command line should carry nokaslr
    # (GDB_CMDLINE) so the vmlinux's addresses are the running kernel's.
    gdb_port: int | None = None
    gdb_wait: bool = False

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
        if self.gdb_port is not None and (not is_int(self.gdb_port) or not 1 <= self.gdb_port <= 65535):
            raise bad(f"gdb_port must be a TCP port in 1..65535, or None, got {self.gdb_port!r}")
        if not isinstance(self.gdb_wait, bool) or (self.gdb_wait and self.gdb_port is None):
            raise bad(f"gdb_wait must be a bool and needs gdb_port (got gdb_wait={self.gdb_wait!r}, "
                      f"gdb_port={self.gdb_port!r})")
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
        if self.gdb_port is not None:
            a += ["-gdb", f"tcp:127.0.0.1:{self.gdb_port}"] + (["-S"] if self.gdb_wait else [])
        a += list(self.extra_args)
        return a

    def shell_command(self) -> str:
        """:meth:`argv` as one shell-quoted line (``shlex.split`` gives :meth:`argv` back)."""
        return shlex.join(self.argv())


# ---- QEMU's gdbstub (--gdb) -------------------------------------------------------------------------------
GDB_WAIT_BOOT_S = 3600.0   # --gdb-wait: the boot deadline (the vCPUs wait for a human in gdb)


def gdb_port(want: int | None = None) -> int:
    """The TCP port for ``-gdb tcp:127.0.0.1:PORT``: ``want`` if nobody listens on it (else a SetupError naming
    it), or a free one.  (QEMU may still lose a race for a free port: it then exits naming the port.)"""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", want or 0))
        except OSError as e:
            raise SetupError(f"--gdb-port {want}: 127.0.0.1:{want} is taken ({e.strerror})",
                             hint="pass another --gdb-port, or leave it out for a free port") from None
        return s.getsockname()[1]


def gdb_command(port: int, vmlinux: Path | None) -> str:
    """The gdb line to attach to a guest's gdbstub (Debian's gdb-multiarch debugs an arm64 kernel on x86)."""
    if vmlinux is not None:
        return f"gdb-multiarch {shlex.quote(str(vmlinux))} -ex 'target remote 127.0.0.1:{port}'"
    return f"gdb-multiarch -ex 'set architecture aarch64' -ex 'target remote 127.0.0.1:{port}'"


SOCK_PREFIX = "smccc-sock-"


def sock_dir(run_dir: Path) -> Path:
    """Where a run's QMP and control sockets live: the run directory itself (0700), unless that path is too
    long for a unix socket (deep pytest/xdist tmp dirs, matrix output dirs): then a private 0700 temp dir,
    removed by :meth:`GuestSession.close`, with a pointer to it left in the run directory."""
    if len(str(Path(run_dir) / "ctl.sock")) <= SUN_PATH_MAX:
        return Path(run_dir)
    d = Path(tempfile.mkdtemp(prefix=SOCK_PREFIX))
    with contextlib.suppress(OSError):
        (Path(run_dir) / "sockets").write_text(f"{d}\n")
    return d
