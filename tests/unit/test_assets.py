"""harness.images.assets: the pure parts (Debian versions, apt output parsing, kernel choice, lock merging)."""

import json
from pathlib import Path

import pytest

from harness.errors import AssetError
from harness.images import assets, debian
from harness.images import lock as locks
from harness.images import store as stores
from harness.images.debian import Available
from harness.images.lock import Lock, LockEntry

# `apt-cache madison ...` against trixie + trixie-backports + sid (arm64), recorded 2026-11-25
MADISON = """\
linux-binary-7.3.4+deb13-cloud-arm64 | 7.3.4-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main arm64 Packages
linux-base-7.3.4+deb13-cloud-arm64 | 7.3.4-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main arm64 Packages
linux-binary-7.2.13+deb14-cloud-arm64 |   7.2.13-1 | http://deb.debian.org/debian sid/main arm64 Packages
linux-base-7.2.13+deb14-cloud-arm64 |   7.2.13-1 | http://deb.debian.org/debian sid/main arm64 Packages
linux-image-7.3.4+deb13-cloud-arm64 | 7.3.4-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main arm64 Packages
linux-image-6.12.117+deb13-cloud-arm64 | 6.12.117-1 | http://deb.debian.org/debian trixie/main arm64 Packages
linux-image-6.19.14+deb13-cloud-arm64 | 6.19.14-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main arm64 Packages
linux-binary-7.2.12+deb13-cloud-arm64 | 7.2.12-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main arm64 Packages
linux-image-cloud-arm64 | 7.3.4-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main arm64 Packages
linux-image-cloud-arm64 |   7.2.13-1 | http://deb.debian.org/debian sid/main arm64 Packages
linux-binary-6.19.14+deb13-cloud-arm64 | 6.19.14-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main arm64 Packages
linux-binary-unsigned-7.3.4+deb13-cloud-arm64 | 7.3.4-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main arm64 Packages
"""

SHOW = """\
Package: libc6
Source: glibc
Version: 2.41-12+deb13u5
Installed-Size: 23770
Architecture: arm64
Depends: libgcc-s1
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system.
Filename: pool/main/g/glibc/libc6_2.41-12+deb13u5_arm64.deb
Size: 2488872
SHA256: 0966fc3da1a26cc57647c68b5736f791b6e7eb498173a7993f63b6c89b4ed4f5

Package: libc6
Version: 2.43-7
Size: 1
"""

SUITES = ["trixie", "trixie-backports", "sid"]


@pytest.mark.parametrize(("a", "b", "sign"), [
    ("7.3.4-1~bpo13+1", "7.3.4-1", -1),
    ("7.3.4-1", "7.3.4-1~bpo13+1", 1),
    ("1:1.37.0-6+b9", "1.38.0-3", 1),  # the epoch wins
    ("2.41-12+deb13u5", "2.41-12", 1),
    ("2.41-12", "2.41-12", 0),
    ("6.12.117-1", "6.12.99-1", 1),
    ("1.0~rc1", "1.0", -1),
    ("1:1.3.dfsg+really1.3.1-1+deb13u1", "1:1.3.dfsg+really1.3.2-4", -1),
    ("3.13.5-2+deb13u5", "3.13.18-1", -1),
    ("1.0a", "1.0+", -1),
])
def test_compare_versions(a, b, sign):
    got = debian.compare_versions(a, b)
    assert (got > 0) - (got < 0) == sign


def test_parse_madison():
    rows = debian.parse_madison(MADISON)
    assert len(rows) == 12
    assert rows[0] == Available("linux-binary-7.3.4+deb13-cloud-arm64", "7.3.4-1~bpo13+1", "trixie-backports", "arm64")
    assert rows[2].suite == "sid" and rows[2].version == "7.2.13-1"


def test_parse_control_first_stanza():
    f = debian.parse_control(SHOW)
    assert f["Version"] == "2.41-12+deb13u5"
    assert f["Size"] == "2488872"
    assert f["SHA256"].startswith("0966fc3d")
    assert f["Filename"].endswith("libc6_2.41-12+deb13u5_arm64.deb")
    assert "nearly all programs" in f["Description"]


@pytest.mark.parametrize(("name", "kind", "up", "abi"), [
    ("linux-binary-7.3.4+deb13-cloud-arm64", "binary", (7, 3, 4), "7.3.4+deb13-cloud-arm64"),
    ("linux-image-6.12.117+deb13-cloud-arm64", "image", (6, 12, 117), "6.12.117+deb13-cloud-arm64"),
    ("linux-binary-7.2.13+deb14-cloud-arm64", "binary", (7, 2, 13), "7.2.13+deb14-cloud-arm64"),
])
def test_parse_kernel_name(name, kind, up, abi):
    kn = debian.parse_kernel_name(name, "cloud-arm64")
    assert (kn.kind, kn.upstream, kn.abi) == (kind, up, abi)


@pytest.mark.parametrize("name", [
    "linux-image-cloud-arm64", "linux-binary-unsigned-7.3.4+deb13-cloud-arm64", "linux-image-7.2.13+deb14-cloud-arm64-dbg",
    "linux-image-7.3.4+deb13-arm64", "linux-base-7.3.4+deb13-cloud-arm64",
])
def test_parse_kernel_name_rejects(name):
    assert debian.parse_kernel_name(name, "cloud-arm64") is None


def choose(spec):
    return debian.choose_kernel(spec, debian.parse_madison(MADISON), "cloud-arm64", "7", SUITES)


def test_choose_default_is_newest_7x_binary_with_base():
    c = choose("default")
    assert c.package == "linux-binary-7.3.4+deb13-cloud-arm64"  # not the linux-image-* meta
    assert c.config_package == "linux-base-7.3.4+deb13-cloud-arm64"
    assert (c.version, c.suite, c.abi) == ("7.3.4-1~bpo13+1", "trixie-backports", "7.3.4+deb13-cloud-arm64")


def test_choose_series():
    assert choose("7.2").package == "linux-binary-7.2.13+deb14-cloud-arm64"
    assert choose("7.2.12").package == "linux-binary-7.2.12+deb13-cloud-arm64"
    assert choose("7.2.12").config_package is None  # no linux-base-7.2.12 in the recorded index
    c = choose("6.12")
    assert (c.package, c.config_package, c.suite) == ("linux-image-6.12.117+deb13-cloud-arm64", None, "trixie")
    assert choose("6").package == "linux-binary-6.19.14+deb13-cloud-arm64"


def test_choose_suite():
    assert choose("sid").package == "linux-binary-7.2.13+deb14-cloud-arm64"
    assert choose("trixie").package == "linux-image-6.12.117+deb13-cloud-arm64"
    assert choose("trixie-backports").package == "linux-binary-7.3.4+deb13-cloud-arm64"


def test_choose_exact_names():
    assert choose("linux-image-6.12.117+deb13-cloud-arm64").package == "linux-image-6.12.117+deb13-cloud-arm64"
    # the 7.x linux-image-* is a meta: the binary package is chosen instead
    assert choose("linux-image-7.3.4+deb13-cloud-arm64").package == "linux-binary-7.3.4+deb13-cloud-arm64"
    assert choose("7.2.13+deb14-cloud-arm64").package == "linux-binary-7.2.13+deb14-cloud-arm64"


def test_choose_no_match():
    with pytest.raises(AssetError, match="no cloud-arm64 kernel matches '8.1'"):
        choose("8.1")
    with pytest.raises(AssetError):
        choose("linux-binary-9.9.9+deb13-cloud-arm64")


def entry(name, version, sha="0" * 64, suite="trixie"):
    return LockEntry(name, version, suite, "arm64", sha, 1, f"{name}_{version}_arm64.deb")


def test_lock_roundtrip_is_stable():
    lock = Lock("http://deb.debian.org/debian", {"b": entry("b", "1"), "a": entry("a", "2")}, {"default": ["a"]})
    text = lock.dumps()
    assert list(json.loads(text)["packages"]) == ["a", "b"]  # sorted: diffs stay small
    again = Lock.loads(text)
    assert again == lock
    assert again.dumps() == text


def test_lock_merge_newer_wins_and_keeps_the_rest():
    old = Lock("m", {"a": entry("a", "1"), "b": entry("b", "1")}, {"default": ["k1"], "6.12": ["k0"]})
    new = Lock("m", {"a": entry("a", "2", "1" * 64)}, {"default": ["k2"]})
    merged = old.merge(new)
    assert merged.packages["a"].version == "2" and merged.packages["a"].sha256 == "1" * 64
    assert merged.packages["b"].version == "1"
    assert merged.kernels == {"default": ["k2"], "6.12": ["k0"]}
    assert old.packages["a"].version == "1"  # merge does not mutate


def test_lock_loads_empty():
    assert Lock.loads("") == Lock()


def test_stale_warning_text():
    w = locks.stale_warning("libc6", "2.41-12+deb13u5", "2.41-12+deb13u6")
    assert "images/lock.json pins libc6 2.41-12+deb13u5 but the mirror now has 2.41-12+deb13u6" in w
    assert "smccc-harness assets lock" in w


def test_sources_list_and_manifest():
    m = locks.load_manifest()
    assert m.flavour == "cloud-arm64" and "trixie-backports" in m.suites
    assert {"busybox-static", "python3.13-minimal", "libffi8"} <= set(m.rootfs_packages)
    text = locks.sources_list(m, "arm64")
    assert text.count("\n") == len(m.suites)
    assert f"deb [arch=arm64 signed-by={m.keyring}] {m.mirror} trixie main" in text


def test_committed_lock_is_consistent():
    lock = Lock.loads(locks.LOCK_FILE.read_text())
    for spec, names in lock.kernels.items():
        assert all(n in lock.packages for n in names), spec
    for e in lock.packages.values():
        assert len(e.sha256) == 64 and e.size > 0


def test_find_kernel_files(tmp_path):
    binary = tmp_path / "b"
    (binary / "usr/lib/modules/7.3.4+deb13-cloud-arm64").mkdir(parents=True)
    (binary / "usr/lib/modules/7.3.4+deb13-cloud-arm64/vmlinuz").write_bytes(b"MZ")
    base = tmp_path / "c"
    (base / "usr/lib/modules/7.3.4+deb13-cloud-arm64").mkdir(parents=True)
    (base / "usr/lib/modules/7.3.4+deb13-cloud-arm64/config").write_text("CONFIG_KVM=y\n")
    image, config, ver = assets.find_kernel_files([binary, base])
    assert ver == "7.3.4+deb13-cloud-arm64" and image.name == "vmlinuz" and config.name == "config"
    old = tmp_path / "old"
    (old / "boot").mkdir(parents=True)
    (old / "boot/vmlinuz-6.12.117+deb13-cloud-arm64").write_bytes(b"MZ")
    (old / "boot/config-6.12.117+deb13-cloud-arm64").write_text("")
    image, config, ver = assets.find_kernel_files([old])
    assert ver == "6.12.117+deb13-cloud-arm64" and config is not None
    with pytest.raises(AssetError, match="no vmlinuz"):
        assets.find_kernel_files([tmp_path / "nothing"])


def test_lock_pruned_drops_unreferenced():
    lock = Lock("m", {"a": entry("a", "1"), "k": entry("k", "1"), "old": entry("old", "1")}, {"default": ["k"]})
    assert set(lock.pruned(["a"]).packages) == {"a", "k"}


def test_lock_pruned_keeps_the_modules_of_a_kept_kernel_at_its_version():
    r = "7.3.4+deb13-cloud-arm64"
    lock = Lock("m", {f"linux-binary-{r}": entry(f"linux-binary-{r}", "7.3.4-1"),
                      f"linux-modules-{r}": entry(f"linux-modules-{r}", "7.3.4-1"),
                      "linux-modules-6.1.0-9-arm64": entry("linux-modules-6.1.0-9-arm64", "6.1.1-1"),
                      "linux-modules-7.3.4+deb13-rt-arm64": entry("linux-modules-7.3.4+deb13-rt-arm64", "7.3.4-1")},
                {"default": [f"linux-binary-{r}"]})
    assert set(lock.pruned([]).packages) == {f"linux-binary-{r}", f"linux-modules-{r}"}


def test_the_optional_ssh_group_is_part_of_the_manifest():
    assert "dropbear-bin" in locks.load_manifest().optional_packages


class _FullDiskApt:
    """apt-get download as it behaves on a full disk: part of the file written, then ENOSPC."""
    updated = True

    def __init__(self, size: int) -> None:
        self.size = size

    def ensure_lists(self) -> None:
        pass

    def show(self, name, version):
        return {"Size": str(self.size), "SHA256": "0" * 64, "Architecture": "arm64"}

    def download(self, name, version, into: Path) -> Path:
        (into / f"{name}_{version}_arm64.deb").write_bytes(b"\0" * 1000)       # half-written
        raise AssetError(f"apt-get download {name}={version} failed:\nE: Write error - write (28: No space "
                                "left on device)")


@pytest.mark.parametrize("size,what", [(10, "ENOSPC in the middle of apt's download"),
                                       (1 << 50, "more than the free space: refused before apt runs")])
def test_full_disk_download_is_refused_and_leaves_nothing_half_written(tmp_path, monkeypatch, size, what):
    monkeypatch.setenv("SMCCC_HARNESS_CACHE", str(tmp_path / "cache"))
    store = stores.Store(lambda *_: None)
    store.apt = _FullDiskApt(size)
    store.debs.mkdir(parents=True)
    (store.debs / ("1" * 64 + ".deb")).write_bytes(b"cached")
    with pytest.raises(AssetError, match=r"^no space left in .*/debs while downloading libx 1\.0") as ei:
        store.download("libx", "1.0", "trixie")
    assert "SMCCC_HARNESS_CACHE" in ei.value.hint, what
    assert sorted(p.name for p in store.debs.iterdir()) == ["1" * 64 + ".deb"], what
