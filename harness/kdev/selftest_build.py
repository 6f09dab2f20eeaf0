"""Upstream's arm64 KVM selftests, built from a kernel tree: the source (a tree you name, or Debian's
linux-source of the kernel under test, keyed by a hash of what the build reads), the static cross build
(``make -C tools/testing/selftests/kvm ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- USERLDFLAGS=-static``), and
the cache of stripped binaries keyed by recipe, toolchain and source.  Running them in the guest:
harness/kdev/selftests.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import paths
from ..errors import HarnessError

RECIPE = 1  # bump when the build recipe changes: it is part of the cache key
CROSS = "aarch64-linux-gnu-"
KVM_DIR = "tools/testing/selftests/kvm"
DEFAULT_TESTS = ("smccc_filter", "psci_test", "hypercalls", "hello_el2")  # basenames: arm64/ (aarch64/ before 6.14)


class SelftestError(HarnessError):
    """The selftests could not be found, built, or sent to the guest."""


def progress_default(msg: str) -> None:
    print(f"[smccc-harness] {msg}", flush=True)


# ==== source ======================================================================================
@dataclass
class Source:
    tree: Path
    key: str  # content identity: a .deb sha256 or a tree hash
    label: str  # for humans: "linux-source-7.3 7.3.4-1~bpo13+1" or the tree's path
    version: str  # the tree's kernel version (Makefile VERSION.PATCHLEVEL.SUBLEVEL)


def tree_version(tree: Path) -> str:
    """``VERSION.PATCHLEVEL.SUBLEVEL`` from the top Makefile ('' when it is not a kernel tree)."""
    try:
        text = (tree / "Makefile").read_text(errors="replace")[:2000]
    except OSError:
        return ""
    parts = {k: v for k, v in re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL)\s*=\s*(\d+)\s*$", text, re.MULTILINE)}
    return ".".join(parts.get(k, "0") for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL")) if parts else ""


# what a KVM selftest build reads (beyond these, nothing of the tree matters)
HASH_ROOTS = ("Makefile", "scripts", "include/uapi", "arch/arm64/include/uapi", "arch/arm64/Makefile",
              "arch/arm64/tools", "tools")
_ARTIFACT_SUFFIXES = (".o", ".d", ".cmd", ".a", ".so", ".tmp")


def hash_tree(tree: Path) -> str:
    """sha256 over (relative path, content) of every source file the build reads, build artifacts skipped
    (``.o``/``.d``/``.cmd``/..., and ELF files: in-tree selftest binaries and host tools)."""
    h = hashlib.sha256()
    for root in HASH_ROOTS:
        p = tree / root
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file() and not x.is_symlink()) \
            if p.is_dir() else []
        for f in files:
            if f.name.endswith(_ARTIFACT_SUFFIXES) or f.name.startswith(".tmp"):
                continue
            data = f.read_bytes()
            if data[:4] == b"\x7fELF":
                continue
            h.update(str(f.relative_to(tree)).encode() + b"\0" + len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def tree_source(path: str | os.PathLike) -> Source:
    tree = Path(path).resolve()
    if not (tree / KVM_DIR / "Makefile").is_file():
        raise SelftestError(f"{tree} is not a kernel tree with KVM selftests (no {KVM_DIR}/Makefile)",
                            hint="give the top of a Linux source tree, or no SRC for Debian's linux-source package")
    return Source(tree=tree, key="tree-" + hash_tree(tree), label=str(tree), version=tree_version(tree))


def _series(uname: str) -> str:
    m = re.match(r"(\d+)\.(\d+)", uname)
    if not m:
        raise SelftestError(f"cannot tell the kernel series of {uname!r}")
    return f"{m.group(1)}.{m.group(2)}"


def _unpack_tarball(deb_dir: Path, tree: Path, progress) -> None:
    tarballs = sorted((deb_dir / "usr" / "src").glob("linux-source-*.tar.*"))
    if not tarballs:
        raise SelftestError(f"no linux-source tarball in {deb_dir}/usr/src")
    tree.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=tree.parent, prefix=f".x{os.getpid()}-"))
    t0 = time.monotonic()
    progress(f"unpacking {tarballs[0].name} ...")
    try:
        r = subprocess.run(["tar", "-xf", str(tarballs[0]), "-C", str(tmp)], check=False, capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise SelftestError(f"tar -xf {tarballs[0]} failed: {r.stderr.strip()}")
        inner = [p for p in tmp.iterdir() if p.is_dir()]
        if len(inner) != 1:
            raise SelftestError(f"{tarballs[0]}: expected one top directory, found {[p.name for p in inner]}")
        try:
            os.rename(inner[0], tree)
        except OSError:
            if not (tree / "Makefile").is_file():  # lost a race, and the winner did not finish either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"unpacked in {time.monotonic() - t0:.1f} s: {tree}")


def debian_source(kernel_spec: str = "default", progress=progress_default) -> Source:
    """Debian's ``linux-source-X.Y`` of exactly the version of the Debian kernel ``kernel_spec`` resolves to.

    The package's sha256 is remembered in ``<cache>/selftests/sources.json``: a second run needs no apt.
    """
    from filelock import FileLock

    from ..images.assets import ensure_kernel
    from ..images.lock import LockEntry
    from ..images.store import Store
    kernel = ensure_kernel(kernel_spec, progress)
    if not kernel.deb_version:
        raise SelftestError(f"kernel {kernel_spec!r} is not a Debian package: no matching linux-source",
                            hint="pass the kernel's source tree: smccc-harness selftests build SRC")
    name, version = f"linux-source-{_series(kernel.version)}", kernel.deb_version
    store = Store(progress)
    index_path = paths.cache_dir() / "selftests" / "sources.json"
    index_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(index_path) + ".lock"):
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
        raw = index.get(f"{name}={version}")
        entry = LockEntry(**raw) if raw else None
        if entry is None or store.cached(entry) is None:
            suite = store.read_lock().packages.get(kernel.package)
            entry = store.download(name, version, suite.suite if suite else "")
            index[f"{name}={version}"] = asdict(entry)
            tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, index_path)
    tree = paths.cache_dir() / "ksrc" / entry.sha256[:16] / name
    if not (tree / "Makefile").is_file():
        with FileLock(str(tree.parent) + ".lock"):
            if not (tree / "Makefile").is_file():
                _unpack_tarball(store.extract(entry), tree, progress)
    return Source(tree=tree, key="deb-" + entry.sha256, label=f"{name} {version}", version=tree_version(tree))


# ==== build =======================================================================================
@dataclass
class Build:
    dir: Path  # <cache>/selftests/<key>
    key: str
    source: Source
    binaries: dict[str, Path]  # "smccc_filter" -> stripped static binary
    paths: dict[str, str]  # "smccc_filter" -> "arm64/smccc_filter" (the tree's make target)
    seconds: float  # this call's wall time
    cached: bool  # nothing had to be compiled
    log: Path | None = None
    meta: dict = field(default_factory=dict)


def _toolchain_id() -> str:
    try:
        out = subprocess.run([CROSS + "gcc", "--version"], check=False, capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise SelftestError(f"{CROSS}gcc is not installed ({e})",
                            hint="smccc-harness selftests build installs it (gcc-aarch64-linux-gnu)") from None
    return out.stdout.splitlines()[0] if out.stdout else "?"


def build_key(source: Source) -> str:
    return hashlib.sha256(f"{RECIPE}|{_toolchain_id()}|{source.key}".encode()).hexdigest()[:16]


def available_tests(tree: Path) -> list[str]:
    """The arm64 tests of the tree's KVM selftests (``TEST_GEN_PROGS_arm64`` of Makefile.kvm, or Makefile)."""
    names: list[str] = []
    for mk in ("Makefile.kvm", "Makefile"):
        p = tree / KVM_DIR / mk
        if p.is_file():
            text = p.read_text()
            arm = re.findall(r"^TEST_GEN_PROGS_(?:arm64|aarch64)\s*[+:]?=\s*(\S+)\s*$", text, re.MULTILINE)
            if "$(TEST_GEN_PROGS_COMMON)" in arm:  # 6.13+: the tests every architecture builds
                names += re.findall(r"^TEST_GEN_PROGS_COMMON\s*[+:]?=\s*(\S+)\s*$", text, re.MULTILINE)
            names += arm
    return [n for n in dict.fromkeys(names) if not n.startswith("$(")]


def resolve_tests(tree: Path, names) -> tuple[dict[str, str], list[str]]:
    """Basenames (or tree paths) -> {basename: make target in the tree}, and the names the tree lacks.

    ``smccc_filter`` is ``arm64/smccc_filter`` in 6.14+ and ``aarch64/smccc_filter`` before."""
    known = available_tests(tree)
    by_base = {t.rsplit("/", 1)[-1]: t for t in known}
    found, missing = {}, []
    for n in names:
        base = n.rsplit("/", 1)[-1]
        if base in by_base:
            found[base] = by_base[base]
        else:
            missing.append(base)
    return found, missing


def _tree_is_clean(tree: Path) -> bool:
    return not (tree / ".config").exists() and not (tree / "include" / "config").exists()


def _make(argv: list[str], log, what: str) -> None:
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    r = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False)
    if r.returncode != 0:
        log.flush()
        tail = "\n".join(Path(log.name).read_text(errors="replace").splitlines()[-25:])
        raise SelftestError(f"{what} failed (exit {r.returncode}); last lines of {log.name}:\n{tail}")


def build(source: Source, tests: tuple[str, ...] | list[str] = DEFAULT_TESTS, jobs: int | None = None,
          progress=progress_default) -> Build:
    """Build (or find cached) static arm64 binaries of ``tests`` (basenames: "smccc_filter", ...).

    Every name must exist in the tree (:func:`resolve_tests` tells which do before you ask)."""
    from filelock import FileLock
    t0 = time.monotonic()
    targets, unknown = resolve_tests(source.tree, tests)
    if unknown:
        raise SelftestError(f"{source.label} has no arm64 KVM selftest {', '.join(unknown)}",
                            hint="arm64 tests of this tree: " + " ".join(available_tests(source.tree)))
    from ..images.sysdeps import ensure_selftest_packages
    ensure_selftest_packages(progress)   # before build_key: the key names the cross gcc's version
    key = build_key(source)
    bdir = paths.cache_dir() / "selftests" / key
    bdir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(bdir) + ".lock"):
        mpath = bdir / "manifest.json"
        meta = json.loads(mpath.read_text()) if mpath.exists() else {}
        have = meta.get("binaries", {})
        missing = [t for t in targets if t not in have or not (bdir / "bin" / have[t]).is_file()]
        log_path = bdir / "build.log"
        if missing:
            obj = bdir / "obj"
            (obj / "tools").mkdir(parents=True, exist_ok=True)
            out = obj / "kvm"
            jobs = jobs or os.cpu_count() or 1
            with open(log_path, "a") as log:
                hdr = obj / "usr"
                if not (hdr / "include" / "linux" / "kvm.h").is_file():
                    t1 = time.monotonic()
                    progress(f"installing the arm64 UAPI headers of {source.label} ...")
                    argv = ["make", "-s", "-C", str(source.tree), "ARCH=arm64", f"CROSS_COMPILE={CROSS}",
                            f"INSTALL_HDR_PATH={hdr}", f"-j{jobs}", "headers_install"]
                    if _tree_is_clean(source.tree):
                        argv.insert(4, f"O={obj / 'kobj'}")
                    _make(argv, log, "make headers_install")
                    meta["headers_s"] = round(time.monotonic() - t1, 1)
                t1 = time.monotonic()
                progress(f"building {' '.join(targets[t] for t in missing)} (static, {CROSS}gcc, -j{jobs}) ...")
                argv = ["make", "-C", str(source.tree / KVM_DIR), "ARCH=arm64", f"CROSS_COMPILE={CROSS}",
                        f"OUTPUT={out}", f"INSTALL_HDR_PATH={hdr}", f"KHDR_INCLUDES=-isystem {hdr / 'include'}",
                        f"abs_objdir={obj}", "USERLDFLAGS=-static", f"-j{jobs}",
                        *(str(out / targets[t]) for t in missing)]
                _make(argv, log, "make (KVM selftests)")
                meta.setdefault("compile_s", {})[" ".join(missing)] = round(time.monotonic() - t1, 1)
            (bdir / "bin").mkdir(exist_ok=True)
            for t in missing:
                part = bdir / "bin" / f".{t}.{os.getpid()}"
                r = subprocess.run([CROSS + "strip", "-o", str(part), str(out / targets[t])], check=False,
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise SelftestError(f"{CROSS}strip {out / targets[t]} failed: {r.stderr.strip()}")
                os.replace(part, bdir / "bin" / t)
                have[t] = t
            meta.update({"key": key, "recipe": RECIPE, "source": source.label, "source_key": source.key,
                         "version": source.version, "toolchain": _toolchain_id(), "binaries": have,
                         "targets": {**meta.get("targets", {}), **targets}})
            tmp = mpath.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, mpath)
        dt = time.monotonic() - t0
        return Build(dir=bdir, key=key, source=source, seconds=dt, cached=not missing,
                     binaries={t: bdir / "bin" / have[t] for t in targets}, paths=targets, log=log_path, meta=meta)


# ==== command line ================================================================================
def resolve_source(src: str | None, kernel_spec: str, progress=progress_default) -> Source:
    """SRC given: that tree.  Else Debian's linux-source matching ``kernel_spec``."""
    if src:
        return tree_source(src)
    if "/" in kernel_spec or os.path.exists(kernel_spec):
        raise SelftestError(f"--kernel {kernel_spec} is a file: which source built it is unknown",
                            hint="pass its tree: smccc-harness selftests build SRC (or SMCCC_SELFTESTS_SRC=SRC)")
    return debian_source(kernel_spec, progress)
