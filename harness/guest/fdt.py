"""A flattened device tree (DTB) writer and reader, standard library only.

Format: the Devicetree Specification v0.4, chapter 5 "Flattened Devicetree (DTB) Format": a 40-byte
big-endian header, the memory reservation block (pairs of u64, ended by a zero pair), the structure block
(FDT_BEGIN_NODE / FDT_PROP / FDT_END_NODE tokens, each 4-byte aligned, ended by FDT_END) and the strings
block (property names, NUL-terminated, shared).  Version 17, last compatible version 16.

Property values (:func:`encode_value`): ``str`` is a NUL-terminated string, a ``list``/``tuple`` of ``str`` a
string list, an ``int`` one u32 cell, a ``list``/``tuple`` of ``int`` u32 cells, ``bytes`` raw, ``True`` an
empty property.  :func:`u64` splits a 64-bit number into two cells.
"""

from __future__ import annotations

import struct

MAGIC = 0xD00DFEED
VERSION = 17
LAST_COMP_VERSION = 16
HEADER = struct.Struct(">10I")
FDT_BEGIN_NODE = 1
FDT_END_NODE = 2
FDT_PROP = 3
FDT_NOP = 4
FDT_END = 9


def u64(value: int) -> tuple[int, int]:
    """Two u32 cells (high, low) for a 64-bit address or size (#address-cells = <2>)."""
    return (value >> 32) & 0xFFFF_FFFF, value & 0xFFFF_FFFF


def encode_value(value) -> bytes:
    if value is True:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode() + b"\0"
    if isinstance(value, int) and not isinstance(value, bool):
        return struct.pack(">I", value & 0xFFFF_FFFF)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return b"".join(v.encode() + b"\0" for v in value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        for v in value:
            if not 0 <= v <= 0xFFFF_FFFF:
                raise ValueError(f"cell {v:#x} does not fit in 32 bits (use fdt.u64 for 64-bit values)")
        return struct.pack(f">{len(value)}I", *value)
    raise TypeError(f"cannot encode a device tree property value {value!r}")


def prop_name(keyword: str) -> str:
    """Keyword argument -> property name: ``_`` becomes ``-`` (``enable_method``), except ``device_type``."""
    return keyword if keyword == "device_type" else keyword.replace("_", "-")


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


class Node:
    """One device tree node: ordered properties and ordered children."""

    def __init__(self, name: str = "", **props):
        self.name = name
        self.props: dict[str, bytes] = {}
        self.children: list[Node] = []
        for k, v in props.items():
            self.set(prop_name(k), v)

    def set(self, prop: str, value) -> Node:
        self.props[prop] = encode_value(value)
        return self

    def add(self, name: str, **props) -> Node:
        if any(c.name == name for c in self.children):
            raise ValueError(f"duplicate node {name!r} under {self.name or '/'}")
        child = Node(name)
        for k, v in props.items():
            child.set(prop_name(k), v)
        self.children.append(child)
        return child

    def child(self, name: str) -> Node:
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(name)


class _Strings:
    def __init__(self):
        self.data = bytearray()
        self.offsets: dict[str, int] = {}

    def offset(self, name: str) -> int:
        if name not in self.offsets:
            self.offsets[name] = len(self.data)
            self.data += name.encode() + b"\0"
        return self.offsets[name]


def build(root: Node, reserve: list[tuple[int, int]] = (), boot_cpuid: int = 0) -> bytes:
    """The DTB for ``root`` (whose name must be empty)."""
    if root.name:
        raise ValueError("the root node has an empty name")
    strings = _Strings()
    out = bytearray()

    def emit(node: Node) -> None:
        out.extend(struct.pack(">I", FDT_BEGIN_NODE))
        out.extend(_pad4(node.name.encode() + b"\0"))
        for k, v in node.props.items():
            out.extend(struct.pack(">III", FDT_PROP, len(v), strings.offset(k)))
            out.extend(_pad4(v))
        for c in node.children:
            emit(c)
        out.extend(struct.pack(">I", FDT_END_NODE))

    emit(root)
    out.extend(struct.pack(">I", FDT_END))
    rsv = b"".join(struct.pack(">QQ", a, s) for a, s in reserve) + struct.pack(">QQ", 0, 0)
    off_rsv = 40                       # header size; the reservation block is 8-byte aligned
    off_struct = off_rsv + len(rsv)
    off_strings = off_struct + len(out)
    total = off_strings + len(strings.data)
    header = HEADER.pack(MAGIC, total, off_struct, off_strings, off_rsv, VERSION, LAST_COMP_VERSION, boot_cpuid,
                         len(strings.data), len(out))
    return header + rsv + bytes(out) + bytes(strings.data)


def parse(blob: bytes) -> dict:
    """Decode a DTB into nested dicts: {"props": {name: bytes}, "children": {name: ...}} (for tests/debugging)."""
    (magic, total, off_struct, off_strings, _off_rsv, version, _last, _boot, size_strings,
     size_struct) = HEADER.unpack_from(blob, 0)
    if magic != MAGIC:
        raise ValueError(f"bad FDT magic {magic:#x}")
    if total > len(blob):
        raise ValueError(f"FDT totalsize {total} exceeds the blob ({len(blob)} bytes)")
    if version < 16:
        raise ValueError(f"FDT version {version} is not supported")
    strings = blob[off_strings:off_strings + size_strings]
    pos, end = off_struct, off_struct + size_struct
    stack: list[dict] = []
    root = None
    while pos < end:
        (tok,) = struct.unpack_from(">I", blob, pos)
        pos += 4
        if tok == FDT_BEGIN_NODE:
            nul = blob.index(b"\0", pos)
            name = blob[pos:nul].decode()
            pos = nul + 1 + (-(nul + 1 - pos) % 4)
            node = {"name": name, "props": {}, "children": {}}
            if stack:
                stack[-1]["children"][name] = node
            else:
                root = node
            stack.append(node)
        elif tok == FDT_PROP:
            length, nameoff = struct.unpack_from(">II", blob, pos)
            pos += 8
            pname = strings[nameoff:strings.index(b"\0", nameoff)].decode()
            stack[-1]["props"][pname] = blob[pos:pos + length]
            pos += length + (-length % 4)
        elif tok == FDT_END_NODE:
            stack.pop()
        elif tok == FDT_NOP:
            continue
        elif tok == FDT_END:
            break
        else:
            raise ValueError(f"bad FDT token {tok:#x} at {pos - 4:#x}")
    if root is None or stack:
        raise ValueError("unbalanced FDT structure block")
    return root


def cells(value: bytes) -> list[int]:
    return list(struct.unpack(f">{len(value) // 4}I", value))


def strings_of(value: bytes) -> list[str]:
    return [s.decode() for s in value.split(b"\0")[:-1]]
