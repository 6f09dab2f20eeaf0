"""The VMM's SDEI dispatcher as a pure state machine (harness/guest/sdei.py): every call, bad input, delivery."""

import pytest

from harness.guest import sdei as S

RAM = (0x4000_0000, 0x20_0000)
H = 0x4000_1000                  # a handler address inside RAM
EL1 = 0x3C5
U = 0xFFFF_FFFF_FFFF_FFFF


def u(x):
    return x & U


@pytest.fixture
def d():
    return S.Sdei([0x8000_0000, 0x8000_0001], RAM)      # MPIDR bit 31 (RES1) is not part of the affinity


def ret(d, fid, *args, caller=0, pstate=EL1):
    out = d.call(caller, fid, list(args), pstate=pstate)
    assert out.effect is None, out
    return out.regs[0]


def test_version_and_features(d):
    assert ret(d, S.VERSION) == 0x0001_0001_0000_0000
    assert ret(d, S.FEATURES, 0) == 0 and ret(d, S.FEATURES, 1) == 0
    assert ret(d, S.FEATURES, 2) == u(S.INVALID_PARAMETERS)
    assert ret(d, S.BASE + 0x13) == u(S.NOT_SUPPORTED)          # past SHARED_RESET: no such call


def test_aarch32_caller_gets_not_supported(d):
    assert ret(d, S.VERSION, pstate=0x1D3) == u(S.NOT_SUPPORTED)


def test_register_enable_status_disable_unregister(d):
    assert ret(d, S.EVENT_STATUS, 0) == 0
    assert ret(d, S.EVENT_REGISTER, 0, H, 0xA5) == S.SUCCESS
    assert ret(d, S.EVENT_STATUS, 0) == S.STATUS_REGISTERED
    assert ret(d, S.EVENT_STATUS, 0, caller=1) == 0              # private: PE 1 has its own
    assert ret(d, S.EVENT_ENABLE, 0) == S.SUCCESS
    assert ret(d, S.EVENT_ENABLE, 0) == S.SUCCESS                # already enabled: no effect
    assert ret(d, S.EVENT_STATUS, 0) == S.STATUS_REGISTERED | S.STATUS_ENABLED
    assert ret(d, S.EVENT_DISABLE, 0) == S.SUCCESS
    assert ret(d, S.EVENT_UNREGISTER, 0) == S.SUCCESS
    assert ret(d, S.EVENT_STATUS, 0) == 0


@pytest.mark.parametrize("ev", [1, 99, 0xFFFF_FFFF, 1 << 32])
def test_bad_event_numbers(d, ev):
    for fid in (S.EVENT_REGISTER, S.EVENT_ENABLE, S.EVENT_DISABLE, S.EVENT_UNREGISTER, S.EVENT_STATUS,
                S.EVENT_GET_INFO, S.EVENT_SIGNAL, S.EVENT_ROUTING_SET):
        assert ret(d, fid, ev, H) == u(S.INVALID_PARAMETERS), S.name(fid)


@pytest.mark.parametrize("addr", [0, 0x4000_1002, RAM[0] + RAM[1], 0x3FFF_FFFC, U])
def test_bad_handler_addresses(d, addr):
    assert ret(d, S.EVENT_REGISTER, 0, addr, 0) == u(S.INVALID_PARAMETERS)
    assert ret(d, S.EVENT_STATUS, 0) == 0


def test_register_twice_is_denied(d):
    assert ret(d, S.EVENT_REGISTER, 200, H, 0) == S.SUCCESS
    assert ret(d, S.EVENT_REGISTER, 200, H + 4, 0) == u(S.DENIED)
    assert ret(d, S.EVENT_REGISTER, 200, H, 0, caller=1) == S.SUCCESS     # another PE's private instance


def test_enable_disable_unregister_unregistered_are_denied(d):
    for fid in (S.EVENT_ENABLE, S.EVENT_DISABLE, S.EVENT_UNREGISTER):
        assert ret(d, fid, 0) == u(S.DENIED), S.name(fid)


def test_register_bad_flags_and_affinity(d):
    assert ret(d, S.EVENT_REGISTER, 100, H, 0, 2, 0) == u(S.INVALID_PARAMETERS)       # flags bit 1
    assert ret(d, S.EVENT_REGISTER, 100, H, 0, S.RM_PE, 0x5) == u(S.INVALID_PARAMETERS)  # no such PE
    assert ret(d, S.EVENT_REGISTER, 100, H, 0, S.RM_PE, 1) == S.SUCCESS
    assert ret(d, S.EVENT_GET_INFO, 100, S.INFO_ROUTING_MODE) == S.RM_PE
    assert ret(d, S.EVENT_GET_INFO, 100, S.INFO_ROUTING_AFF) == 1


def test_get_info(d):
    assert ret(d, S.EVENT_GET_INFO, 0, S.INFO_TYPE) == S.TYPE_PRIVATE
    assert ret(d, S.EVENT_GET_INFO, 0, S.INFO_SIGNALED) == 1
    assert ret(d, S.EVENT_GET_INFO, 100, S.INFO_TYPE) == S.TYPE_SHARED
    assert ret(d, S.EVENT_GET_INFO, 100, S.INFO_SIGNALED) == 0
    assert ret(d, S.EVENT_GET_INFO, 0, S.INFO_PRIORITY) == S.PRIORITY_NORMAL
    assert ret(d, S.EVENT_GET_INFO, 0, S.INFO_ROUTING_MODE) == u(S.INVALID_PARAMETERS)   # private
    assert ret(d, S.EVENT_GET_INFO, 100, S.INFO_ROUTING_MODE) == u(S.DENIED)             # not registered
    assert ret(d, S.EVENT_GET_INFO, 0, 5) == u(S.INVALID_PARAMETERS)


def test_routing_set(d):
    assert ret(d, S.EVENT_ROUTING_SET, 0, S.RM_ANY, 0) == u(S.INVALID_PARAMETERS)      # private event
    assert ret(d, S.EVENT_ROUTING_SET, 100, S.RM_ANY, 0) == u(S.DENIED)                # not registered
    assert ret(d, S.EVENT_REGISTER, 100, H, 0) == S.SUCCESS
    assert ret(d, S.EVENT_ROUTING_SET, 100, S.RM_PE, 1) == S.SUCCESS
    assert ret(d, S.EVENT_ENABLE, 100) == S.SUCCESS
    assert ret(d, S.EVENT_ROUTING_SET, 100, S.RM_ANY, 0) == u(S.DENIED)                # enabled


def _ctx(pc=0x4000_0100, pstate=EL1):
    return S.Context([0x5EED_0000 + i for i in range(18)], pc, pstate)


def _ready(d, ev=0, caller=0, arg=0xA5):
    assert ret(d, S.EVENT_REGISTER, ev, H, arg, caller=caller) == S.SUCCESS
    assert ret(d, S.EVENT_ENABLE, ev, caller=caller) == S.SUCCESS


def test_pe_starts_masked_and_mask_reports_change(d):
    _ready(d)
    assert ret(d, S.EVENT_SIGNAL, 0, 0x8000_0000) == u(S.INVALID_PARAMETERS)   # RES1 bit 31: not affinity
    assert ret(d, S.EVENT_SIGNAL, 0, 0) == S.SUCCESS
    assert d.deliverable(0) is None                     # masked after reset
    assert ret(d, S.PE_UNMASK) == S.SUCCESS
    assert d.deliverable(0) == 0
    assert ret(d, S.PE_MASK) == 1 and ret(d, S.PE_MASK) == 0
    assert d.deliverable(0) is None


def test_delivery_entry_context_and_complete(d):
    _ready(d)
    ret(d, S.PE_UNMASK)
    assert ret(d, S.EVENT_SIGNAL, 0, 0) == S.SUCCESS
    ev = d.deliverable(0)
    e = d.enter(0, ev, _ctx())
    assert (e.pc, e.pstate, e.regs) == (H, 0x3C5, [0, 0xA5, 0x4000_0100, EL1])
    assert ret(d, S.EVENT_STATUS, 0) == S.STATUS_REGISTERED | S.STATUS_ENABLED | S.STATUS_RUNNING
    assert ret(d, S.EVENT_CONTEXT, 0) == 0x5EED_0000 and ret(d, S.EVENT_CONTEXT, 17) == 0x5EED_0011
    assert ret(d, S.EVENT_CONTEXT, 18) == u(S.INVALID_PARAMETERS)
    assert d.call(0, S.EVENT_COMPLETE, [0]) == S.Outcome(None, ("complete", _ctx()))
    assert ret(d, S.EVENT_STATUS, 0) == S.STATUS_REGISTERED | S.STATUS_ENABLED


def test_complete_and_resume(d):
    _ready(d)
    ret(d, S.PE_UNMASK)
    d.raise_event(0, 0)
    d.enter(0, 0, _ctx())
    assert d.call(0, S.EVENT_COMPLETE_AND_RESUME, [0x4000_0003]).regs == [u(S.INVALID_PARAMETERS)]
    out = d.call(0, S.EVENT_COMPLETE_AND_RESUME, [0x4000_0200])
    assert out == S.Outcome(None, ("complete_and_resume", _ctx(), 0x4000_0200, 1))


@pytest.mark.parametrize("fid", [S.EVENT_COMPLETE, S.EVENT_COMPLETE_AND_RESUME, S.EVENT_CONTEXT])
def test_complete_or_context_outside_a_handler_is_denied(d, fid):
    assert ret(d, fid, 0x4000_0200) == u(S.DENIED)


def test_signal_while_running_is_pending_until_complete(d):
    _ready(d)
    ret(d, S.PE_UNMASK)
    d.raise_event(0, 0)
    d.enter(0, 0, _ctx())
    assert ret(d, S.EVENT_SIGNAL, 0, 0) == S.SUCCESS
    assert d.deliverable(0) is None                      # a handler runs on this PE
    d.call(0, S.EVENT_COMPLETE, [0])
    assert d.deliverable(0) == 0                         # delivered again after COMPLETE


def test_signal_bad_target_and_unregistered_target(d):
    assert ret(d, S.EVENT_SIGNAL, 0, 7) == u(S.INVALID_PARAMETERS)
    assert ret(d, S.EVENT_SIGNAL, 0, 1 << 40) == u(S.INVALID_PARAMETERS)     # bits outside the affinity
    assert ret(d, S.EVENT_SIGNAL, 200, 0) == u(S.INVALID_PARAMETERS)         # not signalable
    assert ret(d, S.EVENT_SIGNAL, 0, 1) == S.SUCCESS                         # not registered there: lost
    _ready(d, caller=1)
    assert d.call(1, S.PE_UNMASK, []).regs == [0]
    assert d.deliverable(1) is None


def test_disabled_event_stays_pending(d):
    assert ret(d, S.EVENT_REGISTER, 0, H, 0) == S.SUCCESS
    ret(d, S.PE_UNMASK)
    ret(d, S.EVENT_SIGNAL, 0, 0)
    assert d.deliverable(0) is None
    ret(d, S.EVENT_ENABLE, 0)
    assert d.deliverable(0) == 0


def test_unregister_while_running_is_pending(d):
    _ready(d)
    ret(d, S.PE_UNMASK)
    d.raise_event(0, 0)
    d.enter(0, 0, _ctx())
    assert ret(d, S.EVENT_UNREGISTER, 0) == u(S.PENDING)
    assert ret(d, S.EVENT_ENABLE, 0) == u(S.DENIED)
    assert ret(d, S.EVENT_UNREGISTER, 0) == u(S.PENDING)
    d.call(0, S.EVENT_COMPLETE, [0])
    assert ret(d, S.EVENT_STATUS, 0) == 0


def test_private_and_shared_reset(d):
    _ready(d)
    _ready(d, ev=100)
    assert ret(d, S.PRIVATE_RESET) == S.SUCCESS
    assert ret(d, S.EVENT_STATUS, 0) == 0 and ret(d, S.EVENT_STATUS, 100) != 0
    assert ret(d, S.SHARED_RESET) == S.SUCCESS
    assert ret(d, S.EVENT_STATUS, 100) == 0


def test_shared_event_routing_to_a_pe(d):
    assert ret(d, S.EVENT_REGISTER, 100, H, 7, S.RM_PE, 1) == S.SUCCESS
    ret(d, S.EVENT_ENABLE, 100)
    for c in (0, 1):
        ret(d, S.PE_UNMASK, caller=c)
    d.raise_event(0, 100)
    assert d.deliverable(0) is None and d.deliverable(1) == 100
    e = d.enter(1, 100, _ctx())
    assert e.regs[:2] == [100, 7]
    assert ret(d, S.EVENT_CONTEXT, 0, caller=0) == u(S.DENIED)    # the handler runs on PE 1, not 0


def test_client_el2_handler_entry(d):
    assert ret(d, S.EVENT_REGISTER, 0, H, 0, pstate=0x3C9) == S.SUCCESS
    ret(d, S.EVENT_ENABLE, 0)
    ret(d, S.PE_UNMASK)
    d.raise_event(0, 0)
    assert d.enter(0, 0, _ctx(pstate=0x3C9)).pstate == 0x3C9


def test_interrupt_bind_without_slots(d):
    assert ret(d, S.INTERRUPT_BIND, 33) == u(S.OUT_OF_RESOURCE)
    assert ret(d, S.INTERRUPT_RELEASE, 0) == u(S.INVALID_PARAMETERS)


# ---- the scenario key that signals events from the host (harness/protocol.py) --------------------------------
def _spec(**kw):
    from harness import protocol
    seg = {"addr": protocol.RAM_BASE, "data": protocol.b64(b"\0" * 4)}
    return protocol.validate_scenario({"name": "x", "payload": {"entry": protocol.RAM_BASE, "segments": [seg]},
                                       "vcpus": 2, **kw})


def test_sdei_scenario_key_accepts_signals():
    s = _spec(sdei={"signal": [{"event": 200, "vcpu": 1, "after_calls": 3}, {"event": 0}]})
    assert s["sdei"]["signal"][1] == {"event": 0}


@pytest.mark.parametrize("bad,match", [
    ({"signal": [{"vcpu": 0}]}, "event required"),
    ({"signal": [{"event": 0, "vcpu": 2}]}, "vcpu"),
    ({"signal": [{"event": -1}]}, "event"),
    ({"signal": [{"event": 0, "after": 1}]}, "event, vcpu, after_calls"),
    ({"signals": []}, "'signal' only"),
    ([], "'signal' only"),
])
def test_sdei_scenario_key_bad_input(bad, match):
    from harness import protocol
    with pytest.raises(protocol.ProtocolError, match=match):
        _spec(sdei=bad)
