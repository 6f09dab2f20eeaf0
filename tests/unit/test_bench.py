"""bench.run without QEMU: a warm start that restored nothing is reported, not a crash."""

import pytest

from bench import run as bench

# GuestSession.timings after harness.machine.snapshot.warm_start ...
RESTORED = {"snapshot": "k", "qemu_to_qmp_s": 0.11, "load_s": 0.08, "cont_to_ping_s": 0.05, "boot_s": 0.24,
            "ready_s": 0.24, "snapshot_created": False, "warm_start_s": 0.3}
CREATED = {"boot_s": 4.4, "ready_s": 4.6, "snapshot": "k", "snapshot_created": True, "warm_start_s": 5.1}
FALLBACK = {"boot_s": 4.5, "ready_s": 4.7,
            "snapshot_fallback": "DeadTimerSnapshot: snapshot k: the restored guest's timer interrupt is dead"}


class FakeSession:
    def __init__(self, timings):
        self.timings = dict(timings)

    def start(self):
        return self

    def run(self, spec, payload=None):
        return type("R", (), {"outcome": "done", "describe": lambda self: "done"})()

    def close(self):
        pass


class FakeAssets:
    def __init__(self, *timings):
        self.timings = list(timings)

    def session(self, prefix, *, snapshots, smp=1):
        return FakeSession(self.timings.pop(0))


@pytest.fixture(autouse=True)
def no_payloads(monkeypatch):
    monkeypatch.setattr(bench, "scenarios", lambda: [("fake", "EL1", {}, None)])


@pytest.mark.parametrize("timings", [CREATED, FALLBACK])
def test_warm_phases_of_a_start_that_restored_nothing(timings):
    r = bench.warm_phases(FakeAssets(timings))
    assert r["qmp"] is None and r["loaded"] is None and r["agent_ready"] >= 0
    assert (r["created"], r["fallback"]) == ((True, None) if timings is CREATED else (False, FALLBACK["snapshot_fallback"]))


def test_warm_phases_of_a_restore():
    r = bench.warm_phases(FakeAssets(RESTORED))
    assert r["qmp"] == 0.11 and r["loaded"] == pytest.approx(0.19) and not r["created"] and r["fallback"] is None


def test_section_warm_reports_the_fallback_instead_of_crashing(capsys):
    results = {}
    bench.section_warm(FakeAssets(CREATED, FALLBACK, FALLBACK), 2, results)
    text = capsys.readouterr().out
    assert "snapshot built first" in text
    assert text.count("warm: no snapshot, fell back to cold boot (DeadTimerSnapshot: ") == 2
    assert "no snapshot restored in 2 runs" in text and len(results["warm"]) == 2


def test_section_warm_medians_only_over_restores(capsys):
    bench.section_warm(FakeAssets(RESTORED, RESTORED, FALLBACK, RESTORED), 3, {})
    text = capsys.readouterr().out
    median = next(ln for ln in text.splitlines() if ln.strip().startswith("median"))
    assert median.split()[1:3] == ["0.110", "0.190"] and "(2 of 3 runs restored)" in median
    assert "fell back to cold boot" in text
