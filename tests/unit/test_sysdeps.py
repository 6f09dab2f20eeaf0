"""harness.images.sysdeps: the pure parts (version parsing, release -> QEMU source, mirror discovery)."""

import pytest

from harness.errors import HarnessError, SetupError
from harness.images import sysdeps


@pytest.mark.parametrize(("text", "want"), [
    ("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025", (10, 0, 2)),
    ("qemu-aarch64 version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)", (10, 0, 2)),
    ("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)", (7, 2, 15)),
    ("QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)", (8, 2, 2)),
    ("QEMU emulator version 9.0", (9, 0, 0)),
])
def test_parse_qemu_version(text, want):
    assert sysdeps.parse_qemu_version(text) == want


def test_parse_qemu_version_garbage():
    with pytest.raises(ValueError):
        sysdeps.parse_qemu_version("command not found")


def test_min_qemu_comparison():
    assert (8, 2, 2) < sysdeps.MIN_QEMU <= (9, 0, 0) <= (10, 0, 2)


@pytest.mark.parametrize(("dv", "osr", "want"), [
    ("12.11\n", "", "bookworm"),
    ("12.0", "", "bookworm"),
    ("13.1\n", "", "trixie"),
    ("13", "", "trixie"),
    ("trixie/sid\n", "", "trixie"),
    ("forky/sid", 'VERSION_CODENAME=forky\n', "forky"),
])
def test_codename(dv, osr, want):
    assert sysdeps.codename_from_debian_version(dv, osr) == want


def test_codename_unknown():
    with pytest.raises(SetupError):
        sysdeps.codename_from_debian_version("garbage")


def test_qemu_source_decision():
    assert sysdeps.qemu_source("bookworm") == "bookworm-backports"
    assert sysdeps.qemu_source("trixie") is None
    assert sysdeps.qemu_source("forky") is None


DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_deb822():
    assert sysdeps.mirror_from_sources("", DEB822, "bookworm") == "http://mirror.example.org/debian"


def test_mirror_from_one_line():
    text = ("# comment\ndeb http://security.debian.org/debian-security bookworm-security main\n"
            "deb [arch=amd64] http://ftp.de.debian.org/debian bookworm main contrib\n")
    assert sysdeps.mirror_from_sources(text, "", "bookworm") == "http://ftp.de.debian.org/debian"


def test_mirror_default():
    assert sysdeps.mirror_from_sources("", "", "bookworm") == sysdeps.DEFAULT_MIRROR


def test_backports_line():
    assert sysdeps.backports_line("http://deb.debian.org/debian", "bookworm") == \
        "deb http://deb.debian.org/debian bookworm-backports main\n"


def test_setup_error_has_hint():
    e = SetupError("qemu-system-aarch64 8.2.2 is too old", hint="apt-get install -t bookworm-backports qemu-system-arm")
    assert isinstance(e, HarnessError)
    assert "bookworm-backports" in str(e) and e.hint


def test_check_qemu_too_old(monkeypatch):
    monkeypatch.setattr(sysdeps, "qemu_version", lambda binary="x": (8, 2, 2))
    with pytest.raises(SetupError, match=r"8\.2\.2 is too old: need >= 9\.0"):
        sysdeps.check_qemu()


def test_check_qemu_missing(monkeypatch):
    monkeypatch.setattr(sysdeps.shutil, "which", lambda name: None)
    with pytest.raises(SetupError, match="not found"):
        sysdeps.check_qemu("qemu-system-aarch64")
