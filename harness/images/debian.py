"""Debian package logic with no I/O: version comparison (deb-version(7) ordering), ``apt-cache madison`` and
control-file parsing, kernel package names, and which kernel package a spec ('default', '7.2', '6.12', a
name) chooses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import AssetError


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
