"""Debian arm64 packages (guest kernel + rootfs), fetched with a private apt configuration into the cache.

Nothing here touches the system's apt state: the sources file, the lists and apt's cache live under
``cache_dir()/apt/``, and packages are only downloaded (``apt-get download``) and unpacked (``dpkg-deb -x``).

Layout under the cache::

    apt/sources.list, apt/lists/, apt/cache/   private apt state
    debs/<sha256>.deb                          content-addressed package store
    extract/<sha256>/                          ``dpkg-deb -x`` of that package (renamed into place when complete)
    locks/assets.lock                          file lock around resolve / download / extract / lock.json

``images/lock.json`` pins name, version, suite, sha256 of every package used; with everything locked in the
cache, no apt command runs at all (offline-safe).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

from ..errors import AssetError
from ..paths import IMAGES_DIR, cache_dir

MANIFEST = IMAGES_DIR / "manifest.toml"
LOCK_FILE = IMAGES_DIR / "lock.json"
LOCK_FORMAT = 1


# ==== Debian version comparison (pure) ============================================================
def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_part(a: str, b: str) -> int:
    ia = ib = 0
    while ia < len(a) or ib < len(b):
        first_diff = 0
        while (ia < len(a) and not a[ia].isdigit()) or (ib < len(b) and not b[ib].isdigit()):
            ac = _order(a[ia]) if ia < len(a) else 0
            bc = _order(b[ib]) if ib < len(b) else 0
            if ac != bc:
                return ac - bc
            ia += 1
            ib += 1
        while ia < len(a) and a[ia] == "0":
            ia += 1
        while ib < len(b) and b[ib] == "0":
            ib += 1
        while ia < len(a) and a[ia].isdigit() and ib < len(b) and b[ib].isdigit():
            if not first_diff:
                first_diff = ord(a[ia]) - ord(b[ib])
            ia += 1
            ib += 1
        if ia < len(a) and a[ia].isdigit():
            return 1
        if ib < len(b) and b[ib].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
    upstream, _, rev = rest.rpartition("-") if "-" in rest else (rest, "", "0")
    return int(epoch or 0), upstream, rev


def compare_versions(a: str, b: str) -> int:
    """dpkg's version ordering: <0, 0, >0 like ``dpkg --compare-versions``."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return ea - eb
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)


class DebVersion(str):
    """A str that sorts like a Debian version."""

    def __lt__(self, other):  # type: ignore[override]
        return compare_versions(self, other) < 0

    def __gt__(self, other):  # type: ignore[override]
        return compare_versions(self, other) > 0


# ==== apt output parsing (pure) ====================================================================
@dataclass(frozen=True)
class Available:
    name: str
    version: str
    suite: str
    arch: str


def parse_madison(text: str) -> list[Available]:
    """``apt-cache madison`` lines: ``name | version | URL suite/component arch Packages``."""
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 3:
            continue
        src = parts[2].split()
        if len(src) < 3 or src[-1] != "Packages":
            continue
        suite = src[1].split("/")[0]
        out.append(Available(parts[0], parts[1], suite, src[2]))
    return out


def parse_control(text: str) -> dict[str, str]:
    """The first stanza of ``apt-cache show`` output (continuation lines joined)."""
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and key:
            fields[key] += "\n" + line.strip()
            continue
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


# ==== kernel selection (pure) ======================================================================
_KNAME = re.compile(r"^linux-(binary|image)-(\d+)\.(\d+)(?:\.(\d+))?(\+[a-z0-9]+)?-([a-z0-9-]+)$")


@dataclass(frozen=True)
class KernelName:
    kind: str  # "binary" (7.x: vmlinuz in linux-binary-*, config in linux-base-*) or "image" (one package)
    upstream: tuple[int, int, int]
    abi: str  # the uname -r, e.g. "7.3.4+deb13-cloud-arm64"
    flavour: str


def parse_kernel_name(name: str, flavour: str) -> KernelName | None:
    """``linux-binary-7.3.4+deb13-cloud-arm64`` -> KernelName; None for metas, -dbg, -unsigned, other flavours."""
    m = _KNAME.match(name)
    if not m or m.group(6) != flavour:
        return None
    up = (int(m.group(2)), int(m.group(3)), int(m.group(4) or 0))
    abi = name.split("-", 2)[2]
    return KernelName(m.group(1), up, abi, flavour)


@dataclass(frozen=True)
class KernelChoice:
    package: str  # the package holding the Image
    version: str  # its Debian version
    suite: str
    abi: str  # uname -r
    config_package: str | None  # linux-base-<abi> for 7.x, None when the config is in `package`


def choose_kernel(spec: str, available: list[Available], flavour: str, default_series: str,
                  suites: list[str]) -> KernelChoice:
    """Pick the kernel package for a spec among the available (madison) entries.

    spec: "default" (newest of ``default_series``), a series ("7", "7.2", "6.12", "7.3.4"), a suite name,
    an exact package name (linux-binary-/linux-image-...), or a uname -r ("7.3.4+deb13-cloud-arm64").
    """
    # per abi: the best (newest) package of each kind
    by_abi: dict[str, dict[str, Available]] = {}
    parsed: dict[str, KernelName] = {}
    names = {a.name for a in available}
    for a in available:
        kn = parse_kernel_name(a.name, flavour)
        if kn is None or a.arch not in ("arm64", "all"):
            continue
        parsed[kn.abi] = kn
        cur = by_abi.setdefault(kn.abi, {}).get(kn.kind)
        if cur is None or compare_versions(a.version, cur.version) > 0:
            by_abi[kn.abi][kn.kind] = a

    def pick(abi: str) -> KernelChoice:
        kinds = by_abi[abi]
        a = kinds.get("binary") or kinds["image"]
        config = f"linux-base-{abi}" if a.name.startswith("linux-binary-") else None
        if config and config not in names:
            config = None
        return KernelChoice(a.name, a.version, a.suite, abi, config)

    def newest(abis) -> KernelChoice:
        abis = list(abis)
        if not abis:
            have = ", ".join(sorted(by_abi, key=lambda x: parsed[x].upstream)) or "none"
            raise AssetError(f"no {flavour} kernel matches {spec!r} (available: {have})",
                             hint="kernel spec: 'default', a series like '7.2', a suite, or a package name")
        best = max(abis, key=lambda x: (parsed[x].upstream, DebVersion(pick(x).version)))
        return pick(best)

    s = spec.strip()
    if s in ("", "default"):
        s = default_series
    if re.fullmatch(r"\d+(\.\d+){0,2}", s):
        want = tuple(int(x) for x in s.split("."))
        return newest(x for x in by_abi if parsed[x].upstream[: len(want)] == want)
    if s in suites:
        return newest(x for x in by_abi if any(k.suite == s for k in by_abi[x].values()))
    if s.startswith("linux-"):
        kn = parse_kernel_name(s, flavour) or parse_kernel_name(s, s.rsplit("+", 1)[-1].split("-", 1)[-1])
        if kn and kn.abi in by_abi:
            return pick(kn.abi)
        raise AssetError(f"kernel package {s!r} is not available from the configured suites ({', '.join(suites)})")
    if s in by_abi:
        return pick(s)
    return newest([])


# ==== lock file (pure merge logic) =================================================================
@dataclass
class LockEntry:
    name: str
    version: str
    suite: str
    arch: str
    sha256: str
    size: int
    filename: str


@dataclass
class Lock:
    mirror: str = ""
    packages: dict[str, LockEntry] = field(default_factory=dict)
    kernels: dict[str, list[str]] = field(default_factory=dict)  # spec -> [image package, config package?]

    @classmethod
    def loads(cls, text: str) -> Lock:
        data = json.loads(text) if text.strip() else {}
        lock = cls(mirror=data.get("mirror", ""))
        for name, e in data.get("packages", {}).items():
            lock.packages[name] = LockEntry(**{k: e[k] for k in LockEntry.__dataclass_fields__})
        lock.kernels = {k: list(v) for k, v in data.get("kernels", {}).items()}
        return lock

    def dumps(self) -> str:
        data = {
            "format": LOCK_FORMAT,
            "comment": "generated by harness/images/assets.py; refresh with `smccc-harness assets lock`",
            "mirror": self.mirror,
            "kernels": dict(sorted(self.kernels.items())),
            "packages": {n: asdict(self.packages[n]) for n in sorted(self.packages)},
        }
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    def pruned(self, keep: list[str]) -> Lock:
        """Only the packages named in ``keep`` or by a kernel spec, and the ``linux-modules-R`` of a kept
        kernel package at its version (--ssh's virtio_net); stale pins are dropped."""
        names = set(keep) | {n for ns in self.kernels.values() for n in ns}
        kernel_versions = {(n.split("-", 2)[2], self.packages[n].version) for n in names if n in self.packages
                           and n.startswith(("linux-image-", "linux-binary-"))}
        names |= {n for n, e in self.packages.items()
                  if n.startswith("linux-modules-") and (n[len("linux-modules-"):], e.version) in kernel_versions}
        return Lock(self.mirror, {n: e for n, e in self.packages.items() if n in names}, dict(self.kernels))

    def merge(self, other: Lock) -> Lock:
        """``other``'s entries win (they are newer facts); the union of everything else is kept."""
        out = Lock(mirror=other.mirror or self.mirror, packages=dict(self.packages), kernels=dict(self.kernels))
        out.packages.update(other.packages)
        out.kernels.update(other.kernels)
        return out


def stale_warning(name: str, locked: str, now: str) -> str:
    return (f"WARNING: images/lock.json pins {name} {locked} but the mirror now has {now}: using {now}; "
            f"run 'smccc-harness assets lock' to record it")


# ==== the manifest ================================================================================
@dataclass(frozen=True)
class Manifest:
    mirror: str
    suites: list[str]
    components: list[str]
    arch: str
    keyring: str
    lists_max_age_hours: float
    flavour: str
    default_series: str
    rootfs_suite: str
    rootfs_packages: list[str]
    optional_packages: list[str] = field(default_factory=list)   # [ssh]: only --ssh sessions fetch them


def load_manifest(path: Path = MANIFEST) -> Manifest:
    d = tomllib.loads(path.read_text())
    apt, k, r = d["apt"], d["kernel"], d["rootfs"]
    return Manifest(
        mirror=os.environ.get("SMCCC_HARNESS_MIRROR") or apt.get("mirror", "http://deb.debian.org/debian"),
        suites=list(apt["suites"]), components=list(apt.get("components", ["main"])),
        arch=apt.get("arch", "arm64"), keyring=apt.get("keyring", "/usr/share/keyrings/debian-archive-keyring.gpg"),
        lists_max_age_hours=float(apt.get("lists_max_age_hours", 24)),
        flavour=k.get("flavour", "cloud-arm64"), default_series=str(k.get("default_series", "7")),
        rootfs_suite=r.get("suite", apt["suites"][0]), rootfs_packages=list(r["packages"]),
        optional_packages=list(d.get("ssh", {}).get("packages", [])),
    )


def sources_list(m: Manifest, arch_list: str) -> str:
    return "".join(f"deb [arch={arch_list} signed-by={m.keyring}] {m.mirror} {s} {' '.join(m.components)}\n"
                   for s in m.suites)


# ==== the private apt ==============================================================================
def _sha256_file(path: Path) -> str:
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
        _hash_memo[key] = _sha256_file(path)
    return _hash_memo[key]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


_UPDATED_LISTS: set[str] = set()


class PrivateApt:
    """apt-get / apt-cache with their own sources, lists and cache under ``cache/apt``; arm64 only."""

    def __init__(self, manifest: Manifest, root: Path, progress=print) -> None:
        self.m = manifest
        self.root = root
        self.progress = progress
        self.lists = root / "lists"
        self.cache = root / "cache"
        self.sources = root / "sources.list"
        self.archs = [manifest.arch]  # arm64 only; falls back to the host's arch + arm64 if apt refuses

    @property
    def _updated(self) -> bool:  # one update per process is enough, whichever Store asked for it
        return str(self.root) in _UPDATED_LISTS

    def _opts(self) -> list[str]:
        o = [
            f"-o=Dir::Etc::sourcelist={self.sources}", "-o=Dir::Etc::sourceparts=-",
            f"-o=Dir::State::Lists={self.lists}", f"-o=Dir::Cache={self.cache}",
            f"-o=Dir::State::status={self.root / 'status'}", f"-o=Dir::Cache::pkgcache={self.cache / 'pkgcache.bin'}",
            "-o=Dir::Cache::srcpkgcache=", f"-o=Dir::Etc::preferences={self.root / 'preferences'}",
            "-o=Dir::Etc::preferencesparts=-", "-o=APT::Sandbox::User=root", "-o=Acquire::Languages=none",
            "-o=Acquire::Retries=3", f"-o=APT::Architecture={self.archs[0]}", "-o=APT::Architectures=",
        ]
        o += [f"-o=APT::Architectures::={a}" for a in self.archs]
        return o

    def _prepare(self) -> None:
        (self.lists / "partial").mkdir(parents=True, exist_ok=True)
        (self.cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        status = self.root / "status"  # an empty dpkg status: nothing is "installed" for this apt
        if not status.exists():
            status.write_text("")
        text = sources_list(self.m, ",".join(self.archs))
        if not self.sources.exists() or self.sources.read_text() != text:
            self.sources.write_text(text)
            for p in self.lists.glob("*_Packages*"):  # sources changed: the lists must be refetched
                p.unlink()

    def run(self, tool: str, *args: str, check: bool = True, cwd: Path | None = None,
            capture: bool = True) -> subprocess.CompletedProcess:
        self._prepare()
        cmd = [tool, *self._opts(), *args]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
        r = subprocess.run(cmd, check=False, cwd=cwd, env=env, text=True, capture_output=capture)
        if check and r.returncode != 0:
            raise AssetError(f"{tool} {' '.join(args)} failed (exit {r.returncode}):\n{(r.stderr or '').strip()}",
                             hint=f"the private apt state is in {self.root}; check network access to {self.m.mirror}")
        return r

    def have_lists(self) -> bool:
        return any(self.lists.glob("*_Packages*")) if self.lists.is_dir() else False

    def lists_age_hours(self) -> float:
        files = list(self.lists.glob("*_Packages*"))
        if not files:
            return float("inf")
        return (time.time() - min(p.stat().st_mtime for p in files)) / 3600

    def update(self) -> None:
        t0 = time.monotonic()
        self.progress(f"apt update (private, {','.join(self.archs)}): {self.m.mirror} {' '.join(self.m.suites)}")
        r = self.run("apt-get", "-q", "update", check=False)
        if r.returncode != 0 and self.archs == [self.m.arch]:
            host = subprocess.run(["dpkg", "--print-architecture"], check=False, capture_output=True, text=True).stdout.strip()
            self.progress(f"apt refused an arm64-only configuration; retrying with {host},arm64:\n{r.stderr.strip()}")
            self.archs = [host or "amd64", self.m.arch]
            r = self.run("apt-get", "-q", "update", check=False)
        if r.returncode != 0 or "\nE: " in "\n" + (r.stderr or "") or "\nW: Failed to fetch" in "\n" + (r.stderr or ""):
            raise AssetError(f"private apt-get update failed:\n{(r.stderr or '').strip()}",
                             hint=f"check network access to {self.m.mirror} (override with $SMCCC_HARNESS_MIRROR)")
        _UPDATED_LISTS.add(str(self.root))
        self.progress(f"apt update done in {time.monotonic() - t0:.1f} s")

    def ensure_lists(self, fresh: bool = False) -> None:
        """Lists present (and, with ``fresh``, younger than the manifest's max age)."""
        if self._updated:
            return
        if not self.have_lists() or (fresh and self.lists_age_hours() > self.m.lists_max_age_hours):
            self.update()

    def madison(self, names: list[str]) -> list[Available]:
        out: list[Available] = []
        for i in range(0, len(names), 200):
            r = self.run("apt-cache", "madison", *names[i:i + 200], check=False)
            out += parse_madison(r.stdout)
        return out

    def pkgnames(self, prefix: str) -> list[str]:
        return self.run("apt-cache", "pkgnames", prefix).stdout.split()

    def show(self, name: str, version: str) -> dict[str, str]:
        for q in (f"{name}:{self.m.arch}={version}", f"{name}={version}"):
            r = self.run("apt-cache", "show", q, check=False)
            if r.returncode == 0 and r.stdout.strip():
                return parse_control(r.stdout)
        return {}

    def download(self, name: str, version: str, into: Path) -> Path:
        for q in (f"{name}:{self.m.arch}={version}", f"{name}={version}"):
            r = self.run("apt-get", "-q", "download", q, cwd=into, check=False)
            debs = list(into.glob("*.deb"))
            if r.returncode == 0 and len(debs) == 1:
                return debs[0]
            for d in debs:
                d.unlink()
        raise AssetError(f"apt-get download {name}={version} failed:\n{(r.stderr or '').strip()}")


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
        if not cands and not self.apt._updated:
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
        if not meta and not self.apt._updated:
            self.apt.update()
            meta = self.apt.show(name, version)
        if not meta:
            raise AssetError(f"{name} {version} is no longer on {self.m.mirror}")
        size = int(meta.get("Size", 0))
        self.progress(f"downloading {name} {version} ({suite}, {_mb(size)}) ...")
        t0 = time.monotonic()
        self.debs.mkdir(parents=True, exist_ok=True)

        def no_space() -> AssetError:
            return AssetError(f"no space left in {self.debs} while downloading {name} {version} ({_mb(size)}; "
                              f"{_mb(shutil.disk_usage(self.debs).free)} free)",
                              hint="free some space, or point SMCCC_HARNESS_CACHE at a disk with ~1 GB free; "
                                   "nothing already cached was touched")
        if size and shutil.disk_usage(self.debs).free < size:   # now, not after apt's retries (1+2+4+8 s)
            raise no_space()
        try:
            with tempfile.TemporaryDirectory(dir=self.debs, prefix=".dl-") as tmp:
                deb = self.apt.download(name, version, Path(tmp))
                sha = _sha256_file(deb)
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
        self.progress(f"  {name}: {_mb(size)} in {dt:.1f} s, sha256 {sha[:16]}")
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
                                     f"({_mb(shutil.disk_usage(self.extract_root).free)} free)",
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
            entries = [self._get(choice.package, choice.version, choice.suite)]
            if choice.config_package:
                entries.append(self._get(choice.config_package, choice.version, choice.suite))
            self.record(entries, {spec: [e.name for e in entries]})
            return entries

    def _download_locked(self, e: LockEntry) -> LockEntry:
        got = self.download(e.name, e.version, e.suite)
        if got.sha256 != e.sha256:
            raise AssetError(f"{e.name} {e.version}: sha256 {got.sha256} != locked {e.sha256}")
        return e

    def _get(self, name: str, version: str, suite: str) -> LockEntry:
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


# ==== public API ==================================================================================
_summary: dict = {}


def find_kernel_files(dirs: list[Path]) -> tuple[Path, Path | None, str]:
    image = config = None
    version = ""
    for d in dirs:
        for p in sorted(d.glob("usr/lib/modules/*/vmlinuz")) + sorted(d.glob("boot/vmlinuz-*")):
            if p.is_file() and not p.is_symlink():
                image = p
                version = p.parent.name if p.name == "vmlinuz" else p.name[len("vmlinuz-"):]
        for p in sorted(d.glob("usr/lib/modules/*/config")) + sorted(d.glob("boot/config-*")):
            if p.is_file():
                config = p
    if image is None:
        raise AssetError(f"no vmlinuz in {', '.join(map(str, dirs))}",
                         hint="the package may be a meta package; name the linux-binary-* package instead")
    return image, config, version


IMAGE_SHA_RECORD = ".smccc-image.sha256"


def _check_extracted_image(store: Store, entries: list[LockEntry], dirs: list[Path], image: Path) -> str | None:
    """The Image's sha256, checked against the record written at its first use (written now if absent).

    None (and the extraction removed, with a warning) if the Image no longer matches: a corrupted cache entry.
    """
    d = next(d for d in dirs if d in image.parents)
    rec = d / IMAGE_SHA_RECORD
    sha = sha256_file(image)
    try:
        want = rec.read_text().strip()
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            tmp = rec.with_name(f"{rec.name}.{os.getpid()}.tmp")
            tmp.write_text(sha + "\n")
            os.replace(tmp, rec)
        return sha
    if want == sha:
        return sha
    store.progress(f"WARNING: {image} has sha256 {sha}, but {want} when it was extracted: the cache entry is "
                   f"corrupt; extracting it again")
    with store.flock:
        shutil.rmtree(d, ignore_errors=True)
    return None


def ensure_kernel(spec: str = "default", progress=print) -> KernelAsset:
    """The guest kernel for ``spec`` ("default", "7.2", "6.12", a suite, a package name), fetched + extracted."""
    store = Store(progress)
    entries = store.kernel_packages(spec)
    dirs = [store.extract(e) for e in entries]
    image, config, version = find_kernel_files(dirs)
    image_sha = _check_extracted_image(store, entries, dirs, image)
    if image_sha is None:   # the extracted Image changed since it was extracted: extract it again
        dirs = [store.extract(e) for e in entries]
        image, config, version = find_kernel_files(dirs)
        image_sha = _check_extracted_image(store, entries, dirs, image)
        if image_sha is None:
            raise AssetError(f"{image} does not match the sha256 recorded when it was extracted, even after "
                             "extracting it again", hint="run 'smccc-harness cache clean --all' and 'smccc-harness setup'")
    asset = KernelAsset(image=image, config=config, version=version, package=entries[0].name,
                        deb_version=entries[0].version, sha256=image_sha)
    _summary.setdefault("kernels", {})[spec] = {
        "package": asset.package, "deb_version": asset.deb_version, "uname": asset.version,
        "image_sha256": asset.sha256, "deb_sha256": entries[0].sha256, "suite": entries[0].suite}
    return asset


def ensure_rootfs(progress=print) -> dict[str, Path]:
    """Every rootfs package of the manifest, extracted: package name -> directory."""
    store = Store(progress)
    out: dict[str, Path] = {}
    for name in store.m.rootfs_packages:
        e = store.fetch(name, store.m.rootfs_suite)
        out[name] = store.extract(e)
        _summary.setdefault("rootfs", {})[name] = {"version": e.version, "sha256": e.sha256, "suite": e.suite}
    return out


def rootfs_entries() -> dict[str, LockEntry]:
    """The lock entries of the rootfs packages (call after ensure_rootfs)."""
    store = Store(lambda *_: None)
    lock = store.read_lock()
    return {n: lock.packages[n] for n in store.m.rootfs_packages if n in lock.packages}


def asset_summary() -> dict:
    """Versions + hashes of what this process ensured (else what images/lock.json pins): for reports."""
    if _summary:
        return json.loads(json.dumps(_summary))
    lock = Store(lambda *_: None).read_lock()
    return {"mirror": lock.mirror, "kernels": lock.kernels,
            "packages": {n: {"version": e.version, "sha256": e.sha256, "suite": e.suite}
                         for n, e in lock.packages.items()}}


def fetch_all(kernels: tuple[str, ...] = ("default",), refresh: bool = False, progress=print) -> dict:
    """Fetch (``refresh``: re-resolve to the newest and re-lock, i.e. ``assets lock``) rootfs + kernels."""
    store = Store(progress)
    if refresh:
        store.apt.update()
        for name in store.m.rootfs_packages:
            store.extract(store.fetch(name, store.m.rootfs_suite, refresh=True))
        for spec in kernels:
            for e in store.kernel_packages(spec, refresh=True):
                store.extract(e)
    ensure_rootfs(progress)
    for spec in kernels:
        ensure_kernel(spec, progress)
    return asset_summary()


def verify_cache(progress=print) -> list[str]:
    """Problems with the cached copies of everything images/lock.json pins (empty list: all good).

    Only real problems count: a corrupt .deb (sha256 mismatch; it is fetched again on next use), a lock entry
    that names no package, an extraction without its package.  A pin that was never downloaded (e.g. a kernel
    series nobody used yet) or not yet extracted is reported through ``progress`` only.
    """
    store = Store(progress)
    problems = []
    lock = store.read_lock()
    for name, e in sorted(lock.packages.items()):
        p = store.deb_path(e.sha256)
        if not p.exists():
            if (store.extract_root / e.sha256).is_dir():
                problems.append(f"{name} {e.version}: extracted in {store.extract_root / e.sha256} but its .deb "
                                f"{p} is missing (run 'smccc-harness cache clean', it is fetched again)")
            else:
                progress(f"{name} {e.version}: not downloaded (fetched on first use)")
            continue
        got = _sha256_file(p)
        if got != e.sha256:
            problems.append(f"{name} {e.version}: {p} has sha256 {got}, lock says {e.sha256} "
                            "(corrupt: it is removed and fetched again on next use)")
        elif not (store.extract_root / e.sha256).is_dir():
            progress(f"{name} {e.version}: not extracted yet (extracted on first use)")
    for spec, names in lock.kernels.items():
        for n in names:
            if n not in lock.packages:
                problems.append(f"kernel {spec!r}: {n} has no package entry in the lock")
    return problems


def clean_cache(everything: bool = False, progress=print) -> int:
    """Remove cached debs/extractions the lock no longer names (``everything``: the whole cache). Bytes freed."""
    root = cache_dir()
    freed = 0

    def du(p: Path) -> int:
        if p.is_file() or p.is_symlink():
            return p.lstat().st_size
        return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())

    if everything:
        if root.exists():
            freed = du(root)
            shutil.rmtree(root)
        progress(f"removed {root} ({_mb(freed)})")
        return freed
    store = Store(progress)
    with store.flock:
        keep = {e.sha256 for e in store.read_lock().packages.values()}
        for p in list(store.debs.glob("*.deb")) + [d for d in store.extract_root.glob("*") if d.is_dir()]:
            sha = p.name.split(".")[0]
            if sha not in keep:
                freed += du(p)
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                progress(f"removed {p}")
    return freed


if __name__ == "__main__":  # python -m harness.assets [spec]
    k = ensure_kernel(sys.argv[1] if len(sys.argv) > 1 else "default")
    print(k)
    print(ensure_rootfs())
