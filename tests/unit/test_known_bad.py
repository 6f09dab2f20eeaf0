"""harness/model/known_bad.py: known-bad KVM behaviour is gated to the kernel series it was measured on."""

import pytest

from harness.model.known_bad import KNOWN_BAD, zero_zero_errno


@pytest.mark.parametrize("uname,want", [
    ("6.1.0", None), ("6.4.0", "EEXIST"), ("6.11.9", "EEXIST"), ("6.12.117+deb13-cloud-arm64", "EINVAL"),
    ("7.2.13+deb14-cloud-arm64", "EINVAL"), ("7.3.4+deb13-cloud-arm64", "EINVAL"), ("bogus", None)])
def test_zero_zero_errno_per_version(uname, want):
    assert zero_zero_errno(uname) == want


@pytest.mark.parametrize("uname,applies", [("7.3.4+deb13-cloud-arm64", True), ("7.2.13+deb14-cloud-arm64", True),
                                           ("7.1.0", False), ("7.4.0", False), (None, False)])
def test_hcd_xfail_applies_only_to_the_measured_series(uname, applies):
    bad = KNOWN_BAD["hcd_undef_elr_after_hvc"]
    assert bad.applies(uname) is applies
    assert "7.3" in bad.reason(uname) and "harness/model/known_bad.py" in bad.reason(uname)


def test_every_entry_names_series_and_evidence():
    assert all(b.series and b.evidence for b in KNOWN_BAD.values())
