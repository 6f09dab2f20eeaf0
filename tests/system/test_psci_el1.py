"""PSCI for multi-vCPU EL1 guests: the userspace emulator, checked against KVM's own PSCI.

Every program runs twice on the same kernel: once with no filter (KVM's in-kernel PSCI, psci.c,
docs/kvm-smccc-abi.md §2.3) and once with the PSCI ranges FWD_TO_USER (harness/guest/psci.py).  The guest's view
(return values x0..x3, which secondaries came up, with which x0 and at which EL, system events) must be
identical; a difference fails with both views side by side.  Behaviours: docs/kvm-smccc-abi.md §6 items 17–22.
"""

import pytest

from harness.guest import psci
from harness.images.payloads import get_payload
from harness.model import psci_program as pp
from harness.model.scenarios import PSCI_FWD, scenario

pytestmark = [pytest.mark.el1, pytest.mark.psci]
CONDUITS = [pytest.param("hvc", marks=pytest.mark.hvc), pytest.param("smc", marks=pytest.mark.smc)]
U64 = 0xFFFF_FFFF_FFFF_FFFF
CTX = 0xC0FFEE_0000_1234


@pytest.fixture(scope="module")
def smp():
    return get_payload("psci_smp")


def run_both(guest, payload, steps, *, secondary=pp.SEC_PARK, conduit="hvc", vcpus=2, name="psci"):
    """Run ``steps`` in-kernel and forwarded; return (kernel_view, user_view, kernel_result, user_result).

    Before any comparison it proves that the two runs are what they claim (:func:`assert_forwarded`): two
    in-kernel runs, or two forwarded ones, would compare equal and prove nothing.
    """
    minor = guest.caps["psci_version_raw"] & 0xFFFF
    params = pp.encode(steps, secondary, conduit)
    out = []
    for mode, filters in (("kernel", []), ("user", list(PSCI_FWD))):
        r = guest.run(scenario(f"{name}_{conduit}_{mode}", payload, filters=filters, vcpus=vcpus, params=params,
                               psci_minor=minor, deadline_s=30), payload=payload)
        out.append(r)
    assert_forwarded(out[0], out[1], steps)
    kv, uv = pp.guest_view(out[0], steps), pp.guest_view(out[1], steps)
    return kv, uv, out[0], out[1]


def boot_cpu_calls(result, steps) -> list[tuple[int, str]]:
    """The (function id, conduit) of every PSCI call the boot vCPU made, from its own records: a call step
    once, a poll step as many times as it called (record +0x20), and the step it was in when the run ended
    (a call that never returns: SYSTEM_OFF, SYSTEM_RESET...)."""
    recs = pp.decode(result.result_block, steps)["records"]
    out = []
    for i, s in enumerate(steps[:len(recs) + 1]):
        if s.op not in (pp.OP_HVC, pp.OP_SMC, pp.OP_POLL_HVC, pp.OP_POLL_SMC):
            continue
        conduit = "smc" if s.op in (pp.OP_SMC, pp.OP_POLL_SMC) else "hvc"
        out += [(s.x[0], conduit)] * (recs[i]["iters"] if i < len(recs) else 1)
    return out


def assert_forwarded(rk, ru, steps) -> None:
    """Both sides of a differential are what they claim.

    userspace run: every filter range installed (errno None), every PSCI call the boot vCPU made produced a
    KVM_EXIT_HYPERCALL on vCPU 0 (same function id and conduit, in order), and every exit, on any vCPU, was
    answered by the PSCI emulator (``by == "psci"``).  In-kernel run: no filter, no exit at all.
    """
    why = "\n--- in-kernel run ---\n" + rk.describe() + "\n--- userspace run ---\n" + ru.describe()
    assert rk.filters == [] and rk.hypercalls == [], "the in-kernel run exited to userspace:" + why
    assert len(ru.filters) == len(PSCI_FWD) and all(f["errno"] is None for f in ru.filters), \
        f"the userspace run's filter was not installed: {ru.filters}" + why
    assert all(h["by"] == "psci" for h in ru.hypercalls), "an exit not answered by the PSCI emulator:" + why
    made = boot_cpu_calls(ru, steps)
    assert made, "the program made no PSCI call: nothing to compare" + why
    exits = [(h["nr"], h["conduit"]) for h in ru.hypercalls if h["vcpu"] == 0]
    assert exits == made, f"boot vCPU calls {made} but exits {exits}:" + why


def assert_same(kv, uv, rk, ru):
    assert kv == uv, ("in-kernel and userspace PSCI differ:\n" + pp.side_by_side(kv, uv)
                      + "\n--- in-kernel run ---\n" + rk.describe() + "\n--- userspace run ---\n" + ru.describe())


def x0s(view):
    return [r["x0"] for r in view["records"]]


@pytest.mark.parametrize("conduit", CONDUITS)
def test_cpu_on_starts_secondary_at_entry_with_context_id(guest, smp, conduit):
    sec = smp.sym("secondary_entry")
    steps = [pp.call(conduit, psci.CPU_ON64, 1, sec, CTX, "CPU_ON64(1)"), pp.wait_secondary(1),
             pp.call(conduit, psci.AFFINITY_INFO64, 1, 0, label="AFFINITY_INFO64(1,0)")]
    kv, uv, rk, ru = run_both(guest, smp, steps, conduit=conduit)
    assert_same(kv, uv, rk, ru)
    assert x0s(uv) == [psci.SUCCESS, 1, psci.AFFINITY_ON], ru.describe()
    assert uv["secondaries"][1]["context_id"] == CTX and uv["secondaries"][1]["el"] == 1
    fwd = [h for h in ru.hypercalls if h["nr"] == psci.CPU_ON64]
    assert len(fwd) == 1 and fwd[0]["conduit"] == conduit and fwd[0]["args"][2] == sec, ru.describe()
    on = [e for e in ru.events if e["kind"] == "psci" and e["effect"] == "powered_on"]
    assert on and on[0]["vcpu"] == 1 and on[0]["entry"] == sec and on[0]["context_id"] == CTX, ru.describe()


@pytest.mark.parametrize("conduit", CONDUITS)
def test_cpu_on_errors_already_on_and_invalid_params(guest, smp, conduit):
    sec = smp.sym("secondary_entry")
    steps = [pp.call(conduit, psci.CPU_ON64, 1, sec, 1, "CPU_ON64(1)"), pp.wait_secondary(1),
             pp.call(conduit, psci.CPU_ON64, 1, sec, 2, "CPU_ON64(1) again"),
             pp.call(conduit, psci.CPU_ON64, 0, sec, 3, "CPU_ON64(self)"),
             pp.call(conduit, psci.CPU_ON64, 7, sec, 4, "CPU_ON64(no such cpu)"),
             pp.call(conduit, psci.CPU_ON64, 1 << 40, sec, 5, "CPU_ON64(bad mpidr bits)")]
    kv, uv, rk, ru = run_both(guest, smp, steps, conduit=conduit)
    assert_same(kv, uv, rk, ru)
    assert x0s(uv) == [0, 1, psci.ALREADY_ON & U64, psci.ALREADY_ON & U64, psci.INVALID_PARAMS & U64,
                       psci.INVALID_PARAMS & U64], pp.side_by_side(kv, uv)


@pytest.mark.parametrize("conduit", CONDUITS)
def test_affinity_info_levels_and_bad_affinity(guest, smp, conduit):
    steps = [pp.call(conduit, psci.AFFINITY_INFO64, t, lvl, label=f"AFFINITY_INFO64({t:#x},{lvl})")
             for t, lvl in ((0, 0), (1, 0), (2, 0), (0, 1), (0x100, 1), (0, 2), (0, 3), (0, 4), (1 << 40, 0))]
    kv, uv, rk, ru = run_both(guest, smp, steps, conduit=conduit)
    assert_same(kv, uv, rk, ru)
    ON, OFF, INV = psci.AFFINITY_ON, psci.AFFINITY_OFF, psci.INVALID_PARAMS & U64
    assert x0s(uv) == [ON, OFF, INV, ON, INV, ON, ON, INV, INV], pp.side_by_side(kv, uv)


@pytest.mark.parametrize("conduit", CONDUITS)
def test_cpu_off_does_not_return_and_affinity_becomes_off(guest, smp, conduit):
    sec = smp.sym("secondary_entry")
    steps = [pp.call(conduit, psci.CPU_ON64, 1, sec, 0x111, "CPU_ON64(1)"),
             pp.poll(conduit, psci.AFFINITY_INFO64, 1, 0, until=psci.AFFINITY_OFF, label="poll AFFINITY==OFF"),
             pp.call(conduit, psci.CPU_ON64, 1, sec, 0x222, "CPU_ON64(1) after off"),
             pp.wait_secondary(1, 2),
             pp.poll(conduit, psci.AFFINITY_INFO64, 1, 0, until=psci.AFFINITY_OFF, label="poll AFFINITY==OFF")]
    kv, uv, rk, ru = run_both(guest, smp, steps, secondary=pp.SEC_CPU_OFF, conduit=conduit)
    assert_same(kv, uv, rk, ru)
    assert x0s(uv) == [0, psci.AFFINITY_OFF, 0, 2, psci.AFFINITY_OFF], pp.side_by_side(kv, uv)
    s = uv["secondaries"][1]
    assert s["arrivals"] == 2 and s["context_id"] == 0x222 and s["cpu_off_returned"] == 0
    offs = [h for h in ru.hypercalls if h["nr"] == psci.CPU_OFF]
    assert [h["vcpu"] for h in offs] == [1, 1] and all(h["reply"] is None for h in offs), ru.describe()


@pytest.mark.parametrize("conduit", CONDUITS)
def test_cpu_on_32bit_narrows_its_arguments(guest, smp, conduit):
    sec = smp.sym("secondary_entry")
    steps = [pp.call(conduit, psci.CPU_ON, 0xFFFF_FFFF_0000_0001, (0xABCD << 32) | sec, 0x1234_5678_9ABC_DEF0,
                     "CPU_ON(1) high bits set"), pp.wait_secondary(1)]
    kv, uv, rk, ru = run_both(guest, smp, steps, conduit=conduit)
    assert_same(kv, uv, rk, ru)
    assert x0s(uv)[0] == psci.SUCCESS and uv["secondaries"][1]["context_id"] == 0x9ABC_DEF0


@pytest.mark.parametrize("conduit", CONDUITS)
@pytest.mark.parametrize("width", ["32", "64"])
def test_psci_features_table_matches_kvm(guest, smp, conduit, width):
    base = 0x8400_0000 if width == "32" else 0xC400_0000
    fids = [base | n for n in range(0x20)] + ([0x8000_0000] if width == "32" else [])
    steps = [pp.call(conduit, psci.PSCI_FEATURES, f, label=f"FEATURES({psci.name(f)})") for f in fids]
    kv, uv, rk, ru = run_both(guest, smp, steps, conduit=conduit, vcpus=1)
    assert_same(kv, uv, rk, ru)
    # KVM does not implement MIGRATE (psci.c kvm_psci_1_x_call: not in the PSCI_FEATURES switch): NOT_SUPPORTED
    migrate = [r for s, r in zip(steps, uv["records"], strict=True) if s.x[1] in (psci.MIGRATE, psci.MIGRATE64)]
    assert [r["x0"] for r in migrate] == [psci.NOT_SUPPORTED & U64], pp.side_by_side(kv, uv)


@pytest.mark.parametrize("conduit", CONDUITS)
def test_version_migrate_and_unknown_ids(guest, smp, conduit):
    steps = [pp.call(conduit, f, label=psci.name(f)) for f in (
        psci.PSCI_VERSION, psci.MIGRATE_INFO_TYPE, psci.MIGRATE, psci.MIGRATE64, psci.MIGRATE_INFO_UP_CPU,
        psci.MIGRATE_INFO_UP_CPU64, 0x8400_001F, 0xC400_001F, 0x8400_000B)]
    kv, uv, rk, ru = run_both(guest, smp, steps, conduit=conduit, vcpus=1)
    assert_same(kv, uv, rk, ru)
    NS = psci.NOT_SUPPORTED & U64
    assert x0s(uv) == [guest.caps["psci_version_raw"], psci.TOS_MP, NS, NS, NS, NS, NS, NS, NS]
    assert all(h["conduit"] == conduit for h in ru.hypercalls) and len(ru.hypercalls) == len(steps)


SYSTEM_CASES = [
    pytest.param([(psci.SYSTEM_OFF, 0, 0)], "SHUTDOWN", 0, id="system_off"),
    pytest.param([(psci.SYSTEM_RESET, 0, 0)], "RESET", 0, id="system_reset"),
    pytest.param([(psci.SYSTEM_RESET2, 1, 0), (psci.SYSTEM_RESET2, 0, 0)], "RESET", 1, id="system_reset2"),
    pytest.param([(psci.SYSTEM_RESET2_64, 0x8000_0001, 0)], "RESET", 1, id="system_reset2_vendor"),
    pytest.param([(psci.SYSTEM_OFF2_64, 1, 1), (psci.SYSTEM_OFF2_64, 1, 0)], "SHUTDOWN", 1, id="system_off2"),
]


@pytest.mark.parametrize("conduit", CONDUITS)
@pytest.mark.parametrize("calls,event,flag", SYSTEM_CASES)
def test_system_calls_end_the_vm_with_the_same_event(guest, smp, conduit, calls, event, flag):
    minor = guest.caps["psci_version_raw"] & 0xFFFF
    need = 3 if calls[0][0] in (psci.SYSTEM_OFF2, psci.SYSTEM_OFF2_64) else 1 if calls[0][0] in (
        psci.SYSTEM_RESET2, psci.SYSTEM_RESET2_64) else 0
    if minor < need:
        pytest.skip(f"kernel {guest.caps['uname']}: PSCI 1.{minor}; {psci.name(calls[0][0])} needs PSCI 1.{need}")
    steps = [pp.call(conduit, f, a1, a2, label=f"{psci.name(f)}({a1:#x},{a2:#x})") for f, a1, a2 in calls]
    kv, uv, rk, ru = run_both(guest, smp, steps, conduit=conduit, vcpus=1)
    assert_same(kv, uv, rk, ru)
    assert uv["outcome"] == "system_event" and uv["system_events"] == [(event, [flag])], pp.side_by_side(kv, uv)
    assert all(r["x0"] == psci.INVALID_PARAMS & U64 for r in uv["records"]), "the invalid calls must return"


def test_psci_0_1_vcpu_still_forwards_0_2_ids(guest, smp):
    """Without KVM_ARM_VCPU_PSCI_0_2 KVM answers 0.2 ids NOT_SUPPORTED, but a FWD range still forwards them."""
    steps = [pp.call("hvc", psci.PSCI_VERSION, label="PSCI_VERSION")]
    params = pp.encode(steps)
    rk = guest.run(scenario("psci01_kernel", smp, vcpus=1, params=params, psci_0_2=False), payload=smp)
    ru = guest.run(scenario("psci01_fwd", smp, vcpus=1, params=params, psci_0_2=False, filters=PSCI_FWD,
                            psci_minor=guest.caps["psci_version_raw"] & 0xFFFF), payload=smp)
    assert_forwarded(rk, ru, steps)
    assert x0s(pp.guest_view(rk, steps)) == [psci.NOT_SUPPORTED & U64], rk.describe()
    assert x0s(pp.guest_view(ru, steps)) == [guest.caps["psci_version_raw"]], ru.describe()


SEED = [0x5EED_0000 | n for n in range(4, 16)]   # what firmware/psci_smp.S puts in x4..x15 before every call


def test_cpu_suspend_returns_success_with_registers_preserved(guest, smp):
    """Forwarded CPU_SUSPEND (standby): SUCCESS in x0, x1..x3 as the handler wrote them, x4..x15 preserved.

    (Not differential: in-kernel CPU_SUSPEND is a WFI that waits for an interrupt this payload never arms,
    psci.c kvm_psci_vcpu_suspend.)  The payload seeds x4..x15 before the call (SEED); after the call it only
    stores x0..x3 and writes DONE (which clobbers x16/x17), so the vCPU's final x4..x15 are what KVM and the
    emulator left there: SMCCC (DEN0028, "Register use in AArch64 SMC and HVC calls") makes them callee-saved.
    """
    steps = [pp.call("hvc", psci.CPU_SUSPEND64, 0, 0x1234, 0x5678, "CPU_SUSPEND64")]
    r = guest.run(scenario("cpu_suspend_fwd", smp, vcpus=1, params=pp.encode(steps), filters=PSCI_FWD),
                  payload=smp)
    assert r.outcome == "done", r.describe()
    assert [e["effect"] for e in r.events if e["kind"] == "psci"] == ["suspend"], r.describe()
    (h,) = r.hypercalls
    assert (h["nr"], h["by"], h["args"][1:4]) == (psci.CPU_SUSPEND64, "psci", [0, 0x1234, 0x5678]), r.describe()
    assert h["args"][4:16] == SEED, f"the guest did not pass the seed in x4..x15: {r.describe()}"
    rec = pp.decode(r.result_block, steps)["records"][0]
    assert rec["x0"] == psci.SUCCESS, r.describe()
    assert [rec["x0"], rec["x1"], rec["x2"], rec["x3"]] == h["reply"], "x0..x3 are not what the handler wrote"
    final = r.vcpus[0]["x"]
    assert final[4:16] == SEED, ("x4..x15 changed across the forwarded CPU_SUSPEND:\n"
                                 + "\n".join(f"x{n}: {SEED[n - 4]:#x} -> {final[n]:#x}" for n in range(4, 16)
                                             if final[n] != SEED[n - 4]))


@pytest.mark.parametrize("conduit", CONDUITS)
@pytest.mark.parametrize("mode", ["kernel", "user"])
def test_racing_cpu_on_gives_exactly_one_success(guest, smp, conduit, mode):
    """kvm-unit-tests arm/psci.c cpu-on: two vCPUs race CPU_ON(cpu1); one SUCCESS, the other ALREADY_ON.

    Not compared run-to-run (the winner is timing); each mode must satisfy the rule on its own.
    """
    sec = smp.sym("secondary_entry")
    steps = [pp.call(conduit, psci.CPU_ON64, 2, sec, 0x2, "CPU_ON64(2)"), pp.wait_secondary(2),
             pp.call(conduit, psci.CPU_ON64, 1, sec, 0x1, "CPU_ON64(1) racing cpu2"),
             pp.wait_action(2), pp.wait_secondary(1)]
    params = pp.encode(steps, pp.SEC_CPU_ON_OTHER, conduit, target_mpidr=1)
    r = guest.run(scenario(f"race_{conduit}_{mode}", smp, vcpus=3, params=params,
                           filters=PSCI_FWD if mode == "user" else [], deadline_s=30), payload=smp)
    v = pp.guest_view(r, steps)
    assert r.outcome == "done", r.describe()
    if mode == "kernel":
        assert r.filters == [] and r.hypercalls == [], r.describe()
    else:
        assert r.filters and all(f["errno"] is None for f in r.filters), r.describe()
        assert r.hypercalls and all(h["by"] == "psci" for h in r.hypercalls), r.describe()
    boot_x0 = v["records"][2]["x0"]
    cpu2_x0 = v["secondaries"][2]["cpu_off_returned"]
    assert sorted([boot_x0, cpu2_x0]) == sorted([psci.SUCCESS, psci.ALREADY_ON & U64]), r.describe()
    assert v["secondaries"][1]["arrivals"] == 1, "cpu1 must be started exactly once"
    if mode == "user":      # concurrent exits on different vCPUs each carry their own nr and conduit (§6.16)
        seen = {(h["vcpu"], h["nr"], h["conduit"]) for h in r.hypercalls}
        assert {(0, psci.CPU_ON64, conduit), (2, psci.CPU_ON64, conduit)} <= seen, r.describe()
