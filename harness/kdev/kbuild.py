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
harness's private apt and unpacked once into the cache; ``kernel source --patch FILE`` makes a patched copy of
it, cached by the patches' hash (harness/kdev/patched.py), to build like any other tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import HarnessError
from .kconfig import CONFIG_MODES, check_kernel_config, configure
from .make import make_argv, make_env, run_make
from .toolchain import CROSS, Toolchain, resolve_toolchain, which

FRAGMENT = paths.REPO_ROOT / "images" / "kernel.config"
SSH_FRAGMENT = paths.REPO_ROOT / "images" / "kernel-ssh.config"   # `kernel build --ssh`: + TCP/IP, virtio-net
# `kernel build --debug`: + lockdep, KASAN, DEBUG_ATOMIC_SLEEP, DEBUG_LIST, DWARF, KALLSYMS_ALL, LKDTM (docs/debug-kernels.md)
DEBUG_FRAGMENT = paths.REPO_ROOT / "images" / "kernel-debug.config"
MERGED = ".smccc-harness-fragment.config"  # in O=: the fragments, concatenated, when there are several
SOURCE_PACKAGE = "linux-source-7.3"
SOURCE_SUITE = "trixie-backports"


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


def default_out_dir(src: Path, flavour: str = "") -> Path:
    """A persistent O= per source tree (keyed by its absolute path) and flavour ("" or "ssh", "llvm",
    "defconfig", ...), so rebuilds are incremental and switching flavours does not reconfigure the others."""
    key = hashlib.sha256(str(Path(src).resolve()).encode()).hexdigest()[:12]
    return paths.cache_dir() / "kbuild" / f"{Path(src).resolve().name}-{key}{'-' + flavour if flavour else ''}"


def out_flavour(*, ssh: bool = False, llvm: bool = False, config: str | None = None, debug: bool = False) -> str:
    parts = ["debug"] if debug else []
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
    if ccache and not which("ccache"):
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
    files = run_make(make_argv(src, out, "Image", jobs, ccache, tc), env, log, "build", progress, verbose)
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
    debug = getattr(args, "debug", False)
    fragments = ([Path(f) for f in (args.fragment or [FRAGMENT])] + ([DEBUG_FRAGMENT] if debug else [])
                 + ([SSH_FRAGMENT] if args.ssh else []))
    llvm = args.llvm
    flavour = ""
    if args.ssh or debug:   # the --ssh / --debug builds keep their own O= (and the LLVM ones theirs too)
        uses_llvm = bool((llvm if llvm is not None else os.environ.get("LLVM", "")).strip() not in ("", "0"))
        flavour = out_flavour(ssh=args.ssh, llvm=uses_llvm, config=args.config, debug=debug)
    try:
        r = build(src, args.out, jobs=args.jobs, fragment=fragments, ccache=not args.no_ccache, progress=say,
                  config=args.config, llvm=llvm, cross_compile=args.cross_compile,
                  install_toolchain=args.install_toolchain, verbose=args.verbose, flavour=flavour)
    except HarnessError as e:
        if debug and "did not stick" in str(e):
            e.hint = (f"{e.hint}; {DEBUG_FRAGMENT.name} needs a compiler with KASAN support (gcc >= 8.3 or clang "
                      ">= 11: -fsanitize=kernel-address) and a base config that allows lockdep and KASAN "
                      "(docs/debug-kernels.md)")
        raise
    what = " + ".join(str(f) for f in fragments)
    say(f"built {r.version} in {r.seconds:.1f} s with {r.toolchain.describe(not args.no_ccache)}"
        + (f" (configured: {args.config or 'allnoconfig'} + {what})" if r.configured else ""))
    say(f"log: {r.log}")
    say(f"vmlinux: {r.vmlinux}")
    print(r.image)
    return 0


def _cmd_source(args) -> int:
    from .patched import patched_tree, patches_in

    def say(msg: str) -> None:
        print(f"[smccc-harness] {msg}", flush=True)
    patches = [Path(p) for p in (args.patch or [])]
    lv_files: list[Path] = []
    for d in args.patches or []:
        more, lvs = patches_in(Path(d))
        patches += more
        lv_files += lvs
    if not patches and (args.localversion or lv_files):
        raise HarnessError("--localversion without a patch", hint="add --patch FILE or --patches DIR")
    tree = source_tree(progress=say)
    if patches:
        p = patched_tree(tree, patches, localversion=args.localversion or "", localversion_files=lv_files,
                         progress=say)
        say(("made" if p.made else "cached") + f": {len(p.patches)} patch(es) on {tree.name}"
            + (f", localversion {p.localversion}" if p.localversion else "") + f" (key {p.key})")
        tree = p.tree
    print(tree)
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
    b.add_argument("--debug", action="store_true",
                   help=f"also {DEBUG_FRAGMENT.name}: lockdep, KASAN, DEBUG_ATOMIC_SLEEP, DEBUG_LIST, DWARF, "
                        "KALLSYMS_ALL, LKDTM (docs/debug-kernels.md); own O= dir")
    b.add_argument("--no-ccache", action="store_true")
    add_toolchain_args(b)
    b.set_defaults(func=_cmd_build)
    s = ks.add_parser("source", help="fetch and unpack Debian's linux-source-7.3 (with --patch: a patched copy, "
                                     "cached by the patches' hash); prints the tree's path")
    s.add_argument("--patch", action="append", default=None, metavar="FILE",
                   help="apply this patch (git format-patch or any -p1 unified diff) to a hard-linked copy; "
                        "repeatable, applied in order (harness/kdev/patched.py)")
    s.add_argument("--patches", action="append", default=None, metavar="DIR",
                   help="apply DIR/*.patch in name order and copy DIR/localversion* into the tree "
                        "(e.g. patches/linux)")
    s.add_argument("--localversion", default=None, metavar="SUFFIX",
                   help="kbuild localversion of the patched tree, appended to the release (e.g. --localversion=-kvm-nv-hcd-elr)")
    s.set_defaults(func=_cmd_source)
    i = ks.add_parser("info", help="check a kernel file or spec: version, sha256, vmlinux found next to it")
    i.add_argument("path")
    i.set_defaults(func=_cmd_info)
