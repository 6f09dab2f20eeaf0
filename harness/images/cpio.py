"""A deterministic newc ("070701") cpio writer, pure Python.

Same entries in any order -> byte-identical archive: entries are sorted by path, every parent directory is
created, mtime is a constant, uid/gid are 0, inode numbers are assigned in output order, nlink is 1 for
non-directories (hard links are written as separate copies), and the archive ends with ``TRAILER!!!``.
Header and name are padded to 4 bytes, and so is the data.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
MTIME = 0


@dataclass(frozen=True)
class Entry:
    """One archive member. ``path`` is relative (no leading '/'); ``mode`` includes the file type bits.

    Regular files take their bytes from ``data`` or, lazily, from ``source``; symlinks keep the target in
    ``data``; device nodes use ``rdev`` = (major, minor).
    """

    path: str
    mode: int
    data: bytes = b""
    source: Path | None = None
    rdev: tuple[int, int] = (0, 0)

    def content(self) -> bytes:
        if self.source is not None:
            return self.source.read_bytes()
        return self.data


def _norm(path: str) -> str:
    p = PurePosixPath("/" + path.lstrip("/"))
    parts = [x for x in p.parts[1:] if x not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"cpio path escapes the root: {path!r}")
    return "/".join(parts)


def directory(path: str, mode: int = 0o755) -> Entry:
    return Entry(_norm(path), stat.S_IFDIR | (mode & 0o7777))


def file(path: str, data: bytes = b"", mode: int = 0o644, source: Path | None = None) -> Entry:
    return Entry(_norm(path), stat.S_IFREG | (mode & 0o7777), data, source)


def symlink(path: str, target: str) -> Entry:
    return Entry(_norm(path), stat.S_IFLNK | 0o777, target.encode())


def chardev(path: str, major: int, minor: int, mode: int = 0o600) -> Entry:
    return Entry(_norm(path), stat.S_IFCHR | (mode & 0o7777), rdev=(major, minor))


def header(ino: int, mode: int, nlink: int, filesize: int, namesize: int, rdev: tuple[int, int] = (0, 0),
           mtime: int = MTIME) -> bytes:
    """The 110-byte newc header: magic + 13 fields of 8 hex digits."""
    fields = (ino, mode, 0, 0, nlink, mtime, filesize, 0, 0, rdev[0], rdev[1], namesize, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def complete(entries: list[Entry]) -> list[Entry]:
    """Entries normalised, de-duplicated (the last one wins), with every missing parent directory, sorted."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        p = _norm(e.path)
        if not p:
            continue
        by_path[p] = Entry(p, e.mode, e.data, e.source, e.rdev)
    for p in list(by_path):
        parent = PurePosixPath(p).parent
        while str(parent) not in (".", ""):
            by_path.setdefault(str(parent), directory(str(parent)))
            parent = parent.parent
    return [by_path[p] for p in sorted(by_path, key=lambda s: s.encode())]


def write(out: BinaryIO, entries: list[Entry], mtime: int = MTIME) -> int:
    """Write a newc archive of ``entries`` (see :func:`complete`); returns the number of bytes written."""
    n = 0

    def emit(b: bytes) -> None:
        nonlocal n
        out.write(b)
        n += len(b)

    for ino, e in enumerate(complete(entries), start=1):
        data = b"" if stat.S_ISDIR(e.mode) or stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode) else e.content()
        name = e.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        emit(header(ino, e.mode, nlink, len(data), len(name), e.rdev, mtime) + name)
        emit(_pad(110 + len(name)))
        emit(data)
        emit(_pad(len(data)))
    name = TRAILER.encode() + b"\0"
    emit(header(0, 0, 1, 0, len(name), mtime=0) + name + _pad(110 + len(name)))
    return n


def build(path: Path, entries: list[Entry]) -> int:
    """Write the archive to ``path`` atomically (temp file + rename); returns its size."""
    import os

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            size = write(f, entries)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return size
