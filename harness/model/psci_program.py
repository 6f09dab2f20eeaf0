"""Programs for firmware/psci_smp.S: a list of PSCI calls made by the boot vCPU, plus what secondaries do.

The layouts mirror the header of firmware/psci_smp.S.  :func:`guest_view` reduces a run to what the guest
could observe (return values, which secondaries arrived, with which x0, at which EL) so that the in-kernel
and the userspace PSCI runs of the same program can be compared field by field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import protocol as P

OP_HVC, OP_SMC, OP_POLL_HVC, OP_POLL_SMC, OP_WAIT_SECONDARY, OP_WAIT_ACTION = range(6)
SEC_PARK, SEC_CPU_OFF, SEC_DONE, SEC_CPU_ON_OTHER = range(4)
MAX_ENTRIES = 48
ENTRY_WORDS = 8
RECORD_SIZE = 0x40
SEC_BASE = 0x1000
SMP_MAGIC = 0x00504D5349435350
SEC_MAGIC = 0x5EC0ED
U64 = P.U64_MASK


@dataclass(frozen=True)
class Step:
    op: int
    x: tuple[int, int, int, int] = (0, 0, 0, 0)
    arg: int = 0
    max_iter: int = 1
    label: str = ""


def call(conduit: str, fid: int, x1: int = 0, x2: int = 0, x3: int = 0, label: str = "") -> Step:
    return Step(OP_SMC if conduit == "smc" else OP_HVC, (fid, x1 & U64, x2 & U64, x3 & U64),
                label=label or f"{fid:#x}")


# Waits are bounded by the scenario's deadline, not by a spin count: how many iterations fit in the time a
# sibling vCPU thread needs to be scheduled depends on the host's load (TCG on 2 busy cores: > 5 M spins).
FOREVER = 1 << 48


def poll(conduit: str, fid: int, x1: int, x2: int, until: int, max_iter: int = FOREVER, label: str = "") -> Step:
    return Step(OP_POLL_SMC if conduit == "smc" else OP_POLL_HVC, (fid, x1, x2, 0), arg=until & U64,
                max_iter=max_iter, label=label or f"poll {fid:#x}")


def wait_secondary(index: int, arrivals: int = 1, max_iter: int = FOREVER) -> Step:
    return Step(OP_WAIT_SECONDARY, (0, index, arrivals, 0), max_iter=max_iter, label=f"wait cpu{index}")


def wait_action(index: int, max_iter: int = FOREVER) -> Step:
    return Step(OP_WAIT_ACTION, (0, index, 0, 0), max_iter=max_iter, label=f"wait cpu{index} action")


def encode(steps: list[Step], secondary_action: int = SEC_PARK, secondary_conduit: str = "hvc",
           target_mpidr: int = 0) -> list[int]:
    if len(steps) > MAX_ENTRIES:
        raise ValueError(f"at most {MAX_ENTRIES} steps")
    words = [len(steps), secondary_action, 1 if secondary_conduit == "smc" else 0, target_mpidr]
    for s in steps:
        words += [s.op, *s.x, s.arg, s.max_iter, 0]
    return words


def decode(block: bytes, steps: list[Step], max_cpus: int = 8) -> dict:
    block = block + bytes(max(0, SEC_BASE + max_cpus * 0x40 - len(block)))
    magic, done, current_el = struct.unpack_from("<3Q", block, 0)
    records = []
    for i, s in enumerate(steps[:done]):
        x0, x1, x2, x3, iters = struct.unpack_from("<5Q", block, 0x40 + i * RECORD_SIZE)
        records.append({"step": s.label, "x0": x0, "x1": x1, "x2": x2, "x3": x3, "iters": iters})
    secondaries = {}
    for k in range(max_cpus):
        m, ctx, el, mpidr, off_ret, spsel, arrivals, acted = struct.unpack_from("<8Q", block, SEC_BASE + k * 0x40)
        if m == SEC_MAGIC:
            secondaries[k] = {"context_id": ctx, "el": (el >> 2) & 3, "mpidr": mpidr, "cpu_off_returned": off_ret,
                              "spsel": spsel, "arrivals": arrivals, "action_done": acted}
    return {"magic_ok": magic == SMP_MAGIC, "done": done, "el": (current_el >> 2) & 3, "records": records,
            "secondaries": secondaries}


def guest_view(result, steps: list[Step]) -> dict:
    """What the guest observed in one run; identical for in-kernel and userspace PSCI when both are right.

    Poll iteration counts are timing, not behaviour, and are left out.
    """
    d = decode(result.result_block, steps)
    events = [(e["name"], e["data"][:1]) for e in result.events if e["kind"] == "system_event"]
    return {
        "outcome": result.outcome,
        "exit_code": result.exit_code,
        "records": [{k: v for k, v in r.items() if k != "iters"} for r in d["records"]],
        "secondaries": d["secondaries"],
        "system_events": events,
    }


def side_by_side(a: dict, b: dict, left: str = "in-kernel", right: str = "userspace") -> str:
    """Two guest views, line by line, differences marked with '!!'."""
    def lines(v):
        out = [f"outcome={v['outcome']} exit_code={v['exit_code']}"]
        out += [f"{r['step']:<28} x0={r['x0']:#x} x1={r['x1']:#x}" for r in v["records"]]
        out += [f"cpu{k}: ctx={s['context_id']:#x} el={s['el']} arrivals={s['arrivals']} "
                f"off_ret={s['cpu_off_returned']:#x}" for k, s in sorted(v["secondaries"].items())]
        out += [f"system_event {n} {d}" for n, d in v["system_events"]]
        return out
    la, lb = lines(a), lines(b)
    w = max([len(x) for x in la] + [len(left)])
    rows = [f"   {left:<{w}} | {right}"]
    for i in range(max(len(la), len(lb))):
        x = la[i] if i < len(la) else ""
        y = lb[i] if i < len(lb) else ""
        rows.append(f"{'!! ' if x != y else '   '}{x:<{w}} | {y}")
    return "\n".join(rows)
