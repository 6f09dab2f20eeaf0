"""A TAP 13 / KTAP 1 parser for kselftest output (Documentation/dev-tools/ktap.rst, testanything.org TAP13).

What it understands:

* ``TAP version 13`` / ``KTAP version 1`` headers; the plan ``1..N`` at the start or the end, and
  ``1..0 # SKIP reason`` (everything skipped); a missing plan or a count that does not match it is an
  ``error`` of the document, not an exception.
* Result lines ``ok N description # DIRECTIVE reason`` / ``not ok N ...``; directives SKIP, TODO, XFAIL,
  TIMEOUT (case-insensitive, ``skipped`` counts as SKIP); any other ``# text`` after the description is a
  comment.
* Subtests come *before* their parent's result line, either indented (KTAP: four spaces, or a tab) or
  ``# ``-prefixed (kselftest's runner.sh pipes every program's output through ``sed 's/^/# /'``).  A block
  of prefixed lines is parsed as a nested document when it holds TAP (a version line, a plan, or a
  numbered result); otherwise its lines are the diagnostics of the result that follows.
* ``# Subtest: name`` lines (KTAP), ``Bail out! reason`` (parsing stops; later tests are missing).

Everything is plain data: :class:`TapDocument` holds :class:`TapResult` items; ``outcome`` of a result is one
of passed / failed / skipped / xfail / xpass / todo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

VERSION_RE = re.compile(r"^(TAP|KTAP) version (\d+)\s*$")
PLAN_RE = re.compile(r"^1\.\.(\d+)\s*(?:#\s*(.*?))?\s*$")
RESULT_RE = re.compile(r"^(not ok|ok)\b(?:\s+(\d+))?(?:\s+-)?(?:\s+([^#]*?))?\s*(?:#\s*(.*?))?\s*$")
BAIL_RE = re.compile(r"^Bail out!\s*(.*?)\s*$", re.IGNORECASE)
SUBTEST_RE = re.compile(r"^#\s*Subtest:\s*(.*?)\s*$")
DIRECTIVE_RE = re.compile(r"^(SKIP\w*|TODO|XFAIL|TIMEOUT)\b[:\s]*(.*)$", re.IGNORECASE)
NEST_PREFIXES = ("    ", "\t", "  ", "# ")  # KTAP indentation first; kselftest's '# ' is also a diagnostic


@dataclass
class TapResult:
    ok: bool
    number: int | None
    name: str
    directive: str | None = None  # "SKIP" | "TODO" | "XFAIL" | "TIMEOUT"
    reason: str = ""  # the directive's text
    comment: str = ""  # '# text' after the description that is not a directive
    diagnostics: list[str] = field(default_factory=list)  # lines before this result, its subtests left out
    lines: list[str] = field(default_factory=list)  # every line before this result ('# ' removed), subtests too
    subtests: TapDocument | None = None
    line: int = 0  # 1-based line of the result in the text parsed

    @property
    def outcome(self) -> str:
        if self.directive == "SKIP":
            return "skipped"
        if self.directive == "TODO":
            return "xpass" if self.ok else "todo"
        if self.directive == "XFAIL":
            return "xfail"
        return "passed" if self.ok else "failed"

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@dataclass
class TapDocument:
    version: str | None = None  # "TAP 13", "KTAP 1"
    plan: int | None = None
    skip_all: str | None = None  # "1..0 # SKIP reason" -> reason ("" when none)
    results: list[TapResult] = field(default_factory=list)
    bail_out: str | None = None
    diagnostics: list[str] = field(default_factory=list)  # lines after the last result
    errors: list[str] = field(default_factory=list)
    subtest_name: str | None = None  # "# Subtest: name"
    preamble: list[str] = field(default_factory=list)  # lines before the version header (kselftest: the header)

    @property
    def ok(self) -> bool:
        """No failed result, no bail out, no parse error (skips and TODOs are fine)."""
        return (not self.errors and self.bail_out is None
                and all(r.outcome in ("passed", "skipped", "xfail", "todo") for r in self.results))

    def walk(self, prefix: tuple[str, ...] = ()):
        """Yield (path of names, TapResult) depth first, children before their parent (like the text)."""
        for r in self.results:
            path = (*prefix, r.name or str(r.number))
            if r.subtests is not None:
                yield from r.subtests.walk(path)
            yield path, r

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.outcome] = out.get(r.outcome, 0) + 1
        return out


def _reason(text: str) -> str:
    """A directive's reason, without kselftest's leading '- ' (``ksft_exit_skip("- " fmt)``)."""
    text = text.strip()
    return text[2:].strip() if text.startswith("- ") else text


def parse_result(line: str) -> TapResult | None:
    m = RESULT_RE.match(line)
    if not m:
        return None
    ok = m.group(1) == "ok"
    num = int(m.group(2)) if m.group(2) else None
    name = (m.group(3) or "").strip()
    res = TapResult(ok=ok, number=num, name=name)
    tail = m.group(4)
    if tail is not None:
        d = DIRECTIVE_RE.match(tail)
        if d:
            word = d.group(1).upper()
            res.directive = "SKIP" if word.startswith("SKIP") else word
            res.reason = _reason(d.group(2))
        else:
            res.comment = tail
    return res


def _runs(lines: list[str], prefix: str) -> list[tuple[int, list[str]]]:
    """Contiguous runs of lines carrying ``prefix`` (blank lines inside a run kept), prefix removed."""
    out: list[tuple[int, list[str]]] = []
    cur: list[str] = []
    start = 0
    bare = prefix.rstrip()
    for i, ln in enumerate(lines + ["\0end"]):
        if ln.startswith(prefix) or (cur and (not ln.strip() or (bare and ln == bare))):
            if not cur:
                start = i
            cur.append(ln[len(prefix):] if ln.startswith(prefix) else "")
        elif cur:
            while cur and not cur[-1].strip():
                cur.pop()
            out.append((start, cur))
            cur = []
    return out


def _holds_tap(lines: list[str]) -> bool:
    for ln in lines:
        if VERSION_RE.match(ln) or PLAN_RE.match(ln):
            return True
        r = RESULT_RE.match(ln)
        if r and r.group(2):
            return True
    return False


def _diag(line: str) -> str:
    """A diagnostic line as text: without the leading '# '."""
    if line.startswith("# "):
        return line[2:]
    return line.removeprefix("#")


def _find_nested(block: list[str]) -> tuple[int, int, list[str]] | None:
    """(first index, count, de-prefixed lines) of the nested TAP run in ``block``, or None."""
    for prefix in NEST_PREFIXES:
        for i, run in _runs(block, prefix):
            if _holds_tap(run):
                return i, len(run), run
    return None


def _parse_lines(lines: list[str], first_line: int = 1) -> TapDocument:
    doc = TapDocument()
    pending: list[str] = []
    pending_start = first_line
    seen_result = False
    for i, raw in enumerate(lines):
        lineno = first_line + i
        line = raw.rstrip("\r\n")
        if doc.bail_out is not None:
            break
        if doc.version is None and not doc.results:
            m = VERSION_RE.match(line)
            if m:
                doc.version = f"{m.group(1)} {m.group(2)}"
                doc.preamble, pending = [_diag(ln) for ln in pending], []  # output before the header
                continue
        m = PLAN_RE.match(line)
        if m:
            if doc.plan is not None:
                doc.errors.append(f"line {lineno}: a second plan {line!r}")
            else:
                doc.plan = int(m.group(1))
                why = m.group(2)
                if why is not None:
                    d = DIRECTIVE_RE.match(why)
                    if d and d.group(1).upper().startswith("SKIP"):
                        doc.skip_all = _reason(d.group(2))
            continue
        m = BAIL_RE.match(line)
        if m:
            doc.bail_out = m.group(1)
            continue
        m = SUBTEST_RE.match(line)
        if m and doc.subtest_name is None and doc.plan is None and not doc.results:
            doc.subtest_name = m.group(1)  # KTAP: "# Subtest: name" inside the nested block
            continue
        res = parse_result(line)
        if res is not None:
            res.line = lineno
            found = _find_nested(pending) if pending else None
            res.lines = [_diag(ln) for ln in pending]
            if found is not None:
                i, n, run = found
                sub = res.subtests = _parse_lines(run, pending_start + i)
                for ln in pending[:i] + pending[i + n:]:
                    sm = SUBTEST_RE.match(ln)
                    if sm and sub.subtest_name is None:  # older KTAP: the line precedes the block
                        sub.subtest_name = sm.group(1)
                res.diagnostics = ([_diag(ln) for ln in pending[:i] if not SUBTEST_RE.match(ln)] + sub.preamble
                                   + [_diag(ln) for ln in pending[i + n:] if not SUBTEST_RE.match(ln)])
            else:
                res.diagnostics = list(res.lines)
            doc.results.append(res)
            pending = []
            seen_result = True
            continue
        if not pending:
            pending_start = lineno
        pending.append(line)
    doc.diagnostics = [_diag(ln) for ln in pending]
    _check(doc, seen_result)
    return doc


def _check(doc: TapDocument, seen_result: bool) -> None:
    n = len(doc.results)
    if doc.bail_out is not None:
        doc.errors.append(f"Bail out! {doc.bail_out}".rstrip())
    if doc.plan is None:
        if seen_result:
            doc.errors.append(f"no plan (1..N) for {n} result(s)")
        else:
            doc.errors.append("no plan and no results")
    elif doc.plan != n and doc.bail_out is None:
        doc.errors.append(f"plan says {doc.plan} test(s), {n} reported")
    for i, r in enumerate(doc.results, 1):
        if r.number is not None and r.number != i:
            doc.errors.append(f"result {i} is numbered {r.number}")
            break


def parse(text: str) -> TapDocument:
    """Parse a TAP/KTAP document (a whole program's output)."""
    return _parse_lines(text.splitlines())
