"""VMM-side save/restore of a paused guest, SMCCC filter included (docs/vmm-save-restore.md).

The seed thread's question "how do we migrate VMs that have these forwarding requirements": the filter is
write-only and frozen after the first KVM_RUN (docs/kvm-smccc-abi.md §1.1, §5), so the VMM replays the ranges it
remembers into the fresh VM before its first run.  The handler stops every vCPU after the N-th forwarded
call, saves registers (KVM_GET_REG_LIST), memory, mp_state, PSCI power state and the filter, restores all of
it into a new VM and continues there.
"""

import pytest

from harness.guest import psci
from harness.images.payloads import get_payload
from harness.model import psci_program as pp
from harness.model.payload_abi import decode_call_results, encode_call_table
from harness.model.scenarios import PSCI_FWD, fwd, scenario

pytestmark = [pytest.mark.el1, pytest.mark.filter]
SIP = 0xC200_0042
U64 = 0xFFFF_FFFF_FFFF_FFFF


@pytest.fixture(scope="module")
def calls():
    return get_payload("smccc_calls")


def three_calls(guest, calls, name, **kw):
    table = [("hvc", [SIP, 1]), ("smc", [SIP, 2] + [0x4400 + n for n in range(2, 18)]), ("hvc", [SIP, 3])]
    r = guest.run(scenario(name, calls, params=encode_call_table(table), filters=[fwd(SIP)],
                           replies={SIP: [0x600D, 0x11, 0x22, 0x33]}, **kw), payload=calls)
    assert r.outcome == "done", r.describe()
    return r, decode_call_results(r.result_block, 3)


@pytest.mark.hvc
@pytest.mark.smc
def test_forwarded_calls_keep_working_after_restore(guest, calls):
    r, rec = three_calls(guest, calls, "migrate_replay", migrate={"after_hypercalls": 1})
    m = r.migrations
    assert len(m) == 1 and m[0]["filter_replayed"] == 1, r.describe()
    assert [h["args"][1] for h in r.hypercalls] == [1, 2, 3], r.describe()
    assert [x["ret"] for x in rec] == [[0x600D, 0x11, 0x22, 0x33]] * 3
    assert rec[1]["regs"][4:18] == [0x4400 + n for n in range(4, 18)], "x4..x17 must survive the restore"
    assert rec[2]["regs"][18:31] == [(2 << 16) | 0x1800 | n for n in range(18, 31)]


@pytest.mark.hvc
@pytest.mark.smc
def test_without_replay_the_restored_vm_answers_in_kernel(guest, calls):
    """Forgetting to replay the write-only filter silently changes behaviour: the guest gets NOT_SUPPORTED."""
    r, rec = three_calls(guest, calls, "migrate_noreplay", migrate={"after_hypercalls": 1, "replay_filter": False})
    assert [h["args"][1] for h in r.hypercalls] == [1], r.describe()
    assert [x["ret"][0] for x in rec] == [0x600D, U64, U64]


@pytest.mark.hvc
def test_replaying_the_filter_after_the_first_run_is_ebusy(guest, calls):
    r, _ = three_calls(guest, calls, "migrate_late", migrate={"after_hypercalls": 1}, late_filters=[fwd(SIP)])
    assert [f["errno"] for f in r.late_filters] == ["EBUSY"], r.describe()


@pytest.mark.hvc
@pytest.mark.psci
def test_psci_power_state_survives_restore(guest):
    smp = get_payload("psci_smp")
    sec = smp.sym("secondary_entry")
    steps = [pp.call("hvc", psci.CPU_ON64, 1, sec, 0xAB, "CPU_ON64(1)"), pp.wait_secondary(1),
             pp.call("hvc", psci.AFFINITY_INFO64, 1, 0, label="AFFINITY_INFO64(1)"),
             pp.call("hvc", psci.CPU_ON64, 1, sec, 0xCD, "CPU_ON64(1) again")]
    r = guest.run(scenario("migrate_psci", smp, vcpus=2, filters=PSCI_FWD, params=pp.encode(steps),
                           migrate={"after_hypercalls": 1}), payload=smp)
    view = pp.guest_view(r, steps)
    assert r.migrations and r.outcome == "done", r.describe()
    assert [x["x0"] for x in view["records"]] == [0, 1, psci.AFFINITY_ON, psci.ALREADY_ON & U64], r.describe()
    assert view["secondaries"][1]["context_id"] == 0xAB
