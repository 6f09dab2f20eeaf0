"""The guest's serial console: a pexpect-driven reader with success + failure patterns and deadlines.

Everything QEMU prints on the console is read through one :class:`Console`, which keeps

* the durable copy in ``console.log`` (``logfile_read`` of the pexpect child, flushed on every chunk),
* an in-memory copy of the whole session (``Console.text``), so that the pytest plugin can take a
  :meth:`Console.mark` before a test and :meth:`Console.since` after it, and scan that slice with
  :func:`scan_failures` (a test that made the kernel print a ``WARNING:`` fails even if its assertions
  passed).

Waiting (:meth:`Console.expect`, :meth:`Console.expect_ready`, :meth:`Console.run_shell`) always has a
deadline, and always watches the kernel failure patterns (:data:`FAILURE_PATTERNS`) and EOF (QEMU exited)
next to the success pattern, so that a panic ends the wait within seconds instead of at the timeout.

The matching engine is our own, on top of ``read_nonblocking``; pexpect's ``expect`` is not used, so a
:meth:`Console.drain` (which the plugin calls while the host is busy on the control channel) never hides
output from a later wait: waits search ``Console.text`` from their own cursor.

Carriage returns are dropped on the way in (the guest tty turns ``\\n`` into ``\\r\\n``), both in memory and
in ``console.log``.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import IO

import pexpect

from ..errors import BootError
from ..model.splats import END_MARKER, MAX_INCIDENT_LINES, TAIL_LINES, Finding, finding_is, match_line, scan_failures

FAILURE_GRACE_S = 3.0   # after a failure line, keep reading this long (at most) to complete the excerpt


# ---- errors ----------------------------------------------------------------------------------------
class ConsoleFailure(BootError):
    """A console wait failed: a failure pattern, EOF (QEMU exited) or the deadline.

    ``kind`` is "failure", "eof" or "timeout"; ``excerpt`` the relevant console text (the incident, or the
    last :data:`TAIL_LINES` lines); ``log_path`` the console log; ``finding`` the :class:`Finding` (kind
    "failure", and for "eof" when the output before the exit contained one); ``exit_status`` QEMU's exit
    status (kind "eof"; negative = killed by that signal; None if unknown).
    """

    def __init__(self, message: str, *, kind: str, excerpt: str = "", log_path: Path | None = None,
                 finding: Finding | None = None, exit_status: int | None = None, hint: str = "") -> None:
        if log_path is not None and not hint:
            hint = f"full console log: {log_path}"
        super().__init__(message, hint=hint)
        self.kind = kind
        self.excerpt = excerpt
        self.log_path = log_path
        self.finding = finding
        self.exit_status = exit_status


# ---- the console -----------------------------------------------------------------------------------
class _Tee:
    """``logfile_read`` of the pexpect child: every chunk read goes to the buffer and the log file."""

    def __init__(self, console: Console, log: IO[str] | None) -> None:
        self._console = console
        self._log = log

    def write(self, s: str) -> None:
        s = s.replace("\r", "")
        if not s:
            return
        self._console._append(s)
        if self._log is not None and not self._log.closed:
            self._log.write(s)
            self._log.flush()

    def flush(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.flush()


def _describe(pattern: str | re.Pattern[str]) -> str:
    """A pattern as a reader wants it in "no ... within N s": its literal prefix when it has one
    (``re.escape(READY_BANNER) + r" (\\{.*\\})"`` -> ``SMCCC-AGENT READY``), else the regex itself."""
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    m = re.match(r"(?:\\[^A-Za-z0-9]|[^.^$*+?{}\[\]\\|()])+", text)
    literal = re.sub(r"\\(.)", r"\1", m.group(0)).strip() if m else ""
    return literal if len(literal) >= 4 else text


def _tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").split("\n")[-n:])


class Console:
    """The serial console of one QEMU process (or any pexpect child: the unit tests use ``cat``).

    ``child``: a ``pexpect.spawn`` with ``encoding`` set.  ``log_path``: where to keep the durable copy
    (opened for appending, line-buffered).  ``name``: what the child is, for messages ("QEMU exited ...").
    ``started``: ``time.monotonic()`` at the child's start (default: now); messages give times since then.
    """

    def __init__(self, child: pexpect.spawn, log_path: Path | None = None, *, name: str = "QEMU",
                 started: float | None = None) -> None:
        self.child = child
        self.log_path = Path(log_path) if log_path is not None else None
        self.name = name
        self.started = time.monotonic() if started is None else started
        self._text = ""
        self._cursor = 0            # waits search from here; advanced past each successful match
        self._watched = 0           # failure lines before this have been checked (and reported) by a wait
        self._eof = False
        # Kept open for the console's lifetime (closed by close()); line-buffered and flushed per chunk.
        self._log = open(self.log_path, "a", encoding="utf-8", buffering=1) if self.log_path else None  # noqa: SIM115
        child.logfile_read = _Tee(self, self._log)

    # -- buffer ---------------------------------------------------------------------------------------
    def _append(self, s: str) -> None:
        self._text += s

    @property
    def text(self) -> str:
        """Everything read from the console so far (without carriage returns)."""
        return self._text

    @property
    def eof(self) -> bool:
        """True once the child closed the console (QEMU exited)."""
        return self._eof

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _read(self, timeout: float) -> bool:
        """Read one chunk, waiting at most ``timeout`` s.  False on timeout or EOF (then ``eof`` is set)."""
        if self._eof:
            return False
        try:
            self.child.read_nonblocking(size=65536, timeout=max(0.0, timeout))
            return True
        except pexpect.TIMEOUT:
            return False
        except (pexpect.EOF, OSError, ValueError):   # ValueError: the pty was closed under us
            self._eof = True
            return False

    def drain(self, timeout: float = 0.0, max_s: float = 5.0) -> str:
        """Read whatever the console has pending, without blocking (``timeout`` 0).

        With ``timeout`` > 0: keep reading until the console has been quiet for ``timeout`` s (or ``max_s``
        s have passed: a chatty guest cannot keep this going).  Returns the text read by this call.
        """
        before = len(self._text)
        stop = time.monotonic() + max(timeout, 0.0) + max_s
        while time.monotonic() < stop and self._read(timeout):
            pass
        return self._text[before:]

    def mark(self) -> int:
        """A position in the console text (after draining): pass it to :meth:`since`."""
        self.drain()
        return len(self._text)

    def since(self, mark: int) -> str:
        """The console text captured since ``mark`` (drains pending output first)."""
        self.drain()
        return self._text[mark:]

    def skip(self) -> None:
        """Let the next wait start at the current end of the text, failures before it included (drains first).

        Waits raise on every failure line printed since the previous wait (drain/since do not change that,
        so no failure is ever lost); a caller that reported such failures itself, like the pytest plugin
        with :meth:`since` + :func:`scan_failures`, acknowledges them with ``skip()``.
        """
        self.drain()
        self._cursor = self._watched = len(self._text)

    # -- sending --------------------------------------------------------------------------------------
    def send_line(self, s: str) -> None:
        """Send ``s`` and a newline to the guest's console."""
        if "\n" in s or "\r" in s:
            raise ValueError("send_line() takes one line; send them one by one")
        self.child.send(s + "\n")

    # -- waiting --------------------------------------------------------------------------------------
    def _exit_status(self, wait_s: float = 5.0) -> int | None:
        """The child's exit status after EOF (negative: killed by that signal), or None if still running."""
        stop = time.monotonic() + wait_s
        while True:
            try:
                alive = self.child.isalive()
            except (OSError, pexpect.ExceptionPexpect):
                return None
            if not alive:
                if self.child.signalstatus is not None:
                    return -int(self.child.signalstatus)
                return self.child.exitstatus
            if time.monotonic() >= stop:
                return None
            time.sleep(0.02)

    def _fail(self, scan_from: int, trigger_line_end: int, what: str) -> ConsoleFailure:
        """Complete the excerpt of a failure seen in the line ending at ``trigger_line_end``, and describe it."""
        elapsed = self.elapsed()
        trigger = match_line(self._text[self._text.rfind("\n", 0, trigger_line_end - 1) + 1:trigger_line_end - 1])
        # An agent's exit line ends its incident (its traceback came before it): nothing more to wait for.
        grace = 0.0 if trigger is not None and trigger[0] == "agent exited" else FAILURE_GRACE_S
        stop = time.monotonic() + grace
        while time.monotonic() < stop:
            after = self._text[trigger_line_end:]
            lines = after.split("\n")
            if len(lines) > MAX_INCIDENT_LINES or any(finding_is(END_MARKER, ln) for ln in lines[:-1]):
                break
            if not self._read(min(0.2, max(0.0, stop - time.monotonic()))) and self._eof:
                break
        findings = scan_failures(self._text[scan_from:])
        self._watched = len(self._text)
        if findings:   # the next wait starts after this incident, not after everything the grace read
            after = self._text[scan_from:].split("\n")[:findings[0].end_lineno]
            self._watched = min(len(self._text), scan_from + sum(len(x) + 1 for x in after))
        if not findings:   # cannot happen (the trigger line matched); stay safe
            return ConsoleFailure(f"console failure after {elapsed:.1f} s while waiting for {what}",
                                  kind="failure", excerpt=_tail(self._text), log_path=self.log_path)
        f = findings[0]
        return ConsoleFailure(f"{f.name} after {elapsed:.1f} s (waiting for {what}): {f.line.strip()}",
                              kind="failure", excerpt=f.excerpt, log_path=self.log_path, finding=f)

    def expect(self, pattern: str | re.Pattern[str], deadline_s: float, *, since: int | None = None,
               watch_failures: bool = True, what: str | None = None) -> re.Match[str]:
        """Wait at most ``deadline_s`` s for ``pattern`` (a regex) in the console output.

        The search starts at ``since`` (a :meth:`mark`) or, by default, where the previous successful wait
        ended.  While waiting, every complete line printed since the previous wait (or :meth:`skip`) is
        checked against :data:`FAILURE_PATTERNS` (unless ``watch_failures`` is false), and EOF is detected.  Raises
        :class:`ConsoleFailure` naming the cause; returns the match (its offsets index :attr:`text`).
        """
        if deadline_s is None or deadline_s <= 0:
            raise ValueError("every console wait needs a positive deadline")
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        what = what or repr(_describe(pattern))
        start = self._cursor if since is None else since
        line_pos = self._text.rfind("\n", 0, self._watched) + 1     # failure scanning works on whole lines
        scan_from = line_pos
        t_end = time.monotonic() + deadline_s
        while True:
            m = rx.search(self._text, start)
            limit = m.start() if m else len(self._text)
            if watch_failures:
                while True:
                    nl = self._text.find("\n", line_pos)
                    if nl < 0 or (m is not None and line_pos > limit):
                        break
                    if match_line(self._text[line_pos:nl]) is not None:
                        raise self._fail(scan_from, nl + 1, what)
                    line_pos = nl + 1
            if m is not None:
                self._cursor = m.end()
                if watch_failures:
                    self._watched = max(self._watched, line_pos)
                return m
            if self._eof:
                if watch_failures:
                    self._watched = len(self._text)
                status = self._exit_status()
                findings = scan_failures(self._text[scan_from:]) if watch_failures else []
                st = "status unknown" if status is None else (
                    f"signal {-status}" if status < 0 else f"status {status}")
                if findings:
                    f = findings[0]
                    raise ConsoleFailure(f"{f.name} after {self.elapsed():.1f} s, then {self.name} exited with {st} "
                                         f"(waiting for {what}): {f.line.strip()}", kind="eof",
                                         excerpt=f.excerpt, log_path=self.log_path, finding=f, exit_status=status)
                raise ConsoleFailure(f"{self.name} exited with {st} after {self.elapsed():.1f} s (waiting for {what})",
                                     kind="eof", excerpt=_tail(self._text), log_path=self.log_path,
                                     exit_status=status)
            remaining = t_end - time.monotonic()
            if remaining <= 0:
                if watch_failures:
                    self._watched = max(self._watched, line_pos)
                raise ConsoleFailure(f"no {what} within {deadline_s:g} s", kind="timeout",
                                     excerpt=_tail(self._text[scan_from:] or self._text), log_path=self.log_path)
            self._read(min(remaining, 0.5))

    def expect_ready(self, success: str | re.Pattern[str], deadline_s: float) -> re.Match[str]:
        """Wait for the success banner (e.g. ``harness.protocol.READY_BANNER``) while watching for failures.

        ``success`` as a str is a literal, not a regex.  Raises :class:`ConsoleFailure` (a ``BootError``):
        "kernel panic after 3.2 s (...)", "no 'SMCCC-AGENT READY' within 60 s", "QEMU exited with status 1 ...".
        """
        if isinstance(success, str):
            return self.expect(re.escape(success), deadline_s, what=repr(success))
        return self.expect(success, deadline_s)

    def run_shell(self, cmd: str, deadline_s: float, *, watch_failures: bool = True) -> tuple[int, str]:
        """Run ``cmd`` in the guest shell on the console (``smccc.shell`` mode); return (exit code, output).

        The command is bracketed by a random marker written as two quoted halves (``'ab12''cd34'``, as
        labgrid does), so that the tty echo of the command line can never match the marker itself.
        """
        if "\n" in cmd:
            raise ValueError("run_shell() takes a one-line command")
        a, b = secrets.token_hex(4), secrets.token_hex(4)
        marker = a + b
        self.drain()
        self._cursor = len(self._text)      # the marker is random: nothing before this can match it
        self.send_line(f"echo '{a}''{b}'; {cmd}; echo '{a}''{b}' $?")
        m = self.expect(re.compile(re.escape(marker) + r"\n(.*?)" + re.escape(marker) + r" (\d+)\n", re.DOTALL),
                        deadline_s, watch_failures=watch_failures, what=f"the end of shell command {cmd!r}")
        return int(m.group(2)), m.group(1)

    def close(self) -> None:
        """Stop logging (the child itself belongs to whoever spawned it)."""
        if self._log is not None and not self._log.closed:
            self._log.close()


def silent_kernel(err: ConsoleFailure, kernel: Path) -> BootError | None:
    """A boot timeout with not one line from the kernel: say that the Image is the likely culprit."""
    if err.kind != "timeout" or err.log_path is None:
        return None
    try:
        lines = Path(err.log_path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    if any(ln.strip() and not ln.startswith(("qemu-system", "[smccc-harness]")) for ln in lines):
        return None
    return BootError(f"the kernel {kernel} printed nothing on the serial console: {err}",
                     hint="the Image is probably corrupt, truncated, or not built for QEMU 'virt' with a PL011 "
                          "console (CONFIG_SERIAL_AMBA_PL011_CONSOLE); rebuild it, or run 'smccc-harness cache "
                          f"verify' for a cached kernel; add --append earlycon to see early output; console log: "
                          f"{err.log_path}")
