"""The toolchain a kernel build uses, as kbuild itself reads it: ``LLVM=1`` / ``LLVM=-19`` / ``LLVM=<dir>/`` (clang,
ld.lld and the llvm binutils, Documentation/kbuild/llvm.rst), else ``CROSS_COMPILE``, else Debian's
``aarch64-linux-gnu-`` gcc.  A toolchain you named that is missing, or a clang older than the tree's
scripts/min-tool-version.sh, is an error naming the Debian packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import HarnessError

CROSS = "aarch64-linux-gnu-"


# ---- toolchain ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Toolchain:
    """What ``make`` is told to compile with.  ``llvm`` is kbuild's LLVM= value ("" for gcc)."""
    llvm: str
    cross_compile: str
    cc: str  # the compiler command: "aarch64-linux-gnu-gcc", "clang", "clang-19", "/opt/llvm/bin/clang"
    version: str  # first line of ``cc --version``
    origin: str  # where the choice came from: "default", "env CROSS_COMPILE", "--llvm", "env LLVM", ...

    @property
    def family(self) -> str:
        return "llvm" if self.llvm else "gcc"

    def make_vars(self, ccache: bool) -> list[str]:
        out = [f"LLVM={self.llvm}"] if self.llvm else []
        if self.cross_compile:
            out.append(f"CROSS_COMPILE={self.cross_compile}")
        if ccache:
            out.append(f"CC=ccache {self.cc}")
        return out

    def describe(self, ccache: bool = False) -> str:
        what = f"LLVM={self.llvm}" if self.llvm else f"CROSS_COMPILE={self.cross_compile}"
        return f"{what} ({self.cc}: {self.version}) [{self.origin}]" + (" through ccache" if ccache else "")


def llvm_tool(llvm: str, tool: str) -> str:
    """kbuild's naming (top Makefile): LLVM=1 -> clang; LLVM=-19 -> clang-19; LLVM=/p/ -> /p/clang."""
    if llvm.endswith("/"):
        return llvm + tool
    if llvm.startswith("-"):
        return tool + llvm
    return tool


def llvm_packages(llvm: str) -> list[str]:
    """Debian packages that provide LLVM=<llvm>'s tools ([] for a path prefix: not Debian's to install)."""
    if llvm.endswith("/"):
        return []
    from ..images import sysdeps
    return [r.package for r in sysdeps.llvm_requirements(_suffix(llvm))]


def _suffix(llvm: str) -> str:
    """LLVM=-19 -> "-19" (Debian's versioned package and command names); LLVM=1 -> ""."""
    return llvm if llvm.startswith("-") else ""


def which(cmd: str) -> str | None:
    if "/" in cmd:
        return cmd if os.access(cmd, os.X_OK) and os.path.isfile(cmd) else None
    return shutil.which(cmd)


def _version_line(cmd: str) -> str:
    try:
        r = subprocess.run([cmd, "--version"], check=False, capture_output=True, text=True, timeout=30)
    except OSError as e:
        return f"unknown ({e.strerror})"
    return (r.stdout or r.stderr).splitlines()[0].strip() if (r.stdout or r.stderr) else "unknown"


def parse_tool_version(text: str) -> tuple[int, ...] | None:
    """``Debian clang version 19.1.7 (3~deb12u1)`` / ``aarch64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0`` -> (19, 1, 7)."""
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text) or re.search(r"\) (\d+)\.(\d+)(?:\.(\d+))?\s*$", text)
    return tuple(int(g or 0) for g in m.groups()) if m else None


def min_tool_version(src: Path, tool: str) -> tuple[int, ...] | None:
    """The tree's own minimum for ``tool`` (scripts/min-tool-version.sh with SRCARCH=arm64), None if unknown."""
    script = Path(src) / "scripts" / "min-tool-version.sh"
    if not script.is_file():
        return None
    r = subprocess.run(["sh", str(script), tool], check=False, capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, ARCH="arm64", SRCARCH="arm64"))
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", r.stdout.strip())
    return tuple(int(x) for x in m.groups()) if r.returncode == 0 and m else None


def debian_llvm_for(src: Path | None, candidates=None) -> str | None:
    """The LLVM= value that builds ``src`` with Debian's packages: "1" when the release's clang is new enough
    for the tree (scripts/min-tool-version.sh), else "-N" for the newest versioned clang-N apt offers that is
    (bookworm: clang 14 is too old for 7.x, clang-19 is in bookworm), else None.

    ``candidates``: {package: apt candidate version} for the unit tests; default asks apt-cache."""
    from ..images import sysdeps
    want = (min_tool_version(src, "llvm") if src else None) or (0,)
    look = candidates if candidates is not None else None

    def major(pkg: str) -> int | None:
        v = look.get(pkg) if look is not None else sysdeps.apt_candidate(pkg)
        return sysdeps.llvm_major_of_candidate(v) if v else None
    m = major("clang")
    if m is not None and (m,) >= want[:1]:
        return "1"
    for n in range(30, 12, -1):
        if (n,) >= want[:1] and major(f"clang-{n}") == n:
            return f"-{n}"
    return None


def _newer_llvm_hint(src: Path) -> str:
    try:
        pick = debian_llvm_for(src)
    except Exception:  # noqa: BLE001 - only a hint
        pick = None
    if pick and pick != "1":
        return f"use Debian's {' '.join(llvm_packages(pick))}: LLVM={pick} (add --install-toolchain to install them)"
    return "install a newer clang, lld and llvm and pass LLVM=-<version> or LLVM=<dir>/"


def resolve_toolchain(*, llvm: str | None = None, cross_compile: str | None = None, env=None,
                      install: bool = True, install_llvm: bool = False, src: Path | None = None,
                      progress=print) -> Toolchain:
    """The toolchain a build uses: ``llvm``/``cross_compile`` arguments, else the LLVM / CROSS_COMPILE
    environment, else Debian's aarch64-linux-gnu gcc (installed when ``install``).  A toolchain you named but
    is not there is a HarnessError naming the command and the Debian package; nothing is built."""
    env = os.environ if env is None else env
    origin_llvm = "--llvm" if llvm is not None else "env LLVM"
    llvm = (llvm if llvm is not None else env.get("LLVM", "")).strip()
    if llvm == "0":
        llvm = ""
    origin_cc = "--cross-compile" if cross_compile is not None else "env CROSS_COMPILE"
    cross = cross_compile if cross_compile is not None else env.get("CROSS_COMPILE")
    if llvm:
        if llvm != "1" and not llvm.startswith("-") and not llvm.endswith("/"):
            raise HarnessError(f"LLVM={llvm!r}: kbuild takes LLVM=1, LLVM=-<version> (e.g. -19) or "
                               "LLVM=<dir>/ (ending in /)", hint="e.g. LLVM=1 for Debian's clang, lld and llvm")
        from ..images import sysdeps
        tools = {t: llvm_tool(llvm, t) for t in ("clang", "ld.lld", "llvm-ar", "llvm-objcopy", "llvm-nm")}
        missing = [cmd for cmd in tools.values() if not which(cmd)]
        if missing and install_llvm and llvm_packages(llvm):
            sysdeps.ensure_llvm_packages(_suffix(llvm), progress)
            missing = [cmd for cmd in tools.values() if not which(cmd)]
        if missing:
            pkgs = llvm_packages(llvm)
            raise HarnessError(
                f"LLVM={llvm} ({origin_llvm}): {', '.join(missing)} not found on PATH",
                hint=(f"install Debian's {' '.join(pkgs)} (apt-get install --no-install-recommends {' '.join(pkgs)}, "
                      "or add --install-toolchain), or unset LLVM to build with gcc") if pkgs else
                     f"{llvm} must hold clang, ld.lld and the llvm binutils; or unset LLVM to build with gcc")
        tc = Toolchain(llvm=llvm, cross_compile=cross or "", cc=tools["clang"],
                       version=_version_line(tools["clang"]), origin=origin_llvm)
        want = min_tool_version(src, "llvm") if src else None
        have = parse_tool_version(tc.version)
        if want and have and have < want:
            raise HarnessError(
                f"{tc.cc} is {'.'.join(map(str, have))}, older than the {'.'.join(map(str, want))} this tree needs "
                "(scripts/min-tool-version.sh llvm)",
                hint=_newer_llvm_hint(src))
        if install:
            sysdeps.ensure_kbuild_packages(progress=progress, cross=False)
        return tc
    if cross:
        cc = cross + "gcc"
        if not which(cc):
            raise HarnessError(f"CROSS_COMPILE={cross} ({origin_cc}): {cc} not found on PATH",
                               hint="fix the prefix or PATH, or unset CROSS_COMPILE to use Debian's "
                                    "gcc-aarch64-linux-gnu (installed by the harness), or set LLVM=1")
        if install:
            from ..images import sysdeps
            sysdeps.ensure_kbuild_packages(progress=progress, cross=False)
        return Toolchain(llvm="", cross_compile=cross, cc=cc, version=_version_line(cc), origin=origin_cc)
    if install:
        from ..images import sysdeps
        sysdeps.ensure_kbuild_packages(progress=progress)
    cc = CROSS + "gcc"
    if not which(cc):
        raise HarnessError(f"{cc} not found on PATH", hint="smccc-harness kernel build installs it as root "
                                                           "(gcc-aarch64-linux-gnu)")
    return Toolchain(llvm="", cross_compile=CROSS, cc=cc, version=_version_line(cc), origin="default")
