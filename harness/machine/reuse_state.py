"""The reusable VM's record (``pytest --reuse-vm``, docs/reuse-vm.md): where its directory and sockets live,
its state file (pid and start time, argv, kernel and initramfs hashes, command line, accel, QEMU version, SSH),
what a run wants of it, and the one-line reasons a VM cannot be reused (:func:`mismatches`).  No process is
started here: harness/machine/reuse.py starts, attaches to and kills the VM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import paths
from ..errors import HarnessError
from .config import SUN_PATH_MAX, MachineConfig, default_cmdline
from .detached import detached_gone, proc_argv, proc_identity, reap_detached_children

STATE_FILE = "state.json"
LOCK_FILE = "lock"
STATE_FORMAT = 1
DIR_PREFIX = "reuse-vm-"
SOCK_DIR_PREFIX = "smccc-vm-"
DEFAULT_IDLE_S = 1800.0
IDLE_ENV = "SMCCC_REUSE_VM_IDLE"
IDLE_PARAM = "smccc.idle"          # read by harness/guest/agent.py
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


class ReuseError(HarnessError):
    """The reusable VM's state is unusable, or the VM is in use by another process."""


def quiet(*_a) -> None:
    pass


# ==== where =========================================================================================
def vm_name() -> str:
    """``default``, or the pytest-xdist worker id (each worker has its own reusable VM)."""
    return os.environ.get("PYTEST_XDIST_WORKER") or "default"


def vm_dir(name: str = "default", root: Path | None = None) -> Path:
    if not NAME_RE.match(name) or name in (".", ".."):
        raise ReuseError(f"reusable VM name {name!r}: use letters, digits, '_', '.', '-' (at most 40)")
    return Path(root or paths.results_root()) / f"{DIR_PREFIX}{name}"


def all_vm_dirs(root: Path | None = None) -> list[Path]:
    root = Path(root or paths.results_root())
    return sorted(d for d in root.glob(DIR_PREFIX + "*") if d.is_dir()) if root.is_dir() else []


def socket_dir(vmdir: Path, create: bool = True) -> Path:
    """``vmdir`` itself, or (path too long for sun_path) a fixed private dir named after it in $TMPDIR."""
    vmdir = Path(vmdir).absolute()
    if len(os.fsencode(str(vmdir / "console.sock"))) <= SUN_PATH_MAX:
        return vmdir
    digest = hashlib.sha256(str(vmdir).encode()).hexdigest()[:16]
    d = Path(tempfile.gettempdir()) / f"{SOCK_DIR_PREFIX}{os.getuid()}-{digest}"
    if create:
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ReuseError(f"{d} is not a private directory of this user: refusing to put sockets there",
                             hint="remove it, or use a shorter --results-dir")
    return d


# ==== the state file ================================================================================
@dataclass
class VmState:
    """What ``state.json`` holds about one running reusable VM."""
    name: str
    pid: int
    pid_start: int                 # /proc/PID/stat starttime: a reused pid has another one
    argv: list[str]
    qemu_version: str
    kernel: str
    kernel_sha256: str
    initrd: str
    rootfs_key: str                # harness.images.initramfs.base_key of the rootfs packages
    init_sha256: str               # images/init (not pushable: a change means a new VM)
    cmdline: str                   # without smccc.idle=
    idle_s: float
    accel: str
    smp: int
    memory_mb: int
    control_socket: str
    qmp_socket: str
    console_socket: str
    console_log: str
    ssh_port: int | None = None
    ssh_dir: str | None = None     # keys: id_ed25519(.pub), host_key.pub, known_hosts
    caps: dict = field(default_factory=dict)
    created: float = 0.0           # time.time() when QEMU started
    boot_s: float = 0.0
    format: int = STATE_FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: object, where: str = STATE_FILE) -> VmState:
        if not isinstance(d, dict):
            raise ReuseError(f"{where}: not a JSON object")
        if d.get("format") != STATE_FORMAT:
            raise ReuseError(f"{where}: format {d.get('format')!r}, this harness writes {STATE_FORMAT}")
        known = {f.name for f in dataclasses.fields(cls)}
        for k, t in _STATE_TYPES.items():
            if k not in d and k in ("ssh_port", "ssh_dir"):
                continue
            v = d.get(k)
            if k not in d or not isinstance(v, t) or (isinstance(v, bool) and t in (int, (int, float))):
                raise ReuseError(f"{where}: field {k!r} missing or of the wrong type ({v!r})")
        if not all(isinstance(a, str) for a in d["argv"]) or not d["argv"]:
            raise ReuseError(f"{where}: argv must be a non-empty list of strings")
        if d["pid"] <= 1:
            raise ReuseError(f"{where}: pid {d['pid']} is not a QEMU")
        return cls(**{k: v for k, v in d.items() if k in known})

    def config(self) -> MachineConfig:
        """The MachineConfig it was started with (raises SetupError if e.g. the kernel file is gone)."""
        return MachineConfig(kernel=Path(self.kernel), initrd=Path(self.initrd), cmdline=self.full_cmdline(),
                             accel=self.accel, smp=self.smp, memory_mb=self.memory_mb, qemu_bin=self.argv[0],
                             control_socket=Path(self.control_socket), qmp_socket=Path(self.qmp_socket),
                             console_socket=Path(self.console_socket), console_logfile=Path(self.console_log),
                             ssh_port=self.ssh_port)

    def full_cmdline(self) -> str:
        return with_idle(self.cmdline, self.idle_s)


_STATE_TYPES = {"name": str, "pid": int, "pid_start": int, "argv": list, "qemu_version": str, "kernel": str,
                "kernel_sha256": str, "initrd": str, "rootfs_key": str, "init_sha256": str, "cmdline": str,
                "idle_s": (int, float), "accel": str, "smp": int, "memory_mb": int, "control_socket": str,
                "qmp_socket": str, "console_socket": str, "console_log": str, "ssh_port": (int, type(None)),
                "ssh_dir": (str, type(None)), "caps": dict, "created": (int, float), "boot_s": (int, float),
                "format": int}


def with_idle(cmdline: str, idle_s: float) -> str:
    return f"{cmdline} {IDLE_PARAM}={int(idle_s)}" if idle_s and idle_s > 0 else cmdline


def strip_idle(cmdline: str) -> str:
    return " ".join(w for w in cmdline.split() if not w.startswith(IDLE_PARAM + "="))


def read_state(vmdir: Path) -> VmState | None:
    """The state file of ``vmdir``; None if there is none; ReuseError if it is unreadable or invalid."""
    p = Path(vmdir) / STATE_FILE
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ReuseError(f"cannot read {p}: {e}") from None
    try:
        d = json.loads(text)
    except ValueError as e:
        raise ReuseError(f"{p}: not JSON: {e}") from None
    return VmState.from_dict(d, str(p))


def write_state(vmdir: Path, st: VmState) -> Path:
    """Atomically (temp file in the same dir, fsync, rename), 0600."""
    vmdir = Path(vmdir)
    vmdir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=vmdir, prefix=".state-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(st.to_dict(), f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, vmdir / STATE_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return vmdir / STATE_FILE


def process_problem(st: VmState) -> str | None:
    """Why ``st.pid`` is not the VM's QEMU any more (None: it is, and it runs)."""
    reap_detached_children()        # one this process started and that exited is reaped, not a zombie
    ident = proc_identity(st.pid)
    if ident is None or ident[1] in "ZX":
        return f"its QEMU (pid {st.pid}) is gone"
    if ident[0] != st.pid_start:
        return f"pid {st.pid} is now another process (started at tick {ident[0]}, the VM's QEMU at {st.pid_start})"
    argv = proc_argv(st.pid)
    if argv is not None and argv != st.argv:
        return f"pid {st.pid} is not the VM's QEMU (another command line)"
    return None


# ==== what this run asks for ========================================================================
@dataclass(frozen=True)
class Wanted:
    kernel: Path
    kernel_sha256: str
    rootfs_key: str
    init_sha256: str
    cmdline: str                   # without smccc.idle=
    accel: str
    smp: int
    memory_mb: int
    qemu_bin: str
    qemu_version: str
    ssh: bool = False


def wanted(kernel: Path, *, append: str = "", accel: str = "tcg", smp: int = 1, memory_mb: int = 1024,
           qemu_bin: str = "qemu-system-aarch64", ssh: bool = False, rootfs: dict | None = None) -> Wanted:
    """What a run with these options needs, without building the initramfs (guest code is pushed instead)."""
    from ..images import assets, initramfs
    from .snapshot_store import file_sha256, qemu_version
    if rootfs is None:
        rootfs = assets.ensure_rootfs(progress=quiet)
    extra = append
    if ssh:
        from ..images.sshimage import SSH_CMDLINE
        extra = f"{append} {SSH_CMDLINE}".strip()
    return Wanted(kernel=Path(kernel).absolute(), kernel_sha256=file_sha256(Path(kernel)),
                  rootfs_key=initramfs.base_key({n: Path(p).name for n, p in rootfs.items()}),
                  init_sha256=hashlib.sha256((paths.IMAGES_DIR / "init").read_bytes()).hexdigest(),
                  cmdline=strip_idle(default_cmdline(extra)), accel=accel, smp=smp, memory_mb=memory_mb,
                  qemu_bin=qemu_bin, qemu_version=qemu_version(qemu_bin), ssh=ssh)


def _short(h: str) -> str:
    return h[:12]


def mismatches(st: VmState, want: Wanted) -> list[str]:
    """Why the running VM cannot serve this run (empty: it can).  A VM with SSH serves a run without."""
    out = []
    if st.kernel_sha256 != want.kernel_sha256:
        out.append(f"the kernel changed ({_short(st.kernel_sha256)} {st.kernel} -> "
                   f"{_short(want.kernel_sha256)} {want.kernel})")
    if st.rootfs_key != want.rootfs_key:
        out.append("the rootfs packages changed")
    if st.init_sha256 != want.init_sha256:
        out.append("images/init changed")
    ssh_cmd = ""
    if st.ssh_port is not None and not want.ssh:
        from ..images.sshimage import SSH_CMDLINE
        ssh_cmd = SSH_CMDLINE
    vm_cmdline = strip_idle(st.cmdline)
    if ssh_cmd:
        vm_cmdline = " ".join(vm_cmdline.replace(ssh_cmd, " ").split())
    if vm_cmdline != want.cmdline:
        out.append(f"the kernel command line differs ({vm_cmdline!r} -> {want.cmdline!r})")
    for what, have, need in (("accel", st.accel, want.accel), ("smp", st.smp, want.smp),
                             ("memory", st.memory_mb, want.memory_mb)):
        if have != need:
            out.append(f"{what} {have} -> {need}")
    if shutil.which(st.argv[0]) != shutil.which(want.qemu_bin):
        out.append(f"another QEMU binary ({st.argv[0]} -> {want.qemu_bin})")
    elif st.qemu_version != want.qemu_version:
        out.append(f"QEMU changed ({st.qemu_version} -> {want.qemu_version})")
    if want.ssh and st.ssh_port is None:
        out.append("SSH asked for, the VM has none")
    return out


def idle_default() -> float:
    """``SMCCC_REUSE_VM_IDLE`` seconds (0: never), else :data:`DEFAULT_IDLE_S`."""
    env = os.environ.get(IDLE_ENV, "")
    try:
        return float(env) if env else DEFAULT_IDLE_S
    except ValueError:
        raise ReuseError(f"{IDLE_ENV}={env!r}: not a number of seconds") from None


def stale_state(vmdir: Path) -> bool:
    """True if ``vmdir`` has a state file whose QEMU is gone (leftovers may remove its sockets)."""
    try:
        st = read_state(vmdir)
    except ReuseError:
        return True
    return st is None or detached_gone(st.pid, st.pid_start) or process_problem(st) is not None


def format_status(info: dict) -> str:
    """``smccc-harness vm status``: a reusable VM's :func:`harness.machine.reuse.status` as lines for a person."""
    state = "running" if info["running"] else f"not running ({info.get('problem', '?')})"
    out = [f"reusable VM {info['name']!r}: {state}"]
    if "pid" in info:
        up = info["uptime_s"]
        out += [(f"  pid            {info['pid']} (up {int(up // 3600)}h{int(up % 3600 // 60):02d}m{int(up % 60):02d}s, "
                 f"idle timeout {info['idle_s']:.0f} s)"),
                f"  kernel         {info.get('release') or '?'} ({info['kernel']})",
                f"  control socket {info['control_socket']}",
                f"  console socket {info['console_socket']}"]
    out.append(f"  console log    {info['console_log']}")
    if info.get("ssh"):
        out.append(f"  ssh            {info['ssh']}")
    return "\n".join(out)
