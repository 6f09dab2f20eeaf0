"""Bare-metal payloads: build ``firmware/*.S`` with cross binutils, load and check the ELF, and the
parameter / result-block layouts of the payloads that use them.

Build: every ``firmware/*.S`` is assembled with ``aarch64-linux-gnu-as -march=armv8.4-a -I firmware`` and
linked alone with ``aarch64-linux-gnu-ld -T firmware/payload.ld`` (``*.inc`` files are shared includes).
A source that declares ``@ payload-state: aarch32`` on a line of its own is an AArch32 payload instead: it is
assembled with ``arm-linux-gnueabihf-as -march=armv8-a`` and linked with ``arm-linux-gnueabihf-ld -T
firmware/payload32.ld`` into an ELF32 EM_ARM image; its entry symbol's bit 0 says A32 (0) or T32 (1), and the
VMM creates its vCPUs with KVM_ARM_VCPU_EL1_32BIT in AArch32 SVC mode (harness/guest/runner.py).
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
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import protocol
from ..errors import PayloadError, SetupError
from ..guest import psci
from ..paths import FIRMWARE_DIR, cache_dir

# ---- toolchain ------------------------------------------------------------------------------------
CROSS_PREFIX_ENV = "SMCCC_HARNESS_CROSS"        # override the tool prefix (default aarch64-linux-gnu-)
DEFAULT_CROSS_PREFIX = "aarch64-linux-gnu-"
AS_FLAGS = ("-march=armv8.4-a",)
LD_FLAGS = ("--build-id=none", "-z", "max-page-size=0x1000", "-static")
BUILD_RECIPE = 2                                 # bump when the build procedure changes
INSTALL_HINT = "apt-get install binutils-aarch64-linux-gnu"
# AArch32 payloads (``@ payload-state: aarch32``): installed by setup (harness/images/sysdeps.py REQUIREMENTS)
CROSS32_PREFIX_ENV = "SMCCC_HARNESS_CROSS32"    # override the AArch32 tool prefix (default arm-linux-gnueabihf-)
DEFAULT_CROSS32_PREFIX = "arm-linux-gnueabihf-"
AS32_FLAGS = ("-march=armv8-a",)
INSTALL_HINT32 = "apt-get install binutils-arm-linux-gnueabihf (./smccc-harness setup installs it)"
LINKER_SCRIPT32 = "payload32.ld"
AARCH32_MARKER = "@ payload-state: aarch32"
STATES = ("aarch64", "a32", "t32")              # Payload.state: the instruction set the vCPU starts in
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
PSCI_VERSION = psci.PSCI_VERSION   # harness/guest/psci.py


EC_UNKNOWN, EC_HVC64, EC_SMC64 = 0x00, 0x16, 0x17


def _cross_prefix() -> str:
    return os.environ.get(CROSS_PREFIX_ENV, DEFAULT_CROSS_PREFIX)


def toolchain(aarch32: bool = False) -> dict[str, str]:
    """Paths of the cross assembler and linker (AArch64, or AArch32 ones); :class:`SetupError` if missing."""
    if aarch32:
        prefix = os.environ.get(CROSS32_PREFIX_ENV, DEFAULT_CROSS32_PREFIX)
        tools = {}
        for tool in ("as", "ld"):
            path = shutil.which(prefix + tool)
            if path is None:
                raise SetupError(f"{prefix + tool} not found on PATH: it is needed to build the AArch32 payloads "
                                 f"in firmware/ (sources marked {AARCH32_MARKER!r})",
                                 hint=f"{INSTALL_HINT32} (or set {CROSS32_PREFIX_ENV} to another arm binutils prefix)")
            tools[tool] = path
        return tools
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


def is_aarch32_source(src: Path) -> bool:
    """True when ``src`` declares itself an AArch32 payload (a line ``@ payload-state: aarch32``)."""
    return any(line.strip() == AARCH32_MARKER for line in src.read_text(errors="replace").splitlines()[:40])


def build_key(src_dir: Path = FIRMWARE_DIR) -> str:
    """The cache key: sha256 of the sources, the linker script, tool versions and flags."""
    tools = toolchain()
    h = hashlib.sha256()
    meta = {"recipe": BUILD_RECIPE, "as": _tool_version(tools["as"]), "ld": _tool_version(tools["ld"]),
            "as_flags": AS_FLAGS, "ld_flags": LD_FLAGS + _ld_extra_flags(tools["ld"])}
    if any(is_aarch32_source(p) for p in src_dir.glob("*.S")):
        t32 = toolchain(aarch32=True)
        meta.update(as32=_tool_version(t32["as"]), ld32=_tool_version(t32["ld"]), as32_flags=AS32_FLAGS)
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
    a32 = is_aarch32_source(src)
    if a32:
        tools = toolchain(aarch32=True)
    script = src_dir / (LINKER_SCRIPT32 if a32 else LINKER_SCRIPT)
    _run([tools["as"], *(AS32_FLAGS if a32 else AS_FLAGS), "-I", str(src_dir), "-o", str(obj), str(src)],
         f"assembling {src}", src_dir)
    _run([tools["ld"], *LD_FLAGS, *_ld_extra_flags(tools["ld"]), "-T", str(script),
          "-o", str(out), str(obj)], f"linking {src.name} with {script}", src_dir)
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
_EM_ARM = 40
_LINK_HINT = ("build payloads with harness.images.payloads.build_payloads(), i.e. aarch64-linux-gnu-as and "
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
    state: str = "aarch64"      # STATES: the instruction set at entry (a32/t32: an AArch32 EL1 vCPU)

    @property
    def aarch32(self) -> bool:
        return self.state != "aarch64"

    def to_wire(self) -> dict:
        """The scenario ``payload`` object (see :func:`harness.protocol.validate_scenario`).

        ``data`` is the zero-filled segment image (``len == memsz``), so a loader that ignores ``memsz``
        is still correct.
        """
        return {
            "entry": self.entry, "state": self.state,
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
             vcpus: int = 1, state: str | None = None) -> Payload:
    """Load and check a payload ELF; :class:`PayloadError` says what is wrong and what to do.

    An ELF64 EM_AARCH64 image is an AArch64 payload; an ELF32 EM_ARM image an AArch32 one (A32, or T32 when
    the entry address has bit 0 set).  ``state`` ("aarch64" or "aarch32"), when given, is the state the caller
    means to run it in: a payload built for the other one is refused, naming both.
    """
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
    em = int.from_bytes(raw[18:20], "little") if len(raw) >= 20 else 0
    if len(raw) < 6 or raw[4] != 2:
        cls = {1: "ELF32"}.get(raw[4] if len(raw) > 4 else 0, "unknown class")
        if not (cls == "ELF32" and em == _EM_ARM):
            raise PayloadError(f"{path} is {cls}, not ELF64 (AArch64) or ELF32 EM_ARM (AArch32): payloads are "
                               "AArch64 or AArch32 Arm images", hint=_LINK_HINT)
    if raw[5] != 1:
        raise PayloadError(f"{path} is big-endian; payloads must be little-endian AArch64 (aarch64, not aarch64_be)",
                           hint=_LINK_HINT)
    try:
        import io
        elf = ELFFile(io.BytesIO(raw))
        machine = elf["e_machine"]
        wanted = {"aarch64": "EM_AARCH64", "aarch32": "EM_ARM"}.get(state or "")
        if wanted and machine in ("EM_AARCH64", "EM_ARM") and machine != wanted:
            built = "AArch64 (EM_AARCH64)" if machine == "EM_AARCH64" else "AArch32 (EM_ARM)"
            raise PayloadError(f"{path} is an {built} payload, but it was to run in {state}",
                               hint="run it in the state it was built for (smccc-harness run-payload: --state "
                                    f"{'aarch64' if machine == 'EM_AARCH64' else 'aarch32'}), or rebuild it "
                                    f"({'an @ payload-state: aarch32 source' if state == 'aarch32' else 'with aarch64-linux-gnu-as'})")
        if machine not in ("EM_AARCH64", "EM_ARM") or (machine == "EM_ARM" and elf.elfclass != 32):
            what = _MACHINES.get(machine, "not an AArch64 binary")
            raise PayloadError(f"{path}: e_machine is {machine}: this is {what}; payloads must be EM_AARCH64 "
                               "(or ELF32 EM_ARM for AArch32 payloads)",
                               hint="build payloads with aarch64-linux-gnu-as (harness.images.payloads.build_payloads)")
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
    pstate = "aarch64" if machine == "EM_AARCH64" else ("t32" if entry & 1 else "a32")
    payload = Payload(name=name, path=path, entry=entry, segments=tuple(segments), symbols=symbols, state=pstate)
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
