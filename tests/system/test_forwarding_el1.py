"""Walking skeleton: PSCI_VERSION from an EL1 payload, forwarded to the Python handler over HVC and SMC.

ABI (docs/kvm-smccc-abi.md §1.2): KVM_EXIT_HYPERCALL with nr = the function id, flags bit 0 set iff SMC,
PC already past the HVC/SMC; the x0 the VMM writes with KVM_SET_ONE_REG is what the guest sees.
"""

import pytest

from harness.guest import kvm
from harness.images.payloads import get_payload
from harness.model.scenarios import PSCI_FWD, scenario

PSCI_VERSION = 0x8400_0000
HANDLER_VERSION = 0x0001_0001     # the emulator answers PSCI 1.1, distinct from KVM's in-kernel 1.3


@pytest.fixture(scope="module")
def psci_version_run(guest_pool):
    """One forwarded run of firmware/psci_version.S, shared by the assertions below."""
    g = guest_pool.get()
    if not g.caps.get("kvm") or not g.caps.get("smccc_filter"):
        pytest.skip(f"kernel {g.caps.get('uname')}: no KVM or no SMCCC filter")
    p = get_payload("psci_version")
    return p, g.run(scenario("psci_version_fwd", p, filters=PSCI_FWD, psci_minor=1), payload=p)


def _exit(result, conduit):
    calls = [h for h in result.hypercalls if h["conduit"] == conduit]
    assert len(calls) == 1, result.describe()
    return calls[0]


@pytest.mark.el1
@pytest.mark.psci
@pytest.mark.parametrize("conduit", [pytest.param("hvc", marks=pytest.mark.hvc),
                                     pytest.param("smc", marks=pytest.mark.smc)])
def test_psci_version_exits_to_userspace_with_function_id(guest, psci_version_run, conduit):
    _, r = psci_version_run
    assert r.outcome == "done", r.describe()
    h = _exit(r, conduit)
    assert h["nr"] == PSCI_VERSION, r.describe()
    assert h["args"][0] == PSCI_VERSION


@pytest.mark.el1
@pytest.mark.psci
@pytest.mark.parametrize("conduit,flags", [pytest.param("hvc", 0, marks=pytest.mark.hvc),
                                           pytest.param("smc", kvm.KVM_HYPERCALL_EXIT_SMC, marks=pytest.mark.smc)])
def test_hypercall_flags_name_the_conduit(guest, psci_version_run, conduit, flags):
    _, r = psci_version_run
    assert _exit(r, conduit)["flags"] == flags, r.describe()


@pytest.mark.el1
@pytest.mark.psci
@pytest.mark.parametrize("conduit", [pytest.param("hvc", marks=pytest.mark.hvc),
                                     pytest.param("smc", marks=pytest.mark.smc)])
def test_pc_is_already_past_the_call_at_exit(guest, psci_version_run, conduit):
    p, r = psci_version_run
    h = _exit(r, conduit)
    insn = p.sym(f"{conduit}_insn")
    assert h["pc"] == insn + 4, f"exit PC {r.symbol(h['pc'])}, expected {conduit}_insn+0x4\n{r.describe()}"
    assert kvm.pstate_el(h["pstate"]) == 1


@pytest.mark.el1
@pytest.mark.psci
@pytest.mark.parametrize("conduit,slot", [pytest.param("hvc", 0, marks=pytest.mark.hvc),
                                          pytest.param("smc", 1, marks=pytest.mark.smc)])
def test_guest_sees_the_x0_the_handler_wrote(guest, psci_version_run, conduit, slot):
    _, r = psci_version_run
    h = _exit(r, conduit)
    assert h["reply"][0] == HANDLER_VERSION, r.describe()
    assert r.reports[slot] == HANDLER_VERSION, r.describe()


@pytest.mark.el1
@pytest.mark.psci
@pytest.mark.hvc
@pytest.mark.smc
def test_without_a_filter_psci_version_stays_in_kernel(guest):
    p = get_payload("psci_version")
    r = guest.run(scenario("psci_version_in_kernel", p), payload=p)
    assert r.outcome == "done", r.describe()
    assert r.hypercalls == [], r.describe()
    kernel_version = guest.caps["psci_version_raw"]
    assert r.reports == {0: kernel_version, 1: kernel_version}, r.describe()
