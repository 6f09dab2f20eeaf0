"""The plugin's command-line options (``--kernel``, ``--accel``, ``--reuse-vm``, ...) and its start-up: results
directory, retention of old runs, stale sockets, an impossible ``--accel kvm`` as a usage error, SIGTERM as
Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from .. import paths
from ..errors import HarnessError
from ..machine.accel import resolve_accel
from .keys import ROWS_KEY

OPT_GROUP = "smccc-harness"


def pytest_addoption(parser):
    g = parser.getgroup(OPT_GROUP, "smccc-harness: the guest kernel and QEMU")
    g.addoption("--kernel", default=os.environ.get("SMCCC_KERNEL", "default"),
                help="arm64 kernel: a path to an Image, or a Debian kernel spec: 'default' (newest 7.x cloud-arm64), "
                     "a series ('7.2', '6.12') or a package name [env SMCCC_KERNEL]")
    g.addoption("--accel", default=os.environ.get("SMCCC_ACCEL", "auto"), choices=("auto", "tcg", "kvm"),
                help="QEMU accelerator; auto = kvm on an arm64 host with /dev/kvm, else tcg [env SMCCC_ACCEL]")
    g.addoption("--qemu-bin", default=paths.default_qemu_bin(), help="QEMU binary [env SMCCC_QEMU or QEMU]")
    g.addoption("--smp", type=int, default=1, help="vCPUs of the QEMU machine (1 is fastest under TCG)")
    g.addoption("--memory", type=int, default=1024, help="RAM of the QEMU machine in MiB")
    g.addoption("--append", default="", help="extra kernel command line")
    g.addoption("--boot-timeout", type=float, default=float(os.environ.get("SMCCC_BOOT_TIMEOUT", "120")),
                help="seconds from QEMU start to the agent's ready banner")
    g.addoption("--results-dir", default=None, help="where run directories (console logs, traces) go [./runs]")
    g.addoption("--kernel-pkg", default=os.environ.get("SMCCC_KERNEL_PKG"), metavar="NAME[/SUITE]",
                help="a Debian arm64 kernel package, e.g. linux-image-6.12.117+deb13-cloud-arm64/trixie "
                     "(overrides --kernel) [env SMCCC_KERNEL_PKG]")
    g.addoption("--no-snapshot", action="store_true",
                default=os.environ.get("SMCCC_NO_SNAPSHOT", "") not in ("", "0"),
                help="cold-boot every guest instead of restoring the cached snapshot of a booted guest "
                     "(harness.machine.snapshot) [env SMCCC_NO_SNAPSHOT=1]")
    g.addoption("--ssh", action="store_true", default=os.environ.get("SMCCC_SSH", "") not in ("", "0"),
                help="boot the pool's guests with the SSH channel (dropbear, virtio-net, hostfwd on 127.0.0.1; "
                     "cold boot, no snapshot; docs/ssh.md); session.ssh is a harness.machine.ssh.SshChannel [env SMCCC_SSH=1]")
    g.addoption("--reuse-vm", action="store_true",
                default=os.environ.get("SMCCC_REUSE_VM", "") not in ("", "0"),
                help="attach to the guest VM an earlier --reuse-vm run left running (push changed guest code, reload "
                     "the agent) or boot one and leave it running; stop it with 'smccc-harness vm stop' "
                     "(docs/reuse-vm.md) [env SMCCC_REUSE_VM=1]")
    g.addoption("--reuse-vm-idle", type=float, default=None, metavar="SECONDS",
                help="a reused VM powers itself off after this long without a request (0: never) "
                     "[env SMCCC_REUSE_VM_IDLE, default 1800]")
    g.addoption("--gdb", action="store_true",
                help="start each guest's QEMU with its gdbstub on 127.0.0.1 (a free port; cold boot, no snapshot, "
                     "nokaslr) and print the gdb-multiarch line to attach (docs/debug-kernels.md)")
    g.addoption("--gdb-port", type=int, default=None, metavar="PORT", help="--gdb on this port (implies --gdb)")
    g.addoption("--gdb-wait", action="store_true",
                help="--gdb with the vCPUs halted at start (QEMU -S) until gdb continues them (implies --gdb)")
    g.addoption("--psci-fuzz-examples", type=_positive_int, default=None, metavar="N",
                help="programs per PSCI differential fuzz test (tests/system/test_psci_fuzz.py; default 100 at EL1, "
                     "30 at vEL2): a nightly run passes more")
    g.addoption("--psci-fuzz-seed", type=_fuzz_seed, default=None, metavar="SEED",
                help="hypothesis seed of the PSCI fuzz tests (an integer, or 'random'); the run prints the one used")
    g.addoption("--dump-on-splat", action="store_true",
                default=os.environ.get("SMCCC_DUMP_ON_SPLAT", "") not in ("", "0"),
                help="on a guest's first kernel splat, dump its memory (QMP dump-guest-memory, ELF) to vmcore.elf in "
                     "its run directory, for crash or drgn (docs/debug-kernels.md) [env SMCCC_DUMP_ON_SPLAT=1]")
    g.addoption("--kcidb", default=None, metavar="FILE",
                help="after the run, write its results as KernelCI KCIDB JSON, read from the JUnit file "
                     "(--junitxml; FILE.junit.xml when not given) (harness/kdev/kcidb.py)")


def _positive_int(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (the number of programs, e.g. 1000)")
    return n


def _fuzz_seed(text: str) -> str:
    if text != "random":
        try:
            int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give an integer (0x.. or decimal) or 'random'") from None
    return text


def pytest_configure(config):
    config.stash[ROWS_KEY] = []
    rd = config.getoption("--results-dir", None)
    if rd:
        os.environ["SMCCC_HARNESS_RESULTS"] = str(Path(rd).resolve())
    from ..machine.leftovers import prune_at_start, sweep_stale_sockets
    try:    # sockets of earlier runs whose pytest was SIGKILLed (their QEMU died with it: PR_SET_PDEATHSIG)
        sweep_stale_sockets(paths.results_root())
    except OSError:
        pass
    if not hasattr(config, "workerinput"):     # retention of runs/: once, by the controller (or the only process)
        try:
            prune_at_start(paths.results_root())
        except HarnessError as e:
            raise pytest.UsageError(f"{e} ({e.hint})" if getattr(e, "hint", "") else str(e)) from None
    # SMCCC_REUSE_VM is for this pytest only: pytest subprocesses that tests start (fault tests, bisect,
    # matrix) boot guests of their own, which die with them (xdist workers get the option value, not the env).
    os.environ.pop("SMCCC_REUSE_VM", None)
    if config.getoption("--reuse-vm", False) and (config.getoption("--gdb", False) or config.getoption(
            "--gdb-wait", False) or config.getoption("--gdb-port", None)):
        raise pytest.UsageError("--gdb cannot be combined with --reuse-vm: the reusable VM was started without a "
                                "gdbstub (and with KASLR); run 'smccc-harness vm stop' and use --gdb alone, which "
                                "boots a guest of this run (docs/debug-kernels.md)")
    if config.getoption("--kernel-pkg", None):
        config.option.kernel = "pkg:" + config.getoption("--kernel-pkg")
    config.addinivalue_line("markers", "system_suspend: needs KVM_CAP_ARM_SYSTEM_SUSPEND")
    if config.getoption("--accel", "auto") == "kvm" and not hasattr(config, "workerinput"):
        try:  # an impossible --accel kvm is a usage error (exit 4), said once, never a silent TCG fallback
            resolve_accel("kvm")
        except HarnessError as e:
            raise pytest.UsageError(str(e)) from None
    kcidb = config.getoption("--kcidb", None)
    if kcidb and not hasattr(config, "workerinput"):     # the controller (or the only process) writes it
        from .summary import KcidbReport
        if not config.option.xmlpath:
            config.option.xmlpath = str(Path(kcidb).resolve()) + ".junit.xml"
        config.pluginmanager.register(KcidbReport(Path(kcidb), Path(config.option.xmlpath), config.option.kernel),
                                      "smccc-harness-kcidb")
    _install_sigterm_handler()


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"pytest received signal {signum} (SIGTERM)")


def _install_sigterm_handler() -> None:
    """SIGTERM = Ctrl-C: pytest stops and tears the fixtures down, so every QEMU is stopped and its sockets go."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm)
