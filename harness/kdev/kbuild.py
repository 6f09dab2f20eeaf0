"""``smccc-harness kernel build``: build an arm64 kernel tree for the harness, with the developer's toolchain.

Toolchain (:func:`resolve_toolchain`), as kbuild itself reads it:
- ``LLVM=1`` / ``LLVM=-19`` / ``LLVM=/path/to/llvm/bin/`` (env or ``--llvm``): clang, ld.lld and the llvm
  binutils (Documentation/kbuild/llvm.rst).  Debian's packages are clang, lld, llvm (``-19`` suffixed for
  the versioned ones); a missing one is an error naming them (``--install-toolchain`` installs them).
- else ``CROSS_COMPILE`` (env or ``--cross-compile``), a prefix whose ``gcc`` must exist;
- else Debian's ``aarch64-linux-gnu-`` gcc, installed on first use.
ccache wraps the compiler (``CC="ccache <cc>"``, ``CCACHE_SLOPPINESS=include_file_mtime,include_file_ctime,
time_macros``) unless ``--no-ccache``.  The build prints the toolchain it used.

Configuration (:func:`configure`):
- default: ``make allnoconfig`` with ``KCONFIG_ALLCONFIG=<fragment>`` (images/kernel.config: the ~30 options
  the guest needs; everything else off), which boots in ~1 s;
- ``--config PATH|defconfig|olddefconfig``: start from your own .config, from ``make defconfig``, or from the
  .config already in O=; then merge the fragment the way scripts/kconfig/merge_config.sh does (the fragment's
  lines replace the base's lines for the same symbols, then ``make alldefconfig`` with the merged file as
  ``KCONFIG_ALLCONFIG``).
Either way every option of the fragment must be in the resulting .config, or the build stops naming the ones
that did not stick; and a configuration that fails leaves O= as it was (the previous .config is put back).
The configuration step runs only when its inputs changed (fragment, base config, toolchain; for olddefconfig
also a .config edited since), so a rebuild after a ``git checkout`` (``git bisect``) recompiles only what
changed: 6-13 s after touching one file in arch/arm64/kvm.

Output directory: ``--out``, else ``$KBUILD_OUTPUT``, else a persistent directory per tree, toolchain family and
config flavour in the cache.  The whole make output goes to ``<O>/build.log``; the terminal gets a live
one-line counter with the file being built (``-v``: make's own lines; not a terminal: a line every 15 s).

Kernel source: any tree you pass, or Debian's ``linux-source-7.3`` (``source_tree()``), fetched through the
harness's private apt and unpacked once into the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import HarnessError

FRAGMENT = paths.REPO_ROOT / "images" / "kernel.config"
SSH_FRAGMENT = paths.REPO_ROOT / "images" / "kernel-ssh.config"   # `kernel build --ssh`: + TCP/IP, virtio-net
MERGED = ".smccc-harness-fragment.config"  # in O=: the fragments, concatenated, when there are several
MERGED_BASE = ".smccc-harness-merged.config"  # in O=: base config + fragment (--config), KCONFIG_ALLCONFIG
CROSS = "aarch64-linux-gnu-"
CCACHE_SLOPPINESS = "include_file_mtime,include_file_ctime,time_macros"
SOURCE_PACKAGE = "linux-source-7.3"
SOURCE_SUITE = "trixie-backports"
STAMP = ".smccc-harness-fragment"  # in O=: JSON of what the .config was made from (fragment, base, toolchain)
CONFIG_MODES = ("allnoconfig", "defconfig", "olddefconfig")  # besides a path to a .config
PROGRESS_EVERY_S = 15.0  # not a terminal: one progress line this often


class KernelBuildError(HarnessError):
    """``make`` failed (the message carries the tail of the build log); ``git bisect run`` maps it to 125."""


@dataclass
class BuildResult:
    image: Path  # <out>/arch/arm64/boot/Image
    vmlinux: Path  # <out>/vmlinux (symbols for the panic symbolizer)
    out: Path
    log: Path
    seconds: float
    configured: bool  # the configuration step ran this time
    version: str  # uname -r from the Image's banner
    toolchain: Toolchain | None = None
    files: int = 0  # compile/link steps make printed (CC, AS, LD, ...)


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
    suffix = llvm if llvm.startswith("-") else ""
    return [f"clang{suffix}", f"lld{suffix}", f"llvm{suffix}"]


def _which(cmd: str) -> str | None:
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
        missing = [cmd for cmd in tools.values() if not _which(cmd)]
        if missing and install_llvm and llvm_packages(llvm):
            sysdeps.ensure_packages([sysdeps.Requirement(p, t) for p, t in
                                     zip(llvm_packages(llvm), (tools["clang"], tools["ld.lld"], tools["llvm-ar"]))],
                                    f"LLVM={llvm} toolchain", progress)
            missing = [cmd for cmd in tools.values() if not _which(cmd)]
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
        if not _which(cc):
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
    if not _which(cc):
        raise HarnessError(f"{cc} not found on PATH", hint="smccc-harness kernel build installs it as root "
                                                           "(gcc-aarch64-linux-gnu)")
    return Toolchain(llvm="", cross_compile=CROSS, cc=cc, version=_version_line(cc), origin="default")


# ---- configuration --------------------------------------------------------------------------------------
def parse_fragment(text: str) -> dict[str, str]:
    """``CONFIG_X=y`` / ``# CONFIG_X is not set`` lines of a fragment -> {"CONFIG_X": "y" | "n" | value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("# CONFIG_") and s.endswith(" is not set"):
            out[s[2:-len(" is not set")]] = "n"
        elif s.startswith("CONFIG_") and "=" in s:
            k, _, v = s.partition("=")
            out[k.strip()] = v.strip()
    return out


def unmet_options(fragment: dict[str, str], config_text: str) -> list[str]:
    """Fragment options the resulting .config does not have (typos, unmet dependencies): 'CONFIG_X=y (got n)'."""
    have = parse_fragment(config_text)
    bad = []
    for k, want in fragment.items():
        got = have.get(k, "n")
        if got.strip('"') != want.strip('"'):
            bad.append(f"{k}={want} (got {got})")
    return bad


def merge_config(base_text: str, fragment_text: str) -> str:
    """scripts/kconfig/merge_config.sh's merge: every symbol the fragment names loses its lines in the base
    (``CONFIG_X=...`` and ``# CONFIG_X is not set``), then the fragment's lines are appended."""
    names = set(parse_fragment(fragment_text))
    kept = []
    for line in base_text.splitlines():
        s = line.strip()
        sym = None
        if s.startswith("CONFIG_") and "=" in s:
            sym = s.split("=", 1)[0].strip()
        elif s.startswith("# CONFIG_") and s.endswith(" is not set"):
            sym = s[2:-len(" is not set")]
        if sym not in names:
            kept.append(line)
    frag = [ln for ln in fragment_text.splitlines() if ln.strip()]
    return "\n".join(kept + ["", "# ---- merged by smccc-harness (kernel build --config) ----", *frag]) + "\n"


def check_kernel_config(path: Path) -> str:
    """The text of a .config given with --config PATH; a HarnessError if it is missing or not a kernel config."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        raise HarnessError(f"--config {path}: no such file",
                           hint="pass a kernel .config, or 'defconfig' / 'olddefconfig' (the .config in O=)") from None
    except OSError as e:
        raise HarnessError(f"--config {path}: cannot read it ({e.strerror})") from None
    opts = parse_fragment(text)
    if not opts:
        raise HarnessError(f"--config {path}: not a kernel config (no CONFIG_ lines)",
                           hint="pass a .config written by the kernel's make *config, or 'defconfig'")
    if "CONFIG_ARM64" in text or "CONFIG_X86" not in opts:
        return text
    raise HarnessError(f"--config {path}: a config for another architecture (CONFIG_X86 is set, no CONFIG_ARM64)",
                       hint="pass an arm64 .config (make ARCH=arm64 ...), or 'defconfig'")


def default_out_dir(src: Path, flavour: str = "") -> Path:
    """A persistent O= per source tree (keyed by its absolute path) and flavour ("" or "ssh", "llvm",
    "defconfig", ...), so rebuilds are incremental and switching flavours does not reconfigure the others."""
    key = hashlib.sha256(str(Path(src).resolve()).encode()).hexdigest()[:12]
    return paths.cache_dir() / "kbuild" / f"{Path(src).resolve().name}-{key}{'-' + flavour if flavour else ''}"


def out_flavour(*, ssh: bool = False, llvm: bool = False, config: str | None = None) -> str:
    parts = []
    if ssh:
        parts.append("ssh")
    if llvm:
        parts.append("llvm")
    if config == "defconfig":
        parts.append("defconfig")
    elif config and config not in CONFIG_MODES:
        parts.append("config-" + hashlib.sha256(str(Path(config).resolve()).encode()).hexdigest()[:8])
    return "-".join(parts)


def resolve_out_dir(src: Path, out=None, *, env=None, flavour: str = "") -> Path:
    """``--out``, else ``$KBUILD_OUTPUT``, else the cache's persistent directory for this tree and flavour."""
    env = os.environ if env is None else env
    if out:
        return Path(out).resolve()
    if env.get("KBUILD_OUTPUT"):
        return Path(env["KBUILD_OUTPUT"]).resolve()
    return default_out_dir(src, flavour)


def make_env(ccache_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ARCH="arm64", CCACHE_SLOPPINESS=CCACHE_SLOPPINESS,
               CCACHE_DIR=str(ccache_dir or (paths.cache_dir() / "ccache")), CCACHE_MAXSIZE="5G",
               KBUILD_BUILD_USER="smccc-harness", KBUILD_BUILD_HOST="kbuild", LC_ALL="C")
    for k in ("KCONFIG_ALLCONFIG", "KBUILD_OUTPUT", "LLVM", "CROSS_COMPILE", "CC"):   # argv says what we use
        env.pop(k, None)
    return env


def make_argv(src: Path, out: Path, target: str, jobs: int, ccache: bool = True,
              toolchain: Toolchain | None = None) -> list[str]:
    tc = toolchain or Toolchain("", CROSS, CROSS + "gcc", "", "default")
    return ["make", "-C", str(src), f"O={out}", "ARCH=arm64", *tc.make_vars(ccache), f"-j{jobs}", target]


# ---- running make with progress ---------------------------------------------------------------------------
_STEP = re.compile(r"^\s{2}([A-Z][A-Z0-9_]{1,9})\s+(?:\[M\]\s+)?(\S+)")


class Progress:
    """make's output -> the build log (every byte) and the terminal: make's lines (``verbose``), a one-line
    counter redrawn in place (a terminal), or one line every PROGRESS_EVERY_S seconds (CI logs)."""

    def __init__(self, say, *, verbose: bool = False, tty: bool | None = None, stream=None, clock=time.monotonic):
        self.say, self.verbose, self.clock = say, verbose, clock
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.files = 0
        self.current = ""
        self.t0 = clock()
        self.last = self.t0
        self.drawn = False

    def line(self, text: str) -> None:
        m = _STEP.match(text)
        if m:
            self.files += 1
            self.current = f"{m.group(1)} {m.group(2)}"
        if self.verbose:
            self.stream.write(text + "\n")
            self.stream.flush()
            return
        now = self.clock()
        if self.tty:
            if m and now - self.last >= 0.1:
                self.last = now
                width = shutil.get_terminal_size((100, 20)).columns - 1
                self.stream.write("\r\x1b[K" + self.status(now)[:width])
                self.stream.flush()
                self.drawn = True
        elif now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self.say(self.status(now))

    def status(self, now: float | None = None) -> str:
        dt = (self.clock() if now is None else now) - self.t0
        return f"[{int(dt // 60)}m{int(dt % 60):02d}s] {self.files} built, now {self.current or '...'}"

    def done(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


def _run_make(argv: list[str], env: dict, log: Path, what: str, progress, verbose: bool = False) -> int:
    progress("$ " + shlex.join(argv))
    shown = Progress(progress, verbose=verbose)
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(argv)}\n".encode())
        f.flush()
        p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            for raw in p.stdout:
                f.write(raw)
                shown.line(raw.decode(errors="replace").rstrip("\n"))
            rc = p.wait()
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            shown.done()
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise KernelBuildError(f"kernel {what} failed (make exit {rc}); last lines of {log}:\n{tail}",
                               hint="fix the tree, or (in git bisect run) this commit is skipped with 125")
    return shown.files


def configure(src: Path, out: Path, *, fragment_text: str, fragment_path: Path, config: str | None,
              toolchain: Toolchain, env: dict, log: Path, jobs: int, ccache: bool, progress,
              verbose: bool = False) -> bool:
    """Make O=/.config (see the module's docstring); return whether the configuration step ran.

    Any failure puts back the .config (and stamp) that were there before, so O= is never half-configured."""
    cfg = out / ".config"
    base_text = check_kernel_config(Path(config)) if config and config not in CONFIG_MODES else None
    if config == "olddefconfig" and not cfg.is_file():
        raise HarnessError(f"--config olddefconfig: there is no .config in {out} to start from",
                           hint="pass --config PATH (your .config) or --config defconfig, or --out your build dir")
    mode = config or "allnoconfig"
    inputs = {"mode": mode if base_text is None else "file", "fragment": hashlib.sha256(fragment_text.encode()).hexdigest(),
              "base": hashlib.sha256(base_text.encode()).hexdigest() if base_text is not None else None,
              "toolchain": f"{toolchain.family} {toolchain.version}"}
    stamp = out / STAMP
    try:
        old = json.loads(stamp.read_text()) if stamp.is_file() else {}
    except ValueError:
        old = {}
    old = old if isinstance(old, dict) else {}
    current_sha = hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None
    if cfg.is_file() and old.get("inputs") == inputs and old.get("config") == current_sha:
        return False
    saved = {p: p.read_bytes() for p in (cfg, stamp) if p.is_file()}
    stamp.unlink(missing_ok=True)
    try:
        if mode == "allnoconfig":
            cenv = dict(env, KCONFIG_ALLCONFIG=str(fragment_path.resolve()))
            _run_make(make_argv(src, out, "allnoconfig", jobs, ccache, toolchain), cenv, log, "configuration",
                      progress, verbose)
        else:
            if mode == "defconfig":
                _run_make(make_argv(src, out, "defconfig", jobs, ccache, toolchain), env, log, "defconfig",
                          progress, verbose)
                base_text = cfg.read_text()
            elif mode == "olddefconfig":
                base_text = cfg.read_text()
            merged = out / MERGED_BASE
            merged.write_text(merge_config(base_text, fragment_text))
            progress(f"merging {fragment_path.name} into the {'given' if mode not in CONFIG_MODES else mode} "
                     f".config (merge_config.sh style): {merged}")
            cenv = dict(env, KCONFIG_ALLCONFIG=str(merged))
            _run_make(make_argv(src, out, "alldefconfig", jobs, ccache, toolchain), cenv, log, "configuration",
                      progress, verbose)
        missing = unmet_options(parse_fragment(fragment_text), cfg.read_text())
        if missing:
            raise KernelBuildError(f"{fragment_path}: these options did not stick in {cfg}: " + ", ".join(missing),
                                   hint="a typo, an option whose dependencies are not in the fragment, or one the "
                                        "base config rules out; O= keeps its previous .config")
    except BaseException:
        for p in (cfg, stamp):
            if p in saved:
                p.write_bytes(saved[p])
            else:
                p.unlink(missing_ok=True)
        raise
    stamp.write_text(json.dumps({"inputs": inputs, "config": hashlib.sha256(cfg.read_bytes()).hexdigest()}) + "\n")
    return True


def build(src: str | os.PathLike, out: str | os.PathLike | None = None, *, jobs: int | None = None,
          fragment: Path | list[Path] = FRAGMENT, ccache: bool = True, progress=print, config: str | None = None,
          llvm: str | None = None, cross_compile: str | None = None, install_toolchain: bool = False,
          verbose: bool = False, flavour: str = "") -> BuildResult:
    """Configure (if needed) and build ``Image`` for the kernel tree ``src`` into ``out``.

    ``fragment``: one config fragment or several (concatenated, later lines win, as KCONFIG_ALLCONFIG reads
    them), e.g. ``[FRAGMENT, SSH_FRAGMENT]``.  ``config``: None (allnoconfig), a .config path, "defconfig" or
    "olddefconfig".  ``llvm``/``cross_compile``: None = the environment's LLVM / CROSS_COMPILE."""
    fragments = [Path(f) for f in (fragment if isinstance(fragment, (list, tuple)) else [fragment])]
    from ..images.kernel import image_banner
    src = Path(src).resolve()
    if not (src / "Makefile").is_file() or not (src / "arch" / "arm64").is_dir():
        raise HarnessError(f"{src} is not a Linux source tree (no Makefile or arch/arm64)",
                           hint="pass the top of a kernel tree, or use 'smccc-harness kernel source' to get one")
    try:
        frag_text = "\n".join(f.read_text() for f in fragments)
    except OSError as e:
        raise HarnessError(f"cannot read the config fragment {e.filename}: {e.strerror}",
                           hint="pass an existing file with --fragment") from None
    if config and config not in CONFIG_MODES:
        check_kernel_config(Path(config))          # bad --config: fail before anything is installed or made
    tc = resolve_toolchain(llvm=llvm, cross_compile=cross_compile, install=True, install_llvm=install_toolchain,
                           src=src, progress=progress)
    if ccache and not _which("ccache"):
        ccache = False
    progress(f"toolchain: {tc.describe(ccache)}")
    out = resolve_out_dir(src, out, flavour=flavour or out_flavour(llvm=bool(tc.llvm), config=config))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    log.write_text("")
    progress(f"build log: {log}")
    env = make_env()
    jobs = jobs or os.cpu_count() or 2
    t0 = time.monotonic()
    fragment_path = fragments[0].resolve()
    if len(fragments) > 1:
        fragment_path = out / MERGED
        fragment_path.write_text(frag_text)
    configured = configure(src, out, fragment_text=frag_text, fragment_path=fragment_path, config=config,
                           toolchain=tc, env=env, log=log, jobs=jobs, ccache=ccache, progress=progress,
                           verbose=verbose)
    files = _run_make(make_argv(src, out, "Image", jobs, ccache, tc), env, log, "build", progress, verbose)
    image = out / "arch" / "arm64" / "boot" / "Image"
    version, _ = image_banner(image)
    dt = time.monotonic() - t0
    return BuildResult(image=image, vmlinux=out / "vmlinux", out=out, log=log, seconds=dt, configured=configured,
                       version=version or "unknown", toolchain=tc, files=files)


# ---- Debian's kernel source ------------------------------------------------------------------------
def source_tree(progress=print) -> Path:
    """Debian's linux-source-7.3 unpacked once under the cache (read-only use: build with O=)."""
    from ..images.store import Store
    have = sorted((paths.cache_dir() / "ksrc").glob(f"*/{SOURCE_PACKAGE}/Makefile"), key=lambda p: p.stat().st_mtime)
    if have:  # already unpacked: no network (git bisect runs offline)
        return have[-1].parent
    store = Store(progress)
    e = store.fetch(SOURCE_PACKAGE, SOURCE_SUITE)
    root = paths.cache_dir() / "ksrc" / e.sha256[:16]
    tree = root / SOURCE_PACKAGE
    if (tree / "Makefile").is_file():
        return tree
    deb_dir = store.extract(e)
    tarballs = sorted((deb_dir / "usr" / "src").glob("linux-source-*.tar.*"))
    if not tarballs:
        raise HarnessError(f"{SOURCE_PACKAGE} {e.version}: no tarball in usr/src of the package")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".x{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.monotonic()
    progress(f"unpacking {tarballs[0].name} ...")
    r = subprocess.run(["tar", "-xf", str(tarballs[0]), "-C", str(tmp)], check=False, capture_output=True,
                       text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HarnessError(f"tar -xf {tarballs[0]} failed: {r.stderr.strip()}")
    inner = [p for p in tmp.iterdir() if p.is_dir()]
    if len(inner) != 1:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HarnessError(f"{tarballs[0]}: expected one top directory, found {[p.name for p in inner]}")
    try:
        os.rename(inner[0], tree)
    except OSError:
        if not (tree / "Makefile").is_file():  # a concurrent unpacker did not win either
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    progress(f"unpacked in {time.monotonic() - t0:.1f} s: {tree}")
    return tree


# ---- CLI: smccc-harness kernel {build,source,info} ---------------------------------------------------
def _cmd_build(args) -> int:
    def say(msg: str) -> None:
        print(f"[smccc-harness] {msg}", flush=True)
    src = Path(args.src) if args.src else source_tree(progress=say)
    fragments = [Path(f) for f in (args.fragment or [FRAGMENT])] + ([SSH_FRAGMENT] if args.ssh else [])
    llvm = args.llvm
    flavour = ""
    if args.ssh:   # the --ssh build keeps its own O= (and the LLVM one its own too)
        uses_llvm = bool((llvm if llvm is not None else os.environ.get("LLVM", "")).strip() not in ("", "0"))
        flavour = out_flavour(ssh=True, llvm=uses_llvm, config=args.config)
    r = build(src, args.out, jobs=args.jobs, fragment=fragments, ccache=not args.no_ccache, progress=say,
              config=args.config, llvm=llvm, cross_compile=args.cross_compile,
              install_toolchain=args.install_toolchain, verbose=args.verbose, flavour=flavour)
    what = " + ".join(str(f) for f in fragments)
    say(f"built {r.version} in {r.seconds:.1f} s with {r.toolchain.describe(not args.no_ccache)}"
        + (f" (configured: {args.config or 'allnoconfig'} + {what})" if r.configured else ""))
    say(f"log: {r.log}")
    say(f"vmlinux: {r.vmlinux}")
    print(r.image)
    return 0


def _cmd_source(args) -> int:
    print(source_tree(progress=lambda m: print(f"[smccc-harness] {m}", flush=True)))
    return 0


def _cmd_info(args) -> int:
    from ..images.kernel import resolve_kernel, vmlinux_of
    k = resolve_kernel(args.path)
    vm = vmlinux_of(k)
    print(json.dumps({"image": str(k.image), "version": k.version, "sha256": k.sha256,
                      "vmlinux": str(vm) if vm else None}, indent=2))
    return 0


def add_toolchain_args(b) -> None:
    """--llvm / --cross-compile / --install-toolchain / -v, shared by `kernel build` and `bisect`."""
    b.add_argument("--llvm", default=None, metavar="1|-N|DIR/",
                   help="build with clang/lld (kbuild's LLVM=; default: $LLVM) e.g. --llvm 1 or --llvm -19")
    b.add_argument("--cross-compile", default=None, metavar="PREFIX",
                   help="gcc prefix (kbuild's CROSS_COMPILE=; default: $CROSS_COMPILE, else Debian's "
                        f"{CROSS}, installed on first use)")
    b.add_argument("--install-toolchain", action="store_true",
                   help="install Debian's clang/lld/llvm packages that LLVM= needs when missing (as root)")
    b.add_argument("-v", "--verbose", action="store_true", help="print make's lines instead of a progress line")


def add_cli(sub) -> None:
    p = sub.add_parser("kernel", help="build your own kernel tree (minimal config), get Debian's source, inspect")
    ks = p.add_subparsers(dest="kernel_command", required=True)
    b = ks.add_parser("build", help="build a kernel tree with images/kernel.config; prints the Image path")
    b.add_argument("src", nargs="?", help="kernel source tree (default: Debian's linux-source-7.3, unpacked in the cache)")
    b.add_argument("--out", help="build directory (O=); default: $KBUILD_OUTPUT, else a persistent one per tree "
                                 "in the cache")
    b.add_argument("-j", "--jobs", type=int, default=None, help="make -j (default: all CPUs)")
    b.add_argument("--config", default=None, metavar="PATH|defconfig|olddefconfig",
                   help="start from this .config, from defconfig, or from the .config in O=, then merge the "
                        "fragment(s) (default: allnoconfig + the fragment)")
    b.add_argument("--fragment", action="append", default=None,
                   help=f"config fragment merged into the config; repeatable (default: {FRAGMENT})")
    b.add_argument("--ssh", action="store_true",
                   help=f"also {SSH_FRAGMENT.name}: TCP/IP and virtio-net built in, for --ssh (docs/ssh.md); own O= dir")
    b.add_argument("--no-ccache", action="store_true")
    add_toolchain_args(b)
    b.set_defaults(func=_cmd_build)
    s = ks.add_parser("source", help="fetch and unpack Debian's linux-source-7.3; prints the tree's path")
    s.set_defaults(func=_cmd_source)
    i = ks.add_parser("info", help="check a kernel file or spec: version, sha256, vmlinux found next to it")
    i.add_argument("path")
    i.set_defaults(func=_cmd_info)
