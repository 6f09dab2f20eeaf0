"""The byte layouts payloads and the host share, with no I/O: the call table a payload walks (conduits,
arguments, expected results), the result blocks of the EL2-vector, guest-hypervisor and CPU_ON payloads, and
the parameter block (``run-payload --param``).  Offsets are the .S files' (firmware/common.inc).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import protocol
from ..errors import PayloadError
from ..paths import FIRMWARE_DIR
from ..protocol import RESULT_BLOCK_SIZE

# ---- smccc_calls: the call table ------------------------------------------------------------------
# Parameter block (u64): [count, entry_0 (20 u64), entry_1, ...]; entry = [conduit, x0..x17, reserved].
CONDUITS = ("hvc0", "smc0", "hvc1", "smc1", "hvcffff", "smcffff")   # index = conduit number
CONDUIT_ALIASES = {"hvc": "hvc0", "smc": "smc0"}
CONDUIT_INSNS = {"hvc0": 0xD400_0002, "smc0": 0xD400_0003, "hvc1": 0xD400_0022, "smc1": 0xD400_0023,
                 "hvcffff": 0xD41F_FFE2, "smcffff": 0xD41F_FFE3}
CALLS_MAX = 63
CALL_ENTRY_WORDS = 20
CALL_ARG_REGS = 18                  # x0..x17
CALL_HEADER_SIZE = 0x40
CALL_RECORD_SIZE = 0x100
CALL_RESULT_MAGIC = 0x534D_4343_4341_4C4C     # "SMCCCALL"
CALL_FRAME = 32                     # record SP = header sp_at_entry - CALL_FRAME


# header offsets
CALL_HDR_CURRENT_EL, CALL_HDR_HCR_EL2, CALL_HDR_DONE, CALL_HDR_COUNT, CALL_HDR_SP, CALL_HDR_MAGIC = (
    0x00, 0x08, 0x10, 0x18, 0x20, 0x38)


def conduit_index(conduit: str | int) -> int:
    if isinstance(conduit, int) and not isinstance(conduit, bool):
        if 0 <= conduit < len(CONDUITS):
            return conduit
    elif isinstance(conduit, str):
        c = CONDUIT_ALIASES.get(conduit.lower(), conduit.lower())
        if c in CONDUITS:
            return CONDUITS.index(c)
    raise ValueError(f"unknown conduit {conduit!r}: use one of {CONDUITS} (or 'hvc'/'smc', or 0..5)")


def conduit_symbol(conduit: str | int) -> str:
    """The smccc_calls symbol of a conduit's instruction (the exit PC is this + 4)."""
    return "call_" + CONDUITS[conduit_index(conduit)]


def call_pattern(i: int, reg: int) -> int:
    """The value smccc_calls puts in x18..x30 before call ``i``."""
    return (i << 16) | 0x1800 | reg


def _u64(v: int, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not -(1 << 63) <= v < (1 << 64):
        raise ValueError(f"{what} must be an integer that fits in 64 bits, got {v!r}")
    return v & protocol.U64_MASK


@dataclass(frozen=True)
class Call:
    """One call-table entry: the conduit and x0..x17 (missing registers are 0)."""
    conduit: str | int
    regs: tuple[int, ...] = ()

    @classmethod
    def of(cls, spec: Call | Mapping | Sequence) -> Call:
        """Accept a :class:`Call`, ``{"conduit", "regs" | "x"}``, or ``(conduit, [x0, ...])``."""
        if isinstance(spec, Call):
            return spec
        if isinstance(spec, Mapping):
            return cls(spec["conduit"], tuple(spec.get("regs", spec.get("x", ()))))
        conduit, regs = spec
        return cls(conduit, tuple(regs))


def encode_call_table(calls: Iterable[Call | Mapping | Sequence]) -> list[int]:
    """The smccc_calls parameter block as a u64 list (the scenario's ``params``)."""
    calls = [Call.of(c) for c in calls]
    if len(calls) > CALLS_MAX:
        raise ValueError(f"smccc_calls takes at most {CALLS_MAX} calls per run, got {len(calls)}")
    out = [len(calls)]
    for i, c in enumerate(calls):
        if len(c.regs) > CALL_ARG_REGS:
            raise ValueError(f"call {i}: at most {CALL_ARG_REGS} registers (x0..x17), got {len(c.regs)}")
        regs = [_u64(v, f"call {i} x{k}") for k, v in enumerate(c.regs)]
        out += [conduit_index(c.conduit), *regs, *([0] * (CALL_ARG_REGS - len(regs))), 0]
    return out


def decode_call_table(params: Sequence[int]) -> list[Call]:
    """Inverse of :func:`encode_call_table` (conduits come back as names)."""
    n = params[0]
    if len(params) < 1 + n * CALL_ENTRY_WORDS:
        raise ValueError(f"call table says {n} calls but has only {len(params)} words")
    calls = []
    for i in range(n):
        e = params[1 + i * CALL_ENTRY_WORDS: 1 + (i + 1) * CALL_ENTRY_WORDS]
        calls.append(Call(CONDUITS[e[0]], tuple(e[1:1 + CALL_ARG_REGS])))
    return calls


def call_results_size(n: int) -> int:
    return CALL_HEADER_SIZE + n * CALL_RECORD_SIZE


def _need(block: bytes, size: int, what: str) -> None:
    if len(block) < size:
        raise PayloadError(f"{what}: result block has {len(block)} bytes, need {size}",
                           hint=f"have the VMM return at least {RESULT_BLOCK_SIZE:#x} bytes from RESULT_BASE")


def _q(block: bytes, off: int, n: int = 1) -> tuple[int, ...]:
    return struct.unpack_from(f"<{n}Q", block, off)


def decode_call_header(block: bytes) -> dict:
    _need(block, CALL_HEADER_SIZE, "smccc_calls header")
    cur, hcr, done, count, sp, _, _, magic = _q(block, 0, 8)
    return {"current_el": (cur >> 2) & 3, "current_el_raw": cur, "hcr_el2": hcr, "calls_done": done,
            "count": count, "sp": sp, "magic_ok": magic == CALL_RESULT_MAGIC}


def decode_call_results(result_block: bytes, n: int) -> list[dict]:
    """Records of the first ``n`` calls: ``{"index", "regs": [x0..x30], "ret": [x0..x3], "sp"}``."""
    _need(result_block, call_results_size(n), f"smccc_calls results for {n} calls")
    out = []
    for i in range(n):
        vals = _q(result_block, CALL_HEADER_SIZE + i * CALL_RECORD_SIZE, 32)
        out.append({"index": i, "regs": list(vals[:31]), "ret": list(vals[:4]), "sp": vals[31]})
    return out


# ---- el2_vectors ------------------------------------------------------------------------------------
EV_MAX_TRAPS = 16
EV_TRAP_LOG = 0x40
EV_TRAP_SIZE = 0x40
EV_RESULT_SIZE = EV_TRAP_LOG + EV_MAX_TRAPS * EV_TRAP_SIZE   # 0x440


# report slots
EV_SLOT_X0_AFTER_HVC, EV_SLOT_ESR, EV_SLOT_ELR, EV_SLOT_VECTOR, EV_SLOT_X0_AFTER_SMC, EV_SLOT_NTRAPS, \
    EV_SLOT_CURRENT_EL = range(7)


_EV_FIELDS = ("vector", "esr", "elr", "far", "spsr", "x0_in", "x0_out")
EV_FLAG_HCD = 1 << 0


def _trap_entry(block: bytes, off: int, fields: Sequence[str]) -> dict:
    vals = _q(block, off, len(fields))
    d = dict(zip(fields, vals))
    if "esr" in d:
        d["ec"] = (d["esr"] >> 26) & 0x3F
        d["iss"] = d["esr"] & 0x1FF_FFFF
    return d


def decode_el2_vectors(block: bytes) -> dict:
    """``{"count": exceptions taken, "hcr_el2": read back right after the write, "hcr_el2_after_exit": read back
    after an exit to the VMM, "traps": [{vector, esr, ec, iss, elr, far, spsr, x0_in, x0_out}]}``."""
    _need(block, EV_RESULT_SIZE, "el2_vectors results")
    count, hcr, hcr_after_exit = _q(block, 0, 3)
    traps = [_trap_entry(block, EV_TRAP_LOG + k * EV_TRAP_SIZE, _EV_FIELDS) for k in range(min(count, EV_MAX_TRAPS))]
    return {"count": count, "hcr_el2": hcr, "hcr_el2_after_exit": hcr_after_exit, "traps": traps}


def encode_el2_vectors_params(*, hcd: bool = False) -> list[int]:
    """el2_vectors' parameter block: ``[flags]`` (bit 0: set HCR_EL2.HCD before the HVC)."""
    return [EV_FLAG_HCD if hcd else 0]


# ---- el2_guest_hyp ----------------------------------------------------------------------------------
GH_FLAG_TSC = 1 << 0        # set HCR_EL2.TSC: inner SMCs trap to the guest hypervisor
GH_FLAG_HCD = 1 << 1        # set HCR_EL2.HCD: HVC disabled (RES0 while the vCPU advertises EL3)
GH_FLAG_PROXY = 1 << 2      # inner HVC with a PSCI id -> re-issued as `smc #0` at vEL2 (symbol l1_proxy_smc)
GH_FLAG_PROXY_SMC = 1 << 3  # likewise for inner SMCs trapped by TSC
GH_MAX_TRAPS = 16
GH_MAX_INNER_EXC = 4
GH_HEADER_SIZE = 0x40
GH_TRAP_LOG = 0x40
GH_TRAP_SIZE = 0x40
GH_INNER_LOG = GH_TRAP_LOG + GH_MAX_TRAPS * GH_TRAP_SIZE            # 0x440
GH_INNER_SIZE = 0x20
GH_RESULT_SIZE = GH_INNER_LOG + GH_MAX_INNER_EXC * GH_INNER_SIZE    # 0x4C0


# header offsets
GH_HDR_CURRENT_EL, GH_HDR_HCR_EL2, GH_HDR_FLAGS, GH_HDR_NTRAPS, GH_HDR_X0_AFTER_HVC, GH_HDR_X0_AFTER_SMC, \
    GH_HDR_EXIT_PATH, GH_HDR_NINNER = range(0, 0x40, 8)


GH_EXIT_BY_L1 = 1           # the inner exit HVC (#0xffff) reached the guest hypervisor, which ended the run
GH_EXIT_BY_INNER = 2        # the inner exit HVC returned (e.g. UNDEF with HCD): the inner guest ended the run
GH_EXIT_HVC_IMM = 0xFFFF


# trap-log action codes
GH_ACT_HVC_MARKER, GH_ACT_HVC_PROXY, GH_ACT_SMC_MARKER, GH_ACT_SMC_PROXY, GH_ACT_EXIT = 1, 2, 3, 4, 5


GH_ACT_FATAL = 0xE1
_GH_FIELDS = ("vector", "esr", "elr", "spsr", "x0_in", "x0_out", "action", "far")
_GH_INNER_FIELDS = ("vector", "esr", "elr", "x0_out")


def encode_guest_hyp_params(*, tsc: bool = False, hcd: bool = False, proxy: bool = False,
                            proxy_smc: bool = False) -> list[int]:
    """el2_guest_hyp's parameter block: ``[flags]``."""
    return [(GH_FLAG_TSC if tsc else 0) | (GH_FLAG_HCD if hcd else 0) | (GH_FLAG_PROXY if proxy else 0)
            | (GH_FLAG_PROXY_SMC if proxy_smc else 0)]


def decode_guest_hyp(block: bytes) -> dict:
    """Header fields plus ``traps`` (the guest hypervisor's log) and ``inner_exceptions`` (inner EL1's log)."""
    _need(block, GH_RESULT_SIZE, "el2_guest_hyp results")
    cur, hcr, flags, ntraps, x0h, x0s, exit_path, ninner = _q(block, 0, 8)
    traps = [_trap_entry(block, GH_TRAP_LOG + k * GH_TRAP_SIZE, _GH_FIELDS) for k in range(min(ntraps, GH_MAX_TRAPS))]
    inner = [_trap_entry(block, GH_INNER_LOG + k * GH_INNER_SIZE, _GH_INNER_FIELDS)
             for k in range(min(ninner, GH_MAX_INNER_EXC))]
    return {"current_el": (cur >> 2) & 3, "hcr_el2": hcr, "flags": flags, "ntraps": ntraps,
            "x0_after_hvc": x0h, "x0_after_smc": x0s, "exit_path": exit_path, "ninner": ninner,
            "traps": traps, "inner_exceptions": inner}


# ---- el2_cpu_on ------------------------------------------------------------------------------------
CO_RESULT_SIZE = 0x80
CO_MAGIC = 0x5EC0_DA7A


CO_DEFAULT_TARGET, CO_DEFAULT_CTX = 1, 0xC0FFEE


CO_SLOT_CPU_ON, CO_SLOT_AFFINITY, CO_SLOT_POLLS, CO_SLOT_SEEN, CO_SLOT_CPU_ON_AGAIN = range(5)


CO_SLOT_SEC_X0, CO_SLOT_SEC_EL, CO_SLOT_SEC_PC = 8, 9, 10


_CO_FIELDS = ("current_el_raw", "cpu_on", "affinity_calls", "affinity", "cpu_on_again", "secondary_seen",
              "target", "context_id")
_CO_SEC_FIELDS = ("magic", "x0", "current_el_raw", "pc", "mpidr", "hcr_el2", "sctlr")


def decode_cpu_on(block: bytes) -> dict:
    """el2_cpu_on's result block: the boot vCPU's fields plus ``secondary`` (None until its magic is there).

    PSCI return values (``cpu_on``, ``affinity``, ``cpu_on_again``) are returned as signed integers.
    """
    _need(block, CO_RESULT_SIZE, "el2_cpu_on results")
    d = dict(zip(_CO_FIELDS, _q(block, 0, len(_CO_FIELDS))))
    for k in ("cpu_on", "affinity", "cpu_on_again"):
        d[k] = d[k] - (1 << 64) if d[k] >> 63 else d[k]
    d["current_el"] = (d["current_el_raw"] >> 2) & 3
    sec = dict(zip(_CO_SEC_FIELDS, _q(block, 0x40, len(_CO_SEC_FIELDS))))
    if sec["magic"] == CO_MAGIC:
        sec["current_el"] = (sec["current_el_raw"] >> 2) & 3
        d["secondary"] = sec
    else:
        d["secondary"] = None
    return d


def encode_cpu_on_params(target: int = CO_DEFAULT_TARGET, context_id: int = CO_DEFAULT_CTX) -> list[int]:
    """el2_cpu_on's parameter block: ``[target MPIDR, context id]``."""
    return [target, context_id]


# ---- a user payload's parameter block (run-payload --param / --params) ----------------------------------
# The scenario's ``params`` (u64 words) are written at PARAM_BASE before the first vCPU runs; the block runs up
# to the result block.  ``smccc-harness run-payload`` builds it from a file and OFFSET=VALUE assignments.
PARAM_BLOCK_SIZE = protocol.RESULT_BASE - protocol.PARAM_BASE      # 0x8000 bytes
_PARAM_HINT = ("use --param OFFSET=VALUE with a byte offset into the parameter block at PARAM_BASE (0x40100000) and a "
               f"u64 value, both decimal or 0x-hex, e.g. --param 0x8=0xC4000003; OFFSET + 8 <= {PARAM_BLOCK_SIZE:#x}")
_PARAMS_FILE_HINT = (f"--params FILE: raw bytes (at most {PARAM_BLOCK_SIZE:#x}), written at PARAM_BASE as they are; or, "
                     "for a FILE ending in .json, a list of u64 words ([1, \"0x84000000\"]) or an object of byte "
                     "offsets to u64 values ({\"0x8\": \"0xC4000003\"})")


def _param_int(text, what: str, hint: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if isinstance(text, str):
        try:
            return int(text.strip().replace("_", ""), 0)
        except ValueError:
            pass
    raise PayloadError(f"{what}: {text!r} is not a number", hint=hint)


def _check_param(offset: int, value: int, what: str, hint: str) -> tuple[int, int]:
    if not 0 <= offset <= PARAM_BLOCK_SIZE - 8:
        raise PayloadError(f"{what}: offset {offset:#x} is outside the parameter block (a u64 at 0.."
                           f"{PARAM_BLOCK_SIZE - 8:#x})", hint=hint)
    if not -(1 << 63) <= value < (1 << 64):
        raise PayloadError(f"{what}: value {value:#x} does not fit in 64 bits", hint=hint)
    return offset, value & protocol.U64_MASK


def parse_param(text: str) -> tuple[int, int]:
    """``OFFSET=VALUE`` (``--param``) -> (byte offset, u64 value); :class:`PayloadError` with a hint if bad."""
    what = f"--param {text!r}"
    off, eq, val = str(text).partition("=")
    if not eq or not off.strip() or not val.strip():
        raise PayloadError(f"{what}: not OFFSET=VALUE", hint=_PARAM_HINT)
    return _check_param(_param_int(off, what, _PARAM_HINT), _param_int(val, what, _PARAM_HINT), what, _PARAM_HINT)


def read_params_file(path: Path | str) -> bytes:
    """The bytes of a ``--params`` file: raw, or built from JSON (a ``.json`` file, see ``_PARAMS_FILE_HINT``)."""
    path = Path(path)
    what = f"--params {path}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PayloadError(f"{what}: cannot read it: {e.strerror}", hint=_PARAMS_FILE_HINT) from None
    if path.suffix.lower() != ".json":
        if len(raw) > PARAM_BLOCK_SIZE:
            raise PayloadError(f"{what}: {len(raw)} bytes, more than the parameter block's {PARAM_BLOCK_SIZE:#x}",
                               hint=_PARAMS_FILE_HINT)
        return raw
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise PayloadError(f"{what}: not JSON: {e}", hint=_PARAMS_FILE_HINT) from None
    if isinstance(doc, list):
        items = [(8 * i, _param_int(v, f"{what} word {i}", _PARAMS_FILE_HINT)) for i, v in enumerate(doc)]
    elif isinstance(doc, dict):
        items = [(_param_int(k, f"{what} key", _PARAMS_FILE_HINT), _param_int(v, f"{what} [{k!r}]", _PARAMS_FILE_HINT))
                 for k, v in doc.items()]
    else:
        raise PayloadError(f"{what}: JSON must be a list of u64 words or an object of offset: value",
                           hint=_PARAMS_FILE_HINT)
    return param_block_bytes(b"", [_check_param(o, v, what, _PARAMS_FILE_HINT) for o, v in items])


def param_block_bytes(base: bytes = b"", assignments: Iterable[tuple[int, int]] = ()) -> bytes:
    """``base`` with each (offset, value) written over it as a little-endian u64, zero-extended as needed."""
    block = bytearray(base)
    for off, val in assignments:
        off, val = _check_param(off, val, f"parameter at {off:#x}", _PARAM_HINT)
        if len(block) < off + 8:
            block.extend(bytes(off + 8 - len(block)))
        block[off:off + 8] = struct.pack("<Q", val)
    return bytes(block)


def param_words(base: bytes = b"", assignments: Iterable[tuple[int, int]] = ()) -> list[int]:
    """The scenario's ``params`` (u64 words at PARAM_BASE) for ``base`` bytes with ``assignments`` over them."""
    block = param_block_bytes(base, assignments)
    block += bytes(-len(block) % 8)
    return list(struct.unpack(f"<{len(block) // 8}Q", block))


# ---- firmware/common.inc constants (for the unit test that keeps both sides in sync) -------------------
def common_inc_constants(path: Path | None = None) -> dict[str, int]:
    """The ``.equ NAME, value`` lines with plain integer values in a firmware file (default common.inc)."""
    text = (path or FIRMWARE_DIR / "common.inc").read_text()
    out = {}
    for m in re.finditer(r"^\s*\.equ\s+(\w+)\s*,\s*(0x[0-9A-Fa-f]+|\d+)\b", text, re.MULTILINE):
        out[m.group(1)] = int(m.group(2), 0)
    return out
