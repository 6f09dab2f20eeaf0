"""``smccc-harness``: set up, run the suite, boot a guest, run a payload, manage the cache.

Exit codes: 0 success; 1 tests failed; 2 bad usage or input (the message says what to do); other pytest codes
are passed through.  Errors the user can fix print ``error: ...`` and ``hint: ...`` and never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

from . import paths
from .errors import HarnessError
from .machine.leftovers import keep_runs_arg

SUITE_MARKERS = "not slow"
# The main job: forwarding behaviour only (PSCI, the filter, both conduits, EL1 and nested EL2); the fault,
# bad-input, selftest and Linux-guest suites and the PSCI differential fuzzer (~40-100 s under TCG,
# docs/psci-fuzz.md) run under `test` and in a bare pytest.
RUN_MARKERS = "(psci or filter or hvc or smc or el2) and not slow and not infra and not upstream and not fuzz"


def _progress(msg: str) -> None:
    print(f"[smccc-harness] {msg}", flush=True)


# ---- setup -------------------------------------------------------------------------------------------
def cmd_setup(args) -> int:
    from .images import assets, initramfs, payloads, sysdeps
    t0 = time.monotonic()
    if not args.no_system:
        sysdeps.ensure_system_packages(progress=_progress)
    sysdeps.check_qemu(args.qemu_bin)
    t1 = time.monotonic()
    from .images.kernel import resolve_kernel
    k = resolve_kernel(args.kernel)
    rootfs = assets.ensure_rootfs(progress=_progress)
    t2 = time.monotonic()
    cpio = initramfs.build_initramfs(rootfs, progress=_progress)
    built = payloads.build_payloads()
    t3 = time.monotonic()
    _progress(f"kernel {k.version}: {k.image}")
    _progress(f"initramfs: {cpio} ({cpio.stat().st_size / 1e6:.1f} MB)")
    _progress(f"payloads: {', '.join(sorted(built))}")
    _progress(f"setup took {t3 - t0:.1f} s (system {t1 - t0:.1f} s, assets {t2 - t1:.1f} s, "
              f"initramfs+payloads {t3 - t2:.1f} s)")
    return 0


# ---- pytest runs -------------------------------------------------------------------------------------
def _pytest(argv: list[str]) -> int:
    import pytest
    os.chdir(paths.REPO_ROOT)
    _progress("pytest " + " ".join(shlex.quote(a) for a in argv))
    return int(pytest.main(argv))


def _common_pytest_args(args) -> list[str]:
    out = ["--kernel", args.kernel, "--accel", args.accel, "--qemu-bin", args.qemu_bin]
    if getattr(args, "results_dir", None):
        out += ["--results-dir", args.results_dir]
    if getattr(args, "no_snapshot", False):
        out += ["--no-snapshot"]
    return out


def _cache_args() -> list[str]:
    """pytest's cache (``--lf``, ``--ff``) stays on: it lives in the checkout's ``.pytest_cache``, or, when the
    checkout is read-only, in ``<cache_dir()>/pytest-cache`` (pass ``-o cache_dir=...`` to a later pytest)."""
    local = paths.REPO_ROOT / ".pytest_cache"
    if os.access(local if local.exists() else paths.REPO_ROOT, os.W_OK):
        return []
    return ["-o", f"cache_dir={paths.cache_dir() / 'pytest-cache'}"]


def run_argv(args) -> list[str]:
    """The pytest argv of ``smccc-harness run`` (the cache provider stays on, so ``pytest --lf`` works after it)."""
    argv = ["tests/system", "-m", args.markers, "-q", *_cache_args()] + _common_pytest_args(args)
    if args.k:
        argv += ["-k", args.k]
    return argv + list(args.pytest_args)


def cmd_run(args) -> int:
    """The main job: set up, then the PSCI/SMC suite on one kernel, ending with the results table."""
    if not args.no_setup:
        rc = cmd_setup(args)
        if rc:
            return rc
    return _pytest(run_argv(args))


def cmd_test(args) -> int:
    """Unit tests, then system tests (the README's test command; .ci/run calls it)."""
    if not args.no_setup:
        rc = cmd_setup(args)
        if rc:
            return rc
        if not args.no_system:   # the upstream tier builds KVM selftests with the cross gcc: install it now
            from .images import sysdeps
            sysdeps.ensure_selftest_packages(progress=_progress)
            sysdeps.ensure_report_packages(progress=_progress)   # Chromium: the report page test renders with it
    argv = ["tests/unit", "tests/system", "-m", args.markers] + _common_pytest_args(args)
    return _pytest(argv + list(args.pytest_args))


# ---- boot / run-payload -----------------------------------------------------------------------------
def _results_root(args) -> Path | None:
    """``--results-dir`` as an absolute path (None: the default, :func:`harness.paths.results_root`)."""
    rd = getattr(args, "results_dir", None)
    return Path(rd).resolve() if rd else None


def _session(args, append: str = "", ssh: bool = False):
    """The guest of boot / run-payload / selftests run: harness/machine/guests.py, from the CLI's arguments."""
    from .machine.guests import GuestOptions, guest_assets, new_session
    append = " ".join(a for a in (getattr(args, "append", "") or "", append) if a)   # --append, then ours
    opts = GuestOptions.from_args(args, append=append, ssh=ssh)
    if getattr(args, "shell", False):
        opts = dataclasses.replace(opts, snapshots=False)
    a = guest_assets(opts, progress=_progress)
    run_dir = paths.new_run_dir(args.command.replace("-", "_"), _results_root(args))
    s = new_session(opts, run_dir, assets=a)
    if opts.gdb and not getattr(args, "print_cmd", False):     # the printed line runs gdb-multiarch
        from .images.sysdeps import ensure_debug_packages
        ensure_debug_packages(progress=_progress)
    from .machine.guests import gdb_hint
    if (line := gdb_hint(s, a.kernel)) and not getattr(args, "print_cmd", False):
        _progress(line)
    return s, a.kernel


def cmd_boot(args) -> int:
    s, k = _session(args, append="smccc.shell" if args.shell else "", ssh=getattr(args, "ssh", False))
    if args.print_cmd:
        print(s.config.shell_command())
        return 0
    if args.shell:
        import subprocess
        _progress(f"booting {k.version} with a shell on the console (exit QEMU with Ctrl-a x)")
        argv = s.config.argv()
        return subprocess.call(argv)
    with s:
        _progress(f"guest ready in {s.timings['ready_s']} s; kernel {s.caps.get('uname')}; "
                  f"KVM: {s.caps.get('kvm_mode')}")
        print(json.dumps(s.caps, indent=2, sort_keys=True))
        _progress(f"console log: {s.console_log}")
        if s.ssh is not None:
            _progress(f"ssh: {s.ssh.run('uname -a', 10)[1].strip()}  (key {s.run_dir / 'ssh' / 'id_ed25519'}, "
                      f"127.0.0.1:{s.config.ssh_port})")
        if s.config.gdb_port is not None:     # keep the guest for gdb until Ctrl-C (or QEMU exits)
            _progress(f"guest running for gdb on 127.0.0.1:{s.config.gdb_port}; Ctrl-C (or SIGTERM) stops it")
            import signal

            def _stop(signum, frame):
                raise KeyboardInterrupt(f"signal {signum}")
            signal.signal(signal.SIGTERM, _stop)      # `with s` then kills QEMU and keeps the run directory
            while s.alive():
                time.sleep(0.5)
            _progress("QEMU exited")
    return 0


def payload_params(args) -> list[int]:
    """The parameter block (u64 words at PARAM_BASE) from ``--params FILE`` with each ``--param OFFSET=VALUE``
    written over it, in order."""
    from .model.payload_abi import param_words, parse_param, read_params_file
    base = read_params_file(args.params) if getattr(args, "params", None) else b""
    return param_words(base, [parse_param(t) for t in getattr(args, "param", None) or []])


def cmd_run_payload(args) -> int:
    from .images.payloads import load_elf
    from .model.scenarios import scenario
    p = load_elf(args.elf, vcpus=args.vcpus, state=args.state)     # an ELF for the other state: a clear error
    if p.aarch32 and args.el2:
        from .errors import PayloadError
        raise PayloadError(f"{args.elf} is an AArch32 payload: it cannot run at vEL2 (KVM refuses "
                           "KVM_ARM_VCPU_EL1_32BIT with HAS_EL2: arch/arm64/kvm/arm.c kvm_vcpu_init_check_features)",
                           hint="drop --el2: AArch32 payloads run at EL1")
    from .model.filter_model import parse_forward
    filters = [f for text in args.forward for f in parse_forward(text)]
    from .model.filter_model import check_filters
    check_filters(filters, what="--forward range")      # before anything boots: KVM would refuse it
    params = payload_params(args)                        # bad input: an error before anything boots
    spec = scenario(Path(args.elf).stem, p, filters=filters, el2=args.el2, vcpus=args.vcpus,
                    handler=args.handler, deadline_s=args.deadline, params=params)
    s, _ = _session(args)
    with s:
        r = s.run(spec, payload=p)
        print(r.describe())
        _progress(f"trace: {r.trace_path}; console log: {s.console_log}")
    return 0 if r.outcome in ("done", "system_event", "all_off") else 1


# ---- the reusable VM (--reuse-vm, docs/reuse-vm.md) ------------------------------------------------------
def _vm_dirs(args) -> list[Path]:
    from .machine import reuse_state
    root = _results_root(args)
    if getattr(args, "all", False):
        return reuse_state.all_vm_dirs(root)
    return [reuse_state.vm_dir(args.name, root)]


def cmd_vm(args) -> int:
    """``vm start|status|stop``: the reusable VM that ``pytest --reuse-vm`` attaches to."""
    from .machine import reuse, reuse_state
    if args.action == "start":
        from .images.kernel import resolve_kernel
        from .images.sysdeps import check_qemu
        from .machine.accel import resolve_accel
        check_qemu(args.qemu_bin)
        k = resolve_kernel(args.kernel)
        root = _results_root(args)
        s = reuse.open_vm(k.image, paths.new_run_dir("vm_start", root), name=args.name, root=root,
                          append=args.append, accel=resolve_accel(args.accel), smp=args.smp, memory_mb=args.memory,
                          qemu_bin=args.qemu_bin, ssh=args.ssh, idle_s=args.idle, boot_deadline_s=args.boot_timeout,
                          progress=_progress)
        info = s.reuse
        try:
            if info["how"] == "attached":
                _progress(f"already running: pid {info['pid']} (attached in {info['attach_s']} s"
                          + (f", pushed {len(info['pushed'])} guest module(s)" if info["pushed"] else "") + ")")
            else:
                _progress(f"started pid {info['pid']}: guest ready in {info['boot_s']} s")
        finally:
            s.close()
        print(reuse_state.format_status(reuse.status(Path(info["vm_dir"]))))
        return 0
    dirs = _vm_dirs(args)
    if args.action == "status":
        if not dirs or not any((d / reuse_state.STATE_FILE).exists() for d in dirs):
            print("no reusable VM" + ("" if getattr(args, "all", False) else f" {args.name!r}") +
                  f" under {_results_root(args) or paths.results_root()}")
            return 1
        infos = [reuse.status(d) for d in dirs if (d / reuse_state.STATE_FILE).exists()]
        for info in infos:
            print(reuse_state.format_status(info))
        return 0 if all(i["running"] for i in infos) else 1
    for d in dirs:
        if not d.is_dir():
            continue
        killed = reuse.kill(d)
        _progress(f"{d.name}: " + ("QEMU killed" if killed else "no QEMU was running") +
                  f"; logs kept: {d / 'console.log'}")
    if not any(d.is_dir() for d in dirs):
        _progress("no reusable VM")
    return 0


# ---- assets / cache ---------------------------------------------------------------------------------
def cmd_assets(args) -> int:
    from .images import assets
    if args.action in ("fetch", "lock"):
        assets.fetch_all(tuple(args.kernels or ["default"]), refresh=(args.action == "lock"), progress=_progress)
        return 0
    if args.action == "verify":
        problems = assets.verify_cache(progress=_progress)
        for p in problems:
            print(f"problem: {p}")
        _progress("cache OK" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    if args.action == "clean":
        n = assets.clean_cache(everything=args.all, progress=_progress)
        _progress(f"removed {n} entries")
        return 0
    if args.action == "summary":
        print(json.dumps(assets.asset_summary(), indent=2, sort_keys=True))
        return 0
    return 2


# ---- qemu build --------------------------------------------------------------------------------------
def cmd_qemu_build(args) -> int:
    from .images import qemu_build
    t0 = time.monotonic()
    patch_dir = Path(args.patches) if args.patches else qemu_build.PATCH_DIR
    b = qemu_build.build(version=args.source_version, patch_dir=patch_dir, jobs=args.jobs, progress=_progress)
    what = (f"{b.info.get('version_line', '?')}: Debian's qemu {b.version} + {len(b.info.get('patches', []))} "
            f"patch(es) from {patch_dir} (hash {b.digest})")
    if b.cached:
        _progress(f"cached {what}; its build took {b.build_s:.0f} s ({b.info.get('built', '?')}); "
                  f"found in {time.monotonic() - t0:.2f} s")
    else:
        _progress(f"built {what} in {b.build_s:.0f} s")
    _progress(f"use it with --qemu-bin {b.path} (pytest and every command) or QEMU={b.path}")
    print(b.path, flush=True)
    return 0


# ---- main -------------------------------------------------------------------------------------------
def gdb_args(p) -> None:
    """--gdb / --gdb-port / --gdb-wait (boot, run-payload; pytest has the same options): docs/debug-kernels.md."""
    p.add_argument("--gdb", action="store_true",
                   help="start QEMU's gdbstub on 127.0.0.1 (a free port), boot with nokaslr and no snapshot, "
                        "print the gdb-multiarch line to attach")
    p.add_argument("--gdb-port", type=int, default=None, metavar="PORT", help="--gdb on this port (implies --gdb)")
    p.add_argument("--gdb-wait", action="store_true",
                   help="--gdb with the vCPUs halted at start (QEMU -S) until gdb continues them (implies --gdb; "
                        "boot deadline 1 h)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="smccc-harness", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, kernel=True):
        if kernel:
            p.add_argument("--kernel", default=os.environ.get("SMCCC_KERNEL", "default"),
                           help="Image, Image.gz or vmlinux path, or Debian spec ('default', '7.2', '6.12', package)")
            p.add_argument("--kernel-pkg", default=os.environ.get("SMCCC_KERNEL_PKG"), metavar="NAME[/SUITE]",
                           help="a Debian arm64 kernel package (overrides --kernel) [env SMCCC_KERNEL_PKG]")
        p.add_argument("--accel", default=os.environ.get("SMCCC_ACCEL", "auto"), choices=("auto", "tcg", "kvm"))
        p.add_argument("--qemu-bin", default=paths.default_qemu_bin(),
                       help="QEMU binary [env SMCCC_QEMU or QEMU; `smccc-harness qemu build` prints a patched one]")
        p.add_argument("--boot-timeout", type=float, default=120.0)
        p.add_argument("--results-dir", default=None, help="where run directories go [env SMCCC_HARNESS_RESULTS, ./runs]")
        p.add_argument("--keep-runs", type=keep_runs_arg, default=None, metavar="N",
                       help="keep the newest N run directories under the results dir, never a live run's "
                            "(0: keep all) [env SMCCC_KEEP_RUNS, default 50]")
        p.add_argument("--no-snapshot", action="store_true",
                       help="cold-boot the guest instead of restoring the cached snapshot [env SMCCC_NO_SNAPSHOT=1]")

    p = sub.add_parser("setup", help="install system packages, fetch kernel and rootfs packages, build initramfs")
    common(p)
    p.add_argument("--no-system", action="store_true", help="skip apt installs of host packages")
    p.set_defaults(func=cmd_setup)

    for name, func, helptext, markers in (
            ("run", cmd_run, "set up, then run the PSCI/SMC suite with a results table", RUN_MARKERS),
            ("test", cmd_test, "set up, then run unit and system tests", SUITE_MARKERS)):
        p = sub.add_parser(name, help=helptext)
        common(p)
        p.add_argument("--no-setup", action="store_true")
        p.add_argument("--no-system", action="store_true")
        p.add_argument("-m", "--markers", default=markers, help=f"pytest -m expression (default: {markers})")
        p.add_argument("-k", default=None, help="pytest -k expression")
        p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
        p.set_defaults(func=func)

    p = sub.add_parser("boot", help="boot a guest: print its QEMU command, its capabilities, or give a shell")
    common(p)
    p.add_argument("--print-cmd", action="store_true", help="print the exact QEMU command line and exit")
    p.add_argument("--shell", action="store_true", help="interactive shell on the serial console")
    p.add_argument("--ssh", action="store_true", help="also bring up the SSH channel (docs/ssh.md) and run uname -a")
    p.add_argument("--append", default="", help="extra kernel command line, e.g. 'initcall_debug loglevel=8' "
                                                "(a new snapshot key: the first boot is cold)")
    gdb_args(p)
    p.set_defaults(func=cmd_boot)

    p = sub.add_parser("vm", help="the reusable VM that pytest --reuse-vm attaches to: start, status, stop")
    p.add_argument("action", choices=("start", "status", "stop"))
    common(p)
    p.add_argument("--name", default="default", help="which reusable VM (pytest-xdist workers: gw0, gw1, ...)")
    p.add_argument("--all", action="store_true", help="status/stop: every reusable VM under the results dir")
    p.add_argument("--ssh", action="store_true", help="start: with the SSH channel (docs/ssh.md); keys in its dir")
    p.add_argument("--idle", type=float, default=None, metavar="SECONDS",
                   help="start: power off after this long without a request (0: never) [env SMCCC_REUSE_VM_IDLE, "
                        "default 1800]")
    p.add_argument("--append", default="", help="start: extra kernel command line")
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--memory", type=int, default=1024)
    p.set_defaults(func=cmd_vm)

    p = sub.add_parser("run-payload", help="run your payload ELF against the handler and print the trace")
    common(p)
    p.add_argument("elf")
    p.add_argument("--forward", action="append", default=[],
                   help="'psci' or BASE[+NR][:fwd|deny|handle]; repeatable")
    p.add_argument("--el2", action="store_true", help="run at vEL2 (HAS_EL2 vCPU)")
    p.add_argument("--state", choices=("aarch64", "aarch32"), default="aarch64",
                   help="the state the ELF was built for: aarch64 (EM_AARCH64) or aarch32 (EM_ARM: A32, or T32 when "
                        "the entry address is odd; an AArch32 EL1 vCPU)")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--handler", default="psci", choices=("psci", "record"))
    p.add_argument("--deadline", type=float, default=10.0)
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--param", action="append", default=[], metavar="OFFSET=VALUE",
                   help="write the u64 VALUE (little-endian) at byte OFFSET of the payload's parameter block at "
                        "PARAM_BASE (0x40100000), e.g. 0x8=0xC4000003; repeatable, applied after --params")
    p.add_argument("--params", default=None, metavar="FILE",
                   help="the parameter block's initial contents: raw bytes, or for FILE.json a list of u64 words "
                        "or an object {\"OFFSET\": VALUE}")
    gdb_args(p)
    p.set_defaults(func=cmd_run_payload)

    for name in ("assets", "cache"):
        p = sub.add_parser(name, help="fetch/lock/verify/clean the Debian package cache")
        p.add_argument("action", choices=("fetch", "lock", "verify", "clean", "summary"))
        p.add_argument("--kernels", nargs="*", help="kernel specs to fetch (default: the default kernel)")
        p.add_argument("--all", action="store_true", help="clean: remove everything, downloads included")
        p.set_defaults(func=cmd_assets)

    p = sub.add_parser("qemu", help="QEMU with the project's fixes (patches/qemu/): build it from Debian's source")
    qs = p.add_subparsers(dest="qemu_command", required=True)
    b = qs.add_parser("build", help="rebuild the installed QEMU from Debian's source with patches/qemu/*.patch "
                                    "(aarch64-softmmu, cached); prints the binary's path")
    b.add_argument("--source-version", default=None, metavar="VERSION",
                   help="Debian source version of qemu to build exactly (default: the installed qemu-system-arm's, "
                        "or the newest of its series on the mirror when that one is gone)")
    b.add_argument("--patches", default=None, metavar="DIR", help="the patch series (default: patches/qemu)")
    b.add_argument("-j", "--jobs", type=int, default=None, help="make -j (default: all CPUs)")
    b.set_defaults(func=cmd_qemu_build)

    from .kdev import bisect, kbuild, matrix, selftests  # kernel build/source/info, bisect, matrix; selftests
    for mod in (kbuild, bisect, matrix, selftests):
        mod.add_cli(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    if getattr(args, "kernel_pkg", None):
        args.kernel = "pkg:" + args.kernel_pkg
    if hasattr(args, "pytest_args"):
        args.pytest_args = list(args.pytest_args) + extra
    if getattr(args, "keep_runs", None) is not None:     # for this process and the pytest runs it starts
        from .machine.leftovers import KEEP_RUNS_ENV
        os.environ[KEEP_RUNS_ENV] = str(args.keep_runs)
    try:
        if hasattr(args, "results_dir") and args.command not in ("run", "test"):   # pytest prunes for run/test
            from .machine.leftovers import prune_at_start
            prune_at_start(_results_root(args) or paths.results_root())
        return int(args.func(args) or 0)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        excerpt = getattr(e, "excerpt", "")     # a console failure: what the kernel printed, cause included
        if excerpt:
            print("console excerpt:\n" + "\n".join("  " + ln for ln in excerpt.splitlines()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:     # a file system the harness writes to refused: say which and what to do
        import errno
        print(f"error: {e}", file=sys.stderr)
        where = f"the cache ({paths.cache_dir()}) and the run directories ({_results_root(args) or paths.results_root()})"
        if e.errno == errno.ENOSPC:
            print(f"  hint: free space for {where}, or set SMCCC_HARNESS_CACHE / --results-dir elsewhere",
                  file=sys.stderr)
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            print(f"  hint: {where} must be writable; set SMCCC_HARNESS_CACHE / --results-dir to writable "
                  "directories", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
