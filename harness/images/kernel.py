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


class Symbolizer:
    """Address -> ``function+0xoff/0xsize`` from a vmlinux's ``.symtab`` (what the kernel's %pS prints)."""

    def __init__(self, vmlinux: Path) -> None:
        from elftools.elf.elffile import ELFFile
        self.vmlinux = Path(vmlinux)
        entries = []
        with open(self.vmlinux, "rb") as f:
            elf = ELFFile(f)
            symtab = elf.get_section_by_name(".symtab")
            if symtab is None:
                raise SetupError(f"{vmlinux}: no .symtab (stripped?)")
            for s in symtab.iter_symbols():
                t = s["st_info"]["type"]
                if t in ("STT_FUNC", "STT_NOTYPE") and s["st_value"] and s.name and not s.name.startswith("$"):
                    entries.append((s["st_value"], s["st_size"], s.name))
        entries.sort()
        self.addrs = [e[0] for e in entries]
        self.entries = entries

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

    def symbolize_excerpt(self, text: str) -> str:
        """Symbolized lines for the ``pc :``, ``lr :`` and call-trace addresses of a panic/Oops excerpt.

        Honours ``Kernel Offset: 0x... from 0x...`` (KASLR) when the excerpt has it.  Empty when nothing
        in the excerpt is a raw address inside this vmlinux.
        """
        off = 0
        m = re.search(r"Kernel Offset: (0x[0-9a-f]+) from", text)
        if m:
            off = int(m.group(1), 16)
        out = []
        seen = set()
        for m in re.finditer(r"^.*?\b(pc|lr)\s*:\s*(?:\[<)?(?:0x)?([0-9a-f]{16})\b|^\s+(?:\[<)?(?:0x)?([0-9a-f]{16})\b",
                             text, re.MULTILINE):
            label = m.group(1) or "at"
            addr = int(m.group(2) or m.group(3), 16)
            if (label, addr) in seen:
                continue
            seen.add((label, addr))
            sym = self.lookup(addr - off)
            if sym:
                out.append(f"{label:>2} {addr:#018x} = {sym}")
        if not out:
            return ""
        return f"symbolized with {self.vmlinux}:\n" + "\n".join(out)


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
