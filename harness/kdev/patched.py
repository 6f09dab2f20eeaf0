"""``smccc-harness kernel source --patch FILE``: a patched copy of a kernel tree, made once and cached.

The copy is a hard-linked ``cp -al`` of the base tree (Debian's linux-source-7.3 unpacked in the cache:
seconds, no extra space but the directories), then every patch is applied in order with GNU patch
(``-p1 --forward --fuzz=0``: offsets are fine, fuzz is not, an already-applied patch is an error).  Before a
file is patched its hard link is broken (the file is copied to a new inode), so the base tree never changes,
whichever tool wrote the file.

Cached by a key over the base tree's path, the diff of every patch in order (not its mail headers or commit
message: rewording one keeps the tree, its O= build directory and ccache's objects) and the localversion: the
same inputs give the same tree (``<cache>/ksrc-patched/<key>/<base name>``), made once; its ``patches.json`` (next
to the tree, not in it) says what went in.  The tree is made under a temporary name and renamed into place
only when every patch applied, so a patch that does not apply (the error names the patch file, the file and
the hunk) leaves nothing behind.

``localversion``: a ``localversion-smccc-harness`` file in the tree's top directory, which kbuild appends to
the kernel release (scripts/setlocalversion reads ``$(srctree)/localversion*``), e.g. ``7.3.4`` ->
``7.3.4-kvm-nv-hcd-elr``.  ``--patches DIR`` applies ``DIR/*.patch`` in name order and adds the contents of
the ``DIR/localversion*`` files (in name order, as kbuild would concatenate them): a directory of fixes names
the release it builds.  harness/model/known_bad.py uses such a release tag to tell a kernel that carries a fix
(``KnownBad.fixed_by``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import HarnessError
from ..images.sysdeps import Requirement, ensure_packages

LOCALVERSION_FILE = "localversion-smccc-harness"
MANIFEST = "patches.json"
KEY_VERSION = "2"          # bump when the way a tree is made changes: old trees are then not reused
_LOCALVERSION_RE = re.compile(r"^[A-Za-z0-9._+-]{1,48}$")
PATCH_REQUIREMENTS = (Requirement("patch", "patch"),)     # GNU patch, installed on first use
_PATCH_ARGV = ["patch", "-p1", "--batch", "--forward", "--fuzz=0", "--no-backup-if-mismatch", "--reject-file=-"]


class PatchError(HarnessError):
    """A patch is missing, is not a patch, or does not apply to the base tree."""


@dataclass(frozen=True)
class Hunk:
    file: str          # the path the patch section names (new name, a/ b/ stripped)
    number: int        # 1-based within its file section, as GNU patch counts ("Hunk #2 FAILED")
    header: str        # "@@ -40,6 +40,17 @@ static int handle_hvc(struct kvm_vcpu *vcpu)"


@dataclass(frozen=True)
class PatchedTree:
    tree: Path
    key: str
    made: bool          # False: reused from the cache
    patches: tuple[Path, ...]
    localversion: str


# ---- reading a patch -----------------------------------------------------------------------------------------
def _strip(name: str) -> str:
    name = name.split("\t", 1)[0].strip()
    return name[2:] if name[:2] in ("a/", "b/") else name


def sections(text: str) -> list[tuple[str, str, list[str]]]:
    """(old path, new path, hunk headers) for each file a unified diff touches, in order; /dev/null kept."""
    out: list[tuple[str, str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            out.append((_strip(line[4:]), _strip(lines[i + 1][4:]), []))
            i += 2
            continue
        if line.startswith("@@ ") and out:
            out[-1][2].append(line)
        i += 1
    return out


def touched_files(text: str) -> list[str]:
    """Every existing path a patch reads or rewrites (old and new names, /dev/null left out)."""
    seen: list[str] = []
    for old, new, _ in sections(text):
        for p in (old, new):
            if p != "/dev/null" and p not in seen:
                seen.append(p)
    return seen


def hunks(text: str) -> list[Hunk]:
    out = []
    for old, new, headers in sections(text):
        name = new if new != "/dev/null" else old
        out += [Hunk(name, n, h) for n, h in enumerate(headers, 1)]
    return out


# ---- the key and the tree ------------------------------------------------------------------------------------
def patches_in(directory: Path) -> tuple[list[Path], list[Path]]:
    """``DIR/*.patch`` in name order, and ``DIR/localversion*`` (kbuild's files) in name order."""
    d = Path(directory)
    if not d.is_dir():
        raise PatchError(f"--patches {d}: not a directory", hint="give a directory of *.patch files (git format-patch)")
    patches = sorted(p for p in d.glob("*.patch") if p.is_file())
    if not patches:
        raise PatchError(f"--patches {d}: no *.patch file in it",
                         hint="git format-patch writes NNNN-subject.patch files; pass one with --patch FILE")
    return patches, sorted(p for p in d.glob("localversion*") if p.is_file() and not p.name.endswith("~"))


def check_localversion(value: str) -> str:
    if not _LOCALVERSION_RE.match(value):
        raise PatchError(f"localversion {value!r}: use 1-48 of A-Z a-z 0-9 . _ + -",
                         hint="e.g. --localversion -kvm-nv-hcd-elr (kbuild appends it to the release: 7.3.4-kvm-nv-hcd-elr)")
    return value


def read_patches(patches) -> list[tuple[Path, bytes]]:
    out = []
    for p in patches:
        p = Path(p)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise PatchError(f"cannot read the patch {p}: {e.strerror}", hint="pass an existing file with --patch") from None
        if not sections(data.decode("utf-8", "replace")):
            raise PatchError(f"{p} is not a patch: no '--- a/FILE' / '+++ b/FILE' header in it",
                             hint="pass a unified diff (git format-patch, git diff, diff -u)")
        out.append((p.resolve(), data))
    return out


def diff_body(data: bytes) -> bytes:
    """What a patch changes: from its first file header (``diff --git`` or ``--- ``) to the end, without the
    ``-- `` signature git format-patch appends.  The mail headers and the commit message are left out, so
    rewording a commit message keeps the tree (and its build directory, and ccache's objects)."""
    lines = data.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.startswith((b"diff ", b"--- "))), 0)
    body = lines[start:]
    sig = next((i for i, ln in enumerate(body) if ln.rstrip(b"\r\n") == b"-- "), len(body))
    return b"".join(body[:sig])


def tree_key(base: Path, patch_data: list[bytes], localversion: str) -> str:
    """The cache key: base tree, localversion and, in order, what each patch changes (``diff_body``)."""
    h = hashlib.sha256()
    h.update(f"v{KEY_VERSION}\0{Path(base).resolve()}\0{localversion}\0".encode())
    for data in patch_data:
        h.update(hashlib.sha256(diff_body(data)).hexdigest().encode() + b"\0")
    return h.hexdigest()[:16]


def _break_link(path: Path) -> None:
    """Give ``path`` an inode of its own (a copy, renamed over it), so writing it leaves the base tree alone."""
    if path.is_symlink() or not path.is_file() or path.stat().st_nlink < 2:
        return
    tmp = path.with_name(path.name + ".smccc-unlink")
    shutil.copy2(path, tmp)
    os.replace(tmp, path)


def _failure(name: Path, text: str, output: str) -> PatchError:
    """The first thing GNU patch reported, as file and hunk (with the hunk's @@ line from the patch)."""
    by_file: dict[str, list[Hunk]] = {}
    for hk in hunks(text):
        by_file.setdefault(hk.file, []).append(hk)
    current = ""
    for line in output.splitlines():
        m = re.match(r"(?:patching|checking) file (.+)$", line)
        if m:
            current = m.group(1).strip().strip("'")
            continue
        m = re.match(r"Hunk #(\d+) FAILED at (\d+)", line)
        if m:
            n = int(m.group(1))
            hk = next((h for h in by_file.get(current, []) if h.number == n), None)
            return PatchError(f"{name} does not apply: {current} hunk #{n} ({hk.header if hk else 'no @@ line'}) "
                              f"failed at line {m.group(2)} of the tree's file",
                              hint="the patch is for another version of this file: rebase it on this tree "
                                   "(git am / git rebase), or pass the patches in their order")
        if line.startswith("Reversed (or previously applied) patch detected"):
            return PatchError(f"{name} does not apply: {current} already has it (reversed or previously applied)",
                              hint="drop this patch (the tree carries it already) or fix the order of --patch")
        if line.startswith(("No file to patch", "can't find file to patch")):
            return PatchError(f"{name} does not apply: a file it patches is not in the tree "
                              f"({', '.join(touched_files(text)) or 'unknown'})",
                              hint="the patch is for another tree, or needs -p1 paths (a/FILE, b/FILE)")
        m = re.search(r"malformed patch at line (\d+)", line)
        if m:
            return PatchError(f"{name} is malformed at line {m.group(1)} (GNU patch: {line.strip()})",
                              hint="regenerate it with git format-patch; a hand-edited hunk's line counts must match")
    tail = " | ".join(output.strip().splitlines()[-4:])
    return PatchError(f"{name} does not apply: {tail or 'patch failed'}", hint="check the patch against the tree")


def apply_patch(tree: Path, name: Path, data: bytes) -> str:
    """Apply one patch in ``tree`` (hard links to the touched files broken first); its output, or PatchError."""
    text = data.decode("utf-8", "replace")
    for rel in touched_files(text):
        target = (tree / rel)
        if tree.resolve() not in target.resolve().parents and target.resolve() != tree.resolve():
            raise PatchError(f"{name} names a path outside the tree: {rel}", hint="a kernel patch names a/FILE b/FILE")
        _break_link(target)
    r = subprocess.run(_PATCH_ARGV, cwd=tree, input=data, capture_output=True, check=False)
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    if r.returncode != 0:
        raise _failure(name, text, out)
    return out


def patched_tree(base: Path, patches=(), *, localversion: str = "", localversion_files=(), progress=print,
                 cache_root: Path | None = None) -> PatchedTree:
    """The tree ``base`` with ``patches`` applied (in order) and the localversion set, made once and cached."""
    base = Path(base).resolve()
    if not (base / "Makefile").is_file():
        raise PatchError(f"{base} is not a kernel tree (no Makefile)", hint="smccc-harness kernel source prints one")
    if not patches:
        raise PatchError("no patch given", hint="--patch FILE (repeatable) or --patches DIR")
    read = read_patches(patches)
    ensure_packages(PATCH_REQUIREMENTS, "the patch tool", progress)
    lv = "".join(Path(f).read_text().strip() for f in localversion_files) + (localversion or "")
    if lv:
        check_localversion(lv)
    key = tree_key(base, [d for _, d in read], lv)
    root = Path(cache_root) if cache_root else paths.cache_dir() / "ksrc-patched"
    home = root / key
    tree = home / base.name
    if (home / MANIFEST).is_file() and (tree / "Makefile").is_file():
        return PatchedTree(tree, key, False, tuple(p for p, _ in read), lv)
    shutil.rmtree(home, ignore_errors=True)         # a tree someone cut short (no manifest): make it again
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.monotonic()
    try:
        progress(f"copying {base} (hard links) ...")
        r = subprocess.run(["cp", "-al", str(base), str(tmp / base.name)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise PatchError(f"cp -al {base} failed: {r.stderr.strip()}",
                             hint=f"the patched copy needs the same filesystem as {base}")
        for p, data in read:
            progress(f"applying {p.name}")
            apply_patch(tmp / base.name, p, data)
        if lv:
            (tmp / base.name / LOCALVERSION_FILE).write_text(lv + "\n")
        (tmp / MANIFEST).write_text(json.dumps({
            "base": str(base), "key": key, "localversion": lv,
            "patches": [{"name": p.name, "path": str(p), "sha256": hashlib.sha256(d).hexdigest()} for p, d in read],
            "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
        try:
            os.rename(tmp, home)
        except OSError:
            if not (home / MANIFEST).is_file():      # not a concurrent maker that won: a real failure
                raise
            return PatchedTree(tree, key, False, tuple(p for p, _ in read), lv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"patched tree made in {time.monotonic() - t0:.1f} s: {tree}")
    return PatchedTree(tree, key, True, tuple(p for p, _ in read), lv)
