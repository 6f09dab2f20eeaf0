"""pytest plugin: options, the booted-guest fixtures, capability skips, console failure scanning, results table.

Outcome table (one place; the bisect command maps the same outcomes to exit codes):

| what happened                                   | pytest       | ``git bisect run`` |
|-------------------------------------------------|--------------|--------------------|
| assertions hold, console clean                  | passed       | 0 (good)           |
| assertion fails, or Oops/WARNING/BUG/panic/lockdep printed while the test ran | failed | 1 (bad) |
| the kernel crashed (a splat or panic on the console) in a fixture, a teardown or between tests | failed or error, naming where | 1 (bad) |
| the kernel printed a splat after the last test  | the session fails (exit 1) with the excerpt | 1 (bad) |
| kernel lacks a capability (/dev/kvm, KVM_CAP_ARM_EL2, filter) | skipped (reason names it) | 125 (skip; 0 with ``--skips-ok`` when the rest passed) |
| guest did not boot at all (panic at boot, no agent banner in time) | error | 125 (skip) |
| harness/infrastructure failure (QEMU missing, asset download) | error | 125 (skip) |
| no tests selected                                | exit 5       | 128 (abort)        |
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from .. import paths
from ..errors import HarnessError
from ..machine.console import scan_failures

OPT_GROUP = "smccc-harness"
_POOL_KEY = pytest.StashKey["GuestPool"]()
_ROWS_KEY = pytest.StashKey[list]()


def pytest_addoption(parser):
    g = parser.getgroup(OPT_GROUP, "smccc-harness: the guest kernel and QEMU")
    g.addoption("--kernel", default=os.environ.get("SMCCC_KERNEL", "default"),
                help="arm64 kernel: a path to an Image, or a Debian kernel spec: 'default' (newest 7.x cloud-arm64), "
                     "a series ('7.2', '6.12') or a package name [env SMCCC_KERNEL]")
    g.addoption("--accel", default=os.environ.get("SMCCC_ACCEL", "auto"), choices=("auto", "tcg", "kvm"),
                help="QEMU accelerator; auto = kvm on an arm64 host with /dev/kvm, else tcg [env SMCCC_ACCEL]")
    g.addoption("--qemu-bin", default=os.environ.get("QEMU", "qemu-system-aarch64"), help="QEMU binary [env QEMU]")
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
                     "(harness.snapshot) [env SMCCC_NO_SNAPSHOT=1]")
    g.addoption("--ssh", action="store_true", default=os.environ.get("SMCCC_SSH", "") not in ("", "0"),
                help="boot the pool's guests with the SSH channel (dropbear, virtio-net, hostfwd on 127.0.0.1; "
                     "cold boot, no snapshot; docs/ssh.md); session.ssh is a harness.ssh.SshChannel [env SMCCC_SSH=1]")
    g.addoption("--reuse-vm", action="store_true",
                default=os.environ.get("SMCCC_REUSE_VM", "") not in ("", "0"),
                help="attach to the guest VM an earlier --reuse-vm run left running (push changed guest code, reload "
                     "the agent) or boot one and leave it running; stop it with 'smccc-harness vm stop' "
                     "(docs/reuse-vm.md) [env SMCCC_REUSE_VM=1]")
    g.addoption("--reuse-vm-idle", type=float, default=None, metavar="SECONDS",
                help="a reused VM powers itself off after this long without a request (0: never) "
                     "[env SMCCC_REUSE_VM_IDLE, default 1800]")


def pytest_configure(config):
    config.stash[_ROWS_KEY] = []
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
    if config.getoption("--kernel-pkg", None):
        config.option.kernel = "pkg:" + config.getoption("--kernel-pkg")
    config.addinivalue_line("markers", "system_suspend: needs KVM_CAP_ARM_SYSTEM_SUSPEND")
    if config.getoption("--accel", "auto") == "kvm" and not hasattr(config, "workerinput"):
        try:  # an impossible --accel kvm is a usage error (exit 4), said once, never a silent TCG fallback
            resolve_accel("kvm")
        except HarnessError as e:
            raise pytest.UsageError(str(e)) from None
    _install_sigterm_handler()


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"pytest received signal {signum} (SIGTERM)")


def _install_sigterm_handler() -> None:
    """SIGTERM = Ctrl-C: pytest stops and tears the fixtures down, so every QEMU is stopped and its sockets go."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm)


PREP_REPORT_S = 1.0  # a preparation step that took this long is reported on the terminal


def say_uncaptured(config, msg: str) -> None:
    """Write ``[smccc-harness] msg`` to the terminal even while pytest captures output (fixtures, tests)."""
    line = f"[smccc-harness] {msg}"
    if hasattr(config, "workerinput"):       # xdist worker: no terminal of its own
        import logging
        logging.getLogger("smccc-harness").warning(line)
        return
    tr = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if tr is None:
        print(line, flush=True)
        return
    import contextlib
    ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    with ctx:
        tr.ensure_newline()
        tr.write_line(line)
        tr.flush()


def resolve_accel(accel: str) -> str:
    """tcg as asked; kvm/auto probe the host's KVM for nested virt (harness/machine/accel.py): an impossible
    ``--accel kvm`` raises SetupError naming what is missing instead of falling back to TCG."""
    if accel == "tcg":
        return accel
    from ..machine.accel import resolve
    return resolve(accel).accel


def _guest_death(dead) -> BaseException | None:
    """The error for a pool guest found dead when a test asks for one (None: its failure was already raised
    to the test whose request broke it, ``broken``; the pool then boots a new guest, with a warning).
    Never a silent replacement: the error names what the console showed since the last scan."""
    from ..errors import GuestError
    if dead.broken is not None:
        import warnings
        warnings.warn(f"the previous guest broke during a request ({dead.broken.splitlines()[0]}); "
                      f"a new guest is booted; console log: {dead.console_log}", stacklevel=3)
        return None
    con = getattr(getattr(dead, "machine", None), "console", None)
    text = con.text if con is not None else ""
    findings = scan_failures(text[getattr(dead, "_smccc_scan_pos", 0):]) or scan_failures(text)
    dead._smccc_scan_pos = len(text)
    if findings:
        f = findings[0]
        err = GuestError(f"the guest died between tests: the kernel printed {f.name!r}\n{f.excerpt}\n"
                         f"console log: {dead.console_log}", hint="a new guest is booted for the next test")
        err.finding = f
    else:
        tail = "\n".join(text.rstrip("\n").splitlines()[-20:])
        err = GuestError(f"the guest died between tests (QEMU is gone, no kernel splat on the console); last "
                         f"console lines:\n{tail}\nconsole log: {dead.console_log}",
                         hint="a new guest is booted for the next test")
    err.guest_died = True
    return err


class GuestPool:
    """Hands each test a healthy booted guest; boots a new one when the previous guest died.

    Guests are restored from the cached snapshot of a booted guest (harness.snapshot; built on the first
    use, ~0.5 s per restore afterwards) unless ``--no-snapshot``; a failed restore falls back to a cold boot
    with a warning.  :meth:`fresh` throws the current guest away and hands out a new one.

    A boot failure is remembered (labgrid's never_retry): every later test fails at once with the same
    cause instead of paying the boot timeout again.
    """

    def __init__(self, config):
        self.config = config
        self.session = None
        self.boot_error: BaseException | None = None
        self.sessions: list = []
        self.assets: dict | None = None

    def say(self, msg: str) -> None:
        """A progress line on the terminal, past pytest's capture (a first run fetches, builds and boots for
        minutes: the user sees what and how long).  xdist workers have no terminal: their log gets it."""
        say_uncaptured(self.config, msg)

    def _step(self, what: str, fn):
        """Run one preparation step; say how long it took when it took long enough to be noticed (a first
        run), stay quiet when everything came from the cache."""
        t0 = time.monotonic()
        out = fn()
        dt = time.monotonic() - t0
        if dt >= PREP_REPORT_S:
            self.say(f"{what}: {dt:.1f} s")
        return out

    def resolve_assets(self) -> dict:
        if self.assets is None:
            from ..images import assets, initramfs
            from ..images.kernel import resolve_kernel
            from ..images.sysdeps import check_qemu
            check_qemu(self.config.getoption("--qemu-bin"))     # missing / too old: one clear error
            kernel = self._step("kernel", lambda: resolve_kernel(self.config.getoption("--kernel"), progress=self.say))
            rootfs = self._step("rootfs packages", lambda: assets.ensure_rootfs(progress=self.say))
            initrd = self._step("initramfs", lambda: initramfs.build_initramfs(rootfs, progress=self.say))
            self.assets = {"kernel": kernel, "initrd": initrd}
        return self.assets

    def _announce_start(self, session) -> None:
        """After the pool's first guest: say how it came up when that was not a quick snapshot restore."""
        t = session.timings
        if t.get("snapshot_created"):
            self.say(f"first boot of {session.config.kernel.name} saved as a snapshot for later runs: "
                     f"{t.get('ready_s', '?')} s")
        elif t.get("snapshot_fallback"):
            self.say(f"snapshot unusable, cold boot instead: {t['snapshot_fallback']}")
        elif (t.get("warm_start_s") or t.get("ready_s") or 0) >= PREP_REPORT_S:
            self.say(f"guest ready: {t.get('warm_start_s') or t.get('ready_s')} s")

    def get(self, fresh: bool = False):
        from ..machine.session import GuestSession
        if self.session is not None and self.session.alive():
            return self.session
        if self.boot_error is not None:
            raise self.boot_error
        if self.session is not None:      # never replaced silently: the death is this caller's error
            dead, self.session = self.session, None
            dead.close()
            died = _guest_death(dead)
            if died is not None:
                raise died
        if self.config.getoption("--reuse-vm"):
            return self._reused(fresh)
        try:
            a = self.resolve_assets()
            opt = self.config.getoption
            run_dir = paths.new_run_dir("guest")
            self.session = GuestSession.create(
                a["kernel"].image, a["initrd"], run_dir, accel=resolve_accel(opt("--accel")), smp=opt("--smp"),
                memory_mb=opt("--memory"), append=opt("--append"), boot_deadline_s=opt("--boot-timeout"),
                qemu_bin=opt("--qemu-bin"), snapshots=not opt("--no-snapshot"), ssh=opt("--ssh"))
            self.sessions.append(self.session)
            if not self.sessions[:-1]:
                self.say(f"booting the first guest ({a['kernel'].version}) ...")
            self.session.start()
            if len(self.sessions) == 1:
                self._announce_start(self.session)
        except BaseException as e:
            e.smccc_phase = "boot"      # a guest that never came up: bisect 125, never bad (_error_kind)
            self.boot_error = e
            raise
        if self.session.timings.get("snapshot_fallback"):
            import warnings
            warnings.warn(f"snapshot restore failed, the guest was cold-booted: "
                          f"{self.session.timings['snapshot_fallback']}", stacklevel=2)
        return self.session

    def _reused(self, fresh: bool):
        """--reuse-vm: attach to the reusable VM (or start it) instead of booting a guest of this run
        (harness/machine/reuse.py).  Another run attached to it: an ordinary guest of this run, with a warning."""
        from ..images.kernel import resolve_kernel
        from ..images.sysdeps import check_qemu
        from ..machine import reuse
        opt = self.config.getoption
        try:
            check_qemu(opt("--qemu-bin"))
            kernel = resolve_kernel(opt("--kernel"))
            run_dir = paths.new_run_dir("guest")
            self.session = reuse.open_vm(
                kernel.image, run_dir, append=opt("--append"), accel=resolve_accel(opt("--accel")), smp=opt("--smp"),
                memory_mb=opt("--memory"), qemu_bin=opt("--qemu-bin"), ssh=opt("--ssh"),
                idle_s=opt("--reuse-vm-idle"), boot_deadline_s=opt("--boot-timeout"), fresh=fresh)
        except reuse.ReuseBusy as e:
            import warnings
            warnings.warn(f"--reuse-vm: {e}; this run boots a guest of its own", stacklevel=3)
            self.config.option.reuse_vm = False
            return self.get()
        except BaseException as e:
            e.smccc_phase = "boot"
            self.boot_error = e
            raise
        self.sessions.append(self.session)
        self.assets = {"kernel": kernel, "initrd": self.session.config.initrd}
        return self.session

    def fresh(self):
        """A new guest with no state from earlier tests (a fresh restore): the current one is thrown away.
        With --reuse-vm the reusable VM is killed and a new one cold-booted (and left running)."""
        if self.session is not None:
            self.session.keep_vm = False
            self.session.close()
            self.session = None       # thrown away on purpose: not a death
        return self.get(fresh=True)

    def spawn(self, snapshots: bool | None = None):
        """A started guest of the caller's own (not handed to other tests), with the pool's options;
        ``snapshots`` None = as ``--no-snapshot`` says.  Closed with the pool at the latest."""
        from ..machine.session import GuestSession
        a = self.resolve_assets()
        opt = self.config.getoption
        s = GuestSession.create(
            a["kernel"].image, a["initrd"], paths.new_run_dir("guest"), accel=resolve_accel(opt("--accel")),
            smp=opt("--smp"), memory_mb=opt("--memory"), append=opt("--append"),
            boot_deadline_s=opt("--boot-timeout"), qemu_bin=opt("--qemu-bin"),
            snapshots=(not opt("--no-snapshot")) if snapshots is None else snapshots)
        self.sessions.append(s)
        return s.start()

    def close(self):
        for s in self.sessions:
            s.close()


@pytest.fixture(scope="session")
def guest_pool(request):
    pool = GuestPool(request.config)
    request.config.stash[_POOL_KEY] = pool
    yield pool
    pool.close()


@pytest.fixture
def guest(guest_pool, request):
    """A booted guest with a ready agent; skips with the exact reason when the kernel lacks what the test needs."""
    try:
        g = guest_pool.get()
    except HarnessError as e:
        pytest.fail(str(e) if getattr(e, "guest_died", False) else f"guest did not come up: {e}", pytrace=False)
    from ..model.capabilities import skip_reason  # the capability -> skip-reason table (tests/unit/test_kernel.py)
    reason = skip_reason(g.caps, {m.name for m in request.node.iter_markers()})
    if reason:
        pytest.skip(reason)
    request.node.user_properties.append(("console_log", str(g.console_log)))
    request.node.stash[_MARK_KEY] = (g, g.machine.console.mark())
    yield g


_MARK_KEY = pytest.StashKey[tuple]()


# ---- console scanning: every byte of every pool guest's console scanned once, attributed -------------------
# Each pool guest keeps ``_smccc_scan_pos``: its console text before that offset has been scanned and
# attributed.  Only tests that use a pool guest (``guest_pool`` in their fixture closure) move it; output read
# while any other test runs is carried to the next guest test.  Windows, in order, for one guest test:
#   before   [pos, start of setup)   printed between tests: fails this test, "before this test began"
#   setup    during its setup         fails it (and every later test using a module/class/session fixture set
#                                     up then), naming the fixtures
#   call     during the test          fails it, even if it raised, skipped or was an xfail
#   teardown during its teardown      a teardown error; for the last test, "after the last test": the session
#                                     fails (exit 1, excerpt in the summary, JUnit property smccc_after_last_test)
# Tests marked ``fault`` break guests on purpose: their windows are consumed, never blamed on anyone.
_FINDINGS_KEY = pytest.StashKey[list]()
_AFTER_LAST: list[str] = []


def _uses_guest(item) -> bool:
    return "guest_pool" in getattr(item, "fixturenames", ())


def _scan_new(item, where: str) -> list[tuple[str, object, object]]:
    """Scan what every pool guest printed since its scan position; advance it.  [(where, finding, session)]"""
    pool = item.config.stash.get(_POOL_KEY, None)
    if pool is None:
        return []
    out = []
    for g in list(pool.sessions):
        con = getattr(getattr(g, "machine", None), "console", None)
        if con is None:
            continue
        try:
            end = con.mark()
        except Exception:  # noqa: BLE001 - a closed console keeps its text
            end = len(con.text)
        pos = getattr(g, "_smccc_scan_pos", 0)
        g._smccc_scan_pos = end
        if "fault" in item.keywords:
            continue
        out += [(where, f, g) for f in scan_failures(con.text[pos:end])]
    return out


def _describe_findings(item, found) -> str:
    where, f, g = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return (f"the guest kernel printed {f.name!r} {where}{more}:\n{f.excerpt}\nconsole log: {g.console_log}"
            + _symbolized(item.config, f.excerpt))


class ConsoleSplat(pytest.fail.Exception):
    """A test failed because the console showed a splat in one of its windows (``finding``: the first)."""


def _add_to_message(e, text: str) -> None:
    """pytest's outcome exceptions report ``.msg`` (not ``args``): extend both."""
    e.msg = f"{e.msg}\n{text}"
    e.args = (e.msg,)


def _splat(item, found) -> ConsoleSplat:
    e = ConsoleSplat(_describe_findings(item, found), pytrace=False)
    e.finding = found[0][1]
    return e


def _fixtures_of(item):
    for name in getattr(item, "fixturenames", ()):
        defs = item._fixtureinfo.name2fixturedefs.get(name) if hasattr(item, "_fixtureinfo") else None
        if defs:
            yield name, defs[-1]


_SETTING_UP: list = []    # the non-function fixtures set up during the setup of the guest test now running


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    yield
    if fixturedef.scope != "function":   # request.node is the module/class/session here, not the test
        _SETTING_UP.append(fixturedef)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    if not _uses_guest(item):
        yield
        return
    found = [(w.replace("@", "before this test began (printed between tests)"), f, g)
             for w, f, g in _scan_new(item, "@")]
    _SETTING_UP.clear()
    outcome = yield
    fixtures = list(_SETTING_UP)
    _SETTING_UP.clear()
    names = ", ".join(f"{d.argname!r} ({d.scope})" for d in fixtures)
    during = _scan_new(item, "during this test's setup" + (f", while fixture {names} was set up" if names else ""))
    for d in fixtures:                           # later tests that use these fixtures fail too
        if during:
            d._smccc_findings = during
    item.stash[_FINDINGS_KEY] = found + during
    if outcome.excinfo is not None and (found or during):
        exc = outcome.excinfo[1]
        # a guest that never came up stays a boot error (bisect 125), even though its console shows the panic
        if not isinstance(exc, (pytest.skip.Exception, ConsoleSplat)) and _error_kind(exc) != "boot":
            e = _splat(item, found + during)
            _add_to_message(e, f"(setup also raised: {getattr(exc, 'msg', None) or exc})")
            outcome.force_exception(e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Fail a test whose windows (before it, its setup and fixtures, its call) show a kernel splat, whatever the
    test itself did (passed, failed, skipped or xfailed: see pytest_runtest_makereport)."""
    outcome = yield
    if not _uses_guest(item):
        return
    found = list(item.stash.get(_FINDINGS_KEY, []))
    for name, d in _fixtures_of(item):
        for w, f, g in getattr(d, "_smccc_findings", ()):
            if (w, f, g) not in found:
                found.append((w.replace("this test's setup", "the setup of an earlier test"), f, g))
    found += _scan_new(item, "while this test ran")
    item.stash[_FINDINGS_KEY] = found
    if found:
        e = _splat(item, found)
        if outcome.excinfo is not None and not isinstance(outcome.excinfo[1], pytest.skip.Exception):
            _add_to_message(e, f"(the test itself also raised: {outcome.excinfo[1]!r})")
        outcome.force_exception(e)


def _error_kind(exc: BaseException | None) -> str:
    """What a setup/teardown error is evidence of, for ``git bisect run`` (harness/kdev/bisect.py ``OUTCOMES``):
    ``boot`` (the guest never came up: GuestPool tags its boot errors), ``kernel_crash`` (the error carries
    a console finding: a splat, panic or Oops after the guest was up) or ``error`` (anything else)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "smccc_phase", None) == "boot":
            return "boot"
        if getattr(exc, "finding", None) is not None and getattr(exc.finding, "name", "") != "agent exited":
            return "kernel_crash"
        exc = exc.__cause__ or exc.__context__
    return "error"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed setup or teardown gets a ``smccc_error`` property (JUnit) saying what it is evidence of."""
    outcome = yield
    rep = outcome.get_result()
    if call.excinfo is not None and isinstance(call.excinfo.value, ConsoleSplat) and hasattr(rep, "wasxfail"):
        del rep.wasxfail                    # an xfail marker must not swallow a kernel splat
        rep.outcome = "failed"
        rep.longrepr = str(call.excinfo.value)
    if rep.when in ("setup", "teardown") and rep.failed:
        kind = _error_kind(call.excinfo.value if call.excinfo is not None else None)
        for props in (item.user_properties, rep.user_properties):  # JUnit writes the teardown report's
            if not any(k == "smccc_error" for k, _ in props):
                props.append(("smccc_error", kind))


def _symbolized(config, excerpt: str) -> str:
    """pc/lr of a panic excerpt resolved with the kernel's vmlinux, when --kernel named one (else '')."""
    pool = config.stash.get(_POOL_KEY, None)
    kernel = (pool.assets or {}).get("kernel") if pool is not None else None
    from ..images.kernel import symbolize_for
    text = symbolize_for(kernel, excerpt)
    return f"\n{text}" if text else ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Scan what the guests printed during teardown (fixture finalizers): a teardown error naming it, or
    for the last test, a failure of the whole session ("after the last test")."""
    _save_test_console(item)
    outcome = yield
    if not _uses_guest(item):
        return
    last = nextitem is None
    found = _scan_new(item, "after the last test" if last else "during this test's teardown")
    if found and last:
        _AFTER_LAST.append(_describe_findings(item, found))
        item.config.stash[_AFTER_LAST_KEY] = _AFTER_LAST
    elif found and outcome.excinfo is None:
        outcome.force_exception(_splat(item, found))


_AFTER_LAST_KEY = pytest.StashKey[list]()


def _save_test_console(item):
    """Keep the console output printed while this test ran as its own file (JUnit property test_console_log)."""
    mark = item.stash.get(_MARK_KEY, None)
    if mark is None:
        return
    g, pos = mark
    try:
        from ..kdev.report import save_test_console
        p = save_test_console(Path(g.console_log).parent, item.nodeid, g.machine.console.since(pos))
        item.user_properties.append(("test_console_log", str(p)))
    except Exception as e:  # noqa: BLE001 - a dead console must not turn into a teardown error
        item.user_properties.append(("test_console_log", f"unavailable: {e}"))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    """JUnit suite properties (kernel version, QEMU version, accel, asset hashes) for --junitxml reports;
    a splat printed after the last test fails the session (exit 1) with its excerpt."""
    from _pytest.junitxml import xml_key
    xml = session.config.stash.get(xml_key, None)
    after = session.config.stash.get(_AFTER_LAST_KEY, [])
    if after:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if xml is not None:
            xml.add_global_property("smccc_after_last_test", after[0].split("\n", 1)[0])
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.section("smccc-harness: the guest kernel printed a splat after the last test", red=True)
            for text in after:
                tr.write_line(text)
    pool = session.config.stash.get(_POOL_KEY, None)
    opt = session.config.getoption
    from ..kdev.report import suite_properties
    if xml is not None and (pool is None or not pool.assets) and _is_xdist_controller(session.config):
        try:  # the workers booted the guests; the controller writes the JUnit file: describe the kernel file
            from ..images.kernel import resolve_kernel
            for name, value in suite_properties(resolve_kernel(opt("--kernel")), {}, opt("--qemu-bin"),
                                                resolve_accel(opt("--accel"))):
                xml.add_global_property(name, value)
        except Exception as e:  # noqa: BLE001 - a property must never fail the run
            xml.add_global_property("kernel_error", str(e))
        return
    if xml is None or pool is None or not pool.assets:
        return
    caps = next((s.caps for s in pool.sessions if getattr(s, "caps", None)), {})
    for name, value in suite_properties(pool.assets.get("kernel"), caps, opt("--qemu-bin"),
                                        resolve_accel(opt("--accel")), pool.assets.get("initrd")):
        xml.add_global_property(name, value)


def _is_xdist_controller(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def _row(report) -> dict:
    kw = report.keywords
    conduit = "+".join(c for c in ("hvc", "smc") if c in kw) or "-"
    el = "EL2" if "el2" in kw else ("EL1" if "el1" in kw else "-")
    return {"test": report.nodeid.split("::", 1)[-1], "conduit": conduit, "el": el, "outcome": report.outcome,
            "duration": report.duration, "skip": report.longrepr[2] if report.skipped and isinstance(
                report.longrepr, tuple) else ""}


def pytest_runtest_logreport(report):
    rows = _CONFIG.stash[_ROWS_KEY] if _CONFIG else None
    if rows is None or "tests/system" not in report.nodeid:
        return
    if report.when == "setup" and report.outcome == "passed":
        _SETUP_S[report.nodeid] = report.duration       # boot or a shared module run is part of the cost
        return
    if report.when == "call" or report.when == "setup":
        r = _row(report)
        r["duration"] += _SETUP_S.pop(report.nodeid, 0.0)
        if report.when == "setup" and report.outcome == "failed":
            r["outcome"] = "error"
        rows.append(r)


def _selects_system_tests(config) -> bool:
    args = [a for a in config.args if not a.startswith("-")] or list(config.getini("testpaths")) or ["."]
    root = paths.REPO_ROOT / "tests" / "system"
    for a in args:
        p = (Path(config.invocation_params.dir) / a.split("::")[0]).resolve()
        if p == root or root in p.parents or p in root.parents:
            return True
    return False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config, specs):
    """-n N: the controller fetches and builds the guest's assets before the workers start, saying so on the
    terminal (workers have none), so N workers do not each sit silent through the same first-run downloads."""
    if config.getoption("--reuse-vm") or not _selects_system_tests(config):
        return
    try:
        GuestPool(config).resolve_assets()
    except HarnessError as e:     # each worker reports it again where it matters: on its tests
        say_uncaptured(config, f"preparing the guest's assets failed: {e}")


_SETUP_S: dict[str, float] = {}


_CONFIG = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    global _CONFIG
    _CONFIG = session.config


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = ("scenario", "conduit", "guest EL", "result", "time")
    body = [(r["test"], r["conduit"], r["el"], r["outcome"].upper() + (f" ({r['skip'][:70]})" if r["skip"] else ""),
             f"{r['duration']:.2f}s") for r in rows]
    w = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = "  ".join(f"{{:<{x}}}" for x in w)
    out = [line.format(*head), line.format(*("-" * x for x in w))]
    out += [line.format(*b) for b in body]
    return "\n".join(out)


def reuse_summary(info: dict) -> str:
    """One line about the reusable VM of a --reuse-vm run: reused or started, how fast, how to stop it."""
    name = info.get("name", "default")
    stop = "smccc-harness vm stop" + ("" if name == "default" else f" --name {name}") + \
        f" --results-dir {Path(info['vm_dir']).parent}"
    if info.get("killed"):
        return f"reusable VM pid {info['pid']} was killed at the end ({info['killed']}); the next run starts a new one"
    if info["how"] == "attached":
        pushed = info.get("pushed") or []
        push = (f"; pushed {len(pushed)} guest module(s) + reload in {info.get('push_s', 0) + info.get('reload_s', 0):.2f} s"
                if pushed else "")
        return (f"reused VM pid {info['pid']} (up {info['uptime_s']:.0f} s, attached in {info['attach_s']:.2f} s{push}); "
                f"still running, stop it with: {stop}")
    why = f" ({info['replaced']})" if info.get("replaced") else ""
    return (f"started reusable VM pid {info['pid']} in {info['boot_s']:.2f} s{why}; left running for the next "
            f"--reuse-vm run (idle timeout {info.get('idle_s', 0):.0f} s), stop it with: {stop}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(_ROWS_KEY, [])
    if not rows:
        return
    tr = terminalreporter
    tr.section("smccc-harness results")
    tr.write_line(format_table(rows))
    pool = config.stash.get(_POOL_KEY, None)
    if pool is not None:
        for s in pool.sessions:
            caps = s.caps or {}
            tr.write_line(f"guest kernel {caps.get('uname', '?')} ({caps.get('kvm_mode') or 'KVM mode unknown'}); "
                          f"boot {s.timings.get('ready_s', '?')} s; console log: {s.console_log}")
            if getattr(s, "reuse", None):
                tr.write_line(reuse_summary(s.reuse))
    else:
        root = paths.results_root()
        tr.write_line(f"console logs and traces: {root}")
        if config.getoption("--reuse-vm", False) and _is_xdist_controller(config):
            for line in _workers_reused_vms(root):
                tr.write_line(line)
    _ = time


def _workers_reused_vms(root: Path) -> list[str]:
    """Under xdist the workers hold the reusable VMs: one line per worker VM still running (from its state
    file), and how to stop them all."""
    from ..machine import reuse
    out = []
    for d in reuse.all_vm_dirs(root):
        try:
            st = reuse.read_state(d)
        except HarnessError:
            continue
        if st is None or not st.name.startswith("gw") or reuse.process_problem(st) is not None:
            continue
        out.append(f"reusable VM {st.name}: pid {st.pid}, up {time.time() - st.created:.0f} s, console log {st.console_log}")
    if out:
        out.append(f"still running; stop them with: smccc-harness vm stop --all --results-dir {root}")
    return out
