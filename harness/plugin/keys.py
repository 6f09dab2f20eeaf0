"""The plugin's shared state: the stash keys its parts read and write (one definition, no cycle between the
parts)."""

from __future__ import annotations

import pytest

POOL_KEY = pytest.StashKey["GuestPool"]()      # config.stash: the process's GuestPool (harness/plugin/pool.py)
ROWS_KEY = pytest.StashKey[list]()             # config.stash: results-table rows (harness/plugin/summary.py)
MARK_KEY = pytest.StashKey[tuple]()            # item.stash: (guest, console mark) for the test's console slice
AFTER_LAST_KEY = pytest.StashKey[list]()       # config.stash: splats printed after the last test
