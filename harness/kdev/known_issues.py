"""Known issues for nightly runs: ``images/known-issues.toml`` (the format is in that file's header comment).

Each entry names a kernel version pattern, a test id (pytest node id), a reason, a link and an expiry date.
``smccc-harness compare`` and ``matrix --baseline`` (harness/kdev/regressions.py) use it:

* a listed test that fails or errors on a matching kernel is *known*: shown as such, not a regression;
  one that xfails (harness/model/known_bad.py makes it a strict xfail on its series) is shown as known too;
* a listed test that passes (or XPASSes a strict xfail, which pytest reports as a failure) is reported
  "known issue no longer fails: remove the entry";
* an expired entry (today after ``expires``) covers nothing and fails the comparison (exit 1), naming it;
* a file that cannot be used — invalid TOML, a missing or unknown field, a bad date, an unknown test id —
  is a :class:`HarnessError` (exit 2) naming the file, the entry's line and the field.

Test ids are checked without importing the tests (``compare`` works on CI artifacts, on any checkout): the
file must exist under the repo and define the test function (``ast``); the parametrisation is checked against
the compared JUnit files when they ran that function at all (a ``-k`` subset that did not must not fail the
comparison).  ``pytest --collect-only`` would check the parameters too, but imports every test module and the
plugin, which a post-processing step on artifacts should not depend on.
"""

from __future__ import annotations

import ast
import datetime as dt
import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .. import paths
from ..errors import HarnessError
from ..model.known_bad import KNOWN_BAD

FILE = paths.IMAGES_DIR / "known-issues.toml"
REQUIRED = ("kernel", "test", "reason", "link", "expires")
OPTIONAL = ("known_bad",)
XPASS_STRICT = "[XPASS(strict)]"
HINT = f"fix the entry; the format is in the header comment of {FILE.relative_to(paths.REPO_ROOT)} (README: known issues)"


# ---- matching ----------------------------------------------------------------------------------------------
def kernel_matches(pattern: str, version: str) -> bool:
    """Whether a kernel version (``uname -r`` or a kernel label) matches an entry's ``kernel`` pattern: with
    ``* ? [`` fnmatch over the whole version, else a prefix that ends at a version boundary (not a digit)."""
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(version, pattern)
    return version == pattern or (version.startswith(pattern) and not version[len(pattern)].isdigit())


def scenario_of(test: str) -> str:
    """A node id as the JUnit scenario name (harness/kdev/report.py ``scenario_name``):
    ``tests/system/test_x.py::test_y[p]`` -> ``test_x::test_y[p]``, ``...::TestC::test_y`` -> ``TestC::test_y``."""
    parts = test.split("::")
    if len(parts) > 2:
        return "::".join(parts[-2:])
    return f"{Path(parts[0]).stem}::{parts[-1]}"


def function_of(scenario: str) -> str:
    """``test_x::test_y[p]`` -> ``test_x::test_y``."""
    return scenario.split("[", 1)[0]


def failed_for_real(outcome: str, message: str) -> bool:
    """failed/error, but not pytest's strict XPASS (that is the test passing where a known_bad xfail expected it
    to fail)."""
    return outcome in ("failed", "error") and not message.lstrip().startswith(XPASS_STRICT)


# ---- the entries -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnownIssue:
    kernel: str
    test: str
    reason: str
    link: str
    expires: dt.date
    where: str              # "images/known-issues.toml:12"
    known_bad: str = ""

    @property
    def scenario(self) -> str:
        return scenario_of(self.test)

    def expired(self, today: dt.date) -> bool:
        return today > self.expires

    def describe(self) -> str:
        return f"{self.where} {self.test} (kernel {self.kernel}, expires {self.expires.isoformat()})"


@dataclass
class KnownIssues:
    entries: list[KnownIssue] = field(default_factory=list)
    today: dt.date = field(default_factory=dt.date.today)
    source: str = ""

    @property
    def active(self) -> list[KnownIssue]:
        return [e for e in self.entries if not e.expired(self.today)]

    @property
    def expired(self) -> list[KnownIssue]:
        return [e for e in self.entries if e.expired(self.today)]

    def for_kernel(self, version: str) -> list[KnownIssue]:
        """The active entries whose pattern matches this kernel version (not those whose known_bad entry says
        this kernel carries the fix: harness/model/known_bad.py ``KnownBad.fixed``)."""
        return [e for e in self.active if kernel_matches(e.kernel, version)
                and not (e.known_bad and KNOWN_BAD[e.known_bad].fixed(version))]

    def check_against(self, scenarios: set[str]) -> None:
        """Unknown parametrisations: an entry whose test function the JUnit files ran, but never with its
        parameters.  ``scenarios``: every scenario name of the compared runs."""
        functions = {function_of(s) for s in scenarios}
        for e in self.entries:
            s = e.scenario
            if function_of(s) in functions and s not in scenarios:
                ran = sorted(x.split("[", 1)[1].rstrip("]") for x in scenarios if function_of(x) == function_of(s)
                             and "[" in x)
                raise HarnessError(f"known issues: {e.where}: unknown test id {e.test!r}: the compared JUnit files "
                                   f"ran {function_of(s)} only as [{'], ['.join(ran)}]" if ran else
                                   f"known issues: {e.where}: unknown test id {e.test!r}: the compared JUnit files "
                                   f"ran {function_of(s)} without parameters", HINT)


def _fail(msg: str) -> HarnessError:
    return HarnessError(f"known issues: {msg}", HINT)


def _entry_lines(text: str) -> list[int]:
    return [i for i, ln in enumerate(text.splitlines(), 1) if re.match(r"\s*\[\[\s*issue\s*\]\]", ln)]


def _date(value, where: str) -> dt.date:
    if isinstance(value, dt.datetime):
        raise _fail(f"{where}: expires = {value.isoformat()} has a time: give a date (YYYY-MM-DD)")
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise _fail(f"{where}: expires = {value!r} is not a date: give YYYY-MM-DD, e.g. expires = 2027-06-30")


_DEFS: dict[Path, set[str]] = {}


def _functions(path: Path) -> set[str]:
    if path not in _DEFS:
        try:
            tree = ast.parse(path.read_text(), str(path))
        except (OSError, SyntaxError, ValueError):
            tree = ast.Module(body=[], type_ignores=[])
        _DEFS[path] = {n.name for n in ast.walk(tree)
                       if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return _DEFS[path]


def check_test_id(test: str, where: str, root: Path) -> None:
    """The node id's file exists under ``root`` and defines its function (and class)."""
    parts = test.split("::")
    if len(parts) < 2 or not parts[0].endswith(".py") or not all(parts[1:]):
        raise _fail(f"{where}: test = {test!r} is not a pytest node id (tests/DIR/test_FILE.py::test_NAME[PARAMS])")
    path = Path(root) / parts[0]
    if Path(parts[0]).is_absolute() or not path.is_file():
        raise _fail(f"{where}: unknown test id {test!r}: no file {parts[0]} in {root}")
    names = [p.split("[", 1)[0] for p in parts[1:]]
    missing = [n for n in names if n not in _functions(path)]
    if missing:
        raise _fail(f"{where}: unknown test id {test!r}: {parts[0]} defines no {missing[0]}")


def parse(text: str, source: str = "known-issues.toml", *, today: dt.date | None = None,
          root: Path = paths.REPO_ROOT) -> KnownIssues:
    """The entries of a known-issues file's text; HarnessError (naming ``source``:line and the field) on any
    bad input."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _fail(f"{source} is not valid TOML: {e}") from None
    extra = sorted(set(doc) - {"issue"})
    if extra:
        raise _fail(f"{source}: unknown top-level key {extra[0]!r}: entries are [[issue]] tables")
    items = doc.get("issue", [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise _fail(f"{source}: 'issue' must be an array of tables ([[issue]])")
    lines = _entry_lines(text)
    out = KnownIssues(today=today or dt.date.today(), source=source)
    for n, item in enumerate(items):
        where = f"{source}:{lines[n]}" if len(lines) == len(items) else f"{source} entry {n + 1}"
        missing = [f for f in REQUIRED if f not in item]
        if missing:
            raise _fail(f"{where}: entry without {', '.join(missing)} (every entry needs {', '.join(REQUIRED)})")
        unknown = sorted(set(item) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise _fail(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(REQUIRED + OPTIONAL)})")
        for f in ("kernel", "test", "reason", "link") + tuple(o for o in OPTIONAL if o in item):
            if not isinstance(item[f], str) or not item[f].strip():
                raise _fail(f"{where}: {f} must be a non-empty string, not {item[f]!r}")
        expires = _date(item["expires"], where)
        check_test_id(item["test"], where, root)
        kb = item.get("known_bad", "")
        if kb:
            if kb not in KNOWN_BAD:
                raise _fail(f"{where}: known_bad = {kb!r} is not in harness/model/known_bad.py "
                            f"(entries: {', '.join(sorted(KNOWN_BAD))})")
            series = [f"{a}.{b}" for a, b in KNOWN_BAD[kb].series]
            if item["kernel"] not in series:
                raise _fail(f"{where}: kernel = {item['kernel']!r} but known_bad {kb!r} is measured on "
                            f"{', '.join(series)}: give one of those series")
        out.entries.append(KnownIssue(item["kernel"], item["test"], item["reason"], item["link"], expires, where, kb))
    return out


def display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(paths.REPO_ROOT))
    except ValueError:
        return str(path)


def load(path: Path, *, today: dt.date | None = None, root: Path = paths.REPO_ROOT) -> KnownIssues:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(f"cannot read {path}: {e}") from None
    return parse(text, display(path), today=today, root=root)


def for_cli(arg: str | None) -> KnownIssues:
    """``--known-issues FILE`` (the repo's file when not given; none when that is absent)."""
    if arg is None:
        return load(FILE) if FILE.is_file() else KnownIssues()
    return load(Path(arg))


def add_option(p) -> None:
    p.add_argument("--known-issues", metavar="FILE", default=None,
                   help=f"known failures by kernel and test id (default: {display(FILE)}; format in its header): "
                        "shown as known, not regressions; an expired entry fails")
