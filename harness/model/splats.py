"""What a kernel failure looks like on the console, and nothing else: the patterns (Oops, BUG, WARNING, panic,
lockdep, RCU stalls, KASAN/UBSAN/KFENCE reports, ...) and :func:`scan_failures`, which turns console text into
:class:`Finding` s with an excerpt (the incident, cut at its end marker, plus the lines before a panic that name
its cause).  Pure text in, findings out; the live console that feeds it is harness/machine/console.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ---- failure patterns ------------------------------------------------------------------------------
# Ordered by severity: when one incident (a "splat": from a cut-here line through the end-trace line)
# matches several patterns, the finding is named after the first entry of this table that matched.
# Each regex is matched at the start of a console line, after any kernel timestamp ("[    3.123456] "),
# caller id ("[    T1] ") or syslog level ("<4>"); see _starts().  Case-sensitive on purpose: Python's
# lowercase "warning" and the like must not match.
FAILURE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("kernel panic", re.compile(r"Kernel panic - not syncing")),
    ("init killed", re.compile(r".*Attempted to kill init")),
    ("KASAN", re.compile(r"BUG: KASAN: ")),
    ("soft lockup", re.compile(r"(?:watchdog: )?(?:BUG: soft lockup|Watchdog detected hard LOCKUP)")),
    # DEBUG_ATOMIC_SLEEP (kernel/sched/core.c __might_resched) and the scheduler's own check (__schedule_bug)
    ("sleep in atomic", re.compile(r"BUG: (?:sleeping function called from invalid context|scheduling while atomic)")),
    ("kernel BUG", re.compile(r"(?:kernel BUG at |BUG: )")),
    # after BUG: BUG() is an Oops on arm64 ("Internal error: Oops - BUG"), named after its "kernel BUG at" line
    ("kernel oops", re.compile(r"Internal error: ")),
    ("kernel fault", re.compile(r"Unable to handle kernel ")),
    ("lockdep", re.compile(
        r"(?:WARNING: |\[ BUG: )?(?:possible circular locking dependency detected|possible recursive locking detected"
        r"|inconsistent lock state|bad unlock balance detected|possible irq lock inversion dependency detected"
        r"|suspicious RCU usage|lock held when returning to user space!|held lock freed!|Invalid wait context \])")),
    ("rcu stall", re.compile(r"(?:rcu: )?INFO: rcu_\w+ (?:self-)?detected stalls?")),
    ("hung task", re.compile(r"INFO: task \S+ blocked for more than \d+ seconds")),
    ("UBSAN", re.compile(r"UBSAN: ")),
    ("kernel WARNING", re.compile(r"WARNING: ")),
    ("end of trace", re.compile(r"---\[ end trace")),
    # images/init prints this when the agent exits; rc=0 is a requested shutdown, anything else a death.
    ("agent exited", re.compile(r"SMCCC-AGENT EXITED(?! rc=0\b)")),
)
_SEVERITY = {name: i for i, (name, _) in enumerate(FAILURE_PATTERNS)}


# A finding for one of these always starts a new incident, even inside another splat (panic_on_warn
# prints the panic before the WARNING's end-trace line).
_NEVER_ABSORBED = {"kernel panic", "agent exited"}
_PREFIX = re.compile(r"<\d{1,2}>(?:\[\s*\d+\.\d+\])?(?:\[\s*[CT]\d+\])? ?|\[\s*\d+\.\d+\](?:\[\s*[CT]\d+\])? ?")
_CUT_HERE = re.compile(r"-+\[ cut here \]-+\s*$")
_SEPARATOR = re.compile(r"(?:={10,}|-{10,})\s*$")
END_MARKER = re.compile(r"---\[ end (?:trace|Kernel panic)")
EXCERPT_LINES = 40      # lines after the matched line kept in a finding's excerpt


# Lines before a "Kernel panic - not syncing" line kept in its excerpt: the panic line names the symptom
# ("VFS: Unable to mount root fs"), the cause comes before it ("check access for rdinit=/x failed: -2" is
# 10 lines earlier, above the list of filesystems).
PANIC_CONTEXT_LINES = 20
MAX_INCIDENT_LINES = 200  # how far to look for the end-trace line of a splat
TAIL_LINES = 30         # lines of console tail in a timeout / EOF excerpt


def _starts(line: str) -> list[int]:
    """Offsets in ``line`` where a console message may start: 0 and after every kernel log prefix."""
    out = [0]
    for m in _PREFIX.finditer(line):
        out.append(m.end())
    return out


def match_line(line: str) -> tuple[str, re.Match[str]] | None:
    """The first failure pattern matching this one console line (without its newline), or None."""
    line = line.rstrip("\r")
    starts = _starts(line)
    for name, rx in FAILURE_PATTERNS:
        for p in starts:
            m = rx.match(line, p)
            if m:
                return name, m
    return None


def finding_is(rx: re.Pattern[str], line: str) -> bool:
    return any(rx.match(line, p) for p in _starts(line))


@dataclass(frozen=True)
class Finding:
    """One incident in the console output.

    ``name`` is the most severe pattern matched inside the incident (see :data:`FAILURE_PATTERNS`),
    ``line`` the console line that matched it, ``lineno`` that line's 1-based number in the scanned text,
    ``excerpt`` the incident: from the ``cut here`` / separator line before the first matched line through
    the ``---[ end trace`` line, or through the call trace after its ``stack backtrace:`` line (lockdep), or at
    most :data:`EXCERPT_LINES` lines after the first matched line.  A kernel
    panic's excerpt also has the :data:`PANIC_CONTEXT_LINES` lines before the panic line (fewer when the scanned
    text or the previous incident ends closer), where the kernel printed the cause.
    """

    name: str
    line: str
    excerpt: str
    lineno: int
    end_lineno: int = 0     # the incident's last line (1-based; may lie beyond the excerpt)

    def __str__(self) -> str:
        return f"{self.name}: {self.line.strip()}"


def _new_incident(lines: list[str], j: int) -> bool:
    """Line j starts a new incident: a cut-here line, or a panic / agent death (never part of another)."""
    if finding_is(_CUT_HERE, lines[j]):
        return True
    h = match_line(lines[j])
    return h is not None and h[0] in _NEVER_ABSORBED


_STACK_BACKTRACE = re.compile(r"stack backtrace:\s*$")
_CALL_TRACE = re.compile(r"Call trace:\s*$")
_FRAME_LINE = re.compile(r"\s+\S")


def _backtrace_end(lines: list[str], i: int) -> int | None:
    """The last line of the call trace after a ``stack backtrace:`` line that follows line i within
    :data:`MAX_INCIDENT_LINES` (and before the next incident), or None."""
    n = len(lines)
    for j in range(i + 1, min(n, i + MAX_INCIDENT_LINES + 1)):
        if _new_incident(lines, j):
            return None
        if finding_is(_STACK_BACKTRACE, lines[j]):
            k = next((k for k in range(j + 1, min(n, j + 6)) if finding_is(_CALL_TRACE, lines[k])), None)
            if k is None:
                return None
            while k + 1 < n and any(_FRAME_LINE.match(lines[k + 1], p) for p in _starts(lines[k + 1])[-1:]):
                k += 1
            return k
    return None


def scan_failures(text: str) -> list[Finding]:
    """All kernel/agent failure incidents in a chunk of console text, in order.

    Robust to kernel timestamps, CRLF line ends and kernel output interleaved into a line; one finding
    per incident (a WARNING splat with its cut-here and end-trace lines is one finding, "kernel WARNING";
    an arm64 Oops, "Unable to handle kernel ..." through its end-trace line, is one finding, "kernel oops").
    """
    lines = text.replace("\r", "").split("\n")
    findings: list[Finding] = []
    n = len(lines)
    i = 0
    while i < n:
        hit = match_line(lines[i])
        if hit is None:
            i += 1
            continue
        start = i
        while start > 0 and i - start < 2 and (finding_is(_CUT_HERE, lines[start - 1]) or finding_is(_SEPARATOR, lines[start - 1])):
            start -= 1
        if hit[0] == "kernel panic":     # the cause is printed before the panic line, never after it
            floor = findings[-1].end_lineno if findings else 0     # not into the previous incident
            start = max(floor, i - PANIC_CONTEXT_LINES)
        # The incident runs to its end-trace line if there is one before the next incident begins ...
        end: int | None = i if finding_is(END_MARKER, lines[i]) else None
        if end is None:
            for j in range(i + 1, min(n, i + MAX_INCIDENT_LINES + 1)):
                if _new_incident(lines, j):
                    break
                if finding_is(END_MARKER, lines[j]):
                    end = j
                    break
        # ... or, for a report that prints "stack backtrace:" (lockdep: the dependency chain first, the call trace
        # last, no end marker), through that call trace ...
        backtrace = end is None and _backtrace_end(lines, i)
        if backtrace:
            end = backtrace
        # ... else over the next EXCERPT_LINES lines, stopping short of the next incident.
        if end is None:
            end = min(n - 1, i + EXCERPT_LINES)
            for j in range(i + 1, end + 1):
                if _new_incident(lines, j):
                    end = j - 1
                    break
        name, best = hit[0], i
        for j in range(i + 1, end + 1):
            h = match_line(lines[j])
            if h is not None and _SEVERITY[h[0]] < _SEVERITY[name]:
                name, best = h[0], j
        last = end if backtrace else min(end, best + EXCERPT_LINES)
        excerpt = "\n".join(lines[start:last + 1]).rstrip("\n")
        findings.append(Finding(name=name, line=lines[best], excerpt=excerpt, lineno=best + 1, end_lineno=end + 1))
        i = end + 1
    return findings
