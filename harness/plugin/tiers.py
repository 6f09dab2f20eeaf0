"""Test tiers: what a bare ``pytest`` runs (the kernel developer's edit-test loop) and what only CI runs.

| tier (marker) | what | bare ``pytest`` | ``./smccc-harness test`` (README, CI) |
|---|---|---|---|
| (none)     | unit tests; the KVM behaviour suite: PSCI, filter ABI, forwarding, nested EL2, VMM save/restore | yes | yes |
| ``infra``    | the harness's own plumbing: bad input, fault injection, SSH, ``--reuse-vm``, snapshots, CLI, workflows | no | yes |
| ``upstream`` | upstream's KVM selftests in the guest (2.3 s per EL1 program, 6.7 s per nested one, under TCG) | no | yes |
| ``slow``     | kernel builds, the bisect demo, Linux guests | no | no (``-m slow``) |

The rule, applied only when the command line has no ``-m``: tests marked ``infra``, ``upstream`` or ``slow``
are deselected, unless their file or node id was named on the command line
(``pytest tests/system/test_faults.py`` runs the fault tests; ``pytest tests/system`` does not).
``-m EXPR`` replaces the rule: ``pytest -m "not slow"`` is the CI suite, ``pytest -m infra`` the plumbing.
A header line says how many tests the rule left out and how to run them, so nothing is silently dropped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TIER_MARKERS = ("infra", "upstream", "slow")
_LEFT_OUT = pytest.StashKey[dict]()


def _named(config) -> list[tuple[Path, str]]:
    """The files (and node-id suffixes) named on the command line: (absolute path, '::rest' or '')."""
    out = []
    root = Path(config.invocation_params.dir)
    for arg in config.args:
        path, sep, rest = str(arg).partition("::")
        p = (root / path).resolve()
        if p.is_file():
            out.append((p, sep + rest))
    return out


def left_out(item, named: list[tuple[Path, str]]) -> str | None:
    """The tier marker that keeps ``item`` out of a run without ``-m``, or None when it runs."""
    tier = next((m for m in TIER_MARKERS if item.get_closest_marker(m) is not None), None)
    if tier is None:
        return None
    path = Path(str(item.path)).resolve()
    nodeid_tail = item.nodeid.partition("::")[2]
    for p, rest in named:
        if p == path and (not rest or ("::" + nodeid_tail).startswith(rest)):
            return None
    return tier


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if config.getoption("markexpr", ""):
        return
    named = _named(config)
    keep, drop, counts = [], [], {}
    for item in items:
        tier = left_out(item, named)
        if tier is None:
            keep.append(item)
        else:
            drop.append(item)
            counts[tier] = counts.get(tier, 0) + 1
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    config.stash[_LEFT_OUT] = counts


def pytest_report_collectionfinish(config, start_path, items):
    counts = config.stash.get(_LEFT_OUT, {})
    if not counts:
        return None
    what = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    return (f"smccc-harness: left out {what} test(s) (harness/plugin/tiers.py); the CI suite is "
            "`./smccc-harness test` or `pytest -m 'not slow'`, one tier: `pytest -m infra|upstream|slow`")
