"""Capabilities of the booted kernel: expectations per kernel series (harness/model/capabilities.py EXPECTED_CAPS), not only
skip conditions.  A kernel that should offer KVM_CAP_ARM_EL2, E2H0 or the SMCCC filter and does not fails here,
naming the table's line, instead of turning the tests that need it into quiet skips."""

import dataclasses

import pytest

from harness import paths
from harness.machine.guests import new_session
from harness.model.capabilities import EXPECTED_CAPS, expected_caps, missing_caps, release_version


def _cmdline(guest) -> str:
    return guest.config.cmdline


def test_booted_kernel_offers_what_its_series_must(guest_pool):
    """Every EXPECTED_CAPS line that applies to this release and command line holds (values, not types).
    Takes the pool's guest directly: the ``guest`` fixture would skip on exactly the capabilities checked here."""
    g = guest_pool.get()
    c = g.caps
    assert release_version(c.get("uname")) is not None, f"cannot parse the kernel release {c.get('uname')!r}"
    lines = expected_caps(c["uname"], _cmdline(g), g.config.accel)
    assert any(e.cap == "kvm" for e in lines), lines       # the table applies at all
    problems = missing_caps(c, _cmdline(g), g.config.accel)
    assert not problems, "\n".join(problems) + f"\ncaps: {c}"


def test_default_kernel_values(guest):
    """The default kernel (7.3.4): the values the suite's expectations are written against."""
    c = guest.caps
    v = release_version(c["uname"])
    if v[:2] != (7, 3):
        pytest.skip(f"kernel {c['uname']}: this test pins the default 7.3 kernel's values")
    assert c["api_version"] == 12
    assert (c["smccc_filter"], c["KVM_CAP_ARM_EL2"], c["KVM_CAP_ARM_EL2_E2H0"]) == (True, 1, 1), c
    assert (c["psci_version"], c["psci_version_raw"]) == ("1.3", 0x1_0003), c
    assert c["KVM_CAP_ARM_SYSTEM_SUSPEND"] == 1, c
    assert "nested" in _cmdline(guest) and "NV2" in (c.get("kvm_mode") or ""), c


def test_expectation_lines_name_their_source():
    assert all(e.source and e.line().startswith("EXPECTED_CAPS: ") for e in EXPECTED_CAPS)


@pytest.mark.infra   # a second boot with another command line: the harness's capability plumbing
def test_kernel_without_kvm_is_reported_as_missing_kvm(guest_pool):
    """kvm-arm.mode=none: KVM does not initialise, /dev/kvm is absent → tests skip with that reason."""
    guest_pool.resolve_assets()
    opts = dataclasses.replace(guest_pool.options, append="kvm-arm.mode=none", snapshots=False)
    with new_session(opts, paths.new_run_dir("nokvm"), assets=guest_pool.guest_assets) as g:
        assert g.caps["kvm"] is False, g.caps
        assert "/dev/kvm is absent" in g.caps["reason"]
        with pytest.raises(Exception, match="dev/kvm"):
            g.request("run", {"name": "x"})
