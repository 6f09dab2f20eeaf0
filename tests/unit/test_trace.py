"""Parsing a recorded handler trace (tests/unit/data/traces: a real run of firmware/psci_version.S)."""

from pathlib import Path

import pytest

from harness.errors import GuestError
from harness.images.payloads import get_payload
from harness.model.results import ScenarioResult

DATA = Path(__file__).parent / "data" / "traces"


@pytest.fixture
def result():
    return ScenarioResult.from_trace_file(DATA / "psci_version_fwd.jsonl", payload=get_payload("psci_version"))


def test_trace_has_one_exit_per_conduit(result):
    assert [(h["conduit"], h["flags"], h["nr"]) for h in result.hypercalls] == [("hvc", 0, 0x84000000),
                                                                                 ("smc", 1, 0x84000000)]


def test_reports_and_summary_are_parsed(result):
    assert result.reports == {0: 0x10001, 1: 0x10001}
    assert result.outcome == "done"


def test_format_trace_names_pcs_with_payload_symbols(result):
    text = result.format_trace()
    assert "pc=hvc_insn+0x4" in text and "pc=smc_insn+0x4" in text
    assert "nr=0x84000000" in text and "reply=0x10001" in text


def test_a_corrupt_trace_line_names_the_file_and_line(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"kind": "report", "slot": 0, "value": 1, "t": 0}\n{not json\n')
    with pytest.raises(GuestError, match=r"t.jsonl:2"):
        ScenarioResult.from_trace_file(bad)


def test_concurrent_records_are_in_time_order(tmp_path, monkeypatch):
    """vCPU threads record concurrently: the times must not go backwards in record (and file) order.  The
    clock yields right after it is read, so a time read outside the trace lock would be overtaken."""
    import itertools
    import json
    import threading
    import time as real_time
    import types

    from harness.guest import trace as trace_mod

    def monotonic():
        t = real_time.monotonic()
        real_time.sleep(0)          # let another vCPU thread run between reading the clock and recording
        return t

    monkeypatch.setattr(trace_mod, "time", types.SimpleNamespace(monotonic=monotonic))
    tr = trace_mod.Trace(str(tmp_path / "trace.jsonl"))
    start = threading.Barrier(8)

    def vcpu(i):
        start.wait()
        for n in range(300):
            tr.add("hypercall", vcpu=i, nr=n)

    threads = [threading.Thread(target=vcpu, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tr.close()
    times = [r["t"] for r in tr.records]
    assert len(times) == 8 * 300
    backwards = [(i, a, b) for i, (a, b) in enumerate(itertools.pairwise(times)) if b < a]
    assert not backwards, f"{len(backwards)} records earlier than the one before them, e.g. {backwards[:3]}"
    in_file = [json.loads(ln)["t"] for ln in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert in_file == times
