"""harness.images.cpio + harness.images.initramfs: the pure parts (newc layout, determinism, file selection, cache keys)."""

import io
import random
import stat

import pytest

from harness.images import cpio, initramfs


# ---- a tiny newc reader (the host has no cpio) ---------------------------------------------------
def read_newc(blob: bytes) -> list[dict]:
    out, off = [], 0
    while True:
        assert blob[off:off + 6] == b"070701", f"bad magic at {off}"
        f = [int(blob[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, check = f
        name = blob[off + 110: off + 110 + namesize - 1].decode()
        assert blob[off + 110 + namesize - 1] == 0
        off += 110 + namesize
        off += -off % 4
        data = blob[off: off + size]
        off += size
        off += -off % 4
        if name == "TRAILER!!!":
            assert off == len(blob)
            return out
        out.append({"name": name, "ino": ino, "mode": mode, "uid": uid, "gid": gid, "nlink": nlink, "mtime": mtime,
                        "data": data, "rdev": (rmaj, rmin), "check": check})


def archive(entries) -> bytes:
    buf = io.BytesIO()
    n = cpio.write(buf, entries)
    assert n == len(buf.getvalue()) and n % 4 == 0
    return buf.getvalue()


def test_header_layout_hand_computed():
    # ino 1, regular 0644, nlink 1, 5 bytes of data, name "a\0" (namesize 2)
    h = cpio.header(1, stat.S_IFREG | 0o644, 1, 5, 2)
    assert h == (b"070701" b"00000001" b"000081A4" b"00000000" b"00000000" b"00000001" b"00000000"
                 b"00000005" b"00000000" b"00000000" b"00000000" b"00000000" b"00000002" b"00000000")
    assert len(h) == 110
    blob = archive([cpio.file("a", b"hello")])
    # header(110) + "a\0" (112, aligned) + "hello" + 3 pad -> the trailer at 120
    assert blob[:110] == h and blob[110:112] == b"a\0" and blob[112:117] == b"hello"
    assert blob[117:120] == b"\0\0\0" and blob[120:126] == b"070701"
    assert blob[120 + 110: 120 + 110 + 11] == b"TRAILER!!!\0"


def test_round_trip_and_parents():
    blob = archive([
        cpio.file("/usr/bin/python3.13", b"\x7fELF", 0o755),
        cpio.symlink("usr/bin/python3", "python3.13"),
        cpio.chardev("dev/console", 5, 1),
        cpio.directory("tmp", 0o1777),
    ])
    ents = {e["name"]: e for e in read_newc(blob)}
    assert list(ents) == ["dev", "dev/console", "tmp", "usr", "usr/bin", "usr/bin/python3", "usr/bin/python3.13"]
    assert stat.S_ISDIR(ents["usr"]["mode"]) and ents["usr"]["mode"] & 0o7777 == 0o755
    assert ents["tmp"]["mode"] & 0o7777 == 0o1777
    assert stat.S_ISLNK(ents["usr/bin/python3"]["mode"]) and ents["usr/bin/python3"]["data"] == b"python3.13"
    assert ents["usr/bin/python3.13"]["mode"] == stat.S_IFREG | 0o755 and ents["usr/bin/python3.13"]["data"] == b"\x7fELF"
    assert stat.S_ISCHR(ents["dev/console"]["mode"]) and ents["dev/console"]["rdev"] == (5, 1)
    assert [e["ino"] for e in ents.values()] == list(range(1, 8))
    assert all(e["uid"] == 0 and e["gid"] == 0 and e["mtime"] == 0 and e["check"] == 0 for e in ents.values())


def test_deterministic_regardless_of_order(tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"x" * 1001)
    entries = [cpio.file(f"d{i % 3}/f{i}", bytes([i]) * i, 0o644) for i in range(30)]
    entries += [cpio.file("big", source=src), cpio.symlink("lib", "usr/lib"), cpio.directory("opt/smccc")]
    a = archive(entries)
    shuffled = entries[:]
    random.Random(1).shuffle(shuffled)
    assert archive(shuffled) == a
    assert archive(entries) == a
    out = tmp_path / "x.cpio"
    assert cpio.build(out, shuffled) == len(a) and out.read_bytes() == a


def test_last_duplicate_wins_and_dotdot_rejected():
    ents = read_newc(archive([cpio.directory("tmp"), cpio.directory("tmp", 0o1777)]))
    assert ents[0]["mode"] & 0o7777 == 0o1777
    with pytest.raises(ValueError):
        cpio.file("../etc/passwd", b"")


# ---- file selection ------------------------------------------------------------------------------
@pytest.mark.parametrize(("pkg", "rel", "want"), [
    ("busybox-static", "usr/bin/busybox", "bin/busybox"),
    ("busybox-static", "usr/share/doc/busybox-static/copyright", None),
    ("python3.13-minimal", "usr/bin/python3.13", "usr/bin/python3.13"),
    ("python3.13-minimal", "usr/lib/binfmt.d/python3.13.conf", None),
    ("libpython3.13-minimal", "usr/lib/python3.13/os.py", "usr/lib/python3.13/os.py"),
    ("libpython3.13-minimal", "./usr/lib/python3.13/json/decoder.py", "usr/lib/python3.13/json/decoder.py"),
    ("libpython3.13-minimal", "usr/lib/python3.13/__pycache__/os.cpython-313.pyc", None),
    ("libpython3.13-minimal", "usr/lib/python3.13/sitecustomize.py", None),
    ("libpython3.13-minimal", "usr/lib/python3.13/lib-dynload/_ssl.cpython-313-aarch64-linux-gnu.so", None),
    ("libpython3.13-minimal", "usr/lib/python3.13/test/test_os.py", None),
    ("libpython3.13-minimal", "usr/lib/python3.13/ensurepip/__init__.py", None),
    ("libpython3.13-minimal", "etc/python3.13/sitecustomize.py", None),
    ("libpython3.13-stdlib", "usr/lib/python3.13/lib-dynload/mmap.cpython-313-aarch64-linux-gnu.so",
     "usr/lib/python3.13/lib-dynload/mmap.cpython-313-aarch64-linux-gnu.so"),
    ("libpython3.13-stdlib", "usr/lib/python3.13/lib-dynload/_ctypes.cpython-313-aarch64-linux-gnu.so",
     "usr/lib/python3.13/lib-dynload/_ctypes.cpython-313-aarch64-linux-gnu.so"),
    ("libpython3.13-stdlib", "usr/lib/python3.13/lib-dynload/_ctypes_test.cpython-313-aarch64-linux-gnu.so", None),
    ("libpython3.13-stdlib", "usr/lib/python3.13/ctypes/__init__.py", "usr/lib/python3.13/ctypes/__init__.py"),
    ("libpython3.13-stdlib", "usr/lib/python3.13/ctypes/macholib/dyld.py", "usr/lib/python3.13/ctypes/macholib/dyld.py"),
    ("libpython3.13-stdlib", "usr/lib/python3.13/asyncio/base_events.py", None),
    ("libpython3.13-stdlib", "usr/lib/python3.13/tkinter/__init__.py", None),
    ("libpython3.13-stdlib", "usr/lib/python3.13/idlelib/idle.py", None),
    ("libc6", "usr/lib/aarch64-linux-gnu/libc.so.6", "usr/lib/aarch64-linux-gnu/libc.so.6"),
    ("libc6", "usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1", "usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1"),
    ("libc6", "usr/lib/ld-linux-aarch64.so.1", "usr/lib/ld-linux-aarch64.so.1"),
    ("libc6", "usr/lib/aarch64-linux-gnu/gconv/UTF-16.so", None),
    ("libc6", "usr/lib/aarch64-linux-gnu/libnss_dns.so.2", None),
    ("zlib1g", "usr/lib/aarch64-linux-gnu/libz.so.1", "usr/lib/aarch64-linux-gnu/libz.so.1"),
    ("zlib1g", "usr/lib/aarch64-linux-gnu/libz.so.1.3.1", "usr/lib/aarch64-linux-gnu/libz.so.1.3.1"),
    ("libexpat1", "usr/lib/aarch64-linux-gnu/libexpat.so.1.13.0", "usr/lib/aarch64-linux-gnu/libexpat.so.1.13.0"),
    ("libexpat1", "usr/lib/aarch64-linux-gnu/libexpatw.so.1", None),
    ("libffi8", "usr/lib/aarch64-linux-gnu/libffi.so.8", "usr/lib/aarch64-linux-gnu/libffi.so.8"),
    ("linux-binary-7.3.4+deb13-cloud-arm64", "usr/lib/modules/7.3.4+deb13-cloud-arm64/vmlinuz", None),
])
def test_select(pkg, rel, want):
    assert initramfs.select(pkg, rel) == want


def test_guest_sources_ship_guest_code_only():
    src = initramfs.guest_sources()
    assert "opt/smccc/harness/__init__.py" in src and "opt/smccc/harness/protocol.py" in src
    assert "opt/smccc/harness/guest/__init__.py" in src
    for host_only in ("assets", "initramfs", "cpio", "paths", "sysdeps", "qemu", "console", "channel", "cli"):
        assert f"opt/smccc/harness/{host_only}.py" not in src
    mods = initramfs.guest_modules(src)
    assert "harness" in mods and "harness.protocol" in mods and "harness.guest" in mods


def test_guest_modules_names():
    src = {"opt/smccc/harness/__init__.py": None, "opt/smccc/harness/guest/__init__.py": None,
           "opt/smccc/harness/guest/agent.py": None, "opt/smccc/harness/guest/sub/x.py": None}
    assert initramfs.guest_modules(src) == ["harness", "harness.guest", "harness.guest.agent", "harness.guest.sub.x"]


SHAS = {"busybox-static": "a" * 64, "libc6": "b" * 64}


def test_keys_change_with_inputs():
    files = {"init": b"#!/bin/busybox sh\n", "opt/smccc/harness/guest/agent.py": b"print(1)\n"}
    k = initramfs.initramfs_key(SHAS, files)
    assert k == initramfs.initramfs_key(dict(reversed(list(SHAS.items()))), dict(reversed(list(files.items()))))
    assert initramfs.initramfs_key(SHAS, {**files, "opt/smccc/harness/guest/agent.py": b"print(2)\n"}) != k
    assert initramfs.initramfs_key(SHAS, {**files, "opt/smccc/harness/guest/new.py": b""}) != k
    assert initramfs.initramfs_key({**SHAS, "libc6": "c" * 64}, files) != k
    # the compiled-stdlib key depends on the packages only
    assert initramfs.base_key(SHAS) == initramfs.base_key(dict(SHAS))
    assert initramfs.base_key({**SHAS, "libc6": "c" * 64}) != initramfs.base_key(SHAS)


def test_key_changes_with_builder_version(monkeypatch):
    k = initramfs.initramfs_key(SHAS, {"init": b""})
    monkeypatch.setattr(initramfs, "BUILDER_VERSION", initramfs.BUILDER_VERSION + 1)
    assert initramfs.initramfs_key(SHAS, {"init": b""}) != k
