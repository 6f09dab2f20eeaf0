"""A structured trace of one scenario: one JSON-serialisable record per exit or emulator action.

Record kinds (every record has ``t`` = seconds since the scenario started, read under the trace lock so that
times never go backwards in record order across vCPU threads, ``kind`` and, when it concerns
one vCPU, ``vcpu``):

* ``hypercall``: ``nr``, ``flags``, ``conduit`` ("hvc"|"smc"), ``pc``, ``pstate``, ``el``, ``args`` (x0..x17),
  ``reply`` (the x0.. written back, or null), ``by`` ("psci" | "reply" | "none")
* ``mmio``: ``addr``, ``len``, ``is_write``, ``data`` (int)      ``report``: ``slot``, ``value``
* ``done``: ``code``                                          ``system_event``: ``type``, ``name``, ``data``
* ``psci``: ``effect`` and its fields (cpu_on target/entry/context_id, cpu_off, suspend)
* ``deadline``: ``pc``, ``pstate``    ``error``: ``message``    ``exit``: any other exit reason, raw
"""

from __future__ import annotations

import collections
import json
import threading
import time


class Trace:
    """``limit``: keep at most this many records in ``records`` (None: all); later ones only count in
    ``dropped`` and the last ``tail_len`` of them stay in ``tail`` (an exit storm must not exhaust the
    guest's memory or the channel)."""

    def __init__(self, path: str | None = None, limit: int | None = None, tail_len: int = 32):
        self.t0 = time.monotonic()
        self.records: list[dict] = []
        self.limit = limit
        self.dropped = 0
        self.tail: collections.deque = collections.deque(maxlen=tail_len)
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - lives as long as the trace

    def add(self, kind: str, vcpu: int | None = None, **fields) -> dict:
        rec = {"t": 0.0, "kind": kind}
        if vcpu is not None:
            rec["vcpu"] = vcpu
        rec.update(fields)
        with self._lock:
            # read the clock under the lock: records of concurrent vCPU threads are in time order
            rec["t"] = round(time.monotonic() - self.t0, 6)
            if self.limit is not None and len(self.records) >= self.limit:
                self.dropped += 1
                self.tail.append(rec)
                return rec
            self.records.append(rec)
            if self._file:
                self._file.write(json.dumps(rec, sort_keys=True) + "\n")
        return rec

    def export(self) -> list[dict]:
        """``records``, then (if any were dropped) a ``trace_truncated`` record and the last ones."""
        if not self.dropped:
            return list(self.records)
        marker = {"t": self.tail[0]["t"] if self.tail else 0.0, "kind": "trace_truncated",
                  "dropped": self.dropped, "kept_tail": len(self.tail)}
        return list(self.records) + [marker] + list(self.tail)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
