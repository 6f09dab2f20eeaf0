"""Building scenario requests on the host (the wire format is in :mod:`harness.protocol`)."""

from __future__ import annotations

import os

from .. import protocol as P
from ..errors import HarnessError

PSCI_BASE32 = 0x8400_0000
PSCI_BASE64 = 0xC400_0000
PSCI_NR = 0x20


def fwd(base: int, nr: int = 1) -> dict:
    return {"base": base, "nr": nr, "action": "fwd"}


def deny(base: int, nr: int = 1) -> dict:
    return {"base": base, "nr": nr, "action": "deny"}


def handle(base: int, nr: int = 1) -> dict:
    return {"base": base, "nr": nr, "action": "handle"}


# The ranges kvmtool's --psci installs (docs/kvm-smccc-abi.md §3.5), minus the legacy 0.1 DENY.
PSCI_FWD = (fwd(PSCI_BASE32, PSCI_NR), fwd(PSCI_BASE64, PSCI_NR))
# SDEI (DEN0054): its SMC64 ids 0xC4000020..0xC400003F, answered by the VMM's dispatcher (harness/guest/sdei.py)
SDEI_BASE = 0xC400_0020
SDEI_NR = 0x20
SDEI_FWD = (fwd(SDEI_BASE, SDEI_NR),)


def scenario(name: str, payload, *, filters=(), el2: bool = False, e2h0: bool = False, vcpus: int = 1,
             handler: str = "psci", replies: dict | None = None, params=(), deadline_s: float = 10.0,
             **extra) -> dict:
    """A validated ``run`` request for ``payload`` (a :class:`harness.images.payloads.Payload`)."""
    spec = {"name": name, "payload": payload.to_wire(), "filters": list(filters), "el2": el2, "e2h0": e2h0,
            "vcpus": vcpus, "handler": handler,
            "replies": {f"{int(k):#x}" if not isinstance(k, str) else k: list(v) for k, v in (replies or {}).items()},
            "params": list(params), "deadline_s": deadline_s}
    spec.update(extra)
    return P.validate_scenario(spec)


LIVELOCK_ENV = "SMCCC_LIVELOCK_S"


def watchdog_from_env(spec: dict, env=None) -> dict:
    """``SMCCC_LIVELOCK_S=0`` turns the VMM's progress watchdog (harness/guest/runner.py) off for every scenario
    that does not set ``livelock_s`` itself: a knob to measure or debug without it.  Unset: ``spec`` unchanged."""
    value = (os.environ if env is None else env).get(LIVELOCK_ENV)
    if value is None or "livelock_s" in spec:
        return spec
    if value.strip() != "0":
        raise HarnessError(f"{LIVELOCK_ENV}={value!r}: only 0 (the progress watchdog off) is understood",
                           f"unset {LIVELOCK_ENV} for the default watchdog, or set a scenario's livelock_s")
    return dict(spec, livelock_s=0)
