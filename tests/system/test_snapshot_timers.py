"""Snapshots and the guest's timer interrupt, with real QEMU (harness/machine/snapshot.py DeadTimerSnapshot).

A snapshot is kept only once a restore of it had a live tick on every vCPU (check_save, save_until_live), and
such a snapshot restores live.  The reproducer (snapshot.timer_gap_round) saves a guest with every vCPU's tick
armed into the future (two spinners per vCPU), stalls QEMU right after cont so the deadline passes first, and
checks that every vCPU was still preempted: what a QEMU that re-arms the EL2 timers after a migration
(``smccc-fix:el2-timers`` in ``--version``, snapshot_store.QEMU_FIXES) must do.  Timing is measured by
bench/snapshot_tries.py, never asserted here.
"""

import dataclasses

import pytest

from harness import paths
from harness.machine import snapshot, snapshot_store
from harness.machine.guests import new_session

pytestmark = pytest.mark.infra  # the harness's own plumbing (harness/plugin/tiers.py)


def _require_snapshots(config):
    if config.getoption("--no-snapshot"):
        pytest.skip("snapshots are disabled (--no-snapshot or SMCCC_NO_SNAPSHOT=1)")


def _sessions(guest_pool, n, **over):
    guest_pool.resolve_assets()
    opts = dataclasses.replace(guest_pool.options, **over)
    return [new_session(opts, paths.new_run_dir("guest"), assets=guest_pool.guest_assets) for _ in range(n)]


def test_a_fresh_validated_snapshot_restores_live_on_every_vcpu(guest_pool, tmp_path, request):
    """Into an empty store, a 2-vCPU guest: the cold boot is saved, the save checked (meta.json records the
    tries; only the last one restored live) and the next start restores it with both vCPUs ticking."""
    _require_snapshots(request.config)
    store = snapshot_store.SnapshotStore(tmp_path / "snapshots")
    first, second = _sessions(guest_pool, 2, snapshots=True, smp=2)
    try:
        first.start(store)
        assert first.timings.get("snapshot_created") is True, first.timings
        snap = store.lookup(first.timings["snapshot"])
        meta = snap.meta()
        tries = meta["tries"]
        assert meta["save_tries"] == len(tries) == first.timings["snapshot_save_tries"], meta
        assert 1 <= len(tries) <= snapshot.SAVE_TRIES and tries[-1]["live"], tries
        assert not any(t["live"] for t in tries[:-1]), tries
        assert tries[-1]["check"]["probe_cpus"] == 2, tries[-1]
        assert first.request("ping")["pong"] is True, "the saved guest goes on serving"
        second.start(store)
        assert (second.timings.get("snapshot"), second.timings.get("snapshot_created")) == (snap.key, False), \
            second.timings
        assert not second.timings.get("snapshot_fallback"), second.timings
        assert second.timings["probe_cpus"] == 2, second.timings
        probe = second.request("timer_probe", {"sleep_s": 0.02, "wait_s": 2.0}, 10.0)
        assert probe["dead"] == [] and set(probe["cpus"]) == {"0", "1"}, probe
    finally:
        first.close()
        second.close()


def test_every_vcpus_timer_armed_at_a_save_fires_after_the_restore(guest_pool, tmp_path, request):
    """The reproducer, one round on a 2-vCPU guest: after the restore, every spinner got its vCPU back within
    a time slice (the tick preempted the other), and the timer probe finds every vCPU live.

    On a QEMU without the fix this may fail (the QEMU bug): on stock QEMU 10.0.2 a round was dead 2 times in
    10 (bench/README.md), so the xfail there is not strict.  A QEMU with the fix must pass."""
    _require_snapshots(request.config)
    (s,) = _sessions(guest_pool, 1, snapshots=False, smp=2)
    if not snapshot_store.qemu_has_fix(s.config.qemu_bin, snapshot_store.EL2_TIMER_FIX):
        request.applymarker(pytest.mark.xfail(
            strict=False, raises=AssertionError,
            reason=f"{snapshot_store.qemu_version(s.config.qemu_bin)} has no "
                   f"{snapshot_store.QEMU_FIXES[snapshot_store.EL2_TIMER_FIX]!r}: vmstate_arm_cpu does not "
                   "carry the EL2 timers (target/arm/machine.c), a restored tick can be dead"))
    dest = tmp_path / "state"
    dest.mkdir()
    try:
        s.start()
        r = snapshot.timer_gap_round(s, dest, s.run_dir / "reproducer")
    finally:
        s.close()
    assert r["cpus"] == [0, 1], r
    assert set(r["max_gap_s"]) == {"0.0", "0.1", "1.0", "1.1"}, r
    assert r["fired"], f"a spinner waited longer than {snapshot.GAP_LATE_S} s for its vCPU: no tick: {r}"
    assert r["probe"] == "live", r
