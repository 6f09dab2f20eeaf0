"""``smccc-harness kernel build``: cross-compile an arm64 kernel tree with the minimal config fragment.

The recipe is the one measured in ../shared/docs/platform.md ("Building a minimal kernel from Debian's
source"): ``make ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- O=<out> allnoconfig`` with
``KCONFIG_ALLCONFIG=images/kernel.config``, then ``make Image``, out of tree, through ccache with
``CCACHE_SLOPPINESS=include_file_mtime,include_file_ctime,time_macros``.  The configuration step runs only
when ``<out>/.config`` is missing or the fragment changed, so a rebuild after a ``git checkout`` (``git
bisect``) recompiles only what changed: 6-9 s after touching one file in arch/arm64/kvm.

Kernel source: any tree you pass, or Debian's ``linux-source-7.3`` (``source_tree()``), fetched through the
harness's private apt and unpacked once into the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .errors import HarnessError

FRAGMENT = paths.REPO_ROOT / "images" / "kernel.config"
SSH_FRAGMENT = paths.REPO_ROOT / "images" / "kernel-ssh.config"   # `kernel build --ssh`: + TCP/IP, virtio-net
MERGED = ".smccc-harness-fragment.config"  # in O=: the fragments, concatenated, when there are several
CROSS = "aarch64-linux-gnu-"
CCACHE_SLOPPINESS = "include_file_mtime,include_file_ctime,time_macros"
SOURCE_PACKAGE = "linux-source-7.3"
SOURCE_SUITE = "trixie-backports"
STAMP = ".smccc-harness-fragment"  # in O=: sha256 of the fragment the .config was made from


class KernelBuildError(HarnessError):
    """``make`` failed (the message carries the tail of the build log); ``git bisect run`` maps it to 125."""


@dataclass
class BuildResult:
    image: Path  # <out>/arch/arm64/boot/Image
    vmlinux: Path  # <out>/vmlinux (symbols for the panic symbolizer)
    out: Path
    log: Path
    seconds: float
    configured: bool  # allnoconfig ran this time
    version: str  # uname -r from the Image's banner


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


def default_out_dir(src: Path, flavour: str = "") -> Path:
    """A persistent O= per source tree (keyed by its absolute path) and config flavour ("" or "ssh"), so
    rebuilds are incremental and switching flavours does not reconfigure (= rebuild) the other one."""
    key = hashlib.sha256(str(Path(src).resolve()).encode()).hexdigest()[:12]
    return paths.cache_dir() / "kbuild" / f"{Path(src).resolve().name}-{key}{'-' + flavour if flavour else ''}"


def make_env(ccache_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ARCH="arm64", CROSS_COMPILE=CROSS, CCACHE_SLOPPINESS=CCACHE_SLOPPINESS,
               CCACHE_DIR=str(ccache_dir or (paths.cache_dir() / "ccache")), CCACHE_MAXSIZE="5G",
               KBUILD_BUILD_USER="smccc-harness", KBUILD_BUILD_HOST="kbuild", LC_ALL="C")
    env.pop("KCONFIG_ALLCONFIG", None)
    return env


def make_argv(src: Path, out: Path, target: str, jobs: int, ccache: bool = True) -> list[str]:
    argv = ["make", "-C", str(src), f"O={out}", "ARCH=arm64", f"CROSS_COMPILE={CROSS}", f"-j{jobs}"]
    if ccache:
        argv.append(f"CC=ccache {CROSS}gcc")
    return argv + [target]


def _run_make(argv: list[str], env: dict, log: Path, what: str, progress) -> None:
    progress("$ " + " ".join(argv))
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(argv)}\n".encode())
        f.flush()
        r = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False)
    if r.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise KernelBuildError(f"kernel {what} failed (make exit {r.returncode}); last lines of {log}:\n{tail}",
                               hint="fix the tree, or (in git bisect run) this commit is skipped with 125")


def build(src: str | os.PathLike, out: str | os.PathLike | None = None, *, jobs: int | None = None,
          fragment: Path | list[Path] = FRAGMENT, ccache: bool = True, progress=print) -> BuildResult:
    """Configure (if needed) and build ``Image`` for the kernel tree ``src`` into ``out``.

    ``fragment``: one config fragment or several (concatenated, later lines win, as KCONFIG_ALLCONFIG reads
    them), e.g. ``[FRAGMENT, SSH_FRAGMENT]``."""
    fragments = [Path(f) for f in (fragment if isinstance(fragment, (list, tuple)) else [fragment])]
    from . import sysdeps
    from .kernel import image_banner
    src = Path(src).resolve()
    if not (src / "Makefile").is_file() or not (src / "arch" / "arm64").is_dir():
        raise HarnessError(f"{src} is not a Linux source tree (no Makefile or arch/arm64)",
                           hint="pass the top of a kernel tree, or use 'smccc-harness kernel source' to get one")
    sysdeps.ensure_kbuild_packages(progress=progress)
    out = Path(out).resolve() if out else default_out_dir(src)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    log.write_text("")
    env = make_env()
    jobs = jobs or os.cpu_count() or 2
    t0 = time.monotonic()
    try:
        frag_text = "\n".join(f.read_text() for f in fragments)
    except OSError as e:
        raise HarnessError(f"cannot read the config fragment {e.filename}: {e.strerror}",
                           hint="pass an existing file with --fragment") from None
    fragment = fragments[0].resolve()
    if len(fragments) > 1:
        fragment = out / MERGED
        fragment.write_text(frag_text)
    frag_sha = hashlib.sha256(frag_text.encode()).hexdigest()
    stamp = out / STAMP
    configured = False
    if not (out / ".config").is_file() or not stamp.is_file() or stamp.read_text().strip() != frag_sha:
        cenv = dict(env, KCONFIG_ALLCONFIG=str(Path(fragment).resolve()))
        _run_make(make_argv(src, out, "allnoconfig", jobs, ccache), cenv, log, "configuration", progress)
        missing = unmet_options(parse_fragment(frag_text), (out / ".config").read_text())
        if missing:
            raise KernelBuildError(f"{fragment}: these options did not make it into {out / '.config'}: "
                                   + ", ".join(missing),
                                   hint="a typo, or an option whose dependencies are not in the fragment")
        stamp.write_text(frag_sha + "\n")
        configured = True
    _run_make(make_argv(src, out, "Image", jobs, ccache), env, log, "build", progress)
    image = out / "arch" / "arm64" / "boot" / "Image"
    version, _ = image_banner(image)
    dt = time.monotonic() - t0
    return BuildResult(image=image, vmlinux=out / "vmlinux", out=out, log=log, seconds=dt, configured=configured,
                       version=version or "unknown")


# ---- Debian's kernel source ------------------------------------------------------------------------
def source_tree(progress=print) -> Path:
    """Debian's linux-source-7.3 unpacked once under the cache (read-only use: build with O=)."""
    from .assets import Store
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
    out = args.out or default_out_dir(src, "ssh" if args.ssh else "")
    r = build(src, out, jobs=args.jobs, fragment=fragments, ccache=not args.no_ccache, progress=say)
    what = " + ".join(str(f) for f in fragments)
    say(f"built {r.version} in {r.seconds:.1f} s{' (configured from ' + what + ')' if r.configured else ''}")
    say(f"log: {r.log}")
    say(f"vmlinux: {r.vmlinux}")
    print(r.image)
    return 0


def _cmd_source(args) -> int:
    print(source_tree(progress=lambda m: print(f"[smccc-harness] {m}", flush=True)))
    return 0


def _cmd_info(args) -> int:
    import json

    from .kernel import resolve_kernel, vmlinux_of
    k = resolve_kernel(args.path)
    vm = vmlinux_of(k)
    print(json.dumps({"image": str(k.image), "version": k.version, "sha256": k.sha256,
                      "vmlinux": str(vm) if vm else None}, indent=2))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("kernel", help="build your own kernel tree (minimal config), get Debian's source, inspect")
    ks = p.add_subparsers(dest="kernel_command", required=True)
    b = ks.add_parser("build", help="cross-compile a kernel tree with images/kernel.config; prints the Image path")
    b.add_argument("src", nargs="?", help="kernel source tree (default: Debian's linux-source-7.3, unpacked in the cache)")
    b.add_argument("--out", help="build directory (O=); default: a persistent one per tree in the cache")
    b.add_argument("-j", "--jobs", type=int, default=None, help="make -j (default: all CPUs)")
    b.add_argument("--fragment", action="append", default=None,
                   help=f"config fragment for allnoconfig (KCONFIG_ALLCONFIG); repeatable (default: {FRAGMENT})")
    b.add_argument("--ssh", action="store_true",
                   help=f"also {SSH_FRAGMENT.name}: TCP/IP and virtio-net built in, for --ssh (docs/ssh.md); own O= dir")
    b.add_argument("--no-ccache", action="store_true")
    b.set_defaults(func=_cmd_build)
    s = ks.add_parser("source", help="fetch and unpack Debian's linux-source-7.3; prints the tree's path")
    s.set_defaults(func=_cmd_source)
    i = ks.add_parser("info", help="check a kernel file or spec: version, sha256, vmlinux found next to it")
    i.add_argument("path")
    i.set_defaults(func=_cmd_info)
