"""harness.images.qemu_build: the cache key, patch application and its failure message, the atomic install.

The build itself runs against a small fake source tree (a ``configure`` and a Makefile that write a fake
``qemu-system-aarch64``): the steps, the install into the cache and what a failure leaves behind are the real
code; only Debian's download and QEMU's compile are replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.images import qemu_build as qb

VERSION = "1:10.0.2+ds-2+deb13u1~bpo12+1"

# `apt-get source --download-only qemu=1:10.0.2+ds-2+deb13u1~bpo12+1` through the private deb-src apt,
# recorded 2026-12-03: the Sources index still names the backport, the pool no longer has its files.
APT_SOURCE_404 = """\
Reading package lists...
NOTICE: 'qemu' packaging is maintained in the 'Git' version control system at:
https://salsa.debian.org/qemu-team/qemu.git
Need to get 39.6 MB of source archives.
Err:1 http://deb.debian.org/debian bookworm-backports/main qemu 1:10.0.2+ds-2+deb13u1~bpo12+1 (dsc)
  404  Not Found [IP: 203.0.113.80 80]
E: Failed to fetch http://deb.debian.org/debian/pool/main/q/qemu/qemu_10.0.2%2bds-2%2bdeb13u1%7ebpo12%2b1.dsc  404  Not Found [IP: 203.0.113.80 80]
E: Failed to fetch http://deb.debian.org/debian/pool/main/q/qemu/qemu_10.0.2%2bds-2%2bdeb13u1%7ebpo12%2b1.debian.tar.xz  404  Not Found [IP: 203.0.113.80 80]
E: Failed to fetch some archives.
"""

# `apt-cache showsrc qemu` (bookworm + trixie deb-src lines), Version fields only, recorded 2026-12-03
SHOWSRC = """\
Package: qemu
Version: 1:7.2+dfsg-7+deb12u18
Package: qemu
Version: 1:10.0.2+ds-2+deb13u1~bpo12+1
Package: qemu
Version: 1:10.0.13+ds-0+deb13u1
Package: qemu
Version: 1:10.0.2+ds-2+deb13u1
Package: qemu
Version: 1:10.2.2+ds-1
Package: qemu
Version: 1:10.0.13+ds-0+deb13u1
"""


def _patch(tmp_path: Path, name: str, body: str, message: str = "fix it") -> Path:
    p = tmp_path / name
    p.write_text(f"From 0000 Mon Sep 17 00:00:00 2001\nSubject: [PATCH] {message}\n\n{message}\n---\n{body}")
    return p


HELLO_PATCH = """\
diff --git a/src/hello.c b/src/hello.c
--- a/src/hello.c
+++ b/src/hello.c
@@ -1,3 +1,3 @@
 int main(void)
 {
-    return 1;
+    return 0;
 }
"""


# ---- the key ------------------------------------------------------------------------------------------
def test_key_names_the_version_and_the_patch_hash(tmp_path):
    p = _patch(tmp_path, "0001-a.patch", HELLO_PATCH)
    digest = qb.patch_hash([p])
    assert len(digest) == 12 and int(digest, 16) >= 0
    assert qb.build_key(VERSION, digest) == f"1_10.0.2+ds-2+deb13u1_bpo12+1-{digest}"
    assert qb.FIX_TOKEN in qb.pkgversion(digest) and digest in qb.pkgversion(digest)
    assert qb.upstream_version(VERSION) == "10.0.2"


def test_hash_follows_the_code_not_the_message(tmp_path):
    a = _patch(tmp_path, "0001-a.patch", HELLO_PATCH, message="first wording")
    b = _patch(tmp_path, "0001-b.patch", HELLO_PATCH, message="a reworded commit message")
    c = _patch(tmp_path, "0001-c.patch", HELLO_PATCH.replace("return 0;", "return 2;"))
    d = _patch(tmp_path, "0002-d.patch", HELLO_PATCH.replace("hello.c", "other.c"))
    assert qb.patch_hash([a]) == qb.patch_hash([b])                 # a message does not rebuild QEMU
    assert qb.patch_hash([a]) != qb.patch_hash([c])                 # a code change does
    assert qb.patch_hash([a, d]) != qb.patch_hash([d, a])           # so does the order
    assert qb.patch_hash([a]) != qb.patch_hash([a, d])
    assert qb.patch_hash([a]) != qb.patch_hash([a], flags=qb.CONFIGURE_FLAGS + ("--enable-debug",))
    assert qb.patch_hash([a]) != qb.patch_hash([a], recipe=qb.RECIPE + 1)


def test_the_project_series_is_found_in_name_order():
    files = qb.patch_files()
    assert files and [p.name for p in files] == sorted(p.name for p in files)
    text = files[0].read_text()
    assert "Subject: [PATCH] target/arm:" in text and "Signed-off-by:" in text
    assert "target/arm/machine.c" in text and "gt_post_load" in text


def test_no_patches_is_an_error(tmp_path):
    with pytest.raises(HarnessError, match="no QEMU patches"):
        qb.patch_files(tmp_path)


@pytest.mark.parametrize("bad", ["", "10.0 2", "1:10.0.2/../x", "$(reboot)"])
def test_bad_version_is_refused(bad):
    with pytest.raises(HarnessError, match="is not a Debian version"):
        qb.build_key(bad, "0" * 12)


# ---- sources ------------------------------------------------------------------------------------------
def test_source_lines_and_backport_origin():
    text = qb.source_lines("http://deb.debian.org/debian/", "bookworm", "/k.gpg")
    assert text.splitlines() == [
        "deb-src [signed-by=/k.gpg] http://deb.debian.org/debian bookworm main",
        "deb-src [signed-by=/k.gpg] http://deb.debian.org/debian bookworm-updates main",
        "deb-src [signed-by=/k.gpg] http://deb.debian.org/debian bookworm-backports main",
        "deb-src [signed-by=/k.gpg] http://deb.debian.org/debian-security bookworm-security main"]
    assert "security" not in qb.source_lines("http://mirror.example/deb", "trixie", "/k.gpg")
    assert qb.origin_codename(VERSION) == "trixie"
    assert qb.origin_codename("1:10.0.13+ds-0+deb13u1") == "trixie"
    assert qb.origin_codename("1:7.2+dfsg-7+deb12u18") == "bookworm"
    assert qb.origin_codename("1:10.2.2+ds-1") is None


def test_same_series_newest_first():
    versions = qb.showsrc_versions(SHOWSRC)
    assert versions[0] == "1:10.2.2+ds-1" and len(versions) == len(set(versions)) == 5
    assert qb.same_series(VERSION, versions) == ["1:10.0.13+ds-0+deb13u1", "1:10.0.2+ds-2+deb13u1"]


def test_missing_source_names_the_version():
    e = qb.parse_apt_source_error(VERSION, APT_SOURCE_404)
    assert VERSION in str(e) and "404" in str(e) and "--source-version" in e.hint
    assert "installed QEMU is unchanged" in e.hint


# ---- patches --------------------------------------------------------------------------------------------
def _tree(tmp_path: Path, hello: str = "int main(void)\n{\n    return 1;\n}\n") -> Path:
    t = tmp_path / "tree"
    (t / "src").mkdir(parents=True)
    (t / "src" / "hello.c").write_text(hello)
    return t


def test_patches_apply_in_order(tmp_path):
    tree = _tree(tmp_path)
    p1 = _patch(tmp_path, "0001-a.patch", HELLO_PATCH)
    second = HELLO_PATCH.replace("-    return 1;\n+    return 0;", "-    return 0;\n+    return 7;")
    p2 = _patch(tmp_path, "0002-b.patch", second)
    qb.apply_patches(tree, [p1, p2], VERSION, tmp_path / "log")
    assert "return 7;" in (tree / "src" / "hello.c").read_text()


def test_a_patch_that_no_longer_applies_names_file_and_hunk(tmp_path):
    tree = _tree(tmp_path, hello="int main(void)\n{\n    return 42;\n}\n")
    before = (tree / "src" / "hello.c").read_text()
    ok = _patch(tmp_path, "0001-ok.patch", HELLO_PATCH.replace("hello.c", "other.c"))
    (tree / "src" / "other.c").write_text("int main(void)\n{\n    return 1;\n}\n")
    bad = _patch(tmp_path, "0002-bad.patch", HELLO_PATCH)
    with pytest.raises(qb.QemuBuildError) as ei:
        qb.apply_patches(tree, [ok, bad], VERSION, tmp_path / "log")
    msg = str(ei.value)
    assert "patch 0002-bad.patch does not apply to Debian's qemu " + VERSION in msg
    assert "checking file src/hello.c" in msg and "Hunk #1 FAILED at 1" in msg
    assert "rebase it on qemu 10.0.2" in ei.value.hint
    assert (tree / "src" / "hello.c").read_text() == before            # the dry run changed nothing
    assert not list(tree.rglob("*.rej")) and not list(tree.rglob("*.orig"))


def test_the_project_patch_on_a_tree_it_does_not_fit(tmp_path):
    """The real series against a tree whose target/arm files differ: the first failing file and hunk."""
    tree = tmp_path / "tree"
    (tree / "target" / "arm").mkdir(parents=True)
    for name in ("cpu.h", "helper.c", "machine.c"):
        (tree / "target" / "arm" / name).write_text("/* not QEMU */\n" * 5)
    with pytest.raises(qb.QemuBuildError) as ei:
        qb.apply_patches(tree, qb.patch_files(), "1:99.0.0+ds-1", tmp_path / "log")
    msg = str(ei.value)
    assert qb.patch_files()[0].name in msg and "1:99.0.0+ds-1" in msg
    assert "checking file target/arm/cpu.h" in msg and "FAILED" in msg


def test_a_patch_for_a_missing_file(tmp_path):
    tree = _tree(tmp_path)
    bad = _patch(tmp_path, "0001-x.patch", HELLO_PATCH.replace("src/hello.c", "src/gone.c"))
    with pytest.raises(qb.QemuBuildError, match=r"0001-x.patch does not apply.*(can't find file|No file to patch)"):
        qb.apply_patches(tree, [bad], VERSION, tmp_path / "log")


# ---- the build and the atomic install --------------------------------------------------------------
CONFIGURE = """\
#!/bin/sh
# fake QEMU configure: remember the pkgversion
for a in "$@"; do
  case "$a" in --with-pkgversion=*) echo "${a#--with-pkgversion=}" > pkgversion ;; esac
done
echo "configure $*" > configured
"""

MAKEFILE = """\
all:
\tmkdir -p out
\tprintf '#!/bin/sh\\necho "QEMU emulator version 10.0.2 (%s)"\\n' "$$(cat pkgversion)" > out/qemu-system-aarch64
\tchmod +x out/qemu-system-aarch64
\t$(FAIL)

install:
\tmkdir -p $(DESTDIR)/usr/bin $(DESTDIR)/usr/share/qemu
\tcp out/qemu-system-aarch64 $(DESTDIR)/usr/bin/
\techo data > $(DESTDIR)/usr/share/qemu/keymap
"""


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """build() against a fake source tree in a private cache; returns (cache, calls)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SMCCC_HARNESS_CACHE", str(cache))
    src = _tree(tmp_path)
    (src / "configure").write_text(CONFIGURE)
    (src / "configure").chmod(0o755)
    (src / "Makefile").write_text(MAKEFILE)
    patches = tmp_path / "patches"
    patches.mkdir()
    _patch(patches, "0001-a.patch", HELLO_PATCH)
    calls = []

    def fetch(requested, progress=print, exact=True):
        calls.append(requested)
        return requested, tmp_path / "fake.dsc"

    monkeypatch.setattr(qb, "fetch_source", fetch)
    monkeypatch.setattr(qb, "unpack", lambda dsc, dest, log: shutil.copytree(src, dest))
    monkeypatch.setattr(qb, "ensure_build_packages", lambda progress=print: None)    # the CLI path installs
    return cache, calls, patches, src


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "qemu").iterdir() if p.name.startswith("."))


def test_build_installs_atomically_and_is_cached(fake_build, capsys):
    cache, calls, patches, _ = fake_build
    b = qb.build(VERSION, patch_dir=patches, jobs=1, install_deps=False, progress=lambda m: None)
    assert not b.cached and calls == [VERSION]
    assert b.root == cache / "qemu" / qb.build_key(VERSION, qb.patch_hash(qb.patch_files(patches)))
    assert b.path == b.root / "bin" / "qemu-system-aarch64" and os.access(b.path, os.X_OK)
    out = subprocess.run([str(b.path), "--version"], capture_output=True, text=True, check=True).stdout
    assert qb.FIX_TOKEN in out and b.digest in out
    info = json.loads((b.root / "build-info.json").read_text())
    assert info["source_version"] == VERSION and info["patches"] == ["0001-a.patch"]
    assert info["patch_hash"] == b.digest and "--target-list=aarch64-softmmu" in info["configure"]
    assert (b.root / "share" / "qemu" / "keymap").is_file() and (b.root / "build.log").is_file()
    assert _leftovers(cache) == []                     # no temp dir behind
    again = qb.build(VERSION, patch_dir=patches, install_deps=False, progress=lambda m: None)
    assert again.cached and again.path == b.path and again.build_s == b.build_s
    assert calls == [VERSION]                          # nothing fetched or built the second time


@pytest.mark.parametrize(("make_var", "expect"), [
    ("FAIL=exit 1", "make failed"),                                   # a compile error (or a full disk)
    ("FAIL=kill -TERM $$PPID", "make failed"),                        # make killed (TERM: a background CI job ignores INT)
])
def test_a_failed_build_leaves_nothing_half_written(fake_build, monkeypatch, make_var, expect):
    cache, _, patches, src = fake_build
    (src / "Makefile").write_text(f"{make_var}\n" + MAKEFILE)
    with pytest.raises(qb.QemuBuildError) as ei:
        qb.build(VERSION, patch_dir=patches, install_deps=False, progress=lambda m: None)
    assert expect in str(ei.value)
    key = qb.build_key(VERSION, qb.patch_hash(qb.patch_files(patches)))
    assert not (cache / "qemu" / key).exists() and qb.lookup(VERSION, qb.patch_hash(qb.patch_files(patches))) is None
    assert _leftovers(cache) == []
    failed = cache / "qemu" / f"failed-{key}.log"
    assert failed.is_file() and str(failed) in ei.value.hint and "configure" in failed.read_text()


def test_a_binary_without_the_token_is_not_installed(fake_build):
    cache, _, patches, src = fake_build
    (src / "configure").write_text("#!/bin/sh\necho 'Debian 1:10.0.2' > pkgversion\n")
    with pytest.raises(qb.QemuBuildError, match="does not report 'smccc-fix:el2-timers'"):
        qb.build(VERSION, patch_dir=patches, install_deps=False, progress=lambda m: None)
    assert [p.name for p in (cache / "qemu").iterdir() if not p.name.startswith("failed-")] == []


def test_a_patch_failure_stops_before_configure(fake_build):
    cache, _, patches, src = fake_build
    (src / "src" / "hello.c").write_text("int main(void) { return 3; }\n")
    with pytest.raises(qb.QemuBuildError, match=r"0001-a.patch does not apply.*Hunk #1 FAILED"):
        qb.build(VERSION, patch_dir=patches, install_deps=False, progress=lambda m: None)
    log = next((cache / "qemu").glob("failed-*.log")).read_text()
    assert "--dry-run" in log and "./configure" not in log
    assert _leftovers(cache) == []


def test_a_leftover_without_its_record_is_rebuilt(fake_build):
    cache, calls, patches, _ = fake_build
    key = qb.build_key(VERSION, qb.patch_hash(qb.patch_files(patches)))
    half = cache / "qemu" / key / "bin"
    half.mkdir(parents=True)
    (half / "qemu-system-aarch64").write_text("#!/bin/sh\n")      # no build-info.json: not complete
    (half / "qemu-system-aarch64").chmod(stat.S_IRWXU)
    b = qb.build(VERSION, patch_dir=patches, install_deps=False, progress=lambda m: None)
    assert not b.cached and calls == [VERSION] and (b.root / "build-info.json").is_file()


def test_a_fallback_version_is_remembered(fake_build, monkeypatch):
    _, calls, patches, _ = fake_build
    newer = "1:10.0.13+ds-0+deb13u1"

    def fetch(requested, progress=print, exact=True):
        calls.append(requested)
        assert not exact
        return newer, Path("fake.dsc")

    monkeypatch.setattr(qb, "fetch_source", fetch)
    monkeypatch.setattr(qb, "installed_source_version", lambda package=qb.HOST_PACKAGE: VERSION)
    b = qb.build(patch_dir=patches, install_deps=False, progress=lambda m: None)
    assert b.version == newer and b.root.name.startswith("1_10.0.13+ds-0+deb13u1-")
    again = qb.build(patch_dir=patches, install_deps=False, progress=lambda m: None)
    assert again.cached and again.path == b.path and calls == [VERSION]


def test_cli_prints_the_path(fake_build, capsys):
    from harness import cli
    _, _, patches, _ = fake_build
    assert cli.main(["qemu", "build", "--source-version", VERSION, "--patches", str(patches)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].endswith("/bin/qemu-system-aarch64") and Path(out[-1]).is_file()
    assert any(line.startswith("[smccc-harness] built ") for line in out)
    assert cli.main(["qemu", "build", "--source-version", VERSION, "--patches", str(patches)]) == 0
    out2 = capsys.readouterr().out.strip().splitlines()
    assert out2[-1] == out[-1] and any("[smccc-harness] cached " in line for line in out2)


def test_cli_bad_version_exits_2(fake_build, capsys):
    from harness import cli
    _, _, patches, _ = fake_build
    assert cli.main(["qemu", "build", "--source-version", "not a version", "--patches", str(patches)]) == 2
    assert "is not a Debian version" in capsys.readouterr().err
