"""harness.machine.console: failure patterns on recorded arm64 console logs, and real waits on a pexpect child.

The waits run against ``cat``/``sh`` children under a pty, so the deadline, EOF and failure paths are the
real ones, without QEMU.
"""

from __future__ import annotations

import time
from pathlib import Path

import pexpect
import pytest

import harness.machine.console as console_mod
from harness.errors import BootError
from harness.machine.console import Console, ConsoleFailure
from harness.model.splats import FAILURE_PATTERNS, PANIC_CONTEXT_LINES, match_line, scan_failures
from harness.protocol import READY_BANNER

DATA = Path(__file__).parent / "data" / "console"


def log(name: str) -> str:
    return (DATA / name).read_bytes().decode()    # keep CRLF (read_text would translate it)


# ---- scan_failures on recorded logs ----------------------------------------------------------------
@pytest.mark.parametrize(("name", "expected"), [
    ("clean_boot.log", []),
    ("panic.log", ["kernel panic"]),
    ("rdinit_panic.log", ["kernel panic"]),
    ("oops.log", ["kernel oops", "agent exited"]),
    ("warning.log", ["kernel WARNING"]),
    ("lockdep.log", ["lockdep"]),
    ("rcu_stall.log", ["rcu stall"]),
])
def test_scan_recorded_logs(name: str, expected: list[str]) -> None:
    assert [f.name for f in scan_failures(log(name))] == expected


def test_clean_boot_log_is_crlf() -> None:
    assert "\r\n" in log("clean_boot.log")    # the fixture exercises CRLF handling


def test_panic_excerpt() -> None:
    (f,) = scan_failures(log("panic.log"))
    lines = f.excerpt.splitlines()
    whole = log("panic.log").splitlines()
    assert lines[:PANIC_CONTEXT_LINES] == whole[f.lineno - 1 - PANIC_CONTEXT_LINES:f.lineno - 1]   # the lead-up
    assert lines[PANIC_CONTEXT_LINES - 1] == "/init: line 15: /usr/bin/python3: not found"       # the cause
    assert lines[PANIC_CONTEXT_LINES].endswith("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
    assert lines[-1].endswith("---[ end Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100 ]---")
    assert any("do_exit+" in ln for ln in lines)
    assert f.line == lines[PANIC_CONTEXT_LINES]
    assert whole[f.lineno - 1] == f.line


def test_panic_excerpt_has_the_cause_printed_before_it() -> None:
    """rdinit=/nonexistent (recorded from a real boot): the panic line says 'Unable to mount root fs', the
    cause is ten lines earlier, above the list of filesystems; QEMU exits (panic=-1) before any end line."""
    (f,) = scan_failures(log("rdinit_panic.log"))
    assert f.line.endswith("Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)")
    lines = f.excerpt.splitlines()
    cause = [i for i, ln in enumerate(lines) if "check access for rdinit=/nonexistent failed: -2" in ln]
    assert cause and cause[0] < lines.index(f.line)
    assert lines.index(f.line) == min(PANIC_CONTEXT_LINES, f.lineno - 1) and lines[-1].endswith("Memory Limit: none")


def test_panic_context_stops_at_the_start_of_the_text_and_at_the_previous_incident() -> None:
    assert scan_failures("cause\nKernel panic - not syncing: boom\n")[0].excerpt.splitlines()[0] == "cause"
    text = ("[ 1.0] WARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x4\n[ 1.1] ---[ end trace 0000000000000000 ]---\n"
            "[ 1.2] after the warning\n[ 1.3] Kernel panic - not syncing: boom\n")
    warning, panic = scan_failures(text)
    assert warning.name == "kernel WARNING" and panic.name == "kernel panic"
    assert panic.excerpt.splitlines() == ["[ 1.2] after the warning", "[ 1.3] Kernel panic - not syncing: boom"]


def test_oops_excerpt_is_one_incident() -> None:
    oops, agent = scan_failures(log("oops.log"))
    lines = oops.excerpt.splitlines()
    assert "Unable to handle kernel NULL pointer dereference" in lines[0]
    assert "Internal error: Oops: 0000000096000004 [#1]" in oops.line
    assert lines[-1].endswith("---[ end trace 0000000000000000 ]---")
    assert any("kvm_smccc_call_handler+0x1c8/0x3a8 (P)" in ln for ln in lines)
    assert agent.line == "SMCCC-AGENT EXITED rc=139" and agent.excerpt == agent.line


def test_warning_excerpt_from_cut_here_to_end_trace() -> None:
    (f,) = scan_failures(log("warning.log"))
    lines = f.excerpt.splitlines()
    assert lines[0].endswith("------------[ cut here ]------------")
    assert "WARNING: CPU: 0 PID: 1 at arch/arm64/kvm/hypercalls.c:245" in f.line
    assert lines[-1].endswith("---[ end trace 0000000000000000 ]---")
    assert len(lines) == 28


def test_lockdep_excerpt() -> None:
    (f,) = scan_failures(log("lockdep.log"))
    lines = f.excerpt.splitlines()
    assert lines[0].endswith("=" * 54)
    assert "possible circular locking dependency detected" in f.line
    assert any("*** DEADLOCK ***" in ln for ln in lines)
    assert lines[-1].endswith("__lock_acquire+0x1364/0x2160")     # through its stack backtrace's call trace


def test_rcu_stall_excerpt() -> None:
    (f,) = scan_failures(log("rcu_stall.log"))
    assert "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:" in f.line
    assert f.excerpt.splitlines()[-1].endswith("el0t_64_sync+0x1b0/0x1b8")


def test_two_splats_two_findings() -> None:
    text = "\n".join([log("warning.log"), log("warning.log")])
    assert [f.name for f in scan_failures(text)] == ["kernel WARNING", "kernel WARNING"]


def test_panic_on_warn_is_reported_separately() -> None:
    text = ("[    1.0] ------------[ cut here ]------------\n"
            "[    1.0] WARNING: CPU: 0 PID: 1 at arch/arm64/kvm/arm.c:1 kvm_arch_init+0x1/0x2\n"
            "[    1.0] Call trace:\n"
            "[    1.0] Kernel panic - not syncing: kernel: panic_on_warn set ...\n")
    assert [f.name for f in scan_failures(text)] == ["kernel WARNING", "kernel panic"]


# ---- line patterns ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("line", "name"), [
    ("[    4.201234] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)", "kernel panic"),
    ("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\r", "kernel panic"),
    ("[   12.3] Internal error: Oops: 0000000096000004 [#1]  SMP", "kernel oops"),
    ("[   12.3] Internal error: Oops - BUG: 00000000f2000800 [#1]  SMP", "kernel oops"),
    ("[   12.3] Unable to handle kernel paging request at virtual address dead000000000108", "kernel fault"),
    ("[    7.1] kernel BUG at mm/slub.c:435!", "kernel BUG"),
    ("[    7.1] BUG: sleeping function called from invalid context at kernel/locking/mutex.c:580", "sleep in atomic"),
    ("[    7.1] BUG: scheduling while atomic: python3/61/0x00000002", "sleep in atomic"),
    ("[    7.1] BUG: KASAN: slab-use-after-free in kvm_vcpu_ioctl+0x7c/0xa38", "KASAN"),
    ("[    7.1] WARNING: lock held when returning to user space!", "lockdep"),
    ("[    7.1] [ BUG: Invalid wait context ]", "lockdep"),
    ("[   33.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [python3:123]", "soft lockup"),
    ("[    4.5] WARNING: CPU: 0 PID: 1 at arch/arm64/kvm/hypercalls.c:245 kvm_smccc_set_filter+0x1d4/0x248",
     "kernel WARNING"),
    ("[    4.5][    T1] WARNING: CPU: 0 PID: 1 at kernel/x.c:1 f+0x0/0x4", "kernel WARNING"),
    ("<4>[    4.5] WARNING: CPU: 0 PID: 1 at kernel/x.c:1 f+0x0/0x4", "kernel WARNING"),
    ("WARNING: at drivers/base/core.c:1 device_release+0x0/0x10", "kernel WARNING"),
    ("[   15.2] WARNING: possible circular locking dependency detected", "lockdep"),
    ("[   15.2] WARNING: possible recursive locking detected", "lockdep"),
    ("[   15.2] possible recursive locking detected", "lockdep"),
    ("[   15.2] WARNING: suspicious RCU usage", "lockdep"),
    ("[   56.7] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:", "rcu stall"),
    ("[   56.7] rcu: INFO: rcu_preempt self-detected stall on CPU", "rcu stall"),
    ("[  245.0] INFO: task python3:123 blocked for more than 120 seconds.", "hung task"),
    ("[    4.5] ---[ end trace 0000000000000000 ]---", "end of trace"),
    ("SMCCC-AGENT EXITED rc=1", "agent exited"),
    ("SMCCC-AGENT EXITED rc=139\r", "agent exited"),
    # kernel output interleaved into a line of agent output
    ("smccc-agent: running scen[    9.876543] WARNING: CPU: 0 PID: 123 at arch/arm64/kvm/psci.c:1 x+0/0x4",
     "kernel WARNING"),
])
def test_failure_lines(line: str, name: str) -> None:
    hit = match_line(line)
    assert hit is not None and hit[0] == name
    assert [f.name for f in scan_failures(line + "\n")] == [name]


@pytest.mark.parametrize("line", [
    "[    0.345678] CPU features: detected: Virtualization Host Extensions",
    "[    0.346230] CPU features: detected: Nested Virtualization Support",
    "[    4.203390] CPU features: 0x0000,000000e0,ff7ef6ab,fd7ffe7f",
    "[    1.024890] kvm [1]: VHE+NV2 mode initialized successfully",
    "[    4.134567] Run /init as init process",
    "[    0.000000] rcu: Hierarchical RCU implementation.",
    "[    0.000000] rcu: \tRCU restricting CPUs from NR_CPUS=256 to nr_cpu_ids=1.",
    "[    0.000000] psci: SMC Calling Convention v1.0",
    "smccc-agent: warning: the scenario asked for 8 vCPUs, using 8",
    "/opt/smccc/harness/guest/agent.py:12: DeprecationWarning: this is a lowercase python warning",
    "  warnings.warn('bug: not really')",
    "smccc-agent: checking for BUG: lines is the host's job",
    "SMCCC-AGENT READY",
    "SMCCC-AGENT EXITED rc=0",
    "SMCCC-AGENT EXITED rc=0\r",
    "[    1.8] Serial: AMBA PL011 UART driver",
    "[    0.0] Kernel command line: console=ttyAMA0 rdinit=/init kvm-arm.mode=nested panic=-1 loglevel=5",
    "[   15.2] ------------------------------------------------------",
    "[    4.5] ------------[ cut here ]------------",
    "",
])
def test_benign_lines(line: str) -> None:
    assert match_line(line) is None
    assert scan_failures(line + "\n") == []


def test_pattern_table_shape() -> None:
    names = [n for n, _ in FAILURE_PATTERNS]
    assert len(names) == len(set(names))
    assert names[0] == "kernel panic"
    assert names.index("lockdep") < names.index("kernel WARNING")


# ---- Console over a real pty child ------------------------------------------------------------------
@pytest.fixture
def spawn(tmp_path: Path):
    children: list[pexpect.spawn] = []
    consoles: list[Console] = []

    def _spawn(script: str, *, log_name: str = "console.log") -> Console:
        child = pexpect.spawn("/bin/sh", ["-c", script], encoding="utf-8", codec_errors="replace",
                              timeout=None, echo=False, cwd=str(DATA))
        child.delayafterterminate = child.ptyproc.delayafterclose = child.ptyproc.delayafterterminate = 0.01  # 0.1 s each
        children.append(child)
        c = Console(child, tmp_path / log_name, name="QEMU")
        consoles.append(c)
        return c

    yield _spawn
    for c in consoles:
        c.close()
    for ch in children:
        ch.close(force=True)


def test_expect_ready_clean(spawn) -> None:
    c = spawn("cat clean_boot.log; sleep 30")
    m = c.expect_ready(READY_BANNER, 10)
    assert m.group(0) == READY_BANNER
    assert "\r" not in c.text
    assert c.text[m.start():].startswith(READY_BANNER)
    assert c.log_path is not None and READY_BANNER in c.log_path.read_text()


def test_expect_ready_panic(spawn, monkeypatch) -> None:
    # The end-of-panic line completes the excerpt: no grace wait.  With the grace stretched to an hour, a
    # grace wait would end only at the child's exit (sleep 300); the bound (60 s) is two orders of magnitude
    # above the ~0.1 s this takes, so host load cannot break it, yet far below a wait that happened.
    monkeypatch.setattr(console_mod, "FAILURE_GRACE_S", 3600.0)
    c = spawn("cat panic.log; sleep 300")
    t0 = time.monotonic()
    with pytest.raises(ConsoleFailure) as ei:
        c.expect_ready(READY_BANNER, 20)
    assert time.monotonic() - t0 < 60
    e = ei.value
    assert isinstance(e, BootError)
    assert e.kind == "failure" and e.finding is not None and e.finding.name == "kernel panic"
    assert str(e).startswith("kernel panic after ")
    assert "Attempted to kill init" in str(e)
    assert e.excerpt.splitlines()[PANIC_CONTEXT_LINES].endswith(
        "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
    assert "/init: line 15: /usr/bin/python3: not found" in e.excerpt      # the cause, before the panic line
    assert e.excerpt.splitlines()[-1].startswith("[    4.203590] ---[ end Kernel panic")
    assert e.log_path == c.log_path and e.hint.endswith("console.log")


def test_expect_ready_warning_before_banner(spawn) -> None:
    c = spawn("cat warning.log; sleep 30")
    with pytest.raises(ConsoleFailure, match=r"^kernel WARNING after \d+\.\d s .*hypercalls\.c:245") as ei:
        c.expect_ready(READY_BANNER, 20)
    assert ei.value.excerpt.splitlines()[0].endswith("[ cut here ]------------")


def test_failure_after_banner_caught_by_next_wait(spawn) -> None:
    c = spawn("cat oops.log; sleep 30")
    c.expect_ready(READY_BANNER, 10)
    with pytest.raises(ConsoleFailure) as ei:
        c.expect("never printed", 20)
    assert ei.value.finding is not None and ei.value.finding.name == "kernel oops"
    assert ei.value.excerpt.splitlines()[-1].endswith("---[ end trace 0000000000000000 ]---")


def test_expect_ready_timeout(spawn) -> None:
    c = spawn("head -n 20 clean_boot.log; sleep 30")
    t0 = time.monotonic()
    with pytest.raises(ConsoleFailure) as ei:
        c.expect_ready(READY_BANNER, 0.5)
    # never before the deadline (monotonic: exact); the upper bound only catches "waited for the child's
    # 30 s sleep", 50x the expected 0.5 s so that a loaded host cannot break it
    assert 0.5 <= time.monotonic() - t0 < 25
    e = ei.value
    assert e.kind == "timeout"
    assert str(e).startswith("no 'SMCCC-AGENT READY' within 0.5 s")
    lines = e.excerpt.splitlines()
    assert len(lines) <= 30 and "rcu: Hierarchical RCU implementation." in e.excerpt


def test_expect_ready_eof(spawn) -> None:
    c = spawn("head -n 20 clean_boot.log; exit 3")
    with pytest.raises(ConsoleFailure, match=r"^QEMU exited with status 3 after") as ei:
        c.expect_ready(READY_BANNER, 20)
    assert ei.value.kind == "eof" and ei.value.exit_status == 3
    assert ei.value.excerpt.splitlines()[-1].endswith("scheduler-enlistment delay is 25 jiffies.")
    assert c.eof


def test_eof_after_unterminated_failure(spawn) -> None:
    c = spawn("printf 'booting\\n[    1.0] Kernel panic - not syncing: boom'; exit 0")
    with pytest.raises(ConsoleFailure, match=r"^kernel panic after .* then QEMU exited with status 0") as ei:
        c.expect_ready(READY_BANNER, 20)
    assert ei.value.kind == "eof" and ei.value.finding is not None


def test_agent_exit_is_a_failure(spawn, monkeypatch) -> None:
    monkeypatch.setattr(console_mod, "FAILURE_GRACE_S", 3600.0)   # as in test_expect_ready_panic
    c = spawn("echo 'Traceback (most recent call last):'; echo 'SMCCC-AGENT EXITED rc=1'; sleep 300")
    t0 = time.monotonic()
    with pytest.raises(ConsoleFailure, match=r"^agent exited after"):
        c.expect_ready(READY_BANNER, 20)
    assert time.monotonic() - t0 < 60      # its line ends the incident: no grace wait (else: 300 s)


def test_wait_needs_a_deadline(spawn) -> None:
    c = spawn("true")
    for bad in (0, -1, None):
        with pytest.raises(ValueError, match="deadline"):
            c.expect("x", bad)


def test_drain_mark_since(spawn) -> None:
    c = spawn("echo one; sleep 0.1; echo two; echo 'WARNING: CPU: 0 PID: 1 at x.c:1 f+0/0x4'; sleep 30")
    c.expect("one\n", 10)
    m = c.mark()
    assert c.drain() == "" or "two" not in c.text[:m]
    stop = time.monotonic() + 10
    while "WARNING" not in c.text and time.monotonic() < stop:
        c.drain(timeout=0.05)
    got = c.since(m)      # drains first
    assert "two\n" in got and "one" not in got
    assert [f.name for f in scan_failures(got)] == ["kernel WARNING"]
    # Output a drain() consumed is still visible to the next wait (which starts at its own cursor) ...
    assert c.expect("two", 5).group(0) == "two"
    # ... and the log file has everything, without carriage returns.
    assert c.log_path is not None and c.log_path.read_text() == c.text
    assert c.since(c.mark()) == ""


def test_drain_with_timeout_waits_for_quiet(spawn) -> None:
    c = spawn("echo a; sleep 0.1; echo b; sleep 30")
    got = c.drain(timeout=0.4)
    assert got == "a\nb\n"


def test_run_shell(spawn, tmp_path: Path) -> None:
    c = spawn("PS1='# ' exec /bin/sh -i")
    c.child.setecho(True)     # the guest's shell echoes the command line on a serial console
    rc, out = c.run_shell("echo hello; echo world", 10)
    assert (rc, out) == (0, "hello\nworld\n")
    rc, out = c.run_shell("ls /nonexistent-dir >/dev/null 2>&1", 10)
    assert rc != 0 and out == ""
    rc, out = c.run_shell("printf 'x'; exit_code() { return 7; }; exit_code", 10)
    assert (rc, out) == (7, "x")
    with pytest.raises(ValueError):
        c.run_shell("a\nb", 1)
    with pytest.raises(ValueError):
        c.send_line("a\nb")


def test_failures_are_never_lost_and_reported_once(spawn) -> None:
    c = spawn("echo one; sleep 0.1; echo '[    3.2] WARNING: CPU: 0 PID: 1 at x.c:1 f+0/0x4'; echo '[    3.2] ---[ end trace 0 ]---';"
              " echo two; sleep 0.1; echo three; sleep 30")
    c.expect("one\n", 10)
    m = c.mark()
    stop = time.monotonic() + 10
    while "three" not in c.text and time.monotonic() < stop:
        c.drain(timeout=0.05)
    assert "WARNING" in c.since(m)              # drained (by the plugin, say) ...
    with pytest.raises(ConsoleFailure, match="^kernel WARNING after"):
        c.expect("three", 10)                   # ... but the next wait still reports it
    assert c.expect("three", 10).group(0) == "three"   # reported once: the following wait goes on


def test_skip_acknowledges_failures(spawn) -> None:
    c = spawn("echo '[    3.2] BUG: sleeping function called from invalid context'; echo two; sleep 0.3; echo three;"
              " sleep 30")
    c.drain(timeout=0.15)
    c.skip()
    assert c.expect("three", 10).group(0) == "three"


def test_timeout_message_names_the_banner_not_its_regex(spawn) -> None:
    from harness.machine.session import READY_RE
    c = spawn("echo booting; sleep 30")
    with pytest.raises(ConsoleFailure, match=r"^no 'SMCCC-AGENT READY' within 0\.2 s\n"):
        c.expect(READY_RE, 0.2)


def test_a_lockdep_report_runs_through_its_stack_backtrace() -> None:
    """lockdep prints the dependency chain first and the call trace last, with no end marker: the excerpt keeps
    the whole report through the call trace (where the symbolizer finds the caller), however long the chain."""
    chain = "\n".join(f"[    9.1]        frame{k}+0x10/0x20" for k in range(60))
    text = ("[    9.0] before\n[    9.1] ======================================================\n"
            "[    9.1] WARNING: possible circular locking dependency detected\n"
            "[    9.1] python3/60 is trying to acquire lock:\n"
            f"[    9.1] the existing dependency chain (in reverse order) is:\n{chain}\n[    9.1] \n"
            "[    9.1] stack backtrace:\n[    9.1] CPU: 0 UID: 0 PID: 60 Comm: python3 Not tainted 7.3.4 #1\n"
            "[    9.1] Call trace:\n[    9.1]  show_stack+0x18/0x24 (C)\n[    9.1]  kvm_smccc_call_handler+0x60/0x100\n"
            "[    9.1]  handle_hvc+0x10/0x20\n[    9.2] after\n")
    (f,) = scan_failures(text)
    assert f.name == "lockdep" and f.excerpt.splitlines()[0].endswith("=" * 54)
    assert f.excerpt.splitlines()[-1] == "[    9.1]  handle_hvc+0x10/0x20", f.excerpt[-300:]
