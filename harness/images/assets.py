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
import json
import os
import shutil
import sys
from pathlib import Path

from ..errors import AssetError
from ..paths import cache_dir
from .lock import LockEntry
from .store import KernelAsset, Store, mb, sha256_file, sha256_of_file

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
        got = sha256_of_file(p)
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
        progress(f"removed {root} ({mb(freed)})")
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


if __name__ == "__main__":  # python -m harness.images.assets [spec]
    k = ensure_kernel(sys.argv[1] if len(sys.argv) > 1 else "default")
    print(k)
    print(ensure_rootfs())
