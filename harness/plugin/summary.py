"""What a run reports: the results table, the reused VMs, the splats printed after the last test, and the JUnit
suite properties (kernel, QEMU, accel, asset hashes) that nightly reports and bisect read.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .. import paths
from ..errors import HarnessError
from ..machine.accel import resolve_accel
from .keys import AFTER_LAST_KEY, POOL_KEY, ROWS_KEY


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    """JUnit suite properties (kernel version, QEMU version, accel, asset hashes) for --junitxml reports;
    a splat printed after the last test fails the session (exit 1) with its excerpt."""
    from _pytest.junitxml import xml_key
    xml = session.config.stash.get(xml_key, None)
    after = session.config.stash.get(AFTER_LAST_KEY, [])
    if after:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if xml is not None:
            xml.add_global_property("smccc_after_last_test", after[0].split("\n", 1)[0])
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.section("smccc-harness: the guest kernel printed a splat after the last test", red=True)
            for text in after:
                tr.write_line(text)
    pool = session.config.stash.get(POOL_KEY, None)
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


class KcidbReport:
    """``--kcidb FILE``: once pytest has written the JUnit file (its own session-finish hook), the same results
    as KCIDB JSON (harness/kdev/kcidb.py); a JUnit file it cannot read fails the session (exit 3)."""

    def __init__(self, path: Path, junit: Path, kernel: str) -> None:
        self.path, self.junit, self.kernel, self.line = path, junit, kernel, ""

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        from ..kdev import kcidb
        try:
            self.line = kcidb.write_kcidb([(self.junit, self.kernel)], self.path)
        except HarnessError as e:
            self.line = f"error: {e}"
            session.exitstatus = pytest.ExitCode.INTERNAL_ERROR

    def pytest_terminal_summary(self, terminalreporter):
        if self.line:
            terminalreporter.write_line(self.line, red=self.line.startswith("error"))


def _is_xdist_controller(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def _row(report) -> dict:
    kw = report.keywords
    conduit = "+".join(c for c in ("hvc", "smc") if c in kw) or "-"
    el = "EL2" if "el2" in kw else ("EL1" if "el1" in kw else "-")
    outcome = report.outcome
    if hasattr(report, "wasxfail"):     # pytest reports an xfail as skipped and an xpass as passed: say which
        outcome = "xfail" if report.skipped else "xpass"
    skip = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
    return {"test": report.nodeid.split("::", 1)[-1], "conduit": conduit, "el": el, "outcome": outcome,
            "duration": report.duration, "skip": skip}


def pytest_runtest_logreport(report):
    rows = _CONFIG.stash[ROWS_KEY] if _CONFIG else None
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
    rows = config.stash.get(ROWS_KEY, [])
    if not rows:
        return
    tr = terminalreporter
    tr.section("smccc-harness results")
    tr.write_line(format_table(rows))
    pool = config.stash.get(POOL_KEY, None)
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
    from ..machine import reuse_state
    out = []
    for d in reuse_state.all_vm_dirs(root):
        try:
            st = reuse_state.read_state(d)
        except HarnessError:
            continue
        if st is None or not st.name.startswith("gw") or reuse_state.process_problem(st) is not None:
            continue
        out.append(f"reusable VM {st.name}: pid {st.pid}, up {time.time() - st.created:.0f} s, console log {st.console_log}")
    if out:
        out.append(f"still running; stop them with: smccc-harness vm stop --all --results-dir {root}")
    return out


_SETUP_S: dict[str, float] = {}
_CONFIG = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    global _CONFIG
    _CONFIG = session.config
