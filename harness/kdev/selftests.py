"""Upstream's own arm64 KVM selftests (``tools/testing/selftests/kvm``): build on the host, run in the guest.

Build (``smccc-harness selftests build [SRC]``)
    SRC is a kernel tree, or nothing: Debian's ``linux-source-X.Y`` whose version equals the kernel under test
    (``7.3.4-1~bpo13+1`` for the default kernel), fetched through the harness's private apt and unpacked once
    under ``<cache>/ksrc/<sha16>/`` (the layout harness.kbuild uses, so the two share one tree).  Nothing is
    written into the tree when it is clean: the UAPI headers are installed with ``O=`` into the build
    directory, the selftests are built with ``OUTPUT=`` there.  A tree that was built in place (it has a
    ``.config``) cannot take ``O=``; its headers are then made in place, as ``make kselftest`` would.

    Then ``make -C tools/testing/selftests/kvm ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-
    USERLDFLAGS=-static <the test targets>``, only the tests asked for (default :data:`DEFAULT_TESTS`).
    The stripped static binaries land in ``<cache>/selftests/<key>/bin/``; ``key`` hashes the recipe, the
    cross compiler and the source (a Debian source: its .deb's sha256; a tree: the content of what the
    build reads, see :func:`hash_tree`).  One file lock per key; binaries and the manifest are renamed into
    place, so a killed build leaves nothing half-written that a later run would trust.

Run (``smccc-harness selftests run``, ``tests/system/test_upstream_selftests.py``)
    Each binary is sent once per booted guest through the agent's ``put`` op into ``/tmp/selftests/<key>/``
    and run by the ``exec`` op under ``busybox timeout`` with a deadline, stdout and stderr merged.  Its exit
    code and output are written up the way kselftest's ``runner.sh`` does (``ok 1 selftests: kvm: NAME``,
    ``# SKIP`` for exit 4, ``# TIMEOUT``, ``# exit=N``, the program's output ``# ``-prefixed), and that KTAP
    document is parsed by :mod:`harness.tap`: a program that prints its own KTAP gets one result per case.

Variants: upstream's library gives every vCPU ``KVM_ARM_VCPU_HAS_EL2`` when ``KVM_CAP_ARM_EL2`` is present,
unless ``NV=0`` is in the environment (lib/arm64/processor.c ``vm_supports_el2()``).  Tests whose vCPUs come
from that default run twice: ``el2`` (no NV: the guest code runs at vEL2) and ``el1`` (``NV=0``).
``hello_el2`` asks for EL2 itself and runs once.
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
from .tap import TapDocument
from .tap import parse as parse_tap

RECIPE = 1  # bump when the build recipe changes: it is part of the cache key
CROSS = "aarch64-linux-gnu-"
KVM_DIR = "tools/testing/selftests/kvm"
DEFAULT_TESTS = ("smccc_filter", "psci_test", "hypercalls", "hello_el2")  # basenames: arm64/ (aarch64/ before 6.14)
KSFT_PASS, KSFT_FAIL, KSFT_XFAIL, KSFT_XPASS, KSFT_SKIP = 0, 1, 2, 3, 4
GUEST_DIR = "/tmp/selftests"
# tests whose vCPUs take upstream's default (HAS_EL2 when KVM_CAP_ARM_EL2): worth running with and without NV
NV_SENSITIVE = ("smccc_filter", "psci_test", "hypercalls", "kvm-uuid", "set_id_regs", "mmio_sign_ext")
# per-test deadline under TCG (seconds); nested VMs make teardown slow
DEFAULT_TIMEOUT_S = 300.0


class SelftestError(HarnessError):
    """The selftests could not be found, built, or sent to the guest."""


def _progress_default(msg: str) -> None:
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


def debian_source(kernel_spec: str = "default", progress=_progress_default) -> Source:
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

    def unstripped(self, test: str) -> Path:
        return self.dir / "obj" / "kvm" / self.paths[test]


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
          progress=_progress_default) -> Build:
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


# ==== run =========================================================================================
@dataclass
class Variant:
    name: str  # "el2" | "el1"
    env: dict[str, str]
    note: str


EL2 = Variant("el2", {}, "upstream default: vCPUs get KVM_ARM_VCPU_HAS_EL2 when KVM_CAP_ARM_EL2 is present")
EL1 = Variant("el1", {"NV": "0"}, "NV=0: upstream's library does not ask for HAS_EL2")
VARIANTS = {v.name: v for v in (EL2, EL1)}


def variants_of(test: str) -> list[Variant]:
    """hello_el2 asks for EL2 itself: one run.  NV-sensitive tests: el2 and el1."""
    return [EL2, EL1] if test in NV_SENSITIVE else [EL2]


@dataclass
class SelftestRun:
    test: str  # "smccc_filter"
    variant: str
    rc: int
    output: str  # stdout+stderr, merged
    seconds: float
    timed_out: bool
    tap_text: str  # runner.sh-style KTAP document
    tap: TapDocument

    @property
    def name(self) -> str:
        return self.test

    @property
    def result(self):
        """The TapResult of the binary (kselftest's one line per program)."""
        return self.tap.results[0]


def runner_tap(test: str, rc: int, output: str, timeout_s: float, timed_out: bool) -> str:
    """What kselftest's runner.sh prints for one program: header, ``# ``-prefixed output, one result line."""
    hdr = f"selftests: kvm: {test}"
    lines = ["TAP version 13", "1..1", f"# timeout set to {timeout_s:g}", f"# {hdr}"]
    lines += [f"# {ln}" if ln else "#" for ln in output.splitlines()]
    if timed_out:
        lines.append(f"not ok 1 {hdr} # TIMEOUT {timeout_s:g} seconds")
    elif rc == KSFT_PASS:
        lines.append(f"ok 1 {hdr}")
    elif rc == KSFT_SKIP:
        lines.append(f"ok 1 {hdr} # SKIP")
    elif rc == KSFT_XFAIL:
        lines.append(f"ok 1 {hdr} # XFAIL")
    else:
        lines.append(f"not ok 1 {hdr} # exit={rc}")
    return "\n".join(lines) + "\n"


_SENT: dict[str, set[str]] = {}  # guest run dir -> guest paths already put there


def send_binary(session, build: Build, test: str) -> str:
    """Put the binary into the guest once per booted guest; its guest path."""
    local = build.binaries[test]
    gpath = f"{GUEST_DIR}/{build.key}/{test}"
    sent = _SENT.setdefault(str(session.run_dir), set())
    if gpath not in sent:
        from .. import protocol as P
        data = local.read_bytes()
        r = session.request("put", {"path": gpath, "data": P.b64(data), "mode": 0o755}, deadline_s=60.0)
        if r.get("sha256") != hashlib.sha256(data).hexdigest():
            raise SelftestError(f"put {gpath}: the guest wrote sha256 {r.get('sha256')}, not the file's")
        sent.add(gpath)
    return gpath


def run_in_guest(session, build: Build, test: str, variant: Variant = EL2,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> SelftestRun:
    """Run one selftest binary in the booted guest, with a deadline; its KTAP written up like runner.sh."""
    gpath = send_binary(session, build, test)
    env = [f"{k}={v}" for k, v in variant.env.items()]
    # cd to the binary's directory like runner.sh; stderr into stdout; busybox timeout kills at the deadline
    script = 'cd "${1%/*}" && exec /bin/busybox timeout -s KILL "$0" "$@" 2>&1'
    argv = ["/bin/busybox", "env", *env, "/bin/busybox", "sh", "-c", script, f"{int(timeout_s)}", gpath]
    t0 = time.monotonic()
    r = session.request("exec", {"argv": argv, "timeout_s": timeout_s + 30}, deadline_s=timeout_s + 60)
    dt = time.monotonic() - t0
    rc = r["rc"]
    output = (r.get("stdout") or "") + (r.get("stderr") or "")
    timed_out = rc in (-9, 137) and dt >= timeout_s * 0.95
    text = runner_tap(test, rc, output, timeout_s, timed_out)
    return SelftestRun(test=test, variant=variant.name, rc=rc, output=output, seconds=round(dt, 3),
                       timed_out=timed_out, tap_text=text, tap=parse_tap(text))


def outcome(run: SelftestRun) -> tuple[str, str]:
    """("passed" | "failed" | "skipped" | "xfail", reason) of a whole program, reasons from its own output."""
    res = run.result
    if res.directive == "SKIP":
        return "skipped", skip_reason(run)
    if res.directive == "XFAIL":
        return "xfail", res.reason or "upstream reported XFAIL (exit 2)"
    if res.ok:
        return "passed", ""
    if run.timed_out:
        return "failed", f"timed out after {res.reason}"
    return "failed", f"exit code {run.rc}"


def skip_reason(run: SelftestRun) -> str:
    """The program's own skip reason: ``1..0 # SKIP reason`` or its last ``ok N # SKIP reason`` line."""
    res = run.result
    sub = res.subtests
    if sub is not None:
        if sub.skip_all is not None:
            return sub.skip_all or "upstream skipped every case (no reason given)"
        for r in reversed(sub.results):
            if r.directive == "SKIP" and r.reason:
                return r.reason
    return res.reason or f"upstream exited with KSFT_SKIP ({KSFT_SKIP}) without a reason"


def save_run(run: SelftestRun, run_dir: Path) -> Path:
    """``<run_dir>/selftests/<name>-<variant>.tap`` (the KTAP) next to a JSON summary."""
    d = Path(run_dir) / "selftests"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{run.name}-{run.variant}.tap"
    p.write_text(run.tap_text)
    o, why = outcome(run)
    (d / f"{run.name}-{run.variant}.json").write_text(json.dumps(
        {"test": run.test, "variant": run.variant, "rc": run.rc, "seconds": run.seconds, "outcome": o,
         "reason": why, "timed_out": run.timed_out}, indent=2) + "\n")
    return p


# ==== command line ================================================================================
def resolve_source(src: str | None, kernel_spec: str, progress=_progress_default) -> Source:
    """SRC given: that tree.  Else Debian's linux-source matching ``kernel_spec``."""
    if src:
        return tree_source(src)
    if "/" in kernel_spec or os.path.exists(kernel_spec):
        raise SelftestError(f"--kernel {kernel_spec} is a file: which source built it is unknown",
                            hint="pass its tree: smccc-harness selftests build SRC (or SMCCC_SELFTESTS_SRC=SRC)")
    return debian_source(kernel_spec, progress)


def _tests_arg(args, source: Source) -> list[str]:
    """The tests asked for that the tree has (explicit --tests: all must exist; the default set: a note)."""
    if args.all:
        return [t.rsplit("/", 1)[-1] for t in available_tests(source.tree)]
    if args.tests:
        return list(args.tests)
    present, missing = resolve_tests(source.tree, DEFAULT_TESTS)
    if missing:
        _progress_default(f"{source.label} has no {', '.join(missing)}: not built")
    return list(present)


def cmd_build(args) -> int:
    t0 = time.monotonic()
    source = resolve_source(args.src, args.kernel)
    t1 = time.monotonic()
    b = build(source, _tests_arg(args, source), jobs=args.jobs)
    _progress_default(f"source {source.label} ({source.version}) in {t1 - t0:.1f} s; "
                      f"build {'cached' if b.cached else 'compiled'} in {b.seconds:.1f} s; key {b.key}")
    for t, p in b.binaries.items():
        print(f"{t:<32} {p}")
    return 0


def cmd_run(args) -> int:
    from ..machine.guests import GuestOptions, new_session
    source = resolve_source(args.src, args.kernel)
    tests = _tests_arg(args, source)
    b = build(source, tests, jobs=args.jobs)
    _progress_default(f"selftests of {source.label}: {'cached' if b.cached else 'built'} in {b.seconds:.1f} s")
    root = Path(args.results_dir).resolve() if getattr(args, "results_dir", None) else None
    s = new_session(GuestOptions.from_args(args), paths.new_run_dir("selftests_run", root), progress=_progress_default)
    failed = 0
    with s:
        _progress_default(f"guest ready in {s.timings.get('ready_s')} s; kernel {s.caps.get('uname')}; "
                          f"KVM_CAP_ARM_EL2={s.caps.get('KVM_CAP_ARM_EL2')}")
        for t in tests:
            for v in [VARIANTS[n] for n in args.variants] if args.variants else variants_of(t):
                if v is EL2 and t in NV_SENSITIVE and not s.caps.get("KVM_CAP_ARM_EL2"):
                    print(f"{t:<28} {v.name:<4} {'SKIPPED':<8} {0:7.2f}s  KVM_CAP_ARM_EL2 is 0: upstream's "
                          "default is EL1 here, the el1 run covers it", flush=True)
                    continue
                r = run_in_guest(s, b, t, v, timeout_s=args.timeout)
                save_run(r, s.run_dir)
                o, why = outcome(r)
                failed += o == "failed"
                print(f"{t:<28} {v.name:<4} {o.upper():<8} {r.seconds:7.2f}s  {why}", flush=True)
                if o == "failed" or args.verbose:
                    print(r.tap_text)
        _progress_default(f"KTAP and summaries: {s.run_dir / 'selftests'}; console log: {s.console_log}")
    return 1 if failed else 0


def add_cli(sub) -> None:
    p = sub.add_parser("selftests", help="upstream's arm64 KVM selftests: build (static, cross) and run in the guest")
    ss = p.add_subparsers(dest="selftests_command", required=True)

    def common(q):
        q.add_argument("--kernel", default=os.environ.get("SMCCC_KERNEL", "default"),
                       help="the kernel under test; without SRC, Debian's linux-source of its version is built")
        q.add_argument("--tests", nargs="+", default=None,
                       help=f"tests to build/run, e.g. smccc_filter (default: {' '.join(DEFAULT_TESTS)})")
        q.add_argument("--all", action="store_true", help="every arm64 test of the tree")
        q.add_argument("-j", "--jobs", type=int, default=None)

    q = ss.add_parser("build", help="build the selftests from SRC (default: Debian's linux-source for --kernel)")
    q.add_argument("src", nargs="?", default=os.environ.get("SMCCC_SELFTESTS_SRC"))
    common(q)
    q.set_defaults(func=cmd_build)

    q = ss.add_parser("run", help="build (cached), boot the guest, run each test; KTAP under the run directory")
    q.add_argument("--src", default=os.environ.get("SMCCC_SELFTESTS_SRC"))
    common(q)
    q.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                   help="el2: upstream default (HAS_EL2 when KVM_CAP_ARM_EL2), el1: NV=0 (default: both for "
                        f"{', '.join(NV_SENSITIVE)}; el2 for the others)")
    q.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline per test run (s)")
    q.add_argument("-v", "--verbose", action="store_true", help="print every test's KTAP")
    q.add_argument("--accel", default=os.environ.get("SMCCC_ACCEL", "auto"), choices=("auto", "tcg", "kvm"))
    q.add_argument("--qemu-bin", default=os.environ.get("QEMU", "qemu-system-aarch64"))
    q.add_argument("--boot-timeout", type=float, default=120.0)
    q.add_argument("--no-snapshot", action="store_true", help="cold-boot the guest")
    q.set_defaults(func=cmd_run, command="selftests-run")


# ==== per-case results of programs that print their own KTAP =======================================
def cases_of(run: SelftestRun) -> list[tuple[str, object]]:
    """(case name, TapResult) of the program's own KTAP (empty when it prints none); unnamed results
    (``ok 101 # SKIP reason``) are named ``case<N>``."""
    sub = run.result.subtests
    if sub is None:
        return []
    return [(r.name or f"case{r.number or i}", r) for i, r in enumerate(sub.results, 1)]


CASES_SNAPSHOT = paths.REPO_ROOT / "tests" / "system" / "data" / "selftest_cases.json"


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("_") or "source"


def _cases_path(test: str, variant: str, source_label: str) -> Path:
    return paths.cache_dir() / "selftests" / "cases" / _safe(source_label) / f"{test}-{variant}.json"


def record_cases(run: SelftestRun, source_label: str) -> None:
    """Remember the program's case names, so the next collection makes one pytest item per case."""
    names = [n for n, _ in cases_of(run)]
    sub = run.result.subtests
    if not names or sub is None or sub.errors:  # a partial list (the program died mid-plan) would hide cases
        return
    p = _cases_path(run.test, run.variant, source_label)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"test": run.test, "variant": run.variant, "source": source_label,
                               "cases": names}, indent=1) + "\n")
    os.replace(tmp, p)


def known_cases(test: str, variant: str, source_label: str | None) -> list[str]:
    """Case names of ``test`` built from ``source_label``: from its last run here (the cache), else from the
    snapshot committed in tests/system/data/selftest_cases.json (so a cold CI gets the items too)."""
    if not source_label:
        return []
    try:
        return list(json.loads(_cases_path(test, variant, source_label).read_text())["cases"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        snap = json.loads(CASES_SNAPSHOT.read_text())
    except (OSError, ValueError):
        return []
    return list(snap.get(source_label, {}).get(f"{test}-{variant}", []))


def expected_source_label(kernel_spec: str) -> str | None:
    """The label :func:`debian_source` will give for ``kernel_spec``, from images/lock.json alone (no apt):
    for naming pytest items at collection time.  None when the kernel is not locked (or is a file)."""
    from ..images.store import Store
    try:
        lock = Store(lambda *_: None).read_lock()
    except Exception:  # noqa: BLE001 - collection must not fail on a broken lock: no per-case items then
        return None
    names = lock.kernels.get(kernel_spec or "default")
    if not names or names[0] not in lock.packages:
        return None
    e = lock.packages[names[0]]
    m = re.search(r"-(\d+\.\d+)(?:\.\d+)?\+", e.name)
    return f"linux-source-{m.group(1)} {e.version}" if m else None


def case_outcome(run: SelftestRun, case: str) -> tuple[str, str]:
    """("passed" | "failed" | "skipped" | "xfail" | "missing", reason) of one case of the program's KTAP."""
    prog, why = outcome(run)
    sub = run.result.subtests
    if prog == "skipped" and (sub is None or sub.skip_all is not None or not sub.results):
        return "skipped", why  # the whole program skipped: every case does
    for name, r in cases_of(run):
        if name == case:
            o = {"todo": "xfail", "xpass": "passed"}.get(r.outcome, r.outcome)
            text = r.reason or "\n".join(r.diagnostics[-20:])
            return o, text
    if sub is not None and not sub.errors and not run.timed_out and run.rc in (KSFT_PASS, KSFT_SKIP):
        return "missing", f"{run.test} completed its plan ({sub.plan} cases) without a case {case!r}"
    return "failed", (f"{run.test} did not report case {case!r}: "
                      + ("; ".join(sub.errors) if sub is not None and sub.errors else f"exit code {run.rc}"))


def snapshot_cases(out: Path = CASES_SNAPSHOT) -> dict:
    """Merge every recorded case list of the cache into the committed snapshot (refresh it after new runs:
    ``python3 -c 'from harness.selftests import snapshot_cases; snapshot_cases()'``)."""
    snap = json.loads(out.read_text()) if out.exists() else {}
    for p in sorted((paths.cache_dir() / "selftests" / "cases").glob("*/*.json")):
        d = json.loads(p.read_text())
        snap.setdefault(d["source"], {})[f"{d['test']}-{d['variant']}"] = d["cases"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")
    return snap
