"""Bare-metal payloads: build ``firmware/*.S`` with cross binutils, load and check the ELF, and the
parameter / result-block layouts of the payloads that use them.

Build: every ``firmware/*.S`` is assembled with ``aarch64-linux-gnu-as -march=armv8.4-a -I firmware`` and
linked alone with ``aarch64-linux-gnu-ld -T firmware/payload.ld`` (``*.inc`` files are shared includes).
The output goes to ``cache_dir()/firmware/<key>/<name>.elf``, where ``key`` is the sha256 of the
firmware sources, the linker script, the tool versions and the flags; a build goes to a temporary
directory that is renamed into place, so concurrent builds (pytest-xdist) never see half-written files
and a matching key never rebuilds.

Load: :func:`load_elf` checks the ELF (ELF64, little-endian, EM_AARCH64, ET_EXEC, at least one PT_LOAD,
the segments inside guest RAM and clear of the parameter/result pages and the vCPU stacks — the same
rules as :func:`harness.protocol.validate_scenario`, which it calls) and returns a :class:`Payload`,
whose :meth:`Payload.to_wire` is the scenario's ``payload`` object.

Result blocks: the VMM returns the bytes at ``RESULT_BASE`` (read at least :data:`RESULT_BLOCK_SIZE`
bytes); the ``decode_*`` helpers below mirror the layouts documented in each payload's header comment.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import protocol
from ..errors import PayloadError, SetupError
from ..paths import FIRMWARE_DIR, cache_dir

# ---- toolchain ------------------------------------------------------------------------------------
CROSS_PREFIX_ENV = "SMCCC_HARNESS_CROSS"        # override the tool prefix (default aarch64-linux-gnu-)
DEFAULT_CROSS_PREFIX = "aarch64-linux-gnu-"
AS_FLAGS = ("-march=armv8.4-a",)
LD_FLAGS = ("--build-id=none", "-z", "max-page-size=0x1000", "-static")
BUILD_RECIPE = 1                                 # bump when the build procedure changes
INSTALL_HINT = "apt-get install binutils-aarch64-linux-gnu"
LINKER_SCRIPT = "payload.ld"
SOURCE_SUFFIXES = (".S", ".inc", ".ld")

# ---- constants shared with firmware/common.inc ----------------------------------------------------
RESULT_BLOCK_SIZE = protocol.RESULT_BLOCK_SIZE   # harness/protocol.py
FATAL_SLOT_VECTOR, FATAL_SLOT_ESR, FATAL_SLOT_ELR, FATAL_SLOT_FAR, FATAL_SLOT_SPSR = 504, 505, 506, 507, 508
DONE_OK = 0
DONE_UNEXPECTED = 0xE1         # unexpected exception (fatal report slots 504..508 or a trap log)
DONE_BAD_PARAMS = 0xE2         # malformed parameter block
DONE_WRONG_EL = 0xE4           # payload needs another exception level
HVC_MARKER = 0xE1E1_0000       # x0 = HVC_MARKER | imm16 after an HVC taken to the payload's own vEL2 vector
SMC_MARKER = 0x5C5C_0000       # x0 = SMC_MARKER | imm16 after an SMC trapped to the guest hypervisor (TSC)
UNDEF_MARKER = 0x0DEF_0000     # x0 after an UNDEF handled by el2_guest_hyp's inner EL1 vector
PSCI_VERSION = 0x8400_0000
EC_UNKNOWN, EC_HVC64, EC_SMC64 = 0x00, 0x16, 0x17


def _cross_prefix() -> str:
    return os.environ.get(CROSS_PREFIX_ENV, DEFAULT_CROSS_PREFIX)


def toolchain() -> dict[str, str]:
    """Paths of the cross assembler and linker; :class:`SetupError` if either is missing."""
    prefix = _cross_prefix()
    tools = {}
    for tool in ("as", "ld"):
        name = prefix + tool
        path = shutil.which(name)
        if path is None:
            raise SetupError(
                f"{name} not found on PATH: it is needed to build the bare-metal payloads in firmware/",
                hint=f"{INSTALL_HINT} (or set {CROSS_PREFIX_ENV} to another aarch64 binutils prefix)")
        tools[tool] = path
    return tools


@functools.cache
def _tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout.splitlines() or [""])[0]


@functools.cache
def _ld_extra_flags(ld: str) -> tuple[str, ...]:
    out = subprocess.run([ld, "--help"], capture_output=True, text=True, check=False).stdout
    return ("--no-warn-rwx-segments",) if "--no-warn-rwx-segments" in out else ()


def _sources(src_dir: Path) -> list[Path]:
    return sorted(p for p in src_dir.iterdir() if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def build_key(src_dir: Path = FIRMWARE_DIR) -> str:
    """The cache key: sha256 of the sources, the linker script, tool versions and flags."""
    tools = toolchain()
    h = hashlib.sha256()
    meta = {"recipe": BUILD_RECIPE, "as": _tool_version(tools["as"]), "ld": _tool_version(tools["ld"]),
            "as_flags": AS_FLAGS, "ld_flags": LD_FLAGS + _ld_extra_flags(tools["ld"])}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for p in _sources(src_dir):
        data = p.read_bytes()
        h.update(f"\0{p.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _run(argv: list[str], what: str, cwd: Path) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
    except OSError as e:
        raise SetupError(f"cannot run {argv[0]}: {e}", hint=INSTALL_HINT) from None
    if proc.returncode != 0:
        diag = (proc.stderr + proc.stdout).strip()
        raise PayloadError(f"{what} failed (exit {proc.returncode}):\n{diag}",
                           hint="fix the source at the file:line shown above; command: " + " ".join(argv))


def _assemble_and_link(src: Path, src_dir: Path, out: Path, tools: dict[str, str]) -> None:
    obj = out.with_suffix(".o")
    _run([tools["as"], *AS_FLAGS, "-I", str(src_dir), "-o", str(obj), str(src)], f"assembling {src}", src_dir)
    _run([tools["ld"], *LD_FLAGS, *_ld_extra_flags(tools["ld"]), "-T", str(src_dir / LINKER_SCRIPT),
          "-o", str(out), str(obj)], f"linking {src.name} with {src_dir / LINKER_SCRIPT}", src_dir)
    obj.unlink()


def build_payloads(out_dir: Path | None = None, *, src_dir: Path | None = None) -> dict[str, Path]:
    """Build every ``<src_dir>/*.S`` (default ``firmware/``); return ``{name: elf_path}``.

    ``out_dir`` is the cache root (default ``cache_dir()/"firmware"``); the ELF files live in
    ``out_dir/<key>/``.  Nothing is rebuilt when that directory exists.
    """
    src_dir = Path(src_dir or FIRMWARE_DIR)
    root = Path(out_dir) if out_dir is not None else cache_dir() / "firmware"
    if not (src_dir / LINKER_SCRIPT).is_file():
        raise PayloadError(f"no linker script {src_dir / LINKER_SCRIPT}",
                           hint="run from a complete checkout of smccc-harness")
    names = sorted(p.stem for p in src_dir.glob("*.S"))
    if not names:
        raise PayloadError(f"no payload sources (*.S) in {src_dir}")
    key = build_key(src_dir)
    final = root / key
    manifest = final / "manifest.json"
    if not manifest.is_file():
        tools = toolchain()
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=root))
        try:
            for name in names:
                _assemble_and_link(src_dir / f"{name}.S", src_dir, tmp / f"{name}.elf", tools)
            (tmp / "manifest.json").write_text(json.dumps({"key": key, "payloads": names}, indent=1) + "\n")
            try:
                os.rename(tmp, final)
            except OSError:
                if not manifest.is_file():   # not a lost race: something else is in the way
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return {name: final / f"{name}.elf" for name in names}


# ---- loading --------------------------------------------------------------------------------------
_MACHINES = {
    "EM_X86_64": "an x86-64 binary",
    "EM_386": "a 32-bit x86 binary",
    "EM_ARM": "a 32-bit Arm (AArch32) binary",
    "EM_RISCV": "a RISC-V binary",
    "EM_PPC64": "a 64-bit PowerPC binary",
    "EM_S390": "an s390 binary",
    "EM_MIPS": "a MIPS binary",
}
_LINK_HINT = ("build payloads with harness.payloads.build_payloads(), i.e. aarch64-linux-gnu-as and "
              "aarch64-linux-gnu-ld -T firmware/payload.ld")


@dataclass(frozen=True)
class Segment:
    addr: int        # guest physical address (MMU off: IPA)
    data: bytes      # file contents (p_filesz bytes)
    memsz: int       # p_memsz >= len(data); the rest is zero (.bss)

    @property
    def image(self) -> bytes:
        """The segment as it must appear in guest memory, zero-filled to ``memsz``."""
        return self.data + bytes(self.memsz - len(self.data))

    @property
    def end(self) -> int:
        return self.addr + self.memsz


@dataclass(frozen=True)
class Payload:
    name: str
    path: Path
    entry: int
    segments: tuple[Segment, ...]
    symbols: dict[str, int] = field(hash=False)

    def to_wire(self) -> dict:
        """The scenario ``payload`` object (see :func:`harness.protocol.validate_scenario`).

        ``data`` is the zero-filled segment image (``len == memsz``), so a loader that ignores ``memsz``
        is still correct.
        """
        return {
            "entry": self.entry,
            "segments": [{"addr": s.addr, "data": protocol.b64(s.image), "memsz": s.memsz} for s in self.segments],
            "symbols": dict(sorted(self.symbols.items(), key=lambda kv: (kv[1], kv[0]))),
        }

    def sym(self, name: str) -> int:
        """Address of symbol ``name``; :class:`PayloadError` naming the payload if absent."""
        try:
            return self.symbols[name]
        except KeyError:
            raise PayloadError(f"payload {self.name} has no symbol {name!r}",
                               hint=f"known symbols: {', '.join(sorted(self.symbols))}") from None

    def word(self, addr: int) -> int:
        """The little-endian u32 at guest address ``addr`` in the loaded image (e.g. an instruction)."""
        for s in self.segments:
            if s.addr <= addr and addr + 4 <= s.end:
                return struct.unpack_from("<I", s.image, addr - s.addr)[0]
        raise PayloadError(f"address {addr:#x} is not inside payload {self.name}")

    @functools.cached_property
    def _sorted_syms(self) -> tuple[list[int], list[str]]:
        best: dict[int, str] = {}
        for name, addr in self.symbols.items():
            cur = best.get(addr)
            # prefer a name that does not start with '_' or '.', then the shorter, then alphabetical
            if cur is None or (name.startswith(("_", ".")), len(name), name) < (cur.startswith(("_", ".")),
                                                                                  len(cur), cur):
                best[addr] = name
        addrs = sorted(best)
        return addrs, [best[a] for a in addrs]

    def symbolize(self, addr: int) -> str:
        """Name a guest address: ``"smc_insn"``, ``"smc_insn+0x4"``, or ``"0x…"`` outside the image."""
        if not any(s.addr <= addr < s.end for s in self.segments):
            return f"{addr:#x}"
        addrs, names = self._sorted_syms
        i = bisect.bisect_right(addrs, addr) - 1
        if i < 0:
            return f"{addr:#x}"
        off = addr - addrs[i]
        return names[i] if off == 0 else f"{names[i]}+{off:#x}"


def load_elf(path: Path | str, *, name: str | None = None, ram_size: int = protocol.RAM_SIZE_DEFAULT,
             vcpus: int = 1) -> Payload:
    """Load and check a payload ELF; :class:`PayloadError` says what is wrong and what to do."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    path = Path(path)
    name = name or path.stem
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PayloadError(f"cannot read payload {path}: {e.strerror}", hint=_LINK_HINT) from None
    if raw[:4] != b"\x7fELF":
        raise PayloadError(f"{path} is not an ELF file (it starts with {raw[:4]!r})", hint=_LINK_HINT)
    if len(raw) < 6 or raw[4] != 2:
        cls = {1: "ELF32"}.get(raw[4] if len(raw) > 4 else 0, "unknown class")
        raise PayloadError(f"{path} is {cls}, not ELF64: payloads are 64-bit AArch64 images", hint=_LINK_HINT)
    if raw[5] != 1:
        raise PayloadError(f"{path} is big-endian; payloads must be little-endian AArch64 (aarch64, not aarch64_be)",
                           hint=_LINK_HINT)
    try:
        import io
        elf = ELFFile(io.BytesIO(raw))
        machine = elf["e_machine"]
        if machine != "EM_AARCH64":
            what = _MACHINES.get(machine, "not an AArch64 binary")
            raise PayloadError(f"{path}: e_machine is {machine}: this is {what}; payloads must be EM_AARCH64",
                               hint="build payloads with aarch64-linux-gnu-as (harness.payloads.build_payloads)")
        etype = elf["e_type"]
        if etype != "ET_EXEC":
            why = {"ET_REL": "an unlinked object file", "ET_DYN": "position-independent (PIE or shared object)",
                   "ET_CORE": "a core dump"}.get(etype, etype)
            raise PayloadError(f"{path} is {why} ({etype}); a payload must be a static ET_EXEC image",
                               hint=_LINK_HINT)
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            segments.append(Segment(addr=seg["p_paddr"], data=seg.data(), memsz=seg["p_memsz"]))
        if not segments:
            raise PayloadError(f"{path} has no PT_LOAD segment: nothing to load", hint=_LINK_HINT)
        entry = elf["e_entry"]
        symbols: dict[str, int] = {}
        globals_: set[str] = set()
        for sec in elf.iter_sections():
            if not isinstance(sec, SymbolTableSection):
                continue
            for s in sec.iter_symbols():
                if (not s.name or s.name.startswith("$") or s["st_info"]["type"] not in
                        ("STT_FUNC", "STT_NOTYPE", "STT_OBJECT") or s["st_shndx"] in ("SHN_UNDEF", "SHN_ABS")):
                    continue
                is_global = s["st_info"]["bind"] in ("STB_GLOBAL", "STB_WEAK")
                if s.name in symbols and (s.name in globals_ or not is_global):
                    continue
                symbols[s.name] = s["st_value"]
                if is_global:
                    globals_.add(s.name)
    except ELFError as e:
        raise PayloadError(f"{path} is a damaged ELF file: {e}", hint=_LINK_HINT) from None
    segments.sort(key=lambda s: s.addr)
    for a, b in itertools.pairwise(segments):
        if a.end > b.addr:
            raise PayloadError(f"{path}: PT_LOAD segments [{a.addr:#x}, {a.end:#x}) and [{b.addr:#x}, {b.end:#x}) "
                               "overlap", hint=_LINK_HINT)
    payload = Payload(name=name, path=path, entry=entry, segments=tuple(segments), symbols=symbols)
    check_layout(payload, ram_size=ram_size, vcpus=vcpus)
    return payload


def check_layout(payload: Payload, *, ram_size: int = protocol.RAM_SIZE_DEFAULT, vcpus: int = 1) -> None:
    """The memory-map rules of :func:`harness.protocol.validate_scenario`, as a :class:`PayloadError`."""
    scenario = {"name": payload.name, "payload": payload.to_wire(), "ram_size": ram_size, "vcpus": vcpus}
    try:
        protocol.validate_scenario(scenario)
    except protocol.ProtocolError as e:
        raise PayloadError(f"{payload.path}: {e}",
                           hint="link payloads with -T firmware/payload.ld: text at RAM_BASE "
                                f"({protocol.RAM_BASE:#x}), everything below PARAM_BASE ({protocol.PARAM_BASE:#x})"
                           ) from None
    if not any(s.addr <= payload.entry < s.end for s in payload.segments):
        raise PayloadError(f"{payload.path}: entry point {payload.entry:#x} is not inside any PT_LOAD segment",
                           hint=_LINK_HINT)


def get_payload(name: str) -> Payload:
    """Build (cached) and load ``firmware/<name>.S``."""
    paths = build_payloads()
    if name not in paths:
        raise PayloadError(f"no payload named {name!r}", hint=f"available: {', '.join(sorted(paths))}")
    return _load_cached(str(paths[name]))


@functools.lru_cache(maxsize=64)
def _load_cached(path: str) -> Payload:
    return load_elf(path)


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
    return v & 0xFFFF_FFFF_FFFF_FFFF


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
    """``{"count": exceptions taken, "traps": [{vector, esr, ec, iss, elr, far, spsr, x0_in, x0_out}]}``."""
    _need(block, EV_RESULT_SIZE, "el2_vectors results")
    count, hcr = _q(block, 0, 2)
    traps = [_trap_entry(block, EV_TRAP_LOG + k * EV_TRAP_SIZE, _EV_FIELDS) for k in range(min(count, EV_MAX_TRAPS))]
    return {"count": count, "hcr_el2": hcr, "traps": traps}


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
    return offset, value & 0xFFFF_FFFF_FFFF_FFFF


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
