"""The host side's layers, checked from the imports themselves (``ast``, nothing is imported).

Bottom to top (docs/design.md has the map):

    harness.errors, harness.paths, harness.protocol    shared at the bottom
    harness.model      pure: scenarios and results, the filter model, PSCI programs, known-bad tables
    harness.images     cached inputs: Debian packages, kernels, initramfs, payloads, host packages
    harness.machine    one guest and its links: QEMU, session, console, channel, snapshot, reuse, SSH
    harness.kdev       kernel build, bisect, matrix and report, upstream selftests
    harness.plugin     pytest: options, pool, fixtures, console scanning, summary, tiers
    harness.cli        the command line, on top
    harness.guest      runs inside the guest: the standard library and harness.protocol only

A module may import its own layer and the layers below it.  This test fails on a cycle between modules, on
an import that runs up (model -> machine, images -> machine, machine -> plugin, kdev -> cli, ...), and on a
private name (``_x``) taken from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "harness"
RANK = {"harness.errors": 0, "harness.paths": 0, "harness.protocol": 0, "harness.model": 1, "harness.images": 2,
        "harness.machine": 3, "harness.kdev": 4, "harness.plugin": 5, "harness.cli": 6, "harness": 0}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(path: Path) -> str:
    mod = _module(path)
    return mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else mod


def modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(HARNESS.rglob("*.py")) if "__pycache__" not in p.parts}


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported harness module, names taken from it, line) for every import in ``path``, at any depth."""
    out = []
    pkg = _package(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "harness"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "harness":
                continue
            plain = []
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in known:            # 'from harness.machine import qemu': the module itself
                    out.append((sub, [], node.lineno))
                else:
                    plain.append(a.name)
            if plain:
                out.append((mod, plain, node.lineno))
    return out


def _ancestors(m: str) -> set[str]:
    parts = m.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def upward(edges: dict) -> list[str]:
    """Imports from a lower layer to a higher one (the guest is checked on its own)."""
    bad = []
    for m, es in edges.items():
        for target, _, line in es:
            if m.startswith("harness.guest") or target.startswith("harness.guest"):
                continue
            a, b = RANK.get(_layer(m)), RANK.get(_layer(target))
            if a is not None and b is not None and b > a:
                bad.append(f"{m}:{line} imports {target} ({_layer(m)} is below {_layer(target)})")
    return bad


def guest_escapes(edges: dict) -> list[str]:
    return [f"{m}:{line} imports {t}" for m, es in edges.items() if m.startswith("harness.guest")
            for t, _, line in es if not (t.startswith("harness.guest") or t in ("harness.protocol", "harness"))]


def private_crossings(edges: dict) -> list[str]:
    return [f"{m}:{line} takes {n} from {t}" for m, es in edges.items() for t, names, line in es
            if t != m for n in names if n.startswith("_") and not n.startswith("__")]


def cycles(edges: dict) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan); a package importing its own parent is no edge."""
    graph = {m: sorted({t for t, _, _ in es if t in edges and t != m and t not in _ancestors(m)})
             for m, es in edges.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in graph:
        if v not in index:
            visit(v)
    return out


MODS = modules()
EDGES = {m: imports(p, MODS) for m, p in MODS.items()}


def test_every_host_module_is_in_a_layer():
    for m in MODS:
        if m.startswith("harness.guest") or m == "harness":
            continue
        assert _layer(m) in RANK, f"{MODS[m]} is in no layer: move it into model/images/machine/kdev/plugin"


def test_no_import_runs_up_a_layer():
    assert upward(EDGES) == []


def test_the_guest_imports_only_protocol_and_itself():
    assert guest_escapes(EDGES) == []


def test_no_private_name_crosses_a_module():
    assert private_crossings(EDGES) == []


def test_no_import_cycle():
    assert cycles(EDGES) == []


@pytest.mark.parametrize("source,target", [
    ("harness.model.scenarios", "harness.machine.session"),
    ("harness.images.kernel", "harness.machine.session"),
    ("harness.machine.session", "harness.plugin"),
    ("harness.kdev.selftests", "harness.cli"),
    ("harness.paths", "harness.machine.leftovers"),
])
def test_an_upward_import_is_reported(source, target):
    assert upward({source: [(target, [], 7)]}) == [
        f"{source}:7 imports {target} ({_layer(source)} is below {_layer(target)})"]


def test_a_guest_import_of_a_host_module_is_reported():
    assert guest_escapes({"harness.guest.runner": [("harness.machine.qemu", [], 3), ("harness.protocol", [], 4)]}) \
        == ["harness.guest.runner:3 imports harness.machine.qemu"]


def test_a_private_name_from_another_module_is_reported():
    assert private_crossings({"harness.kdev.selftests": [("harness.cli", ["_session", "main"], 9)]}) == [
        "harness.kdev.selftests:9 takes _session from harness.cli"]


def test_a_cycle_is_reported():
    e = {"harness.a": [("harness.b", [], 1)], "harness.b": [("harness.c", [], 1)], "harness.c": [("harness.a", [], 1)],
         "harness.d": [("harness.a", [], 1)]}
    assert cycles(e) == [["harness.a", "harness.b", "harness.c"]]
