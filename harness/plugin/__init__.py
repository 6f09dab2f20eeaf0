"""pytest plugin (``-p harness.plugin``): this module only hands pytest the hooks and fixtures of its parts.

- harness/plugin/options.py   the options and the run's start-up
- harness/plugin/pool.py      GuestPool, the ``guest_pool`` / ``guest`` fixtures, capability skips, first-run progress
- harness/plugin/scanning.py  console scanning: every splat attributed to a test, fixture, teardown or the end
- harness/plugin/summary.py   the results table and the JUnit suite properties
- harness/plugin/keys.py      the stash keys they share
- harness/plugin/tiers.py     the infra/upstream/slow tiers (``-p harness.plugin.tiers``)

Outcome table (one place; the bisect command maps the same outcomes to exit codes):

| what happened                                   | pytest       | ``git bisect run`` |
|-------------------------------------------------|--------------|--------------------|
| assertions hold, console clean                  | passed       | 0 (good)           |
| assertion fails, or Oops/WARNING/BUG/panic/lockdep printed while the test ran | failed | 1 (bad) |
| the kernel crashed (a splat or panic on the console) in a fixture, a teardown or between tests | failed or error, naming where | 1 (bad) |
| the kernel printed a splat after the last test  | the session fails (exit 1) with the excerpt | 1 (bad) |
| kernel lacks a capability (/dev/kvm, KVM_CAP_ARM_EL2, filter) | skipped (reason names it) | 125 (skip; 0 with ``--skips-ok`` when the rest passed) |
| guest did not boot at all (panic at boot, no agent banner in time) | error | 125 (skip) |
| harness/infrastructure failure (QEMU missing, asset download) | error | 125 (skip) |
| no tests selected                                | exit 5       | 128 (abort)        |
"""

from .keys import POOL_KEY
from .options import pytest_addoption, pytest_configure
from .pool import GuestPool, guest, guest_pool, pytest_xdist_setupnodes, say_uncaptured
from .scanning import (
    ConsoleSplat,
    pytest_fixture_setup,
    pytest_runtest_call,
    pytest_runtest_makereport,
    pytest_runtest_setup,
    pytest_runtest_teardown,
)
from .summary import (
    format_table,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_sessionstart,
    pytest_terminal_summary,
)

__all__ = [
    "POOL_KEY", "ConsoleSplat", "GuestPool", "format_table", "guest", "guest_pool", "pytest_addoption",
    "pytest_configure", "pytest_fixture_setup", "pytest_runtest_call", "pytest_runtest_logreport",
    "pytest_runtest_makereport", "pytest_runtest_setup", "pytest_runtest_teardown", "pytest_sessionfinish",
    "pytest_sessionstart", "pytest_terminal_summary", "pytest_xdist_setupnodes", "say_uncaptured",
]
