"""The guests tests get: :class:`GuestPool` (one per pytest process; options from
harness/machine/guests.py ``GuestOptions``), the ``guest_pool`` and ``guest`` fixtures, the capability skips,
and the first-run progress printed past pytest's capture.  A guest that died is never replaced silently.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .. import paths
from ..errors import HarnessError
from ..machine.accel import resolve_accel
from ..model.splats import scan_failures
from .keys import MARK_KEY, POOL_KEY

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

    Guests are restored from the cached snapshot of a booted guest (harness.machine.snapshot; built on the first
    use, ~0.5 s per restore afterwards) unless ``--no-snapshot``; a failed restore falls back to a cold boot
    with a warning.  :meth:`fresh` throws the current guest away and hands out a new one.

    A boot failure is remembered (labgrid's never_retry): every later test fails at once with the same
    cause instead of paying the boot timeout again.
    """

    def __init__(self, config):
        from ..machine.guests import GuestOptions
        self.config = config
        self.options = GuestOptions.from_pytest(config)   # the one description of this run's guests
        self.session = None
        self.boot_error: BaseException | None = None
        self.sessions: list = []
        self.guest_assets = None     # harness/machine/guests.py GuestAssets, once resolved

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

    @property
    def assets(self) -> dict | None:
        """{"kernel", "initrd"} of this run's guests once known (JUnit properties, the panic symbolizer)."""
        g = self.guest_assets
        return None if g is None else {"kernel": g.kernel, "initrd": g.initrd}

    def resolve_assets(self) -> dict:
        if self.guest_assets is None:
            from ..machine.guests import guest_assets
            self.guest_assets = guest_assets(self.options, progress=self.say, step=self._step)
        return self.assets

    def _new_session(self, **over):
        """A GuestSession of this pool's options (harness/machine/guests.py), in a new run directory."""
        import dataclasses

        from ..machine.guests import new_session
        self.resolve_assets()
        opts = dataclasses.replace(self.options, **over) if over else self.options
        s = new_session(opts, paths.new_run_dir("guest"), assets=self.guest_assets)
        from ..machine.guests import gdb_hint
        if line := gdb_hint(s, self.guest_assets.kernel):   # --gdb: before the boot (--gdb-wait halts it)
            self.say(line)
        return s

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
            self.session = self._new_session()
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
        o = self.options
        try:
            check_qemu(o.qemu_bin)
            kernel = resolve_kernel(o.kernel)
            run_dir = paths.new_run_dir("guest")
            self.session = reuse.open_vm(
                kernel.image, run_dir, append=o.append, accel=resolve_accel(o.accel, o.qemu_bin), smp=o.smp,
                memory_mb=o.memory_mb, qemu_bin=o.qemu_bin, ssh=o.ssh,
                idle_s=self.config.getoption("--reuse-vm-idle"), boot_deadline_s=o.boot_deadline_s, fresh=fresh)
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
        from ..machine.guests import GuestAssets
        self.guest_assets = GuestAssets(kernel=kernel, initrd=self.session.config.initrd)
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
        s = self._new_session(**({} if snapshots is None else {"snapshots": snapshots}))
        self.sessions.append(s)
        return s.start()

    def close(self):
        for s in self.sessions:
            s.close()


@pytest.fixture(scope="session")
def guest_pool(request):
    pool = GuestPool(request.config)
    request.config.stash[POOL_KEY] = pool
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
    request.node.stash[MARK_KEY] = (g, g.machine.console.mark())
    yield g


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
