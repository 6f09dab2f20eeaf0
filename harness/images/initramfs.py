"""The guest initramfs: busybox + Debian's python3.13 (-minimal, precompiled) + harness guest code + /init.

Two cache levels under ``cache_dir()``:

* ``rootfs/<base key>/`` — busybox, python3.13, the libraries it needs and the filtered stdlib with
  unchecked-hash .pyc files compiled by the guest's own python3.13 under ``qemu-aarch64``.  Key: the
  rootfs package sha256s + :data:`BUILDER_VERSION`.  Built once per package set (~15 s).
* ``initramfs/<key>.cpio`` — an uncompressed, deterministic newc archive of that tree + ``images/init`` +
  ``harness/{__init__,protocol}.py`` + ``harness/guest/`` (+ their .pyc).  Key: the base key + every
  shipped source file.  Rebuilt in ~1–2 s when guest code changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from ..errors import AssetError
from ..paths import IMAGES_DIR, REPO_ROOT, cache_dir, prune_newest
from . import cpio

BUILDER_VERSION = 1
PY = "python3.13"
PYLIB = f"usr/lib/{PY}"
MULTIARCH = "usr/lib/aarch64-linux-gnu"
GUEST_ROOT = "opt/smccc"  # the guest's cwd; `harness` is importable from here

BUSYBOX_APPLETS = (
    "sh", "ash", "mount", "umount", "mkdir", "cat", "echo", "poweroff", "reboot", "halt", "ls", "dmesg", "sleep",
    "ps", "kill", "cp", "mv", "rm", "ln", "grep", "sed", "head", "tail", "wc", "uname", "env", "true", "false",
    "test", "[", "printf", "hexdump", "od", "stat", "sync", "chmod", "find", "date", "dd", "free", "mknod",
    "stty", "setsid", "cttyhack", "timeout", "xargs", "tr", "cut", "sort", "uptime", "vi",
)
RUNTIME_DIRS = ("proc", "sys", "dev", "tmp", "run", "root", GUEST_ROOT, "etc", "usr/lib64", "usr/sbin")

# stdlib parts never needed by the guest agent (and big)
DROP_TOP = {
    "test", "idlelib", "ensurepip", "tkinter", "lib2to3", "pydoc_data", "turtledemo", "venv", "site-packages",
    "dist-packages", "__phello__", "sqlite3", "curses", "dbm", "_pyrepl", "config-3.13-aarch64-linux-gnu",
}
DROP_FILES = {"sitecustomize.py", "turtle.py", "pydoc.py", "EXTERNALLY-MANAGED", "LICENSE.txt"}
DROP_DYNLOAD = re.compile(r"^_(ssl|hashlib)\.")  # need libssl, which is not shipped
KEEP_LIBS = re.compile(r"^(ld-linux-aarch64\.so\.1|lib(c|m|dl|pthread|rt|util|z|expat|ffi)\.so\.[0-9.]+)$")
STDLIB_EXTRA = re.compile(r"^(lib-dynload/(mmap|_ctypes)\.cpython-[^/]*\.so|ctypes/.*)$")


# ==== file selection (pure) ========================================================================
def select(package: str, rel: str) -> str | None:
    """Where a file of an extracted package goes in the initramfs (relative path), or None to drop it.

    ``rel`` is the path inside the package, e.g. ``usr/lib/python3.13/os.py``.
    """
    rel = rel.lstrip("./")
    parts = rel.split("/")
    if "__pycache__" in parts:
        return None
    if package == "busybox-static":
        return "bin/busybox" if rel in ("bin/busybox", "usr/bin/busybox") else None
    if package == f"{PY}-minimal":
        return rel if rel == f"usr/bin/{PY}" else None
    if package in (f"lib{PY}-minimal", f"lib{PY}-stdlib"):
        if not rel.startswith(PYLIB + "/"):
            return None
        sub = rel[len(PYLIB) + 1:]
        top = sub.split("/")[0]
        if package.endswith("-stdlib"):
            if not STDLIB_EXTRA.match(sub):
                return None
            if "/test" in sub or sub.startswith("ctypes/test"):
                return None
            return rel
        if top in DROP_TOP or sub in DROP_FILES:
            return None
        if sub.startswith("lib-dynload/") and DROP_DYNLOAD.match(parts[-1]):
            return None
        return rel
    if package in ("libc6", "zlib1g", "libexpat1", "libffi8"):
        if rel == "usr/lib/ld-linux-aarch64.so.1" or rel == "lib/ld-linux-aarch64.so.1":
            return "usr/lib/ld-linux-aarch64.so.1"
        d, _, name = rel.rpartition("/")
        if d in (MULTIARCH, "lib/aarch64-linux-gnu") and KEEP_LIBS.match(name):
            return f"{MULTIARCH}/{name}"
        return None
    return None


def guest_sources(repo: Path = REPO_ROOT) -> dict[str, Path]:
    """The harness files shipped to the guest: initramfs path -> host path (host-only modules excluded)."""
    out = {
        f"{GUEST_ROOT}/harness/__init__.py": repo / "harness" / "__init__.py",
        f"{GUEST_ROOT}/harness/protocol.py": repo / "harness" / "protocol.py",
    }
    guest = repo / "harness" / "guest"
    for p in sorted(guest.rglob("*.py")):
        if "__pycache__" in p.parts:
            continue
        out[f"{GUEST_ROOT}/harness/guest/{p.relative_to(guest).as_posix()}"] = p
    return out


def guest_modules(sources: dict[str, Path]) -> list[str]:
    """Dotted module names of the shipped harness files (for the build-time import check)."""
    mods = []
    for dest in sorted(sources):
        rel = dest[len(GUEST_ROOT) + 1:-3]
        parts = rel.split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


def base_key(package_shas: dict[str, str]) -> str:
    h = hashlib.sha256(f"smccc-rootfs v{BUILDER_VERSION}\n".encode())
    for name in sorted(package_shas):
        h.update(f"{name} {package_shas[name]}\n".encode())
    return h.hexdigest()[:32]


def initramfs_key(package_shas: dict[str, str], files: dict[str, bytes]) -> str:
    """sha256 over the base key, the builder version and every shipped file (path + content)."""
    h = hashlib.sha256(f"smccc-initramfs v{BUILDER_VERSION}\n{base_key(package_shas)}\n".encode())
    for dest in sorted(files):
        h.update(f"{dest}\0{len(files[dest])}\0".encode())
        h.update(files[dest])
    return h.hexdigest()[:32]


# ==== building =====================================================================================
def _qemu_user() -> str:
    q = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if not q:
        from ..errors import SetupError

        raise SetupError("qemu-aarch64 (qemu-user) is not installed; it byte-compiles the guest's stdlib",
                         hint="apt-get install qemu-user  (on Debian 12: -t bookworm-backports), or: smccc-harness setup")
    return q


def guest_python(tree: Path, args: list[str], cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the guest's python3.13 from ``tree`` under qemu-user (``-L tree``)."""
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [_qemu_user(), "-L", str(tree), str(tree / "usr/bin" / PY), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _stage_base(rootfs: dict[str, Path], tree: Path) -> int:
    n = 0
    for pkg, root in sorted(rootfs.items()):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                src = Path(dirpath) / fn
                dest = select(pkg, src.relative_to(root).as_posix())
                if dest is None or (tree / dest).exists() or (tree / dest).is_symlink():
                    continue
                _place(src, tree / dest)
                n += 1
    # merged-usr layout: the ELF interpreter /lib/ld-linux-aarch64.so.1 resolves through /lib -> usr/lib
    for d in ("usr/bin", "usr/lib64", "bin"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    os.symlink("usr/lib", tree / "lib")
    os.symlink("usr/lib64", tree / "lib64")
    os.symlink("bin", tree / "sbin")
    os.symlink(PY, tree / "usr/bin/python3")
    for applet in BUSYBOX_APPLETS:
        if applet != "busybox":
            os.symlink("busybox", tree / "bin" / applet)
    missing = [p for p in ("bin/busybox", f"usr/bin/{PY}", "usr/lib/ld-linux-aarch64.so.1", f"{PYLIB}/os.py",
                           f"{MULTIARCH}/libc.so.6", f"{MULTIARCH}/libz.so.1", f"{MULTIARCH}/libexpat.so.1",
                           f"{MULTIARCH}/libffi.so.8") if not (tree / p).exists()]
    if missing:
        raise AssetError(f"the rootfs packages lack {', '.join(missing)}",
                         hint="the Debian package layout changed; adjust harness/initramfs.select()")
    return n


def _compile(tree: Path, target: Path, ddir: str, what: str) -> None:
    r = guest_python(tree, ["-S", "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
                            "-d", ddir, str(target)])
    if r.returncode != 0:
        raise AssetError(f"byte-compiling {what} with the guest's {PY} failed (exit {r.returncode}):\n"
                         f"{(r.stdout + r.stderr).strip()[-3000:]}")


def ensure_base(rootfs: dict[str, Path], progress=print) -> Path:
    """The compiled base tree for these packages (cached by their sha256s)."""
    shas = {name: path.name for name, path in rootfs.items()}
    root = cache_dir() / "rootfs"
    dest = root / base_key(shas)
    if (dest / ".complete").exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    (cache_dir() / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir() / "locks" / "rootfs.lock")):
        if (dest / ".complete").exists():
            return dest
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
        try:
            n = _stage_base(rootfs, tmp)
            t1 = time.monotonic()
            progress(f"initramfs: staged {n} rootfs files in {t1 - t0:.1f} s; byte-compiling the stdlib "
                     f"with the guest's {PY} under qemu-user ...")
            _compile(tmp, tmp / PYLIB, "/" + PYLIB, "the stdlib")
            r = guest_python(tmp, ["-S", "-c", "import mmap, ctypes, fcntl, json, struct, select; print('ok')"])
            if r.returncode != 0 or r.stdout.strip() != "ok":
                raise AssetError(f"the guest's {PY} cannot import its core modules:\n{(r.stdout + r.stderr).strip()}")
            (tmp / ".complete").write_text(f"{BUILDER_VERSION}\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
            progress(f"initramfs: stdlib compiled in {time.monotonic() - t1:.1f} s")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _tree_entries(tree: Path, prefix: str = "") -> list[cpio.Entry]:
    out = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = prefix + p.relative_to(tree).as_posix()
            if rel == prefix + ".complete":
                continue
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out.append(cpio.symlink(rel, os.readlink(p)))
            elif stat.S_ISDIR(st.st_mode):
                out.append(cpio.directory(rel))
            elif stat.S_ISREG(st.st_mode):
                out.append(cpio.file(rel, source=p, mode=0o755 if st.st_mode & 0o111 else 0o644))
    return out


def _stage_guest(base: Path, sources: dict[str, Path], stage: Path) -> None:
    for dest, src in sources.items():
        d = stage / dest
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, d)
    _compile(base, stage / GUEST_ROOT / "harness", f"/{GUEST_ROOT}/harness", "the harness guest code")
    mods = guest_modules(sources)
    code = f"import importlib\nfor m in {mods!r}:\n    importlib.import_module(m)\nprint('ok')\n"
    r = guest_python(base, ["-S", "-c", code], cwd=stage / GUEST_ROOT, timeout=120)
    if r.returncode != 0 or not r.stdout.strip().endswith("ok"):
        raise AssetError(f"the guest's {PY} cannot import the harness guest code ({', '.join(mods)}):\n"
                         f"{(r.stdout + r.stderr).strip()[-3000:]}",
                         hint="harness/guest must run on Python 3.13 with the standard library only")


def build_initramfs(rootfs: dict[str, Path] | None = None, progress=print) -> Path:
    """A cached, uncompressed, deterministic newc cpio for the guest; returns its path."""
    if rootfs is None:
        from . import assets

        rootfs = assets.ensure_rootfs(progress)
    shas = {name: path.name for name, path in rootfs.items()}
    sources = guest_sources()
    init = IMAGES_DIR / "init"
    files = {dest: src.read_bytes() for dest, src in sources.items()}
    files["init"] = init.read_bytes()
    key = initramfs_key(shas, files)
    out_dir = cache_dir() / "initramfs"
    out = out_dir / f"{key}.cpio"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir() / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir() / "locks" / "initramfs.lock")):
        if out.exists():
            return out
        t0 = time.monotonic()
        base = ensure_base(rootfs, progress)
        t1 = time.monotonic()
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".guest-") as tmp:
            stage = Path(tmp)
            _stage_guest(base, sources, stage)
            entries = _tree_entries(base) + _tree_entries(stage / GUEST_ROOT, GUEST_ROOT + "/")
            entries += [cpio.directory(d) for d in RUNTIME_DIRS]
            entries += [cpio.directory("tmp", 0o1777), cpio.directory("root", 0o700),
                        cpio.chardev("dev/console", 5, 1, 0o600),
                        cpio.file("init", files["init"], 0o755)]
            size = cpio.build(out, entries)
        nfiles = sum(1 for e in entries if stat.S_ISREG(e.mode))
        progress(f"initramfs: {out} {size / 1e6:.1f} MB, {nfiles} files "
                 f"(guest code + cpio {time.monotonic() - t1:.1f} s, total {time.monotonic() - t0:.1f} s)")
    _prune(out_dir, keep=out)
    return out


def _prune(out_dir: Path, keep: Path, max_keep: int = 8) -> None:
    """Keep the newest few archives (guest code changes often)."""
    prune_newest(out_dir, "*.cpio", keep, max_keep)
