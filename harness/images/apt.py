"""A private apt configuration under the cache (sources, lists, cache): ``apt-get update`` / ``download`` /
``madison`` that never touch the system's apt state.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from ..errors import AssetError
from .debian import Available, parse_control, parse_madison
from .lock import Manifest, sources_list

_UPDATED_LISTS: set[str] = set()


class PrivateApt:
    """apt-get / apt-cache with their own sources, lists and cache under ``cache/apt``; arm64 only.

    ``sources``: the exact sources.list text instead of the manifest's ``deb`` lines (harness/images/qemu_build.py
    fetches Debian's QEMU source through ``deb-src`` lines in a root of its own)."""

    def __init__(self, manifest: Manifest, root: Path, progress=print, sources: str | None = None) -> None:
        self.m = manifest
        self.root = root
        self.progress = progress
        self.sources_text = sources
        self.lists = root / "lists"
        self.cache = root / "cache"
        self.sources = root / "sources.list"
        self.archs = [manifest.arch]  # arm64 only; falls back to the host's arch + arm64 if apt refuses

    @property
    def updated(self) -> bool:  # one update per process is enough, whichever Store asked for it
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
        text = self.sources_text if self.sources_text is not None else sources_list(self.m, ",".join(self.archs))
        if not self.sources.exists() or self.sources.read_text() != text:
            self.sources.write_text(text)
            for p in self._list_files():  # sources changed: the lists must be refetched
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

    def _list_files(self) -> list[Path]:
        """The package (``deb``) and source (``deb-src``) index files fetched by ``update``."""
        return [*self.lists.glob("*_Packages*"), *self.lists.glob("*_Sources*")] if self.lists.is_dir() else []

    def have_lists(self) -> bool:
        return bool(self._list_files())

    def lists_age_hours(self) -> float:
        files = self._list_files()
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
        if self.updated:
            return
        self._prepare()     # sources that changed drop the old lists first
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
