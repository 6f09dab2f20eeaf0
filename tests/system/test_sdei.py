"""SDEI (DEN0054, SDEI 1.1) answered by the VMM: the SDEI range forwarded with FWD_TO_USER, a bare-metal EL1
client (firmware/sdei_calls.S) registering handlers that the dispatcher (harness/guest/sdei.py,
harness/guest/sdei_run.py) enters with x0..x3 = event, argument, interrupted PC, interrupted PSTATE.

Without the filter KVM answers SDEI ids itself: they are in no range it implements, so
kvm_smccc_call_handler leaves x0 = SMCCC_RET_NOT_SUPPORTED (arch/arm64/kvm/hypercalls.c:270 ``val[4] =
{SMCCC_RET_NOT_SUPPORTED}``) -- asserted by test_unfiltered_guest_gets_not_supported.
"""

import struct

import pytest

from harness.guest import sdei as S
from harness.images.payloads import get_payload
from harness.model.scenarios import SDEI_FWD, scenario

U = 0xFFFF_FFFF_FFFF_FFFF
OP_SMC, OP_HVC, OP_REGISTER, OP_WAIT, OP_SELF = 0, 1, 2, 3, 4
H_COMPLETE, H_RESUME, H_HANG, H_RESIGNAL, H_UNREGISTER = 0, 1, 2, 3, 4
ARG = 0xA5A5_0000_1234
SEED10, SEED17 = 0x5EED_000A, 0x5EED_0011
EL1H_DAIF = 0x3C5


def u(x):
    return x & U


def program(*entries):
    words = [len(entries)]
    for e in entries:
        assert len(e) <= 7, e
        e = list(e) + [0] * (7 - len(e))
        words += e
    return words


def register(ev, handler, arg=ARG, flags=0, aff=0):
    return (OP_REGISTER, S.EVENT_REGISTER, ev, handler, arg, flags, aff)


def call(fid, *args):
    return (OP_SMC, fid, *args)


def signal_self(ev=0):
    return (OP_SELF, S.EVENT_SIGNAL, ev)


def decode(r, n):
    blk = r.result_block.ljust(0x1000 + 16 * 0x80, b"\0")
    recs = []
    for i in range(n):
        x0, x1, x2, x3, x10, x17, entries = struct.unpack_from("<7Q", blk, 0x40 + i * 0x40)
        recs.append({"x0": x0, "x1": x1, "x2": x2, "x3": x3, "x10": x10, "x17": x17, "entries": entries})
    count = struct.unpack_from("<Q", blk, 0x10)[0]
    hs = []
    for k in range(min(count, 16)):
        f = struct.unpack_from("<15Q", blk, 0x1000 + k * 0x80)
        hs.append(dict(zip(("event", "arg", "pc", "pstate", "currentel", "daif", "spsel", "ctx0", "ctx1", "ctx2",
                            "ctx17", "handler", "status", "own", "complete_ret"), f)))
    resume = dict(zip(("elr", "spsr", "currentel", "daif", "taken"), struct.unpack_from("<5Q", blk, 0x800)))
    return {"done": struct.unpack_from("<Q", blk, 8)[0], "records": recs, "handlers": hs, "resume": resume}


@pytest.fixture(scope="module")
def sdei_guest(guest_pool):
    g = guest_pool.get()
    if not g.caps.get("kvm") or not g.caps.get("smccc_filter"):
        pytest.skip(f"kernel {g.caps.get('uname')}: no KVM or no SMCCC filter")
    return g


def run(g, name, entries, filters=SDEI_FWD, **kw):
    p = get_payload("sdei_calls")
    r = g.run(scenario(name, p, filters=filters, params=program(*entries), **kw), payload=p)
    return p, r, decode(r, len(entries))


pytestmark = [pytest.mark.el1, pytest.mark.sdei]


def _signal_pstate(r):
    """PSTATE at the EVENT_SIGNAL exit: the interrupted context's PSTATE (flags included)."""
    return [h for h in r.hypercalls if h["nr"] == S.EVENT_SIGNAL][0]["pstate"]


def test_calls_and_bad_input(guest, sdei_guest):
    entries = [
        call(S.VERSION),                                # 0
        (OP_HVC, S.VERSION),                            # 1 the conduit does not matter
        call(S.FEATURES, 0),                            # 2 no binding slots
        call(S.EVENT_STATUS, 0),                        # 3 not registered
        register(0, H_COMPLETE),                        # 4
        register(0, H_COMPLETE),                        # 5 twice: DENIED
        call(S.EVENT_REGISTER, 200, 0x1000, 0),         # 6 handler outside RAM: INVALID_PARAMETERS
        call(S.EVENT_REGISTER, 200, 0x4000_0002, 0),    # 7 misaligned handler
        call(S.EVENT_REGISTER, 7, 0x4000_0000, 0),      # 8 no event 7
        call(S.EVENT_ENABLE, 200),                      # 9 not registered: DENIED
        call(S.EVENT_COMPLETE, 0),                      # 10 outside a handler: DENIED (returns)
        call(S.EVENT_COMPLETE_AND_RESUME, 0x4000_0000),  # 11 outside a handler: DENIED
        call(S.EVENT_CONTEXT, 0),                       # 12 outside a handler: DENIED
        call(S.EVENT_ENABLE, 0),                        # 13
        call(S.EVENT_STATUS, 0),                        # 14 registered | enabled
        call(S.EVENT_GET_INFO, 0, S.INFO_TYPE),         # 15 private
        call(S.EVENT_GET_INFO, 100, S.INFO_TYPE),       # 16 shared
        call(S.EVENT_GET_INFO, 0, S.INFO_SIGNALED),     # 17 signalable
        call(S.EVENT_DISABLE, 0),                       # 18
        call(S.EVENT_UNREGISTER, 0),                    # 19
        call(S.EVENT_STATUS, 0),                        # 20 gone
        call(S.PE_MASK),                                # 21 already masked after reset: 0
        call(S.PE_UNMASK),                              # 22
        call(S.PE_MASK),                                # 23 it was unmasked: 1
        register(100, H_COMPLETE, ARG, S.RM_PE, 0),     # 24 shared, routed to this PE
        call(S.EVENT_GET_INFO, 100, S.INFO_ROUTING_MODE),  # 25
        call(S.SHARED_RESET),                           # 26
        call(S.EVENT_STATUS, 100),                      # 27 gone
        call(S.EVENT_SIGNAL, 0, 0x55),                  # 28 no such PE
        call(S.BASE + 0x13),                            # 29 no such function
        call(0x8400_0020),                              # 30 the SMC32 id: not forwarded (PSCI range? no: KVM)
    ]
    p, r, d = run(sdei_guest, "sdei_calls", entries)
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    x0 = [rec["x0"] for rec in d["records"]]
    want = {0: S.VERSION_1_1, 1: S.VERSION_1_1, 2: 0, 3: 0, 4: 0, 5: u(S.DENIED), 6: u(S.INVALID_PARAMETERS),
            7: u(S.INVALID_PARAMETERS), 8: u(S.INVALID_PARAMETERS), 9: u(S.DENIED), 10: u(S.DENIED),
            11: u(S.DENIED), 12: u(S.DENIED), 13: 0, 14: S.STATUS_REGISTERED | S.STATUS_ENABLED,
            15: S.TYPE_PRIVATE, 16: S.TYPE_SHARED, 17: 1, 18: 0, 19: 0, 20: 0, 21: 0, 22: 0, 23: 1, 24: 0,
            25: S.RM_PE, 26: 0, 27: 0, 28: u(S.INVALID_PARAMETERS), 29: u(S.NOT_SUPPORTED),
            30: u(S.NOT_SUPPORTED)}
    got = {i: x0[i] for i in want}
    assert got == want, f"{ {i: (hex(got[i]), hex(want[i])) for i in want if got[i] != want[i]} }\n{r.describe()}"
    assert all(rec["x10"] == SEED10 and rec["x17"] == SEED17 for rec in d["records"]), "x4..x17 not preserved"
    fwd = [h for h in r.hypercalls if h["by"] == "sdei"]
    assert len(fwd) == len(entries) - 1, r.describe()      # all but the SMC32 id (outside the forwarded range)
    assert [h["conduit"] for h in fwd[:2]] == ["smc", "hvc"]
    assert not d["handlers"], "no event was signalled"


def test_unfiltered_guest_gets_not_supported(guest, sdei_guest):
    entries = [call(S.VERSION), register(0, H_COMPLETE), call(S.EVENT_ENABLE, 0), call(S.PE_UNMASK),
               signal_self(), call(S.EVENT_COMPLETE, 0)]
    _, r, d = run(sdei_guest, "sdei_unfiltered", entries, filters=())
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    assert not r.hypercalls, r.describe()
    assert [rec["x0"] for rec in d["records"]] == [u(-1)] * len(entries), r.describe()


def test_signal_delivers_handler_with_the_right_arguments(guest, sdei_guest):
    p, r, d = run(sdei_guest, "sdei_deliver", [register(0, H_COMPLETE), call(S.EVENT_ENABLE, 0),
                                                call(S.PE_UNMASK), signal_self(), call(S.EVENT_STATUS, 0)])
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    assert len(d["handlers"]) == 1, r.describe()
    h = d["handlers"][0]
    mpidr = r.vcpus[0]["mpidr"] & 0xFF00FFFFFF
    ret_pc = p.sym("sdei_smc") + 4
    sig_pstate = _signal_pstate(r)         # NZCV as the payload left them, EL1h, DAIF masked
    assert sig_pstate & 0x3FF == EL1H_DAIF
    assert (h["event"], h["arg"], h["pc"], h["pstate"]) == (0, ARG, ret_pc, sig_pstate), f"{h}\n{r.describe()}"
    assert h["currentel"] == 1 << 2 and h["daif"] == 0x3C0 and h["spsel"] == 1, h
    # EVENT_CONTEXT: the interrupted x0 is SIGNAL's own SUCCESS, x1 the event, x2 the target, x17 the seed
    assert (h["ctx0"], h["ctx1"], h["ctx2"], h["ctx17"]) == (0, 0, mpidr, SEED17), h
    assert h["status"] == S.STATUS_REGISTERED | S.STATUS_ENABLED | S.STATUS_RUNNING
    sig = d["records"][3]
    assert sig["x0"] == 0 and sig["x10"] == SEED10 and sig["x17"] == SEED17 and sig["entries"] == 1, sig
    assert d["records"][4]["x0"] == S.STATUS_REGISTERED | S.STATUS_ENABLED     # not running any more
    dl = [e for e in r.events if e["kind"] == "sdei" and e["effect"] == "deliver"]
    assert len(dl) == 1 and dl[0]["handler"] == p.sym("sdei_h0") and dl[0]["interrupted_pc"] == ret_pc


def test_complete_and_resume_enters_as_an_irq(guest, sdei_guest):
    p, r, d = run(sdei_guest, "sdei_resume", [register(0, H_RESUME), call(S.EVENT_ENABLE, 0), call(S.PE_UNMASK),
                                              signal_self()])
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    res = d["resume"]
    assert res["taken"] == 1, r.describe()
    assert res["elr"] == p.sym("sdei_smc") + 4 and res["spsr"] == _signal_pstate(r), res
    assert res["currentel"] == 1 << 2 and res["daif"] == 0x3C0, res
    sig = d["records"][3]
    assert sig["x0"] == 0 and sig["x10"] == SEED10 and sig["x17"] == SEED17, "context restored before the resume"


def test_masked_pe_holds_the_event_until_unmask(guest, sdei_guest):
    _, r, d = run(sdei_guest, "sdei_mask", [register(0, H_COMPLETE), call(S.EVENT_ENABLE, 0), signal_self(),
                                            call(S.EVENT_STATUS, 0), call(S.PE_UNMASK), call(S.PE_MASK),
                                            signal_self(), call(S.EVENT_DISABLE, 0), call(S.PE_UNMASK),
                                            call(S.EVENT_ENABLE, 0)])
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    e = [rec["entries"] for rec in d["records"]]
    # masked at reset: the signal waits; UNMASK delivers it; masked again: waits; disabled: still waits;
    # unmasked but disabled: waits; ENABLE delivers it
    assert e == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2], f"{e}\n{r.describe()}"
    assert d["records"][5]["x0"] == 1       # PE_MASK changed the mask


def test_signal_while_the_handler_runs_is_pending_until_complete(guest, sdei_guest):
    p, r, d = run(sdei_guest, "sdei_reentry", [register(0, H_RESIGNAL), call(S.EVENT_ENABLE, 0), call(S.PE_UNMASK),
                                               signal_self()])
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    hs = d["handlers"]
    assert len(hs) == 2, r.describe()
    assert hs[0]["own"] == 0, "EVENT_SIGNAL from inside the handler succeeds"
    # the second entry interrupts the same (restored) context, not the first handler
    assert hs[1]["pc"] == hs[0]["pc"] == p.sym("sdei_smc") + 4, hs
    assert d["records"][3]["entries"] == 2 and d["records"][3]["x17"] == SEED17
    kinds = [(e["kind"], e.get("effect"), e.get("name")) for e in r.events if e["kind"] in ("sdei", "hypercall")]
    i_complete = kinds.index(("sdei", "complete", None))
    assert kinds.index(("sdei", "deliver", None), 0) < i_complete
    assert ("sdei", "deliver", None) in kinds[i_complete:], f"re-delivered only after COMPLETE: {kinds}"


def test_unregister_from_inside_the_handler_is_pending(guest, sdei_guest):
    _, r, d = run(sdei_guest, "sdei_unreg", [register(0, H_UNREGISTER), call(S.EVENT_ENABLE, 0), call(S.PE_UNMASK),
                                             signal_self(), call(S.EVENT_STATUS, 0)])
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    assert d["handlers"][0]["own"] == u(S.PENDING)
    assert d["records"][4]["x0"] == 0, "unregistered at COMPLETE"


def test_host_signalled_event(guest, sdei_guest):
    _, r, d = run(sdei_guest, "sdei_host", [register(200, H_COMPLETE, 0x200), call(S.EVENT_ENABLE, 200),
                                            call(S.PE_UNMASK), (OP_WAIT, 0, 1, 100000)],
                  sdei={"signal": [{"event": 200, "vcpu": 0, "after_calls": 3}]})
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    assert len(d["handlers"]) == 1 and d["handlers"][0]["event"] == 200 and d["handlers"][0]["arg"] == 0x200
    assert d["records"][3]["x0"] >= 1, r.describe()
    hs = [e for e in r.events if e["kind"] == "sdei" and e["effect"] == "host_signal"]
    assert hs and hs[0]["kept"], r.describe()


def test_handler_that_never_completes_runs_into_the_deadline(guest, sdei_guest):
    p, r, d = run(sdei_guest, "sdei_hang", [register(0, H_HANG), call(S.EVENT_ENABLE, 0), call(S.PE_UNMASK),
                                            signal_self()], deadline_s=3.0)
    assert r.outcome == "deadline", r.describe()
    assert r.vcpus and r.vcpus[0]["pc"] == p.sym("sdei_h2_spin"), r.describe()
    assert r.raw["sdei_state"]["pes"][0]["running"] == 0, r.raw.get("sdei_state")
    assert len(d["handlers"]) == 1 and d["done"] == 3


# ---- a vEL2 client (HAS_EL2 vCPU, E2H = 1) over SMC: handlers entered at EL2 --------------------------------
@pytest.mark.el2
@pytest.mark.smc
def test_vel2_client_gets_its_handler_at_el2_and_resumes_as_an_el2_irq(guest, sdei_guest):
    """An SMC from vEL2 is KVM's (no guest hypervisor above it to forward to): the filter forwards it.  The
    dispatcher enters the handler at the client's EL, EL2h with DAIF masked (0x3c9), and COMPLETE_AND_RESUME
    sets ELR_EL2/SPSR_EL2 (sdei_run.py); the payload's `mrs elr_el1` at EL2 with E2H = 1 reads ELR_EL2."""
    if not sdei_guest.caps.get("KVM_CAP_ARM_EL2"):
        pytest.skip(f"kernel {sdei_guest.caps.get('uname')}: KVM_CAP_ARM_EL2 is 0")
    p, r, d = run(sdei_guest, "sdei_vel2", [register(0, H_COMPLETE), call(S.EVENT_ENABLE, 0), call(S.PE_UNMASK),
                                            signal_self(), call(S.EVENT_UNREGISTER, 0), register(0, H_RESUME),
                                            call(S.EVENT_ENABLE, 0), signal_self()],
                  el2=True, deadline_s=30.0)
    assert r.outcome == "done" and r.exit_code == 0, r.describe()
    h0, h1 = d["handlers"]
    sig = _signal_pstate(r)
    assert sig & 0x3FF == 0x3C9, f"the client runs at EL2h: {sig:#x}"
    assert (h0["event"], h0["pc"], h0["pstate"], h0["currentel"]) == (0, p.sym("sdei_smc") + 4, sig, 2 << 2), h0
    assert h0["daif"] == 0x3C0 and h0["spsel"] == 1
    dl = [e for e in r.events if e["kind"] == "sdei" and e["effect"] == "deliver"]
    assert [e["pstate"] for e in dl] == [0x3C9, 0x3C9], r.describe()
    assert h1["event"] == 0 and h1["handler"] == H_RESUME and h1["currentel"] == 2 << 2, h1
    res = d["resume"]
    assert res["taken"] == 1 and res["currentel"] == 2 << 2 and res["daif"] == 0x3C0, res
    assert res["elr"] == h1["pc"] and res["spsr"] == h1["pstate"], (res, h1)
