"""Capability detection on a booted kernel: what the agent reports decides skips, never failures."""

import pytest

from harness import paths
from harness.session import GuestSession


def test_caps_of_the_default_kernel_are_probed(guest):
    c = guest.caps
    assert c["kvm"] is True and c["api_version"] == 12
    assert c["smccc_filter"] is True
    assert c["psci_version"].startswith("1.")
    assert isinstance(c["KVM_CAP_ARM_EL2"], int)


@pytest.mark.infra   # a second boot with another command line: the harness's capability plumbing
def test_kernel_without_kvm_is_reported_as_missing_kvm(guest_pool):
    """kvm-arm.mode=none: KVM does not initialise, /dev/kvm is absent → tests skip with that reason."""
    a = guest_pool.resolve_assets()
    run_dir = paths.new_run_dir("nokvm")
    with GuestSession.create(a["kernel"].image, a["initrd"], run_dir, append="kvm-arm.mode=none") as g:
        assert g.caps["kvm"] is False, g.caps
        assert "/dev/kvm is absent" in g.caps["reason"]
        with pytest.raises(Exception, match="dev/kvm"):
            g.request("run", {"name": "x"})
