"""Console scanning: every byte of every pool guest's console scanned once and attributed to a test, a fixture,
a teardown or the time after the last test (the windows are described at :data:`MARK_KEY`).  A splat fails
the test it is attributed to, whatever the test did; setup/teardown errors are tagged for ``git bisect run``
(harness/kdev/bisect.py ``OUTCOMES``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..model.splats import scan_failures
from .keys import AFTER_LAST_KEY, MARK_KEY, POOL_KEY

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
    pool = item.config.stash.get(POOL_KEY, None)
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
    more = (f" (and {len(found) - 1} more: {', '.join(repr(x.name) for _, x, _ in found[1:])})"
            if len(found) > 1 else "")
    return (f"the guest kernel printed {f.name!r} {where}{more}:\n{f.excerpt}\nconsole log: {g.console_log}"
            + _symbolized(item.config, f.excerpt) + _dumped(item, g))


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
    pool = config.stash.get(POOL_KEY, None)
    kernel = (pool.assets or {}).get("kernel") if pool is not None else None
    from ..images.kernel import symbolize_for
    text = symbolize_for(kernel, excerpt)
    return f"\n{text}" if text else ""


def _dumped(item, g) -> str:
    """``--dump-on-splat``: the guest's memory as an ELF core in its run directory, once per guest (its first
    splat), while it still runs (harness/machine/vmcore.py); '' otherwise."""
    if not item.config.getoption("--dump-on-splat", False) or getattr(g, "_smccc_vmcore", None) is not None:
        return ""
    from ..machine.vmcore import dump_guest_memory, open_hint
    core = Path(g.run_dir) / "vmcore.elf"
    g._smccc_vmcore = core
    try:
        d = dump_guest_memory(g.machine, core)
    except Exception as e:  # noqa: BLE001 - a dead guest (panic) or QMP failure: say so, keep the splat
        return f"\n(no guest memory dump: {e})"
    pool = item.config.stash.get(POOL_KEY, None)
    kernel = (pool.assets or {}).get("kernel") if pool is not None else None
    from ..images.kernel import vmlinux_of
    return (f"\nguest memory: {core} ({d['bytes'] / 2**20:.0f} MiB, {d['seconds']} s); open it with: "
            f"{open_hint(core, vmlinux_of(kernel) if kernel is not None else None)}")


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
        item.config.stash[AFTER_LAST_KEY] = _AFTER_LAST
    elif found and outcome.excinfo is None:
        outcome.force_exception(_splat(item, found))




def _save_test_console(item):
    """Keep the console output printed while this test ran as its own file (JUnit property test_console_log)."""
    mark = item.stash.get(MARK_KEY, None)
    if mark is None:
        return
    g, pos = mark
    try:
        from ..kdev.report import save_test_console
        p = save_test_console(Path(g.console_log).parent, item.nodeid, g.machine.console.since(pos))
        item.user_properties.append(("test_console_log", str(p)))
    except Exception as e:  # noqa: BLE001 - a dead console must not turn into a teardown error
        item.user_properties.append(("test_console_log", f"unavailable: {e}"))
