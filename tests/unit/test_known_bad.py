"""harness/model/known_bad.py: known-bad KVM behaviour is gated to the kernel series it was measured on."""

from pathlib import Path

import pytest

from harness.kdev import patched
from harness.model.known_bad import KNOWN_BAD, zero_zero_errno

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("uname,want", [
    ("6.1.0", None), ("6.4.0", "EEXIST"), ("6.11.9", "EEXIST"), ("6.12.117+deb13-cloud-arm64", "EINVAL"),
    ("7.2.13+deb14-cloud-arm64", "EINVAL"), ("7.3.4+deb13-cloud-arm64", "EINVAL"), ("bogus", None)])
def test_zero_zero_errno_per_version(uname, want):
    assert zero_zero_errno(uname) == want


@pytest.mark.parametrize("uname,applies", [("7.3.4+deb13-cloud-arm64", True), ("7.2.13+deb14-cloud-arm64", True),
                                           ("7.3.4", True), ("7.3.4-kvm-nv-hcd-elr", False),
                                           ("7.2.13-kvm-nv-hcd-elr-other", False),
                                           ("7.1.0", False), ("7.4.0", False), (None, False)])
def test_hcd_xfail_applies_only_to_the_measured_series(uname, applies):
    bad = KNOWN_BAD["hcd_undef_elr_after_hvc"]
    assert bad.applies(uname) is applies
    assert "7.3" in bad.reason(uname) and "harness/model/known_bad.py" in bad.reason(uname)


def test_every_entry_names_series_and_evidence():
    assert all(b.series and b.evidence for b in KNOWN_BAD.values())


def test_a_fix_is_a_repo_patch_whose_directory_gives_builds_the_fixed_by_release_tag():
    """fixed_by is how a kernel says it carries the fix: `kernel source --patches patches/linux` writes the
    directory's localversion* into the tree, so the release has the tag (harness/kdev/patched.py)."""
    for key, kb in KNOWN_BAD.items():
        if not kb.fixed_by:
            continue
        fix = ROOT / kb.fix
        assert fix.is_file(), (key, kb.fix)
        patches, lvs = patched.patches_in(fix.parent)
        assert fix in patches, key
        assert kb.fixed_by in "".join(f.read_text().strip() for f in lvs), (key, [f.name for f in lvs])
        assert kb.fixed("7.3.4" + kb.fixed_by) and not kb.applies("7.3.4" + kb.fixed_by), key
