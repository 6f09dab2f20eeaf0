"""The host <-> guest control protocol and the payload VM memory map.

Imported by both sides: the host (Python >= 3.11) and the in-guest agent (Debian's python3.13-minimal),
so this module uses the standard library only and nothing newer than 3.11.

Transport: JSON lines over the virtio-serial port named ``smccc.ctl`` (guest: ``/dev/vportNpM``; host: a
unix socket in the run directory).  One message per line, UTF-8, no embedded newlines.

    guest -> host   {"type": "hello", "agent": VERSION, "uname": str, "caps": {...}}
    host  -> guest  {"type": "request", "id": int, "op": str, "args": {...}}
    guest -> host   {"type": "response", "id": int, "ok": true, "result": {...}}
                    {"type": "response", "id": int, "ok": false, "error": {"kind": str, "message": str}}

Operations: ``ping``, ``caps``, ``run`` (one scenario, see :func:`validate_scenario`), ``exec`` (argv in the
guest, for diagnostics and the fault tests), ``shutdown``.
"""

from __future__ import annotations

import base64
import json

AGENT_VERSION = 1
PORT_NAME = "smccc.ctl"
READY_BANNER = "SMCCC-AGENT READY"

# ---- payload VM memory map (docs/design.md) ------------------------------------------------------
GICD_BASE = 0x0800_0000
GICR_BASE = 0x080A_0000
GICR_STRIDE = 0x2_0000
REPORT_BASE = 0x0900_0000
REPORT_SIZE = 0x1000
REPORT_DONE = 0xFF8           # offset: store here = payload finished, value = exit code
RAM_BASE = 0x4000_0000
RAM_SIZE_DEFAULT = 0x20_0000  # 2 MiB
PARAM_BASE = 0x4010_0000      # parameter block written by the handler before the first run
RESULT_BASE = 0x4010_8000     # result block written by the payload
RESULT_BLOCK_SIZE = 0x4000   # bytes at RESULT_BASE the VMM returns: covers every payload's result block
U64_MASK = 0xFFFF_FFFF_FFFF_FFFF   # a 64-bit register's value: what the guest and the host mask with
STACK_SIZE = 0x1000
MAX_VCPUS = 8

ACTIONS = {"handle": 0, "deny": 1, "fwd": 2}
# payload["state"]: AArch64, or AArch32 EL1 (KVM_ARM_VCPU_EL1_32BIT) entered in A32 or T32 (harness/guest/runner.py)
PAYLOAD_STATES = ("aarch64", "a32", "t32")


class ProtocolError(ValueError):
    """A malformed message or scenario; the text says what is wrong."""


def encode(msg: dict) -> bytes:
    return (json.dumps(msg, separators=(",", ":"), sort_keys=True) + "\n").encode()


def decode(line: bytes | str) -> dict:
    try:
        msg = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"not a JSON line: {line[:120]!r}: {e}") from None
    if not isinstance(msg, dict) or "type" not in msg:
        raise ProtocolError(f"message without a type: {msg!r}")
    return msg


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


def _int(d: dict, key: str, lo: int, hi: int, default=None) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"scenario field {key!r} must be an integer in [{lo:#x}, {hi:#x}], got {v!r}")
    return v


def validate_filter(f: dict) -> dict:
    """Shape check of one filter range (types and widths only).

    The harness deliberately does *not* pre-judge what KVM accepts (zero length, wrap, reserved ranges,
    overlap): the filter tests pass such ranges through so that the kernel's own errno is observed.
    """
    if not isinstance(f, dict):
        raise ProtocolError(f"filter must be an object, got {f!r}")
    base = _int(f, "base", 0, 0xFFFF_FFFF)
    nr = _int(f, "nr", 0, 0xFFFF_FFFF)
    action = f.get("action", "fwd")
    if isinstance(action, str):
        if action not in ACTIONS:
            raise ProtocolError(f"filter action must be one of {sorted(ACTIONS)} or an integer, got {action!r}")
        action = ACTIONS[action]
    if not isinstance(action, int) or not 0 <= action <= 255:
        raise ProtocolError(f"filter action must fit in a u8, got {action!r}")
    pad = f.get("pad", [0] * 15)
    if not (isinstance(pad, list) and len(pad) == 15 and all(isinstance(b, int) and 0 <= b <= 255 for b in pad)):
        raise ProtocolError("filter pad must be a list of 15 bytes")
    return {"base": base, "nr": nr, "action": action, "pad": pad}


# Every key a ``run`` request may carry; harness/guest/runner.py reads nothing else.  The last group is read
# only inside the guest: in_kernel_gic (default: el2), probes (VM-fd attribute probes), set_regs (registers set
# before the first KVM_RUN), psci_minor (the emulator's PSCI 1.x minor), migrate (save/restore the VM at a
# pause point), max_exits / max_trace (limits of the run and of its trace), livelock_s (the progress watchdog:
# absent = SMC/HVC only over 1.5 s, N = any instruction over N s, 0 = off; harness/guest/runner.py).
SCENARIO_KEYS = frozenset({
    "name", "payload", "vcpus", "el2", "e2h0", "ram_size", "filters", "late_filters", "handler", "replies",
    "params", "deadline_s", "psci_0_2",
    "in_kernel_gic", "probes", "set_regs", "psci_minor", "migrate", "max_exits", "max_trace", "livelock_s",
    "sdei",
})


def validate_scenario(s: dict) -> dict:
    """Check a ``run`` request before it crosses the channel (host) and again on arrival (guest).

    Fields: ``name``; ``payload`` {``entry``, ``segments`` [{``addr``, ``data`` (base64)}], ``symbols``};
    ``vcpus``; ``el2``; ``e2h0``; ``ram_size``; ``filters`` [...]; ``handler`` ("psci" | "record");
    ``replies`` {"0x84000000": [x0, x1, x2, x3]}; ``params`` [u64...] (written at PARAM_BASE);
    ``deadline_s``; ``psci_0_2`` (vCPU feature, default true); ``in_kernel_gic`` (default: el2);
    ``livelock_s`` (progress watchdog window: absent = watch SMC/HVC only for 1.5 s; N = any instruction for N
    s, e.g. a ``b .``; 0 = off).
    """
    if not isinstance(s, dict):
        raise ProtocolError("scenario must be an object")
    unknown = sorted(set(s) - SCENARIO_KEYS)
    if unknown:                     # a misspelt key would otherwise be carried to the guest and ignored there
        import difflib
        close = {k: difflib.get_close_matches(k, SCENARIO_KEYS, 1) for k in unknown}
        raise ProtocolError("unknown scenario key(s): " + ", ".join(
            k + (f" (did you mean {close[k][0]!r}?)" if close[k] else "") for k in unknown)
            + "; known: " + ", ".join(sorted(SCENARIO_KEYS)))
    name = s.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError("scenario needs a non-empty 'name'")
    vcpus = _int(s, "vcpus", 1, MAX_VCPUS, 1)
    ram_size = _int(s, "ram_size", 0x10000, 0x4000_0000, RAM_SIZE_DEFAULT)
    if ram_size % 0x10000:
        raise ProtocolError("ram_size must be a multiple of 64 KiB")
    p = s.get("payload")
    if not isinstance(p, dict):
        raise ProtocolError("scenario needs a 'payload' object (entry, segments)")
    entry = _int(p, "entry", 0, 2**64 - 1)
    if p.get("state", "aarch64") not in PAYLOAD_STATES:
        raise ProtocolError(f"payload state must be one of {PAYLOAD_STATES} (the instruction set at entry), "
                            f"got {p.get('state')!r}")
    segs = p.get("segments")
    if not isinstance(segs, list) or not segs:
        raise ProtocolError("payload needs at least one segment")
    ram_end = RAM_BASE + ram_size
    stacks = ram_end - vcpus * STACK_SIZE
    for seg in segs:
        addr = _int(seg, "addr", 0, 2**64 - 1)
        size = len(unb64(seg.get("data", ""))) if isinstance(seg.get("data"), str) else -1
        if size < 0:
            raise ProtocolError("segment data must be base64 text")
        memsz = _int(seg, "memsz", size, 2**32, size)
        if addr < RAM_BASE or addr + memsz > ram_end:
            raise ProtocolError(
                f"payload segment [{addr:#x}, {addr + memsz:#x}) lies outside guest RAM [{RAM_BASE:#x}, {ram_end:#x})")
        if addr + memsz > stacks:
            raise ProtocolError(
                f"payload segment [{addr:#x}, {addr + memsz:#x}) overlaps the handler's vCPU stacks at {stacks:#x}")
        if addr < RESULT_BASE + 0x1000 and addr + memsz > PARAM_BASE:
            raise ProtocolError(
                f"payload segment [{addr:#x}, {addr + memsz:#x}) overlaps the parameter/result pages "
                f"[{PARAM_BASE:#x}, {RESULT_BASE + 0x1000:#x})")
    if not RAM_BASE <= entry < ram_end:
        raise ProtocolError(f"payload entry {entry:#x} is outside guest RAM")
    filters = [validate_filter(f) for f in s.get("filters", [])]
    late_filters = [validate_filter(f) for f in s.get("late_filters", [])]
    handler = s.get("handler", "psci")
    if handler not in ("psci", "record"):
        raise ProtocolError(f"handler must be 'psci' or 'record', got {handler!r}")
    replies = s.get("replies", {})
    if not isinstance(replies, dict):
        raise ProtocolError("replies must map a function id (hex string) to [x0..x3]")
    for k, v in replies.items():
        try:
            int(k, 0)
        except (TypeError, ValueError):
            raise ProtocolError(f"reply key {k!r} is not a function id") from None
        if not (isinstance(v, list) and 1 <= len(v) <= 18 and all(isinstance(x, int) for x in v)):
            raise ProtocolError(f"reply for {k} must be a list of 1..18 integers")
    params = s.get("params", [])
    if not (isinstance(params, list) and len(params) <= 4096 and all(isinstance(x, int) and 0 <= x < 2**64 for x in params)):
        raise ProtocolError("params must be a list of u64")
    deadline = s.get("deadline_s", 10.0)
    if not isinstance(deadline, (int, float)) or not 0 < deadline <= 600:
        raise ProtocolError("deadline_s must be in (0, 600]")
    if "livelock_s" in s:
        ll = s["livelock_s"]
        if isinstance(ll, bool) or not isinstance(ll, (int, float)) or not (ll == 0 or 0.1 <= ll <= 600):
            raise ProtocolError(f"livelock_s must be 0 (watchdog off) or in [0.1, 600] seconds, got {ll!r}")
    if "sdei" in s:
        _validate_sdei(s["sdei"], vcpus)
    out = dict(s)
    out.update(vcpus=vcpus, ram_size=ram_size, filters=filters, late_filters=late_filters, handler=handler, replies=replies,
               params=params, deadline_s=float(deadline), el2=bool(s.get("el2", False)),
               e2h0=bool(s.get("e2h0", False)))
    return out


def _validate_sdei(sd, vcpus: int) -> None:
    """``sdei``: {"signal": [{"event": u32, "vcpu": index, "after_calls": N}]} -- events the host raises at a vCPU
    once it has made N forwarded calls (harness/guest/sdei_run.py)."""
    if not isinstance(sd, dict) or set(sd) - {"signal"}:
        raise ProtocolError(f"sdei must be an object with the key 'signal' only, got {sd!r}")
    sig = sd.get("signal", [])
    if not isinstance(sig, list) or len(sig) > 64:
        raise ProtocolError("sdei.signal must be a list of at most 64 {event, vcpu, after_calls} objects")
    for x in sig:
        if not isinstance(x, dict) or set(x) - {"event", "vcpu", "after_calls"} or "event" not in x:
            raise ProtocolError(f"sdei.signal entry must be {{event, vcpu, after_calls}} (event required), got {x!r}")
        _int(x, "event", 0, 0xFFFF_FFFF)
        _int(x, "vcpu", 0, vcpus - 1, 0)
        _int(x, "after_calls", 0, 1_000_000, 0)
