"""Known-bad kernel behaviour, gated per kernel release: the only place an xfail for KVM's behaviour lives.

Each entry names the kernel series it was measured on.  On those series the test is ``xfail(strict=True)``
(the bug must still be there: a fixed kernel XPASSes and fails, naming this table); on every other series the
test runs plainly, so a kernel with the bug fails and one without passes.  Nothing here is "every kernel".

A kernel of a listed series that carries the fix says so in its release string: ``fixed_by`` is the kbuild
localversion that the fix's directory gives the builds made from it (``patches/linux/localversion-*``, applied by
``smccc-harness kernel source --patches patches/linux``: release ``7.3.4-kvm-nv-hcd-elr``).  On such a kernel the
entry does not apply and the test runs plainly, asserting the architectural behaviour.  A kernel fixed some other
way (a later stable release, a distribution patch) XPASSes on its series: then narrow ``series``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .capabilities import release_version


@dataclass(frozen=True)
class KnownBad:
    series: tuple[tuple[int, int], ...]     # (major, minor) series measured to have the behaviour
    what: str
    evidence: str
    fixed_by: str = ""      # release tag (kbuild localversion) of a kernel that carries the fix, e.g. "-kvm-nv-hcd-elr"
    fix: str = ""           # the fix, a repo path (patches/linux/...)

    def fixed(self, uname: str | None) -> bool:
        """The release string says this kernel carries the fix (its localversion has ``fixed_by``)."""
        return bool(self.fixed_by and uname and self.fixed_by in uname)

    def applies(self, uname: str | None) -> bool:
        v = release_version(uname)
        return v is not None and v[:2] in self.series and not self.fixed(uname)

    def reason(self, uname: str | None) -> str:
        names = ", ".join(f"{a}.{b}" for a, b in self.series)
        return (f"known bad on {names} (harness/model/known_bad.py), kernel {uname}: {self.what} ({self.evidence}); "
                f"an XPASS means this kernel fixed it: narrow the table")


KNOWN_BAD: dict[str, KnownBad] = {
    "hcd_undef_elr_after_hvc": KnownBad(
        series=((7, 2), (7, 3)),
        what="handle_hvc() injects the HCD UNDEF after the HVC trap advanced the PC: ELR_EL2 = HVC + 4",
        evidence="measured on 7.2.13 and 7.3.4; docs/nested-routing.md",
        fixed_by="-kvm-nv-hcd-elr",
        fix="patches/linux/0001-KVM-arm64-nv-Make-the-HCD-UNDEF-return-to-the-HVC-in.patch"),
}


def zero_zero_errno(uname: str | None) -> str | None:
    """What ``KVM_ARM_VM_SMCCC_FILTER`` with (base 0, nr 0) must return on this release.

    From the source of arch/arm64/kvm/hypercalls.c ``kvm_smccc_set_filter``: current kernels (7.3 line 188)
    reject ``!filter.nr_functions`` with EINVAL before anything else; the 6.4 original checked only
    ``end < start`` with ``end = base + nr - 1`` (u32), which wraps to 0xFFFFFFFF for (0, 0), so it went on to
    ``mtree_insert_range(0, 0xFFFFFFFF)``, which overlaps the reserved Arm Architecture Calls ranges: EEXIST.
    Measured (harness/model/filter_model.py ZERO_ZERO_MEASURED): 6.12.117, 7.2.13, 7.3.4 give EINVAL, so the check
    is in 6.12 stable and later.  Before 6.4 there is no filter (None); 6.4 to 6.11: EEXIST.
    """
    v = release_version(uname)
    if v is None or v[:2] < (6, 4):
        return None
    return "EINVAL" if v[:2] >= (6, 12) else "EEXIST"
