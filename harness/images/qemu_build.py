"""``smccc-harness qemu build``: the host's own QEMU, rebuilt from Debian's source with the project's patches.

Why: QEMU (10.0.2 and master) does not re-arm the EL2 generic timers of a TCG vCPU after an incoming
migration, so a VHE guest kernel restored from a snapshot can come back without a tick
(docs/upstream/qemu-el2-timer-migration.md).  ``patches/qemu/*.patch`` holds the fix, written for upstream.

Steps (:func:`build`):

1. The source version: that of the installed ``qemu-system-arm`` (``dpkg-query ${source:Version}``), or
   ``--source-version``.
2. ``apt-get source --download-only qemu=VERSION`` through a private apt configuration with ``deb-src`` lines
   for the host's release and the one the version was made for (a bookworm backport ``~bpo12`` comes from
   trixie) in ``cache/apt-src`` (harness/images/apt.py): the system's apt state is not touched.  The .dsc,
   orig and debian tarballs stay in ``cache/qemu/sources/<version>/``.  A mirror keeps only the current
   version of each suite: when the installed version's source is gone (on 2026-12-03 bookworm-backports'
   ``1:10.0.2+ds-2+deb13u1~bpo12+1`` was listed but no longer in the pool), the default build takes the newest
   source of the same upstream series the mirror serves (``1:10.0.13+ds-0+deb13u1``), says so and remembers
   the choice; ``--source-version`` never falls back.
3. ``dpkg-source -x`` (Debian's own patches applied), then the project's patches in name order with
   ``patch -p1`` (a dry run first: a patch that no longer applies fails naming the patch, file and hunk,
   before anything is changed).
4. ``configure --target-list=aarch64-softmmu`` with only what the harness uses (TCG, -M virt, virtio-serial,
   chardev sockets, QMP, migration to a file, user networking for --ssh), ``--with-pkgversion`` carrying
   :data:`FIX_TOKEN`; ``make`` and ``make install`` into a temp dir under ``cache/qemu``.
5. The installed tree is renamed to ``cache/qemu/<version>-<hash>/`` (atomic: a build that fails, is
   interrupted or runs out of disk leaves no half-written binary and no temp dir behind; its log is kept as
   ``cache/qemu/failed-<version>-<hash>.log``).

The key's hash covers the patch series (what each patch changes, not its commit message) and the build
recipe (configure options); a second ``qemu build``
with the same inputs finds the tree and prints its path at once.  The binary works with ``--qemu-bin PATH``
(pytest and every CLI command) or ``QEMU=PATH``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..errors import HarnessError, SetupError
from ..paths import REPO_ROOT, cache_dir
from . import sysdeps
from .apt import PrivateApt
from .debian import DebVersion
from .lock import load_manifest

PATCH_DIR = REPO_ROOT / "patches" / "qemu"
FIX_TOKEN = "smccc-fix:el2-timers"          # in `qemu-system-aarch64 --version` of a binary built here
SOURCE_PACKAGE = "qemu"
HOST_PACKAGE = "qemu-system-arm"             # whose source version is rebuilt by default
BINARY = "qemu-system-aarch64"
MIN_FREE_BYTES = 3 << 30                     # source + build tree of aarch64-softmmu: ~1.5 GB; margin
RECIPE = 1                                   # bump when the steps change in a way configure flags do not show
MIN_MESON = (1, 5, 0)                        # QEMU 10.0's pythondeps.toml

# What the harness needs of QEMU (harness/machine/config.py argv): TCG, -M virt with GICv3 and EL2, -kernel,
# virtio-serial-pci + chardev sockets, QMP, migration to file: with mapped-ram, -display none, and for --ssh a
# user-networking virtio-net (slirp).  Everything else is off: no docs, tools, user-mode, UIs, block drivers
# beyond the built-in ones, no ROM blobs (the harness boots -kernel and passes romfile= to virtio-net).
CONFIGURE_FLAGS = (
    "--target-list=aarch64-softmmu",
    "--without-default-features",
    "--disable-download",
    "--disable-docs",
    "--disable-user",
    "--disable-tools",
    "--disable-guest-agent",
    "--disable-install-blobs",
    "--disable-werror",
    "--disable-debug-info",
    "--enable-fdt=system",
    "--enable-slirp",
)

BUILD_REQUIREMENTS = (
    sysdeps.Requirement("dpkg-dev", "dpkg-source"),
    sysdeps.Requirement("patch", "patch"),
    sysdeps.Requirement("xz-utils", "xz"),
    sysdeps.Requirement("gcc", "gcc"),
    sysdeps.Requirement("libc6-dev", "/usr/include/stdio.h"),
    sysdeps.Requirement("make", "make"),
    sysdeps.Requirement("ninja-build", "ninja"),
    sysdeps.Requirement("pkgconf", "pkg-config"),
    sysdeps.Requirement("python3", "/usr/bin/python3"),             # configure --python (Debian's meson is its module)
    sysdeps.Requirement("meson", "meson", from_backports=True),    # QEMU 10.0 needs >= 1.5: bookworm-backports' 1.7
    sysdeps.Requirement("libglib2.0-dev", "/usr/include/glib-2.0/glib.h"),
    sysdeps.Requirement("zlib1g-dev", "/usr/include/zlib.h"),
    sysdeps.Requirement("libfdt-dev", "/usr/include/libfdt.h"),
    sysdeps.Requirement("libslirp-dev", "/usr/include/slirp/libslirp.h"),
)


class QemuBuildError(HarnessError):
    """The patched QEMU could not be fetched, patched or built (the stock QEMU is untouched)."""


# ---- pure parts (unit-tested) -------------------------------------------------------------------------
def patch_files(patch_dir: Path = PATCH_DIR) -> list[Path]:
    """The series: ``*.patch`` in name order (``git format-patch`` numbers them 0001-, 0002-, ...)."""
    patch_dir = Path(patch_dir)
    files = sorted(p for p in patch_dir.glob("*.patch") if p.is_file()) if patch_dir.is_dir() else []
    if not files:
        raise QemuBuildError(f"no QEMU patches in {patch_dir}",
                             hint="the series is patches/qemu/*.patch (git format-patch output), applied in name order")
    return files


def patch_body(text: bytes) -> bytes:
    """What a patch changes: from its first ``diff --git`` (or ``--- ``) line on.  The mail header and commit
    message before it are left out, so rewording a message does not rebuild QEMU."""
    m = re.search(rb"^(diff --git |--- )", text, re.MULTILINE)
    return text[m.start():] if m else text


def patch_hash(patches: list[Path], flags: tuple[str, ...] = CONFIGURE_FLAGS, recipe: int = RECIPE) -> str:
    """12 hex digits of sha256 over the series (each patch's order and :func:`patch_body`), the configure flags
    and the recipe: the key of a build, shown by ``--version`` (:func:`pkgversion`)."""
    h = hashlib.sha256(f"recipe {recipe}\n".encode())
    for i, p in enumerate(patches):
        data = patch_body(Path(p).read_bytes())
        h.update(f"patch {i} {len(data)}\n".encode())
        h.update(data)
    h.update(("flags " + " ".join(flags) + "\n").encode())
    return h.hexdigest()[:12]


def safe_version(version: str) -> str:
    """A Debian version as a directory name: ``1:10.0.2+ds-2+deb13u1~bpo12+1`` -> ``1_10.0.2+ds-2+deb13u1_bpo12+1``."""
    if not version or not re.fullmatch(r"[0-9A-Za-z.+~:-]+", version):
        raise QemuBuildError(f"{version!r} is not a Debian version", hint="e.g. 1:10.0.2+ds-2+deb13u1~bpo12+1")
    return version.replace(":", "_").replace("~", "_")


def build_key(version: str, digest: str) -> str:
    """The cache entry's name: ``<version>-<hash>``."""
    return f"{safe_version(version)}-{digest}"


def pkgversion(digest: str) -> str:
    """``--with-pkgversion``: ``qemu-system-aarch64 --version`` shows ``(smccc-fix:el2-timers patches=<hash>)``."""
    return f"{FIX_TOKEN} patches={digest}"


def upstream_version(version: str) -> str:
    """``1:10.0.2+ds-2+deb13u1~bpo12+1`` -> ``10.0.2``."""
    v = version.split(":", 1)[-1]
    return re.split(r"[+~-]", v, maxsplit=1)[0]


def source_lines(mirror: str, codename: str, keyring: str) -> str:
    """``deb-src`` lines for ``codename``, -updates, -backports (mirror) and -security (when the mirror is
    Debian's own layout, ``.../debian`` -> ``.../debian-security``)."""
    mirror = mirror.rstrip("/")
    opt = f"[signed-by={keyring}]"
    out = [f"deb-src {opt} {mirror} {codename}{suffix} main\n" for suffix in ("", "-updates", "-backports")]
    if mirror.endswith("/debian"):
        out.append(f"deb-src {opt} {mirror}-security {codename}-security main\n")
    return "".join(out)


_HUNK_RE = re.compile(r"^(checking file .*|patching file .*|Hunk #\d+ FAILED.*|\d+ out of \d+ hunks? FAILED.*|"
                      r"can't find file to patch.*|No file to patch.*|.*Reversed \(or previously applied\).*|"
                      r"patch: \*\*\*\*.*|The text leading up to this was:.*|\|\+\+\+ .*|\|--- .*)$", re.MULTILINE)


def patch_failure(patch: str, version: str, output: str) -> QemuBuildError:
    """The error for a patch that does not apply: the patch, the source version, then patch(1)'s lines that
    name the files and hunks (``checking file target/arm/machine.c`` / ``Hunk #1 FAILED at 1005.``)."""
    lines = [m.group(0) for m in _HUNK_RE.finditer(output)]
    failing = [ln for ln in lines if "FAILED" in ln or "can't find" in ln or "No file" in ln or "Reversed" in ln]
    detail = "\n".join("  " + ln for ln in (lines or output.strip().splitlines()[-10:]))
    what = failing[0] if failing else "does not apply"
    return QemuBuildError(
        f"patch {patch} does not apply to Debian's qemu {version} ({what}):\n{detail}",
        hint=f"rebase it on qemu {upstream_version(version)} (git format-patch) and put it back in patches/qemu/; "
             f"the installed QEMU is unchanged and still works")


def parse_apt_source_error(version: str, stderr: str) -> QemuBuildError:
    last = [ln for ln in stderr.strip().splitlines() if ln.startswith(("E:", "W:"))] or stderr.strip().splitlines()[-3:]
    return QemuBuildError(
        f"Debian's source package qemu {version} cannot be fetched: " + " / ".join(last),
        hint="a Debian mirror carries only the current versions of a suite: pick another with --source-version, "
             "or upgrade qemu-system-arm (smccc-harness setup) and build its source; the installed QEMU is unchanged")


@dataclass(frozen=True)
class Built:
    """A patched QEMU in the cache."""
    path: Path                    # .../bin/qemu-system-aarch64
    root: Path                    # cache/qemu/<key>
    version: str                  # Debian source version
    digest: str                   # patch_hash
    build_s: float                # how long the build took (from the record when it was cached)
    cached: bool                  # True: found in the cache, nothing was built now
    info: dict = dataclasses.field(default_factory=dict)


# ---- host probes ---------------------------------------------------------------------------------------
def installed_source_version(package: str = HOST_PACKAGE) -> str:
    """The Debian source version of the installed ``package`` (``dpkg-query ${source:Version}``)."""
    r = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${source:Version}", package],
                       check=False, capture_output=True, text=True)
    parts = r.stdout.split()
    if r.returncode != 0 or len(parts) < 2 or not parts[0].startswith("ii"):
        raise SetupError(f"{package} is not installed, so there is no host QEMU source version to rebuild",
                         hint="smccc-harness setup installs it; or name a version with --source-version")
    return parts[-1]


def qemu_root() -> Path:
    return cache_dir() / "qemu"


def lookup(version: str, digest: str) -> Path | None:
    """The cached tree of (version, digest), if it is complete (the rename happens last)."""
    root = qemu_root() / build_key(version, digest)
    exe = root / "bin" / BINARY
    return root if exe.is_file() and os.access(exe, os.X_OK) and (root / "build-info.json").is_file() else None


def _run(cmd: list[str], log: Path, cwd: Path, what: str, env: dict | None = None) -> None:
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}   (in {cwd})\n")
        f.flush()
        r = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=False,
                           env=dict(os.environ, **(env or {})))
    if r.returncode != 0:
        tail = "\n".join("  " + ln for ln in log.read_text(errors="replace").splitlines()[-25:])
        raise QemuBuildError(f"{what} failed (exit {r.returncode}); the last lines of the log:\n{tail}")


# ---- the steps -----------------------------------------------------------------------------------------
def origin_codename(version: str) -> str | None:
    """The release a version was made for: a backport's origin (``...~bpo12+1`` -> trixie), else a stable
    update's release (``+deb13u1`` -> trixie); None when the version says neither."""
    m = re.search(r"~bpo(\d+)", version)
    n = int(m.group(1)) + 1 if m else None
    if n is None and (m := re.search(r"\+deb(\d+)u\d+", version)):
        n = int(m.group(1))
    if n is None:
        return None
    try:
        return sysdeps.codename_from_debian_version(str(n))
    except SetupError:
        return None


def showsrc_versions(text: str) -> list[str]:
    """The ``Version:`` fields of ``apt-cache showsrc`` output, newest first, each once."""
    found = dict.fromkeys(re.findall(r"^Version:\s*(\S+)", text, re.MULTILINE))
    return sorted(found, key=DebVersion, reverse=True)


def same_series(version: str, versions: list[str]) -> list[str]:
    """Of ``versions``, the others of ``version``'s upstream major.minor series (10.0.x), newest first."""
    series = upstream_version(version).split(".")[:2]
    return [v for v in versions if v != version and upstream_version(v).split(".")[:2] == series]


def _source_apt(version: str, progress) -> PrivateApt:
    codename = sysdeps.host_codename()
    names = [codename] + [c for c in (origin_codename(version),) if c and c != codename]
    m = load_manifest()
    mirror = os.environ.get("SMCCC_HARNESS_MIRROR") or sysdeps.system_mirror(codename)
    text = "".join(source_lines(mirror, c, m.keyring) for c in names)
    m = dataclasses.replace(m, mirror=mirror, suites=[f"{c}{x}" for c in names for x in ("", "-updates", "-backports")])
    return PrivateApt(m, cache_dir() / "apt-src", progress, sources=text)


def _download(apt: PrivateApt, version: str, progress) -> Path:
    dest = qemu_root() / "sources" / safe_version(version)
    dscs = sorted(dest.glob("*.dsc")) if dest.is_dir() else []
    if dscs and (dest / ".complete").exists():
        return dscs[0]
    qemu_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=qemu_root()))
    try:
        progress(f"apt-get source --download-only {SOURCE_PACKAGE}={version}")
        r = apt.run("apt-get", "-q", "source", "--download-only", f"{SOURCE_PACKAGE}={version}", cwd=tmp, check=False)
        dscs = sorted(tmp.glob("*.dsc"))
        if r.returncode != 0 or not dscs:
            raise parse_apt_source_error(version, (r.stderr or "") + (r.stdout or ""))
        (tmp / ".complete").write_text(version + "\n")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / dscs[0].name


def fetch_source(version: str, progress=print, exact: bool = True) -> tuple[str, Path]:
    """(version, .dsc) of Debian's ``qemu`` source, downloaded once into ``cache/qemu/sources/<version>/``.

    ``exact`` False (the default build, of the installed QEMU's version): when the mirror no longer serves that
    version (a mirror keeps only the current version of each suite, and a backport's source can vanish while its
    binary stays installed), the newest source of the same upstream series (10.0.x) that it does serve, from
    the host's release or the one the backport came from, is built instead, and said so."""
    apt = _source_apt(version, progress)
    apt.ensure_lists(fresh=True)
    try:
        return version, _download(apt, version, progress)
    except QemuBuildError as e:
        known = showsrc_versions(apt.run("apt-cache", "showsrc", SOURCE_PACKAGE, check=False).stdout)
        if exact:
            raise QemuBuildError(e.args[0], hint=f"the deb-src lists of {', '.join(apt.m.suites)} name "
                                 f"{', '.join(known) or 'no qemu source'} (a listed one can still be gone from "
                                 f"the mirror's pool); {e.hint}") from e
        for other in same_series(version, known):
            try:
                dsc = _download(apt, other, progress)
            except QemuBuildError as e:
                progress(f"  {other}: not fetchable either ({e.args[0].split(': ', 1)[-1][:160]})")
                continue
            progress(f"WARNING: the installed QEMU's source {version} is not on the mirror any more; building "
                     f"{other} instead, the newest {'.'.join(upstream_version(version).split('.')[:2])}.x "
                     f"source it serves (--source-version picks one exactly)")
            return other, dsc
        raise


PATCH_CMD = ("patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch")


def apply_patches(tree: Path, patches: list[Path], version: str, log: Path) -> None:
    """Each patch in order, ``patch -p1``: a dry run first (nothing changes if it fails), then for real."""
    for p in patches:
        dry = subprocess.run([*PATCH_CMD, "--dry-run", "-i", str(p)], cwd=tree, capture_output=True, text=True,
                             check=False)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n$ patch -p1 --dry-run -i {p}\n{dry.stdout}{dry.stderr}")
        if dry.returncode != 0:
            raise patch_failure(p.name, version, dry.stdout + dry.stderr)
        _run([*PATCH_CMD, "-i", str(p)], log, tree, f"applying {p.name}")


def configure_args(prefix: str, digest: str) -> list[str]:
    args = ["./configure", f"--prefix={prefix}", "--python=/usr/bin/python3", *CONFIGURE_FLAGS,
            f"--with-pkgversion={pkgversion(digest)}"]
    if platform.machine() in ("aarch64", "arm64"):
        args.append("--enable-kvm")        # an arm64 host runs the harness with --accel kvm too
    return args


def meson_version() -> tuple[int, ...] | None:
    exe = shutil.which("meson")
    if not exe:
        return None
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", r.stdout.strip())
    return tuple(int(x or 0) for x in m.groups()) if m else None


def ensure_build_packages(progress=print) -> None:
    """:data:`BUILD_REQUIREMENTS` (only ``qemu build`` installs them), and a meson new enough for QEMU 10."""
    sysdeps.ensure_packages(BUILD_REQUIREMENTS, "QEMU build tools", progress)
    if (meson_version() or (0,)) < MIN_MESON:      # bookworm's own 1.0 was there already: take backports'
        sysdeps.install_packages(["meson"], "QEMU build tools (meson >= 1.5)", progress, from_backports=True)
        if (meson_version() or (0,)) < MIN_MESON:
            raise SetupError(f"meson {meson_version()} is too old for QEMU 10: need >= 1.5.0",
                             hint="apt-get install -t bookworm-backports meson (Debian 12), or meson from Debian 13")


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def unpack(dsc: Path, dest: Path, log: Path) -> None:
    """``dpkg-source -x``: the upstream tree with Debian's own patches applied (the .dsc's hashes were checked
    by apt against the signed Release file)."""
    _run(["dpkg-source", "--no-check", "-x", str(dsc), str(dest)], log, dest.parent, f"dpkg-source -x {dsc.name}")


def build(version: str | None = None, patch_dir: Path = PATCH_DIR, jobs: int | None = None,
          progress=print, install_deps: bool = True) -> Built:
    """The patched QEMU for ``version`` (default: the installed qemu-system-arm's source), built once."""
    patches = patch_files(patch_dir)
    exact = version is not None
    requested = version or installed_source_version()
    digest = patch_hash(patches)
    build_key(requested, digest)         # a malformed --source-version fails here, before any download
    root = qemu_root()
    root.mkdir(parents=True, exist_ok=True)
    (cache_dir() / "locks").mkdir(parents=True, exist_ok=True)
    alias = root / "resolved" / safe_version(requested)     # the installed version -> the source built for it
    with FileLock(str(cache_dir() / "locks" / "qemu-build.lock")):
        candidates = [requested] + ([alias.read_text().strip()] if not exact and alias.is_file() else [])
        for v in candidates:
            hit = lookup(v, digest)
            if hit is not None:
                info = json.loads((hit / "build-info.json").read_text())
                return Built(hit / "bin" / BINARY, hit, v, digest, float(info.get("build_s", 0.0)), True, info)
        if install_deps:
            ensure_build_packages(progress)
        if _free_bytes(root) < MIN_FREE_BYTES:
            raise QemuBuildError(f"less than {MIN_FREE_BYTES >> 30} GiB free under {root} for the QEMU build",
                                 hint="free space, or point SMCCC_HARNESS_CACHE at a larger file system")
        t0 = time.monotonic()
        version, dsc = fetch_source(requested, progress, exact=exact)
        key = build_key(version, digest)
        work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
        log = work / "build.log"
        failed_log = root / f"failed-{key}.log"
        try:
            src = work / "src"
            progress(f"unpacking {dsc.name} (Debian's own patches applied by dpkg-source)")
            unpack(dsc, src, log)
            progress(f"applying {len(patches)} patch(es) from {patch_dir}: {', '.join(p.name for p in patches)}")
            apply_patches(src, patches, version, log)
            prefix = "/usr"
            progress(f"configure {' '.join(CONFIGURE_FLAGS)} (log: {log})")
            _run(configure_args(prefix, digest), log, src, "configure")
            n = jobs or os.cpu_count() or 1
            progress(f"make -j{n} (aarch64-softmmu)")
            _run(["make", f"-j{n}"], log, src, "make")
            dest = work / "destdir"
            _run(["make", "install", f"DESTDIR={dest}"], log, src, "make install")
            tree = dest / prefix.lstrip("/")
            exe = tree / "bin" / BINARY
            try:
                ver = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False, timeout=30)
            except OSError as e:
                raise QemuBuildError(f"the built {BINARY} does not run: {e}") from e
            if ver.returncode != 0 or FIX_TOKEN not in ver.stdout:
                raise QemuBuildError(f"the built {BINARY} does not report {FIX_TOKEN!r} in --version: "
                                     f"{ver.stdout.strip() or ver.stderr.strip()}")
            build_s = round(time.monotonic() - t0, 1)
            info = {"source_version": version, "requested_version": requested,
                    "patches": [p.name for p in patches], "patch_hash": digest,
                    "configure": configure_args(prefix, digest)[1:], "build_s": build_s, "jobs": n,
                    "version_line": ver.stdout.splitlines()[0],
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            shutil.copyfile(log, tree / "build.log")
            (tree / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")   # last: marks it complete
            final = root / key
            if final.exists():          # an incomplete leftover (no build-info.json): replace it
                shutil.rmtree(final)
            os.rename(tree, final)      # the one step that makes it visible: atomic on one file system
            failed_log.unlink(missing_ok=True)
            if version != requested:
                alias.parent.mkdir(parents=True, exist_ok=True)
                alias.write_text(version + "\n")
        except BaseException as e:
            if log.exists():
                shutil.copyfile(log, failed_log)
            if isinstance(e, QemuBuildError):
                raise QemuBuildError(e.args[0],
                                     hint="; ".join(x for x in (e.hint, f"the whole log: {failed_log}") if x)) from e
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return Built(final / "bin" / BINARY, final, version, digest, build_s, False, info)
