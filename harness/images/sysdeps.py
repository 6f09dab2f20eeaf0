"""Host system packages: QEMU (>= 9.0), cross binutils, qemu-user.  The host is Debian 12 or 13, as root.

``ensure_system_packages()`` installs only what is missing (``apt-get --no-install-recommends``), and does
not touch the network when nothing is missing.  On bookworm, QEMU comes from bookworm-backports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import SetupError

MIN_QEMU = (9, 0, 0)
BACKPORTS_LIST = Path("/etc/apt/sources.list.d/smccc-harness-backports.list")
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Debian major release -> codename.  Anything newer than the newest known falls back to os-release.
_CODENAMES = {"11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}


@dataclass(frozen=True)
class Requirement:
    package: str  # Debian package to install
    probe: str  # a command it provides (looked up on PATH) or an absolute file it ships
    from_backports: bool = False  # take it from <codename>-backports where QEMU needs that


REQUIREMENTS = (
    Requirement("qemu-system-arm", "qemu-system-aarch64", from_backports=True),
    Requirement("qemu-user", "qemu-aarch64", from_backports=True),
    Requirement("binutils-aarch64-linux-gnu", "aarch64-linux-gnu-as"),
    Requirement("binutils-arm-linux-gnueabihf", "arm-linux-gnueabihf-as"),  # the AArch32 (A32/T32) payloads
    Requirement("ca-certificates", "/etc/ssl/certs/ca-certificates.crt"),
    Requirement("debian-archive-keyring", "/usr/share/keyrings/debian-archive-keyring.gpg"),
    Requirement("device-tree-compiler", "dtc"),  # cross-checks the guest's FDT writer (tests/unit/test_fdt.py)
)


# ---- pure helpers (unit-tested) -------------------------------------------------------------------
def parse_qemu_version(text: str) -> tuple[int, int, int]:
    """``QEMU emulator version 10.0.2 (Debian ...)`` / ``qemu-aarch64 version 8.2.2`` -> (10, 0, 2)."""
    m = re.search(r"version\s+(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise ValueError(f"cannot parse a QEMU version from {text[:200]!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def codename_from_debian_version(debian_version: str, os_release: str = "") -> str:
    """``/etc/debian_version`` ("12.11", "13.1", "trixie/sid") [+ /etc/os-release] -> codename."""
    v = debian_version.strip()
    m = re.match(r"(\d+)(?:\.|$)", v)
    if m and m.group(1) in _CODENAMES:
        return _CODENAMES[m.group(1)]
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?\s*$", os_release, re.MULTILINE)
    if m:
        return m.group(1)
    if "/" in v:  # testing/unstable: "trixie/sid"
        return v.split("/")[0]
    raise SetupError(f"unknown Debian release {v!r}", hint="smccc-harness supports Debian 12 (bookworm) and 13 (trixie)")


def qemu_source(codename: str) -> str | None:
    """The suite QEMU must come from on this release (``-t`` value), or None for the release's own suite.

    bookworm ships QEMU 7.2, too old for FEAT_NV2 under TCG: take bookworm-backports (10.0).  trixie has 10.0.
    """
    return "bookworm-backports" if codename == "bookworm" else None


def mirror_from_sources(sources_list: str = "", deb822: str = "", codename: str = "") -> str:
    """The Debian mirror the system's own apt sources name (one-line or deb822), else deb.debian.org."""
    for stanza in re.split(r"\n\s*\n", deb822):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        suites = fields.get("suites", "").split()
        for uri in fields.get("uris", "").split():
            if "security" in uri:
                continue
            if not codename or any(s.split("-")[0] == codename for s in suites):
                return uri.rstrip("/")
    for line in sources_list.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) < 3 or parts[0] != "deb":
            continue
        rest = [p for p in parts[1:] if not p.startswith("[") and not p.endswith("]") and "=" not in p]
        if len(rest) >= 2 and "security" not in rest[0] and (not codename or rest[1].split("-")[0] == codename):
            return rest[0].rstrip("/")
    return DEFAULT_MIRROR


def backports_line(mirror: str, codename: str) -> str:
    return f"deb {mirror} {codename}-backports main\n"


# ---- host probes ----------------------------------------------------------------------------------
def host_codename() -> str:
    try:
        dv = Path("/etc/debian_version").read_text()
    except OSError as e:
        raise SetupError("not a Debian system (/etc/debian_version is missing)",
                         hint="install qemu-system-arm (>= 9.0), qemu-user and binutils-aarch64-linux-gnu yourself") from e
    try:
        osr = Path("/etc/os-release").read_text()
    except OSError:
        osr = ""
    return codename_from_debian_version(dv, osr)


def system_mirror(codename: str = "") -> str:
    deb822 = ""
    for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        try:
            deb822 += "\n\n" + p.read_text()
        except OSError:
            pass
    try:
        one_line = Path("/etc/apt/sources.list").read_text()
    except OSError:
        one_line = ""
    return mirror_from_sources(one_line, deb822, codename)


def _present(probe: str) -> bool:
    if probe.startswith("/"):
        return os.path.exists(probe)
    return shutil.which(probe) is not None


def qemu_version(binary: str = "qemu-system-aarch64") -> tuple[int, int, int]:
    path = shutil.which(binary)
    if not path:
        raise SetupError(f"{binary} not found on PATH", hint=_install_hint())
    out = subprocess.run([path, "--version"], check=False, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise SetupError(f"{binary} --version failed: {out.stderr.strip() or out.stdout.strip()}", hint=_install_hint())
    return parse_qemu_version(out.stdout)


def _install_hint() -> str:
    try:
        codename = host_codename()
    except SetupError:
        codename = ""
    src = qemu_source(codename)
    if src:
        return (f"on Debian 12 run: echo 'deb {DEFAULT_MIRROR} {src} main' > {BACKPORTS_LIST} && apt-get update && "
                f"apt-get install -t {src} qemu-system-arm qemu-user  (or: smccc-harness setup)")
    return "apt-get install qemu-system-arm qemu-user  (or: smccc-harness setup)"


def check_qemu(binary: str = "qemu-system-aarch64") -> tuple[int, int, int]:
    """Raise SetupError unless ``binary`` exists and is QEMU >= 9.0; return its version."""
    ver = qemu_version(binary)
    if ver < MIN_QEMU:
        raise SetupError(
            f"{binary} {'.'.join(map(str, ver))} is too old: need >= 9.0 for FEAT_NV2 under TCG",
            hint=_install_hint(),
        )
    return ver


def missing_requirements() -> list[Requirement]:
    missing = [r for r in REQUIREMENTS if not _present(r.probe)]
    if all(r.package != "qemu-system-arm" for r in missing):
        try:
            check_qemu()
        except SetupError:
            missing.insert(0, REQUIREMENTS[0])  # present but too old: upgrade it from backports
    return missing


def _apt(args: list[str], progress) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    progress("$ apt-get " + " ".join(args))
    r = subprocess.run(["apt-get", *args], check=False, env=env)
    if r.returncode != 0:
        raise SetupError(f"apt-get {' '.join(args)} failed (exit {r.returncode})",
                         hint="run it by hand to see why; the host must be root with network access to a Debian mirror")


def ensure_system_packages(progress=print) -> list[str]:
    """Install whatever of REQUIREMENTS is missing; return the packages installed (empty: nothing to do)."""
    missing = missing_requirements()
    if not missing:
        check_qemu()
        check_qemu("qemu-aarch64")
        return []
    if os.geteuid() != 0:
        raise SetupError(f"missing host packages: {', '.join(r.package for r in missing)}",
                         hint="run as root, or install them yourself: " + _install_hint())
    codename = host_codename()
    src = qemu_source(codename)
    if src and any(r.from_backports for r in missing):
        mirror = system_mirror(codename)
        line = backports_line(mirror, codename)
        if not _backports_configured(src):
            progress(f"adding {BACKPORTS_LIST}: {line.strip()}")
            BACKPORTS_LIST.write_text(line)
    _apt(["update", "-q"], progress)
    common = ["install", "-y", "-q", "--no-install-recommends"]
    plain = [r.package for r in missing if not (src and r.from_backports)]
    bpo = [r.package for r in missing if src and r.from_backports]
    if plain:
        _apt(common + plain, progress)
    if bpo:
        _apt(common + ["-t", src] + bpo, progress)
    check_qemu()
    check_qemu("qemu-aarch64")
    return plain + bpo


def _backports_configured(suite: str) -> bool:
    files = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list"),
             *Path("/etc/apt/sources.list.d").glob("*.sources")]
    for p in files:
        try:
            text = p.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            s = line.split("#", 1)[0]
            if suite in s.split() or (s.lower().startswith("suites:") and suite in s.split()[1:]):
                return True
    return False


# ---- kernel builds (installed on demand by `smccc-harness kernel build`) ------------------------------
KBUILD_REQUIREMENTS = (
    Requirement("gcc-aarch64-linux-gnu", "aarch64-linux-gnu-gcc"),
    Requirement("binutils-aarch64-linux-gnu", "aarch64-linux-gnu-ld"),
    Requirement("make", "make"),
    Requirement("flex", "flex"),
    Requirement("bison", "bison"),
    Requirement("bc", "bc"),
    Requirement("libssl-dev", "/usr/include/openssl/ssl.h"),
    Requirement("libelf-dev", "/usr/include/libelf.h"),
    Requirement("ccache", "ccache"),
    Requirement("gcc", "gcc"),
    Requirement("libc6-dev", "/usr/include/stdio.h"),
)


def ensure_packages(requirements, what: str, progress=print) -> list[str]:
    """Install the packages of ``requirements`` whose probe is missing; no network when none is.

    Not root: a SetupError naming the ``apt-get install`` line to run.  Returns the packages installed."""
    missing = [r for r in requirements if not _present(r.probe)]
    if not missing:
        return []
    names = list(dict.fromkeys(r.package for r in missing if not r.from_backports))
    bpo = list(dict.fromkeys(r.package for r in missing if r.from_backports))
    install_packages(names, what, progress)
    install_packages(bpo, what, progress, from_backports=True)
    still = [r for r in requirements if not _present(r.probe)]
    if still:
        raise SetupError(f"installed {', '.join(names + bpo)} but still missing: {', '.join(r.probe for r in still)}")
    return names + bpo


def install_packages(names: list[str], what: str, progress=print, from_backports: bool = False) -> None:
    """``apt-get install`` ``names`` (none: nothing happens); ``from_backports``: from <codename>-backports on a
    release that needs it for QEMU's tools (bookworm: :func:`qemu_source`), adding that suite if missing.
    Not root: a SetupError naming the command to run."""
    if not names:
        return
    src = qemu_source(host_codename()) if from_backports else None
    target = ["-t", src] if src else []
    if os.geteuid() != 0:
        raise SetupError(f"missing {what}: {', '.join(names)}",
                         hint="run as root, or: apt-get install --no-install-recommends " + " ".join(target + names))
    if src and not _backports_configured(src):
        line = backports_line(system_mirror(host_codename()), host_codename())
        progress(f"adding {BACKPORTS_LIST}: {line.strip()}")
        BACKPORTS_LIST.write_text(line)
    progress(f"installing {what}: {' '.join(names)}" + (f" (from {src})" if src else ""))
    _apt(["update", "-q"], progress)
    _apt(["install", "-y", "-q", "--no-install-recommends", *target, *names], progress)


def ensure_kbuild_packages(progress=print, cross: bool = True) -> list[str]:
    """Install the kernel build tools (and, with ``cross``, Debian's aarch64 cross gcc) that are missing."""
    reqs = [r for r in KBUILD_REQUIREMENTS if cross or not r.package.endswith("-aarch64-linux-gnu")]
    return ensure_packages(reqs, "kernel build tools", progress)


# ---- LLVM (``kernel build`` with LLVM=1 or LLVM=-N) --------------------------------------------------------
def llvm_requirements(suffix: str = "") -> tuple[Requirement, ...]:
    """Debian's packages behind kbuild's ``LLVM=1`` (suffix "") or ``LLVM=-19`` (suffix "-19"): clang, lld
    (ld.lld) and llvm (llvm-ar, llvm-nm, llvm-objcopy, llvm-strip...)."""
    return (Requirement(f"clang{suffix}", f"clang{suffix}"), Requirement(f"lld{suffix}", f"ld.lld{suffix}"),
            Requirement(f"llvm{suffix}", f"llvm-ar{suffix}"))


def ensure_llvm_packages(suffix: str = "", progress=print) -> list[str]:
    return ensure_packages(llvm_requirements(suffix), f"LLVM{suffix or '=1'} toolchain", progress)


def apt_candidate(package: str) -> str | None:
    """The version apt would install of ``package`` (None: unknown to apt)."""
    r = subprocess.run(["apt-cache", "policy", package], check=False, capture_output=True, text=True)
    m = re.search(r"Candidate:\s*(\S+)", r.stdout)
    return None if not m or m.group(1) == "(none)" else m.group(1)


def llvm_major_of_candidate(version: str) -> int | None:
    """``1:14.0-55.7~deb12u1`` / ``1:19.1.7-3~deb12u1`` -> 14 / 19."""
    m = re.match(r"(?:\d+:)?(\d+)", version or "")
    return int(m.group(1)) if m else None


# ---- upstream KVM selftests (installed on demand by `smccc-harness selftests build`) ---------------------
SELFTEST_REQUIREMENTS = (
    Requirement("gcc-aarch64-linux-gnu", "aarch64-linux-gnu-gcc"),
    Requirement("libc6-dev-arm64-cross", "/usr/aarch64-linux-gnu/lib/libc.a"),  # -static
    Requirement("binutils-aarch64-linux-gnu", "aarch64-linux-gnu-strip"),
    Requirement("make", "make"),
    Requirement("gcc", "gcc"),  # host tools of `make headers_install` (fixdep, unifdef)
    Requirement("libc6-dev", "/usr/include/stdio.h"),
    Requirement("rsync", "rsync"),  # headers_install copies with rsync
    Requirement("xz-utils", "xz"),  # linux-source-*.tar.xz
)


def ensure_selftest_packages(progress=print) -> list[str]:
    """Install what building the arm64 KVM selftests needs and is missing; no network when nothing is."""
    return ensure_packages(SELFTEST_REQUIREMENTS, "selftest build tools", progress)


# ---- the report's browser (``matrix --screenshot``, the report page test; installed by `test`) ---------------
REPORT_REQUIREMENTS = (
    Requirement("chromium", "chromium"),   # headless: --screenshot, --dump-dom (harness/kdev/browser.py)
)


def ensure_report_packages(progress=print) -> list[str]:
    """Install Debian's Chromium when missing (it renders report.html: screenshots and the page test)."""
    return ensure_packages(REPORT_REQUIREMENTS, "report browser", progress)


# ---- the guest kernel debugger (``--gdb``, the gdb test: docs/debug-kernels.md) ---------------------------
DEBUG_REQUIREMENTS = (
    Requirement("gdb-multiarch", "gdb-multiarch"),   # an arm64 kernel on an x86 host, through QEMU's gdbstub
)


def ensure_debug_packages(progress=print) -> list[str]:
    """Install Debian's gdb-multiarch when missing (``--gdb`` prints a line that runs it)."""
    return ensure_packages(DEBUG_REQUIREMENTS, "kernel debugger", progress)
