"""Guests restored from the cached snapshot of a booted guest (harness.machine.snapshot) are real, working guests.

ABI under test, through a restored guest: docs/kvm-smccc-abi.md §1.2 (KVM_EXIT_HYPERCALL: nr = function id,
flags bit 0 = SMC, the x0 the VMM writes is what the guest sees) at EL1, and §1.3/§2.2 at vEL2 (a HAS_EL2
vCPU's SMC #0 goes through the filter and exits with PSTATE EL2h).  The snapshot itself: a restored guest
answers on a new host socket (the agent's hello was consumed before the save), and each restore starts from
the saved state, not from another restored guest's (the agent's nested-VM GRAVEYARD is empty).
Timing is measured by bench/, never asserted here.
"""

import dataclasses

import pytest

from harness import paths
from harness.errors import GuestError
from harness.guest import kvm
from harness.images.payloads import get_payload
from harness.machine import snapshot_store
from harness.machine.guests import new_session
from harness.model import payload_abi as abi
from harness.model.scenarios import PSCI_FWD, scenario

pytestmark = pytest.mark.infra  # the harness's own plumbing (harness/plugin/tiers.py)

PSCI_VERSION = 0x8400_0000
HANDLER_MARK = 0x5EED_0002        # what the Python handler answers to PSCI_VERSION: KVM never says this
MODE_MASK, MODE_EL2H = 0xF, 0x9


def _require_snapshots(config):
    if config.getoption("--no-snapshot"):
        pytest.skip("snapshots are disabled (--no-snapshot or SMCCC_NO_SNAPSHOT=1)")


DEAD_TIMER_TRIES = 2    # every kept snapshot restored live once when it was saved: a dead restore is rare


def _restored(pool):
    """A guest restored from a snapshot.  A snapshot whose restored timer is dead (harness/machine/snapshot.py
    discards it and the guest boots cold; rare, since every kept snapshot passed a restore when it was saved)
    is replaced by a new one, up to DEAD_TIMER_TRIES times; all dead is an xfail naming the QEMU bug.  Any
    other fallback fails."""
    dead = []
    for _ in range(DEAD_TIMER_TRIES):
        s = pool.spawn(snapshots=True)
        if s.timings.get("snapshot_created"):   # a cache miss: cold-booted and saved; restore the next
            s.close()
            s = pool.spawn(snapshots=True)
        fallback = str(s.timings.get("snapshot_fallback", ""))
        if "DeadTimerSnapshot" in fallback:
            dead.append(fallback)
            s.close()
            continue
        assert not fallback, f"the restore fell back to a cold boot: {s.timings}"
        assert s.timings.get("snapshot") and s.timings.get("snapshot_created") is False, s.timings
        return s
    pytest.xfail(f"QEMU restored {len(dead)} validated snapshots in a row with a dead timer (its vmstate does not "
                 "carry the EL2 timers, bench/README.md); each was discarded")


@pytest.fixture(scope="module")
def restored(guest_pool, request):
    """One guest restored from the snapshot, shared by this module's scenario tests."""
    _require_snapshots(request.config)
    s = _restored(guest_pool)
    yield s
    s.close()


def _need(caps, *names):
    for n in names:
        if not caps.get(n):
            pytest.skip(f"kernel {caps.get('uname')}: {n} is {caps.get(n)!r} "
                        f"({caps.get('reason') or caps.get('kvm_mode') or 'see the boot console'})")


@pytest.mark.el1
@pytest.mark.psci
@pytest.mark.hvc
@pytest.mark.smc
def test_restored_guest_forwards_el1_psci_version_and_returns_the_handler_x0(restored):
    _need(restored.caps, "kvm", "smccc_filter")
    p = get_payload("psci_version")
    r = restored.run(scenario("snapshot_el1_psci_version", p, filters=PSCI_FWD,
                              replies={PSCI_VERSION: [HANDLER_MARK]}), payload=p)
    assert r.outcome == "done", r.describe()
    assert [(h["conduit"], h["nr"]) for h in r.hypercalls] == [("hvc", PSCI_VERSION), ("smc", PSCI_VERSION)], \
        r.describe()
    assert r.reports == {0: HANDLER_MARK, 1: HANDLER_MARK}, r.describe()


@pytest.mark.el2
@pytest.mark.psci
@pytest.mark.smc
def test_restored_guest_forwards_an_smc_from_vel2(restored):
    _need(restored.caps, "kvm", "smccc_filter", "KVM_CAP_ARM_EL2")
    p = get_payload("smccc_calls")
    calls = [("smc", [PSCI_VERSION, 0x1111, 0x2222, 0x3333])]
    r = restored.run(scenario("snapshot_el2_smc", p, filters=PSCI_FWD, el2=True,
                              replies={PSCI_VERSION: [HANDLER_MARK, 0xA1, 0xA2, 0xA3]},
                              params=abi.encode_call_table(calls)), payload=p)
    assert r.outcome == "done", r.describe()
    assert len(r.hypercalls) == 1, r.describe()
    h = r.hypercalls[0]
    assert (h["nr"], h["flags"]) == (PSCI_VERSION, kvm.KVM_HYPERCALL_EXIT_SMC), r.describe()
    assert h["pstate"] & MODE_MASK == MODE_EL2H, r.describe()
    ret = abi.decode_call_results(r.result_block, 1)[0]["ret"]
    assert ret == [HANDLER_MARK, 0xA1, 0xA2, 0xA3], r.describe()


def test_restored_console_log_names_the_snapshot(restored):
    text = restored.console_log.read_text()
    assert f"restored from snapshot {restored.timings['snapshot']}" in text.splitlines()[0]


@pytest.mark.el2
def test_a_second_restore_has_no_state_from_the_first(guest_pool, request):
    """A nested VM is never destroyed (it stays in the agent's GRAVEYARD); a second restore of the same
    snapshot is the same saved agent process (same pid) with an empty graveyard."""
    _require_snapshots(request.config)
    first = _restored(guest_pool)
    try:
        _need(first.caps, "kvm", "KVM_CAP_ARM_EL2")
        p = get_payload("el2_hello")
        r = first.run(scenario("snapshot_el2_hello", p, el2=True), payload=p)
        assert r.outcome == "done", r.describe()
        before = first.request("stats")
        assert before["graveyard_vms"] >= 1, before
    finally:
        first.close()
    second = _restored(guest_pool)
    try:
        after = second.request("stats")
        assert after["pid"] == before["pid"], (before, after)
        assert after["graveyard_vms"] == 0, after
    finally:
        second.close()


def test_pool_replaces_a_dead_guest_with_a_fresh_restore(guest_pool, request):
    _require_snapshots(request.config)
    old = guest_pool.get()
    old.machine.stop()              # QEMU gone, as after a guest crash
    with pytest.raises(GuestError, match="the guest died between tests") as ei:
        guest_pool.get()            # never a silent replacement: the death is the caller's error first
    assert ei.value.guest_died
    new = guest_pool.get()
    assert new is not old and new.alive()
    fallback = str(new.timings.get("snapshot_fallback", ""))
    # a restore, or (the QEMU EL2-timer gap) a dead-timer snapshot discarded and a cold boot in its place
    assert new.timings.get("snapshot") or "DeadTimerSnapshot" in fallback, new.timings
    assert new.request("ping")["pong"] is True


@pytest.mark.slow     # one cold boot (~5 s, more on a busy host); the pool takes this path on every cache miss
def test_a_cache_miss_boots_saves_and_keeps_the_guest_then_the_next_start_restores_it(guest_pool, tmp_path):
    """Into an empty store: the session boots cold, is saved (the save checked by a restore, retaken while that
    restore's tick is dead: meta.json counts the tries) and goes on serving; the next one restores it."""
    guest_pool.resolve_assets()
    opts = dataclasses.replace(guest_pool.options, snapshots=True)
    store = snapshot_store.SnapshotStore(tmp_path / "snapshots")
    sessions = [new_session(opts, paths.new_run_dir("guest"), assets=guest_pool.guest_assets) for _ in range(2)]
    try:
        first = sessions[0].start(store)
        assert first.timings.get("snapshot_created") is True, first.timings
        assert first.request("ping")["pong"] is True
        key = first.timings["snapshot"]
        snap = store.lookup(key)
        assert snap is not None
        assert {"state.ram", "meta.json", "boot-console.log", "stub-kernel"} <= {p.name for p in snap.path.iterdir()}
        assert snap.meta()["save_tries"] == first.timings["snapshot_save_tries"] >= 1, snap.meta()
        second = sessions[1].start(store)
        assert (second.timings.get("snapshot"), second.timings.get("snapshot_created")) == (key, False), \
            second.timings
        assert second.request("stats")["pid"] == first.request("stats")["pid"]
    finally:
        for s in sessions:
            s.close()
