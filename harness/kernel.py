"""The kernel under test: a user's file (``--kernel PATH``) or a Debian package spec.

An arm64 ``Image`` carries the magic ``ARM\\x64`` at offset 0x38 (Documentation/arch/arm64/booting.rst,
"Call the kernel image"); Debian's vmlinuz files are such Images with a PE/EFI stub (platform.md).  A gzip'd
``Image.gz`` is unpacked into the cache, keyed by its sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from pathlib import Path

from . import paths
from .assets import KernelAsset
from .errors import SetupError

ARM64_MAGIC = b"ARM\x64"
BANNER_RE = re.compile(rb"Linux version (\S+) \(([^)]*)\)[^\n\x00]{0,300}")


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
    m = BANNER_RE.search(data)
    if not m:
        return None, None
    return m.group(1).decode(errors="replace"), m.group(0).decode(errors="replace")


def _file_kernel(path: Path) -> KernelAsset:
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"--kernel {path}: no such file",
                         hint="give an arm64 Image or Image.gz, or a Debian spec like 'default', '7.2', '6.12'")
    head = path.open("rb").read(0x400)
    image = path
    if head[:2] == b"\x1f\x8b":
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
        image = out
        head = image.open("rb").read(0x400)
    if not is_arm64_image(head):
        raise SetupError(f"--kernel {path}: {describe_file(head)}, not an arm64 Image (no 'ARM\\x64' magic at 0x38)",
                         hint="use arch/arm64/boot/Image (or Image.gz) from an arm64 build")
    version, _ = image_banner(image)
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    return KernelAsset(image=image, config=None, version=version or "unknown", package=str(path),
                       deb_version="", sha256=sha)


def resolve_kernel(spec: str | os.PathLike) -> KernelAsset:
    """A path (contains '/' or exists) → that file, checked; anything else → a Debian kernel package."""
    s = str(spec)
    if "/" in s or os.path.exists(s):
        return _file_kernel(Path(s))
    from .assets import ensure_kernel
    return ensure_kernel(s)
