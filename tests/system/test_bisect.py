"""A real ``git bisect run smccc-harness bisect`` over a real kernel history finds the commit that breaks
forwarding (docs/kvm-smccc-abi.md, "KVM_EXIT_HYPERCALL": ``flags`` bit 0, KVM_HYPERCALL_EXIT_SMC, says the
guest used SMC).

The history: Debian's linux-source-7.3 (7.3.4) committed as-is (GOOD), then seven commits, one of which
(``BREAKING``) makes kvm_prepare_hypercall_exit() stop setting KVM_HYPERCALL_EXIT_SMC; HEAD is BAD.  The
selection is ``test_hypercall_flags_name_the_conduit`` with the SMC conduit.  The repository and its O=
build directory are cached (``cache/bisect-demo/``; history made with fixed dates, so the commit ids are the
same every time) and ccache holds the objects.

Slow (marker ``slow``, out of the default run).  Measured 2026-11-25 on the shared 2-core machine (load ~9
from other jobs): making the history (copy + ``git add -f`` + 8 commits) 145 s; the first bisect step pays a
full minimal-kernel build (5.5 min on an idle 2-core machine, ~25 min at that load; ccache does not help
across source paths); a warm re-run of the whole bisect (3 steps: incremental build of the changed files +
link, boot, one test) takes ~45 s.  git bisect visits: e7421ae good, 8ce67b9 bad, 4fcd90d bad -> 4fcd90d.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import paths
from harness.kdev import kbuild

pytestmark = pytest.mark.slow

DEMO_FORMAT = 1  # bump when the history below changes
BISECT_DEADLINE_S = 3600  # a cold first run (full kernel build) on a loaded 2-core machine took ~30 min
SELECTION = ["tests/system/test_forwarding_el1.py", "-k", "test_hypercall_flags_name_the_conduit and smc"]
GIT_ENV = {"GIT_AUTHOR_NAME": "Demo Dev", "GIT_AUTHOR_EMAIL": "dev@example.org", "GIT_COMMITTER_NAME": "Demo Dev",
           "GIT_COMMITTER_EMAIL": "dev@example.org", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent-home"}


def _append_comment(path: str, text: str):
    def edit(tree: Path) -> None:
        p = tree / path
        p.write_text(p.read_text() + f"\n/* {text} */\n")
    return edit


def _replace(path: str, old: str, new: str):
    def edit(tree: Path) -> None:
        p = tree / path
        s = p.read_text()
        assert s.count(old) == 1, f"{path}: {old!r} not found exactly once"
        p.write_text(s.replace(old, new))
    return edit


def _text_append(path: str, text: str):
    def edit(tree: Path) -> None:
        p = tree / path
        p.write_text(p.read_text() + text)
    return edit


BREAKING_SUBJECT = "KVM: arm64: simplify the hypercall exit flags"
HISTORY = [
    ("README: mention the smccc-harness demo", _text_append("README", "\nThis tree is a git bisect demo.\n")),
    ("KVM: arm64: document the SMCCC filter lookup", _append_comment(
        "arch/arm64/kvm/hypercalls.c", "The filter is an maple tree keyed by function ID ranges.")),
    ("KVM: arm64: comment on PC advance for trapped SMCs", _append_comment(
        "arch/arm64/kvm/handle_exit.c", "handle_smc() advances PC before any exit to userspace.")),
    (BREAKING_SUBJECT, _replace(
        "arch/arm64/kvm/hypercalls.c",
        "\tif (ec == ESR_ELx_EC_SMC32 || ec == ESR_ELx_EC_SMC64)\n\t\tflags |= KVM_HYPERCALL_EXIT_SMC;\n",
        "\t(void)ec; /* the conduit is implied by the ESR: no flag needed */\n")),
    ("KVM: arm64: psci: comment on the PSCI version", _append_comment(
        "arch/arm64/kvm/psci.c", "PSCI 1.3 is the default version for new VMs.")),
    ("MAINTAINERS: demo entry", _text_append("MAINTAINERS", "\n")),
    ("KVM: arm64: one more comment in hypercalls.c", _append_comment(
        "arch/arm64/kvm/hypercalls.c", "Forwarded calls exit with KVM_EXIT_HYPERCALL.")),
]


def _git(repo: Path, *args: str, date: int = 0, capture: bool = True) -> str:
    env = dict(os.environ, **GIT_ENV)
    if date:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = f"@{1764000000 + date} +0000"
    r = subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, text=True,
                       capture_output=capture, timeout=1800)
    return (r.stdout or "").strip()


def _make_history(root: Path, src: Path) -> dict:
    """Copy the pristine tree, commit it (GOOD), then HISTORY; returns the commit ids."""
    meta = root / "history.json"
    if meta.is_file():
        return json.loads(meta.read_text())
    repo = root / "linux"
    shutil.rmtree(repo, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    subprocess.run(["cp", "-a", str(src), str(repo)], check=True)
    _git(repo, "init", "-q", "-b", "master")
    _git(repo, "add", "-A", "-f")  # Debian's top-level .gitignore ignores "/*"
    _git(repo, "commit", "-q", "-m", "Linux 7.3.4 (Debian linux-source-7.3)", date=1)
    ids = {"good": _git(repo, "rev-parse", "HEAD"), "commits": []}
    for i, (subject, edit) in enumerate(HISTORY, start=2):
        edit(repo)
        _git(repo, "commit", "-q", "-a", "-m", subject, date=i)
        ids["commits"].append([_git(repo, "rev-parse", "HEAD"), subject])
    ids["bad"] = ids["commits"][-1][0]
    ids["breaking"] = next(c for c, s in ids["commits"] if s == BREAKING_SUBJECT)
    ids["seconds"] = round(time.monotonic() - t0, 1)
    meta.write_text(json.dumps(ids, indent=2))
    return ids


@pytest.fixture(scope="module")
def demo():
    src = kbuild.source_tree()
    root = paths.cache_dir() / "bisect-demo" / f"v{DEMO_FORMAT}-{src.parent.name}"
    return root, _make_history(root, src)


@pytest.mark.timeout(BISECT_DEADLINE_S + 300)
def test_git_bisect_run_names_the_commit_that_drops_the_smc_flag(demo):
    root, ids = demo
    repo, out = root / "linux", root / "out"
    _git(repo, "bisect", "reset")
    _git(repo, "checkout", "-q", "master")
    t0 = time.monotonic()
    _git(repo, "bisect", "start", ids["bad"], ids["good"])
    try:
        env = dict(os.environ, PYTHONPATH=str(paths.REPO_ROOT))  # keep HOME: the harness cache lives there
        cmd = [sys.executable, "-m", "harness.cli", "bisect", "--out", str(out), "--", *SELECTION]
        proc = subprocess.Popen(["git", "-C", str(repo), "bisect", "run", *cmd], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=BISECT_DEADLINE_S)
        finally:
            if proc.poll() is None:  # never leave make/QEMU running behind a failed test
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        log = _git(repo, "bisect", "log")
    finally:
        _git(repo, "bisect", "reset")
    dt = time.monotonic() - t0
    steps = re.findall(r"\[smccc-harness bisect\] .*: (\w+) -> exit (\d+)", r.stdout)
    step_lines = re.findall(r"^\[smccc-harness bisect\] (?:built|\w+ ).*$", r.stdout, re.MULTILINE)
    report = (f"git bisect run exit {r.returncode} in {dt:.0f} s, steps {steps}\n" + "\n".join(
        line for line in step_lines if "$ " not in line) + "\n--- stdout tail:\n"
              + "\n".join(r.stdout.splitlines()[-40:]) + f"\n--- stderr tail:\n{r.stderr[-3000:]}\n--- log:\n{log}")
    print(report)
    assert f"{ids['breaking']} is the first bad commit" in r.stdout, report
    assert all(code in ("0", "1") for _, code in steps), report  # no build/boot skips on this history
