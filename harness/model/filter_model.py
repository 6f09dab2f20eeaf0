"""A model of KVM's SMCCC filter: which errno ``KVM_SET_DEVICE_ATTR(KVM_ARM_VM_SMCCC_FILTER)`` returns.

docs/kvm-smccc-abi.md §1.1 (``kvm_smccc_set_filter()``), checks in this order, for each range
``[base, base + nr_functions)`` userspace adds, one per call:

1. any ``pad`` byte is not zero                                        -> EINVAL
2. ``end = base + nr - 1`` (u32) ``< base`` (``nr == 0`` or a wrap), or ``action >= 3`` -> EINVAL
3. a vCPU of the VM has already run (``kvm_vm_has_ran_once``)           -> EBUSY
4. the range overlaps one already inserted, or the reserved Arm Architecture Calls ranges
   ``0x8000_0000-0x8000_FFFF`` / ``0xC000_0000-0xC000_FFFF`` (present from the first call on) -> EEXIST
5. otherwise the range is inserted                                      -> success (``None``)

The edge case ``base = 0, nr = 0``: ``end`` wraps to ``0xFFFF_FFFF``, which is not ``< base``, so older kernels
reach the insert and return EEXIST (the range overlaps the reserved ones); newer kernels reject it with EINVAL.
Measured (tests/system/test_filter_model.py): 6.12.117, 7.2.13 and 7.3.4 all return EINVAL; :data:`ZERO_ZERO_MEASURED`.

The harness uses the model to reject a bad ``--forward`` / scenario filter spec before it boots anything
(:func:`check_filters`), with a message naming the conflicting range; the filter-contract tests still send
bad ranges to the kernel on purpose (``harness.protocol.validate_filter`` only checks shapes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import HarnessError

U32 = 0xFFFF_FFFF
NR_ACTIONS = 3
ACTION_NAMES = {0: "handle", 1: "deny", 2: "fwd"}
ACTION_VALUES = {v: k for k, v in ACTION_NAMES.items()}
RESERVED = ((0x8000_0000, 0x8000_FFFF), (0xC000_0000, 0xC000_FFFF))   # inclusive [start, end]
RESERVED_NAME = "the reserved Arm Architecture Calls range"
# What KVM returns for (base 0, nr 0), by kernel release, as measured by tests/system/test_filter_model.py.
# 6.12.117 (a stable release) already has the EINVAL check: the fix was backported.
ZERO_ZERO_MEASURED = {"6.12.117": "EINVAL", "7.2.13": "EINVAL", "7.3.4": "EINVAL"}


class FilterSpecError(HarnessError):
    """A filter range KVM would refuse; the message names the range and the reason."""

    def __init__(self, message: str, *, errno: str, index: int, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.errno = errno
        self.index = index


def fmt_range(start: int, end: int) -> str:
    """``[0x84000000, 0x8400001f]`` (inclusive end, as KVM's maple tree stores it)."""
    return f"[{start:#x}, {end:#x}]"


def action_value(action: int | str) -> int:
    if isinstance(action, str):
        try:
            return ACTION_VALUES[action]
        except KeyError:
            raise ValueError(f"filter action must be one of {sorted(ACTION_VALUES)} or an integer, "
                             f"got {action!r}") from None
    return int(action)


@dataclass
class Verdict:
    """The model's answer for one range: ``errno`` (None = accepted), why, and what it collides with."""
    errno: str | None
    reason: str = ""
    conflict: tuple[int, int] | None = None      # the inclusive range it overlaps (EEXIST)
    conflict_name: str = ""


@dataclass
class FilterModel:
    """The state of one VM's filter: the ranges inserted so far and whether a vCPU has run.

    ``zero_zero``: what ``(base 0, nr 0)`` gets: "EINVAL" (newer kernels, e.g. 7.3.4) or "EEXIST" (older).
    """
    zero_zero: str = "EINVAL"
    ran: bool = False
    ranges: list[tuple[int, int, int]] = field(default_factory=list)     # (start, end inclusive, action)

    @classmethod
    def for_kernel(cls, release: str | None) -> FilterModel:
        """The model for a kernel ``uname -r`` (e.g. ``7.3.4+deb13-cloud-arm64``)."""
        up = (release or "").split("+")[0].split("-")[0]
        return cls(zero_zero=ZERO_ZERO_MEASURED.get(up, "EINVAL"))

    def check(self, base: int, nr: int, action: int | str = 2, pad: Iterable[int] | None = None) -> Verdict:
        """What KVM would answer to this range now (the state is not changed)."""
        action = action_value(action)
        if pad is not None and any(pad):
            return Verdict("EINVAL", "a pad byte is not zero")
        base &= U32
        end = (base + nr - 1) & U32
        if end < base:
            why = "nr_functions is 0" if nr == 0 else f"the range wraps past {U32:#x}"
            return Verdict("EINVAL", why)
        if action >= NR_ACTIONS:
            return Verdict("EINVAL", f"action {action} is not HANDLE (0), DENY (1) or FWD_TO_USER (2)")
        if base == 0 and nr == 0 and self.zero_zero == "EINVAL":
            return Verdict("EINVAL", "nr_functions is 0")
        if self.ran:
            return Verdict("EBUSY", "a vCPU of the VM has already run (filters must be set before KVM_RUN)")
        for start, stop in RESERVED:
            if base <= stop and start <= end:
                return Verdict("EEXIST", f"it overlaps {RESERVED_NAME} {fmt_range(start, stop)}",
                               (start, stop), RESERVED_NAME)
        for i, (start, stop, act) in enumerate(self.ranges):
            if base <= stop and start <= end:
                return Verdict("EEXIST", f"it overlaps range #{i} {fmt_range(start, stop)} "
                               f"({ACTION_NAMES.get(act, act)}) installed before it", (start, stop), f"range #{i}")
        return Verdict(None)

    def insert(self, base: int, nr: int, action: int | str = 2, pad: Iterable[int] | None = None) -> str | None:
        """KVM_SET_DEVICE_ATTR for one range: the errno name KVM returns (None = success), state updated."""
        v = self.check(base, nr, action, pad)
        if v.errno is None:
            self.ranges.append((base & U32, (base + nr - 1) & U32, action_value(action)))
        return v.errno

    def run(self) -> None:
        """A vCPU did KVM_RUN: every later insert fails with EBUSY (after the EINVAL checks)."""
        self.ran = True


def _fields(f: Mapping) -> tuple[int, int, int | str, list[int] | None]:
    return f["base"], f["nr"], f.get("action", "fwd"), f.get("pad")


def predict(filters: Iterable[Mapping], late_filters: Iterable[Mapping] = (), *, zero_zero: str = "EINVAL"
            ) -> tuple[list[str | None], list[str | None]]:
    """The errno names KVM returns for a scenario's ``filters`` (before the run) and ``late_filters`` (after)."""
    m = FilterModel(zero_zero=zero_zero)
    before = [m.insert(*_fields(f)) for f in filters]
    m.run()
    after = [m.insert(*_fields(f)) for f in late_filters]
    return before, after


def check_filters(filters: Iterable[Mapping], *, what: str = "filter") -> None:
    """Raise :class:`FilterSpecError` for the first range KVM would refuse, naming it and the conflict."""
    m = FilterModel()
    for i, f in enumerate(filters):
        base, nr, action, pad = _fields(f)
        try:
            v = m.check(base, nr, action, pad)
        except ValueError as e:
            raise FilterSpecError(f"{what} #{i}: {e}", errno="EINVAL", index=i,
                                  hint="actions: fwd (FWD_TO_USER), deny (DENY), handle (HANDLE)") from None
        if v.errno is not None:
            end = (base + nr - 1) & U32
            shown = fmt_range(base, end) if nr else f"base {base:#x}, nr 0"
            if v.conflict is not None and v.conflict_name == RESERVED_NAME:
                hint = ("KVM handles the Arm Architecture Calls (SMCCC_VERSION, ARCH_FEATURES, workarounds) itself; "
                        "leave 0x80000000-0x8000ffff and 0xc0000000-0xc000ffff out of the filter")
            elif v.conflict is not None:
                hint = "ranges must not overlap: merge them, or shorten one"
            else:
                hint = "a range is BASE[+NR] with NR >= 1, not past 0xffffffff, action fwd|deny|handle"
            raise FilterSpecError(f"{what} #{i} {shown} ({ACTION_NAMES.get(action_value(action), action)}): "
                                  f"KVM would refuse it with {v.errno}: {v.reason}",
                                  errno=v.errno, index=i, hint=hint)
        m.insert(base, nr, action, pad)


def parse_forward(text: str) -> list[dict]:
    """``run-payload --forward``: 'psci' (the PSCI ranges) or ``BASE[+NR][:fwd|deny|handle]`` -> filter ranges."""
    from .scenarios import PSCI_FWD
    if text == "psci":
        return list(PSCI_FWD)
    try:
        rng, _, action = text.partition(":")
        base, _, nr = rng.partition("+")
        return [{"base": int(base, 0), "nr": int(nr or "1", 0), "action": action or "fwd"}]
    except ValueError:
        raise HarnessError(f"--forward {text!r}: not a range",
                           hint="use 'psci', or BASE[+NR][:fwd|deny|handle], e.g. 0xC2000000+0x100:fwd") from None
