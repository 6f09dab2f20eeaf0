"""The content-addressed package store in the cache: ``debs/<sha256>.deb`` fetched through the private apt
(checked against images/lock.json), ``extract/<sha256>/`` unpacked with ``dpkg-deb -x`` and renamed into place,
all under one file lock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..errors import AssetError
from ..paths import cache_dir
from .apt import PrivateApt
from .debian import Available, DebVersion, choose_kernel, parse_kernel_name
from .lock import LOCK_FILE, Lock, LockEntry, Manifest, load_manifest, stale_warning


# ==== the private apt ==============================================================================
def sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


_hash_memo: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file, memoised per process on (path, size, mtime_ns)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        _hash_memo[key] = sha256_of_file(path)
    return _hash_memo[key]


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ==== the store ===================================================================================
@dataclass
class KernelAsset:
    image: Path  # the arm64 Image (Debian's vmlinuz: an uncompressed Image with a PE stub)
    config: Path | None
    version: str  # uname -r
    package: str
    deb_version: str
    sha256: str  # of `image`


class Store:
    """Resolve -> download -> verify -> extract, under a file lock; pins in images/lock.json."""

    def __init__(self, progress=print, lock_path: Path | None = None, manifest: Manifest | None = None) -> None:
        self.progress = progress
        self.m = manifest or load_manifest()
        self.root = cache_dir()
        self.debs = self.root / "debs"
        self.extract_root = self.root / "extract"
        self.lock_path = lock_path or Path(os.environ.get("SMCCC_HARNESS_LOCKFILE") or LOCK_FILE)
        try:
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
            probe = self.root / "locks" / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise AssetError(f"the cache directory {self.root} is not writable: {e.strerror}",
                             hint="point SMCCC_HARNESS_CACHE (or XDG_CACHE_HOME) at a writable directory with "
                                  "~1 GB free, or fix the permissions / mount of this one") from None
        self.flock = FileLock(str(self.root / "locks" / "assets.lock"))
        self.apt = PrivateApt(self.m, self.root / "apt", progress)

    # ---- lock.json
    def read_lock(self) -> Lock:
        try:
            return Lock.loads(self.lock_path.read_text())
        except FileNotFoundError:
            return Lock(mirror=self.m.mirror)
        except (ValueError, KeyError, TypeError) as e:
            raise AssetError(f"{self.lock_path} is corrupt: {e}", hint="fix it, or delete it and run 'smccc-harness assets lock'") from e

    def record(self, entries: list[LockEntry] = (), kernels: dict[str, list[str]] | None = None) -> None:
        new = Lock(mirror=self.m.mirror, packages={e.name: e for e in entries}, kernels=kernels or {})
        lock = self.read_lock().merge(new).pruned(self.m.rootfs_packages + self.m.optional_packages)
        text = lock.dumps()
        try:
            if self.lock_path.exists() and self.lock_path.read_text() == text:
                return
            tmp = self.lock_path.with_name(f".{self.lock_path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.lock_path)
        except OSError as e:  # a read-only checkout still works, it just cannot record
            self.progress(f"WARNING: cannot update {self.lock_path}: {e}")

    # ---- content-addressed debs
    def deb_path(self, sha: str) -> Path:
        return self.debs / f"{sha}.deb"

    def cached(self, e: LockEntry) -> Path | None:
        p = self.deb_path(e.sha256)
        if not p.exists():
            return None
        if sha256_file(p) != e.sha256:
            self.progress(f"WARNING: {p} is corrupt (sha256 mismatch); removing it")
            p.unlink()
            return None
        return p

    def resolve(self, name: str, suite: str) -> Available:
        self.apt.ensure_lists(fresh=True)
        cands = [a for a in self.apt.madison([name]) if a.name == name and a.suite == suite
                 and a.arch in (self.m.arch, "all")]
        if not cands and not self.apt.updated:
            self.apt.update()
            cands = [a for a in self.apt.madison([name]) if a.name == name and a.suite == suite
                     and a.arch in (self.m.arch, "all")]
        if not cands:
            raise AssetError(f"{name} ({self.m.arch}) is not available in {suite} at {self.m.mirror}")
        return max(cands, key=lambda a: DebVersion(a.version))

    def download(self, name: str, version: str, suite: str) -> LockEntry:
        """apt-get download into a temp dir, verify against the index, move into debs/<sha256>.deb."""
        self.apt.ensure_lists()
        meta = self.apt.show(name, version)
        if not meta and not self.apt.updated:
            self.apt.update()
            meta = self.apt.show(name, version)
        if not meta:
            raise AssetError(f"{name} {version} is no longer on {self.m.mirror}")
        size = int(meta.get("Size", 0))
        self.progress(f"downloading {name} {version} ({suite}, {mb(size)}) ...")
        t0 = time.monotonic()
        self.debs.mkdir(parents=True, exist_ok=True)

        def no_space() -> AssetError:
            return AssetError(f"no space left in {self.debs} while downloading {name} {version} ({mb(size)}; "
                              f"{mb(shutil.disk_usage(self.debs).free)} free)",
                              hint="free some space, or point SMCCC_HARNESS_CACHE at a disk with ~1 GB free; "
                                   "nothing already cached was touched")
        if size and shutil.disk_usage(self.debs).free < size:   # now, not after apt's retries (1+2+4+8 s)
            raise no_space()
        try:
            with tempfile.TemporaryDirectory(dir=self.debs, prefix=".dl-") as tmp:
                deb = self.apt.download(name, version, Path(tmp))
                sha = sha256_of_file(deb)
                if meta.get("SHA256") and meta["SHA256"] != sha:
                    raise AssetError(f"{name} {version}: sha256 {sha} does not match the index ({meta['SHA256']})")
                os.replace(deb, self.deb_path(sha))
        except (AssetError, OSError) as e:   # the temp dir is gone; nothing half-written is left in debs/
            text = str(e)
            if "No space left on device" in text or getattr(e, "errno", None) == 28:
                raise no_space() from None
            if isinstance(e, OSError):
                raise AssetError(f"cannot store {name} {version} in {self.debs}: {e}") from None
            raise
        dt = time.monotonic() - t0
        self.progress(f"  {name}: {mb(size)} in {dt:.1f} s, sha256 {sha[:16]}")
        return LockEntry(name=name, version=version, suite=suite, arch=meta.get("Architecture", self.m.arch),
                         sha256=sha, size=size or self.deb_path(sha).stat().st_size,
                         filename=meta.get("Filename", "").rsplit("/", 1)[-1])

    def fetch(self, name: str, suite: str, refresh: bool = False) -> LockEntry:
        """The locked version if it is cached or still on the mirror; else the suite's newest (recorded)."""
        with self.flock:
            e = self.read_lock().packages.get(name)
            if e and not refresh:
                if self.cached(e):
                    return e
                try:
                    got = self.download(e.name, e.version, e.suite)
                except AssetError as err:
                    if str(err).startswith("no space left"):
                        raise       # the mirror is fine, the disk is full: trying another version will not help
                    got = None
                if got:
                    if got.sha256 != e.sha256:
                        raise AssetError(f"{name} {e.version}: the mirror's .deb has sha256 {got.sha256}, "
                                         f"images/lock.json pins {e.sha256}",
                                         hint="someone changed the package under the same version; "
                                              "check the mirror, then 'smccc-harness assets lock'")
                    return e
                suite = e.suite
            avail = self.resolve(name, suite)
            if e and e.version != avail.version:
                self.progress(stale_warning(name, e.version, avail.version))
            if e and e.version == avail.version and self.cached(e):
                return e
            got = self.download(name, avail.version, avail.suite)
            self.record([got])
            return got

    def extract(self, e: LockEntry) -> Path:
        with self.flock:
            deb = self.cached(e)
            if deb is None:
                raise AssetError(f"{e.name} {e.version} is not in the cache")
            dest = self.extract_root / e.sha256
            if dest.is_dir():
                return dest
            self.extract_root.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            tmp = Path(tempfile.mkdtemp(dir=self.extract_root, prefix=f".x-{e.sha256[:12]}-"))
            try:
                r = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=False, capture_output=True, text=True)
                if r.returncode != 0 and "No space left on device" in r.stderr:
                    raise AssetError(f"no space left in {self.extract_root} while extracting {e.name} {e.version} "
                                     f"({mb(shutil.disk_usage(self.extract_root).free)} free)",
                                     hint="free some space, or point SMCCC_HARNESS_CACHE at a disk with ~1 GB free; "
                                          "the partial extraction was removed, the downloaded .deb is kept")
                if r.returncode != 0:
                    raise AssetError(f"dpkg-deb -x {deb} failed: {r.stderr.strip()}")
                os.chmod(tmp, 0o755)
                os.rename(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.progress(f"  extracted {e.name} in {time.monotonic() - t0:.1f} s")
            return dest

    # ---- kernels
    def kernel_candidates(self) -> list[Available]:
        self.apt.ensure_lists(fresh=True)
        names = [n for prefix in ("linux-binary-", "linux-image-") for n in self.apt.pkgnames(prefix)
                 if parse_kernel_name(n, self.m.flavour)]
        names += [f"linux-base-{parse_kernel_name(n, self.m.flavour).abi}" for n in names
                  if n.startswith("linux-binary-")]
        return [a for a in self.apt.madison(sorted(set(names))) if a.arch in (self.m.arch, "all")]

    def kernel_packages(self, spec: str, refresh: bool = False) -> list[LockEntry]:
        with self.flock:
            lock = self.read_lock()
            pinned = lock.kernels.get(spec)
            if pinned and not refresh and all(n in lock.packages for n in pinned):
                entries = [lock.packages[n] for n in pinned]
                if all(self.cached(e) for e in entries):
                    return entries
                try:
                    return [e if self.cached(e) else self._download_locked(e) for e in entries]
                except AssetError as err:
                    self.progress(f"locked kernel for {spec!r} ({pinned[0]}) is gone from the mirror: {err}")
            choice = choose_kernel(spec, self.kernel_candidates(), self.m.flavour, self.m.default_series, self.m.suites)
            if pinned and pinned[0] != choice.package:
                self.progress(stale_warning(f"kernel {spec!r} = {pinned[0]}", lock.packages[pinned[0]].version
                                            if pinned[0] in lock.packages else "?", f"{choice.package} {choice.version}"))
            self.progress(f"kernel {spec!r} -> {choice.package} {choice.version} ({choice.suite})")
            entries = [self.fetch_exact(choice.package, choice.version, choice.suite)]
            if choice.config_package:
                entries.append(self.fetch_exact(choice.config_package, choice.version, choice.suite))
            self.record(entries, {spec: [e.name for e in entries]})
            return entries

    def _download_locked(self, e: LockEntry) -> LockEntry:
        got = self.download(e.name, e.version, e.suite)
        if got.sha256 != e.sha256:
            raise AssetError(f"{e.name} {e.version}: sha256 {got.sha256} != locked {e.sha256}")
        return e

    def fetch_exact(self, name: str, version: str, suite: str) -> LockEntry:
        """``name`` at exactly ``version`` (a kernel's own modules package): from the cache, else downloaded,
        checked against its pin when images/lock.json has one, and pinned."""
        with self.flock:
            e = self.read_lock().packages.get(name)
            if e and e.version == version and self.cached(e):
                return e
            got = self.download(name, version, suite)
            if e and e.version == version and got.sha256 != e.sha256:
                raise AssetError(f"{name} {version}: the mirror's .deb has sha256 {got.sha256}, images/lock.json "
                                 f"pins {e.sha256}", hint="someone changed the package under the same version; "
                                                          "check the mirror, then 'smccc-harness assets lock'")
            self.record([got])
            return got
