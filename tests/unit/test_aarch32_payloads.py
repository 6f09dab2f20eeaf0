"""AArch32 payloads on the host side: the build marks them, load_elf reads their state, and a payload run in the
wrong state is bad input (harness/images/payloads.py load_elf; smccc-harness run-payload --state)."""

import pytest

from harness import cli, protocol
from harness.errors import PayloadError
from harness.guest import kvm
from harness.guest.vmsetup import aarch32_entry, vcpu_features
from harness.images import payloads


@pytest.fixture(scope="module")
def built():
    return payloads.build_payloads()


def test_states_of_the_built_payloads(built):
    assert payloads.load_elf(built["a32_calls"]).state == "a32"
    t = payloads.load_elf(built["t32_entry"])
    assert t.state == "t32" and t.entry & 1 and t.to_wire()["state"] == "t32"
    assert payloads.load_elf(built["psci_version"]).state == "aarch64"


@pytest.mark.parametrize("name,state,built_for", [("a32_calls", "aarch64", "AArch32 (EM_ARM)"),
                                                  ("psci_version", "aarch32", "AArch64 (EM_AARCH64)")])
def test_wrong_state_is_refused_naming_both(built, name, state, built_for):
    with pytest.raises(PayloadError) as ei:
        payloads.load_elf(built[name], state=state)
    assert built_for in str(ei.value) and state in str(ei.value)
    assert "--state" in ei.value.hint


@pytest.mark.bad_input
def test_run_payload_wrong_state_exits_2_before_booting(built, capsys, tmp_path):
    rc = cli.main(["run-payload", str(built["a32_calls"]), "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "AArch32 (EM_ARM)" in err and "aarch64" in err, err
    rc = cli.main(["run-payload", str(built["a32_calls"]), "--state", "aarch32", "--el2", "--results-dir",
                   str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "vEL2" in err and "kvm_vcpu_init_check_features" in err, err


def test_vcpu_features_and_entry_pstate(built):
    a32 = payloads.load_elf(built["a32_calls"]).to_wire()
    spec = protocol.validate_scenario({"name": "x", "payload": a32})
    assert kvm.KVM_ARM_VCPU_EL1_32BIT in vcpu_features(spec)
    assert kvm.KVM_ARM_VCPU_EL1_32BIT not in vcpu_features(
        protocol.validate_scenario({"name": "x", "payload": payloads.load_elf(built["psci_version"]).to_wire()}))
    assert aarch32_entry(0x4000_0000, False) == (0x4000_0000, 0x1D3)
    assert aarch32_entry(0x4000_0001, False) == (0x4000_0000, 0x1F3)
    assert kvm.pstate_el(0x1D3) == 1 and kvm.pstate_el(0x1D0) == 0 and kvm.pstate_el(0x3C5) == 1


def test_unknown_payload_state_is_a_protocol_error(built):
    w = payloads.load_elf(built["a32_calls"]).to_wire()
    with pytest.raises(protocol.ProtocolError, match="payload state"):
        protocol.validate_scenario({"name": "x", "payload": dict(w, state="arm64")})
