"""The kernel under test: a user's file (``--kernel PATH``) or a Debian package (``--kernel SPEC``,
``--kernel-pkg NAME[/SUITE]``), plus what the harness learns from it.

An arm64 ``Image`` carries the magic ``ARM\\x64`` at offset 0x38 (Documentation/arch/arm64/booting.rst,
"Call the kernel image"); Debian's vmlinuz files are such Images with a PE/EFI stub (docs/platform.md).  A gzip'd
``Image.gz`` is unpacked into the cache, keyed by its sha256.  A ``vmlinux`` (an EM_AARCH64 ELF) is accepted
when its Image sits next to it (``arch/arm64/boot/Image`` of the same O= tree, or ``Image`` in the same
directory) with the same ``linux_banner``; an Image inside an O= tree finds its vmlinux the same way.  The
vmlinux's symbol table symbolizes the ``pc``/``lr`` lines of a panic excerpt (``Symbolizer``).

What a kernel must offer and what a test needs (``EXPECTED_CAPS``, ``skip_reason``) is pure logic, in
harness/model/capabilities.py.
"""

from __future__ import annotations

import bisect as _bisect
import gzip
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import SetupError
from .store import KernelAsset

ARM64_MAGIC = b"ARM\x64"
BANNER_RE = re.compile(rb"Linux version (\S+) \(([^)]*)\)[^\n\x00]{0,300}")
EM_AARCH64 = 183
_SPEC_HINT = "give an arm64 Image, Image.gz or vmlinux, or a Debian spec like 'default', '7.2', '6.12'"


@dataclass
class LocalKernel(KernelAsset):
    """A kernel from a file; ``vmlinux`` is set when its ELF was given or found next to the Image."""

    vmlinux: Path | None = None


def is_arm64_image(head: bytes) -> bool:
    return len(head) >= 0x3C and head[0x38:0x3C] == ARM64_MAGIC


def describe_file(head: bytes) -> str:
    if head[:4] == b"\x7fELF":
        machine = int.from_bytes(head[18:20], "little")
        return {62: "an x86-64 ELF", 183: "an arm64 ELF (vmlinux?)", 40: "a 32-bit Arm ELF"}.get(
            machine, f"an ELF for machine {machine}")
    if head[:2] == b"MZ":
        return "a PE/EFI image without the arm64 Image header (x86 bzImage or EFI zboot?)"
    if head[:2] == b"\x1f\x8b":
        return "gzip data"
    if head[0x202:0x206] == b"HdrS":
        return "an x86 bzImage"
    return "not a kernel image"


def image_banner(path: Path) -> tuple[str | None, str | None]:
    """(uname -r, full banner) read from the image's ``linux_banner`` string, if present."""
    data = Path(path).read_bytes()
    # An Image can hold two: init/version.c's weak placeholder ("# SMP ...", no build number or time) and
    # the real one from init/version-timestamp.c.  The longest is the real one.
    matches = list(BANNER_RE.finditer(data))
    if not matches:
        return None, None
    m = max(matches, key=lambda x: len(x.group(0).strip()))
    return m.group(1).decode(errors="replace"), m.group(0).decode(errors="replace")


# ---- vmlinux (pyelftools) ---------------------------------------------------------------------------
def vmlinux_banner(path: Path) -> str:
    """The ``linux_banner`` string of an arm64 vmlinux; SetupError for a non-ELF, another arch, or a non-kernel."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        try:
            elf = ELFFile(f)
        except ELFError as e:
            raise SetupError(f"--kernel {path}: not an ELF file ({e})", hint=_SPEC_HINT) from None
        if elf["e_machine"] != "EM_AARCH64":
            raise SetupError(f"--kernel {path}: an ELF for {elf['e_machine']}, not EM_AARCH64",
                             hint="use the vmlinux of an arm64 build (ARCH=arm64)")
        symtab = elf.get_section_by_name(".symtab")
        syms = symtab.get_symbol_by_name("linux_banner") if symtab is not None else None
        if not syms:
            raise SetupError(f"--kernel {path}: an arm64 ELF without a linux_banner symbol: not a vmlinux "
                             f"(or a stripped one)", hint="pass the vmlinux from the top of the build (O=) directory")
        addr = syms[0]["st_value"]
        for sec in elf.iter_sections():
            start, size = sec["sh_addr"], sec["sh_size"]
            if sec["sh_type"] != "SHT_NOBITS" and start <= addr < start + size:
                data = sec.data()[addr - start:addr - start + 512]
                return data.split(b"\x00", 1)[0].decode(errors="replace").strip()
    raise SetupError(f"--kernel {path}: linux_banner at {addr:#x} is in no section with file data")


def banner_version(banner: str) -> str | None:
    m = BANNER_RE.search(banner.encode())
    return m.group(1).decode() if m else None


def _same_build(a: str, b: str) -> bool:
    """Two linux_banner strings from the same build (version, builder, compiler, #N and timestamp agree)."""
    return a.strip().split("\n", 1)[0].strip() == b.strip().split("\n", 1)[0].strip()


def image_next_to(vmlinux: Path) -> Path | None:
    for p in (vmlinux.parent / "arch" / "arm64" / "boot" / "Image", vmlinux.parent / "Image",
              vmlinux.parent / "arch" / "arm64" / "boot" / "Image.gz", vmlinux.parent / "Image.gz"):
        if p.is_file():
            return p
    return None


def vmlinux_next_to(image: Path) -> Path | None:
    """The vmlinux of an O= tree whose arch/arm64/boot/Image this is (or a vmlinux in the same directory)."""
    image = Path(image).resolve()
    cands = [image.parent / "vmlinux"]
    if image.parent.name == "boot" and image.parent.parent.name == "arm64":
        cands.insert(0, image.parents[3] / "vmlinux")
    return next((p for p in cands if p.is_file()), None)


ADDR2LINE = "aarch64-linux-gnu-addr2line"   # binutils-aarch64-linux-gnu (installed by setup)
MAX_FRAMES = 16                            # call-trace frames symbolized (lockdep's and KASAN's own frames come first)
_LOG_PREFIX = re.compile(r"^(?:<\d{1,2}>)?(?:\[\s*\d+\.\d+\])?(?:\[\s*[CT]\d+\])?\s*")
_SYM_OFF = re.compile(r"([A-Za-z_.$][\w.$]*)\+0x([0-9a-f]+)/0x([0-9a-f]+)")
_PC_LR = re.compile(r"\b(pc|lr)\s*:\s*(?:\[<)?(?:0x)?(?:([0-9a-f]{16})\b|" + _SYM_OFF.pattern + ")")
_FRAME = re.compile(r"\s*(?:\[<[0-9a-f]+>\]\s*)?(?:(?:0x)?([0-9a-f]{16})\b|" + _SYM_OFF.pattern + r")\S*"
                    r"(?:\s+\[\w+\])?(?:\s+\(\w\))?\s*$")


class Symbolizer:
    """Address -> ``function+0xoff/0xsize`` from a vmlinux's ``.symtab`` (what the kernel's %pS prints), and
    -> ``file:line`` from its DWARF (``kernel build --debug``) through the cross ``addr2line``."""

    def __init__(self, vmlinux: Path) -> None:
        from elftools.elf.elffile import ELFFile
        self.vmlinux = Path(vmlinux)
        entries = []
        with open(self.vmlinux, "rb") as f:
            elf = ELFFile(f)
            symtab = elf.get_section_by_name(".symtab")
            if symtab is None:
                raise SetupError(f"{vmlinux}: no .symtab (stripped?)")
            self.has_dwarf = elf.get_section_by_name(".debug_line") is not None
            for s in symtab.iter_symbols():
                t = s["st_info"]["type"]
                if t in ("STT_FUNC", "STT_NOTYPE") and s["st_value"] and s.name and not s.name.startswith("$"):
                    entries.append((s["st_value"], s["st_size"], s.name))
        entries.sort()
        self.addrs = [e[0] for e in entries]
        self.entries = entries
        self.by_name: dict[str, list[tuple[int, int]]] = {}
        for a, size, name in entries:
            self.by_name.setdefault(name, []).append((a, size))
        src = self.vmlinux.parent / "source"          # an O= tree links its source tree here: paths relative to it
        self._src_prefix = str(src.resolve()) + "/" if src.is_symlink() else ""

    def lookup(self, addr: int) -> str | None:
        i = _bisect.bisect_right(self.addrs, addr) - 1
        if i < 0:
            return None
        start, size, name = self.entries[i]
        # prefer a sized (function) symbol covering the address over a later label at the same spot
        j = i
        while j >= 0 and self.entries[j][0] == start:
            if self.entries[j][1]:
                start, size, name = self.entries[j]
                break
            j -= 1
        if size and addr >= start + size:
            return None
        return f"{name}+{addr - start:#x}/{size:#x}" if size else f"{name}+{addr - start:#x}"

    def address_of(self, name: str, off: int, size: int | None = None) -> int | None:
        """The address ``name+off`` names (a static function's name may repeat: the one of that size)."""
        cands = self.by_name.get(name, [])
        if size is not None and len(cands) > 1:
            cands = [c for c in cands if c[1] == size] or cands
        return cands[0][0] + off if cands else None

    def lines(self, addrs: list[int]) -> dict[int, str]:
        """``file:line`` (innermost; ``(g, inlined into f)`` when inlined) per address, from DWARF; {} without it."""
        import shutil
        import subprocess
        todo = sorted(set(addrs))
        if not self.has_dwarf or not todo or shutil.which(ADDR2LINE) is None:
            return {}
        r = subprocess.run([ADDR2LINE, "-e", str(self.vmlinux), "-f", "-i", "-a", *[hex(a) for a in todo]],
                           capture_output=True, text=True, timeout=120, check=False)
        out: dict[int, str] = {}
        cur, chain = None, []

        def flush():
            if cur is not None and chain:
                where = chain[0][1].replace(self._src_prefix, "") if self._src_prefix else chain[0][1]
                where = re.sub(r" \(discriminator \d+\)", "", where)
                inner, outer = chain[0][0], chain[-1][0]
                out[cur] = where + (f" ({inner}, inlined into {outer})" if inner != outer else "")
        lines = r.stdout.splitlines()
        i = 0
        while i < len(lines):
            if re.fullmatch(r"0x[0-9a-f]+", lines[i]):
                flush()
                cur, chain = int(lines[i], 16), []
                i += 1
                continue
            if i + 1 < len(lines) and not lines[i + 1].startswith("??:"):
                chain.append((lines[i], lines[i + 1]))
            i += 2
        flush()
        return out

    def symbolize_excerpt(self, text: str) -> str:
        """Symbolized lines for the ``pc :``, ``lr :`` and the first :data:`MAX_FRAMES` call-trace entries of a
        splat excerpt: raw addresses (no kallsyms) get ``function+off/size``; ``function+off/size`` entries (what
        a kernel with kallsyms prints) get their address; both get ``file:line`` when the vmlinux has DWARF (a
        return address is looked up 4 bytes back, at its call).

        Honours ``Kernel Offset: 0x... from 0x...`` (KASLR) when the excerpt has it.  Empty when nothing
        in the excerpt resolves inside this vmlinux.
        """
        off = 0
        m = re.search(r"Kernel Offset: (0x[0-9a-f]+) from", text)
        if m:
            off = int(m.group(1), 16)
        items: list[tuple[str, int, str, int, int]] = []   # (label, printed address, symbol, address, for file:line)
        seen = set()

        def add(label: str, raw: str | None, name: str | None, o: str | None, size: str | None, call: bool):
            if raw:
                addr = int(raw, 16) - off
                sym = self.lookup(addr)
                shown = int(raw, 16)
            else:
                addr = self.address_of(name, int(o, 16), int(size, 16))
                sym, shown = f"{name}+{int(o, 16):#x}/{int(size, 16):#x}", addr
            if addr is None or sym is None or (label, addr) in seen:
                return
            seen.add((label, addr))
            items.append((label, shown, sym, addr, addr - 4 if call and addr % 4 == 0 else addr))

        in_trace = frames = 0
        for line in text.splitlines():
            body = _LOG_PREFIX.sub("", line, count=1)
            if in_trace:
                fm = _FRAME.match(body)
                if fm and frames < MAX_FRAMES:
                    frames += 1
                    first = frames == 1 and body.rstrip().endswith("(P)")   # arm64 marks the pc frame "(P)"
                    add(f"#{frames - 1}", fm.group(1), fm.group(2), fm.group(3), fm.group(4), not first)
                    continue
                if not fm:
                    in_trace = 0
            if re.match(r"Call trace:", body):
                in_trace, frames = 1, 0
                continue
            am = re.search(r"\}, at: " + _SYM_OFF.pattern, body)      # lockdep: a lock and where it was taken
            if am:
                add("at", None, am.group(1), am.group(2), am.group(3), True)
                continue
            pm = _PC_LR.search(body)
            if pm and body.lstrip().startswith(pm.group(1)):
                add(pm.group(1), pm.group(2), pm.group(3), pm.group(4), pm.group(5), pm.group(1) == "lr")
            elif re.match(r"\s+(?:\[<)?(?:0x)?([0-9a-f]{16})\b", body):     # a raw call-trace line without its header
                raw = re.match(r"\s+(?:\[<)?(?:0x)?([0-9a-f]{16})\b", body).group(1)
                add("at", raw, None, None, None, False)
        if not items:
            return ""
        where = self.lines([a for *_, a in items])

        def call_note(sym: str, addr: int, a: int) -> str:
            """A return address after a noreturn call (panic()) is the next function's first byte: name the
            function the call is in."""
            inner = self.lookup(a) if a != addr else None
            return f" (the call is in {inner})" if inner and inner.split("+")[0] != sym.split("+")[0] else ""
        out = [f"{label:>2} {shown:#018x} = {sym}{call_note(sym, addr, a)}" + (f" at {where[a]}" if a in where else "")
               for label, shown, sym, addr, a in items]
        note = ""
        if not self.has_dwarf:
            note = " (no DWARF in it: no file:line; 'smccc-harness kernel build --debug' adds it)"
        return f"symbolized with {self.vmlinux}{note}:\n" + "\n".join(out)


# ---- resolving --kernel / --kernel-pkg ---------------------------------------------------------------
def _gunzip_cached(path: Path) -> Path:
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    out = paths.cache_dir() / "kernels" / f"{sha}.Image"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = gzip.decompress(path.read_bytes())
        except (OSError, EOFError) as e:
            raise SetupError(f"--kernel {path}: corrupt gzip data ({e})",
                             hint="rebuild the kernel or pass the uncompressed arch/arm64/boot/Image") from None
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, out)
    return out


def _file_kernel(path: Path) -> KernelAsset:
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"--kernel {path}: no such file", hint=_SPEC_HINT)
    head = path.open("rb").read(0x400)
    vmlinux = None
    if head[:4] == b"\x7fELF":
        banner = vmlinux_banner(path)  # raises for another arch or a non-kernel ELF
        image = image_next_to(path)
        if image is None:
            raise SetupError(f"--kernel {path}: a vmlinux ({banner_version(banner)}), but no Image next to it "
                             f"(looked for arch/arm64/boot/Image and Image in {path.parent})",
                             hint="QEMU boots the Image: run 'make Image' in that tree, or pass the Image itself")
        vmlinux, path = path, image
        head = path.open("rb").read(0x400)
    image = path
    if head[:2] == b"\x1f\x8b":
        image = _gunzip_cached(path)
        head = image.open("rb").read(0x400)
    if not is_arm64_image(head):
        raise SetupError(f"--kernel {path}: {describe_file(head)}, not an arm64 Image (no 'ARM\\x64' magic at 0x38)",
                         hint="use arch/arm64/boot/Image (or Image.gz, or the vmlinux next to it) from an arm64 build")
    version, img_banner = image_banner(image)
    if vmlinux is None:
        cand = vmlinux_next_to(path)
        if cand is not None:
            try:
                if img_banner and _same_build(vmlinux_banner(cand), img_banner):
                    vmlinux = cand
            except SetupError:
                vmlinux = None
    elif img_banner and not _same_build(vmlinux_banner(vmlinux), img_banner):
        raise SetupError(f"--kernel {vmlinux}: its banner differs from {path}'s: they come from different builds",
                         hint="rebuild ('make Image' updates both), or pass the Image alone")
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    return LocalKernel(image=image, config=None, version=version or "unknown", package=str(path),
                       deb_version="", sha256=sha, vmlinux=vmlinux)


def parse_pkg_spec(spec: str) -> tuple[str, str | None]:
    """``NAME[/SUITE]`` -> (name, suite or None); SetupError when it cannot be a Debian package name."""
    name, _, suite = spec.partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name) or (suite and not re.fullmatch(r"[a-z0-9-]+", suite)):
        raise SetupError(f"--kernel-pkg {spec!r}: not NAME[/SUITE]",
                         hint="e.g. linux-image-6.12.117+deb13-cloud-arm64/trixie")
    return name, suite or None


def package_kernel(spec: str, progress=print) -> KernelAsset:
    """``--kernel-pkg NAME[/SUITE]``: that Debian arm64 package (from SUITE if given), fetched and extracted."""
    from .assets import ensure_kernel, find_kernel_files
    from .store import Store, sha256_file
    name, suite = parse_pkg_spec(spec)
    if suite is None:
        return ensure_kernel(name, progress=progress)
    store = Store(progress)
    e = store.fetch(name, suite)
    image, config, version = find_kernel_files([store.extract(e)])
    return KernelAsset(image=image, config=config, version=version, package=name, deb_version=e.version,
                       sha256=sha256_file(image))


def resolve_kernel(spec: str | os.PathLike, progress=print) -> KernelAsset:
    """A path (contains '/' or exists) → that file, checked; ``pkg:NAME[/SUITE]`` → that package; anything
    else → a Debian kernel spec ('default', '7.2', '6.12', a package name)."""
    s = str(spec)
    if s.startswith("pkg:"):
        return package_kernel(s[4:], progress)
    if "/" in s or os.path.exists(s):
        return _file_kernel(Path(s))
    from .assets import ensure_kernel
    return ensure_kernel(s, progress)


def vmlinux_of(kernel: KernelAsset) -> Path | None:
    return getattr(kernel, "vmlinux", None)


# ---- capabilities a kernel series must offer ---------------------------------------------------------
_symbolizers: dict[Path, Symbolizer] = {}


def symbolize_for(kernel: KernelAsset | None, excerpt: str) -> str:
    """``Symbolizer.symbolize_excerpt`` with the kernel's vmlinux (cached per process); '' without one."""
    vm = vmlinux_of(kernel) if kernel is not None else None
    if vm is None:
        return ""
    try:
        if vm not in _symbolizers:
            _symbolizers[vm] = Symbolizer(vm)
        return _symbolizers[vm].symbolize_excerpt(excerpt)
    except Exception as e:  # noqa: BLE001 - symbolizing is best effort: never hide the excerpt itself
        return f"(could not symbolize with {vm}: {e})"
