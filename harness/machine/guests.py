"""One way to get a guest: :class:`GuestOptions` (frozen; from pytest's options, from the CLI's arguments, or
written in code) and :func:`new_session`, which every place that boots a guest uses (the pytest pool, the
CLI's boot/run-payload/selftests run, the bench, the SSH and Linux-guest fixtures).

    opts = GuestOptions.from_pytest(config)        # or .from_args(args), or GuestOptions(kernel="6.12")
    s = new_session(opts, paths.new_run_dir("guest")).start()

:func:`guest_assets` resolves what a guest boots (the kernel, the initramfs built over Debian's rootfs) and
reports each step through ``progress``; :func:`new_session` takes them, or an initrd of the caller's own
(the SSH and Linux-guest images), so that the options are the only other input.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .accel import resolve_accel
from .config import GDB_WAIT_BOOT_S, gdb_command, gdb_port
from .session import GuestSession


@dataclass(frozen=True)
class GuestOptions:
    kernel: str = "default"           # a path (Image, Image.gz, vmlinux) or a Debian spec ('default', '7.2', pkg:NAME)
    accel: str = "auto"               # auto | tcg | kvm (harness/machine/accel.py)
    qemu_bin: str = "qemu-system-aarch64"
    smp: int = 1
    memory_mb: int = 1024
    append: str = ""                  # extra kernel command line
    boot_deadline_s: float = 120.0    # QEMU start -> the agent's ready banner
    snapshots: bool = True            # restore (or make) the cached snapshot of a booted guest
    ssh: bool = False                 # the opt-in SSH channel (docs/ssh.md): cold boot, its own initrd
    gdb: bool = False                 # QEMU's gdbstub on 127.0.0.1 (docs/debug-kernels.md): cold boot, nokaslr
    gdb_port: int | None = None       # with gdb: this port (None: a free one)
    gdb_wait: bool = False            # with gdb: -S, the vCPUs halted until gdb continues them

    def __post_init__(self):
        if self.accel not in ("auto", "tcg", "kvm"):
            raise ValueError(f"accel must be auto, tcg or kvm, not {self.accel!r}")
        if self.smp < 1 or self.memory_mb < 64:
            raise ValueError(f"smp {self.smp} / memory {self.memory_mb} MiB: need >= 1 vCPU and >= 64 MiB")

    @classmethod
    def from_pytest(cls, config, **over) -> GuestOptions:
        """The pytest plugin's options (harness/plugin)."""
        opt = config.getoption
        return dataclasses.replace(cls(
            kernel=str(opt("--kernel")), accel=opt("--accel"), qemu_bin=opt("--qemu-bin"), smp=opt("--smp"),
            memory_mb=opt("--memory"), append=opt("--append") or "", boot_deadline_s=opt("--boot-timeout"),
            snapshots=not opt("--no-snapshot"), ssh=bool(opt("--ssh")),
            gdb=bool(opt("--gdb") or opt("--gdb-wait") or opt("--gdb-port")), gdb_port=opt("--gdb-port"),
            gdb_wait=bool(opt("--gdb-wait"))), **over)

    @classmethod
    def from_args(cls, args, **over) -> GuestOptions:
        """The CLI's common arguments (harness/cli.py ``common``)."""
        from .snapshot_store import disabled_by_env
        return dataclasses.replace(cls(
            kernel=str(args.kernel), accel=args.accel, qemu_bin=args.qemu_bin,
            smp=getattr(args, "smp", 1), memory_mb=getattr(args, "memory", 1024),
            append=getattr(args, "append", "") or "", boot_deadline_s=args.boot_timeout,
            snapshots=not (getattr(args, "no_snapshot", False) or disabled_by_env()),
            gdb=bool(getattr(args, "gdb", False) or getattr(args, "gdb_wait", False) or getattr(args, "gdb_port", None)),
            gdb_port=getattr(args, "gdb_port", None), gdb_wait=bool(getattr(args, "gdb_wait", False))), **over)


@dataclass(frozen=True)
class GuestAssets:
    kernel: object          # harness.images.kernel.KernelAsset
    initrd: Path


def guest_assets(opts: GuestOptions, progress=print, step=None) -> GuestAssets:
    """Check QEMU, resolve the kernel, build the initramfs (cached): what a guest of ``opts`` boots.

    ``step(what, fn)`` runs each of the three steps ("kernel", "rootfs packages", "initramfs"); the pytest
    pool passes one that reports how long a slow step took."""
    from ..images import assets, initramfs
    from ..images.kernel import resolve_kernel
    from ..images.sysdeps import check_qemu
    step = step or (lambda what, fn: fn())
    check_qemu(opts.qemu_bin)          # missing or too old: one clear error before anything else
    kernel = step("kernel", lambda: resolve_kernel(opts.kernel, progress=progress))
    rootfs = step("rootfs packages", lambda: assets.ensure_rootfs(progress=progress))
    initrd = step("initramfs", lambda: initramfs.build_initramfs(rootfs, progress=progress))
    return GuestAssets(kernel=kernel, initrd=initrd)


def new_session(opts: GuestOptions, run_dir: os.PathLike, *, assets: GuestAssets | None = None,
                initrd: os.PathLike | None = None, progress=print) -> GuestSession:
    """A GuestSession for ``opts`` in ``run_dir``, not yet started (``.start()`` boots or restores it).

    ``initrd``: boot this initramfs instead of the harness's own (an image built over it, e.g. the L1 guest
    that carries an L2 kernel)."""
    a = assets or guest_assets(opts, progress)
    port = gdb_port(opts.gdb_port) if opts.gdb else None
    deadline = max(opts.boot_deadline_s, GDB_WAIT_BOOT_S) if opts.gdb and opts.gdb_wait else opts.boot_deadline_s
    return GuestSession.create(
        a.kernel.image, Path(initrd) if initrd else a.initrd, Path(run_dir),
        accel=resolve_accel(opts.accel, opts.qemu_bin), smp=opts.smp, memory_mb=opts.memory_mb,
        append=opts.append, boot_deadline_s=deadline, qemu_bin=opts.qemu_bin,
        snapshots=opts.snapshots and not opts.ssh, ssh=opts.ssh, gdb_port=port, gdb_wait=opts.gdb and opts.gdb_wait)


def gdb_hint(session, kernel) -> str | None:
    """For a session started with --gdb: how to attach (the gdb line), and what is missing without a vmlinux."""
    port = session.config.gdb_port
    if port is None:
        return None
    from ..images.kernel import vmlinux_of
    vm = vmlinux_of(kernel)
    line = f"gdbstub on 127.0.0.1:{port}" + (" (vCPUs halted until gdb continues them)" if session.config.gdb_wait
                                              else "") + f"; attach with: {gdb_command(port, vm)}"
    if vm is None:
        line += ("\n  no vmlinux is known for this kernel: gdb sees addresses only; for symbols pass --kernel "
                 "PATH/vmlinux (or the Image of a kernel build tree, whose vmlinux sits next to it)")
    return line
