"""The packages' layers, read from the source: imports run one way, in no circle, and no
private name crosses a module.

    schemas  <-  ps  <-  transforms  <-  dataflow  <-  benchmarks

A package imports only itself and the packages to its left. In ``ps/`` the data structures
(table, filter, optimizers, snapshots, store, ...) import neither Beam nor our other packages;
only the PS DoFns (``PS_DOFN_MODULES``) import Beam. Imports inside functions count too:
a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ("schemas", "ps", "transforms", "dataflow", "benchmarks")
# ps modules that are Beam DoFns (they may import apache_beam, and only ps besides)
PS_DOFN_MODULES = {"ps.shard_state", "ps.sparse_shard", "ps.dense_shard"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict:
    """{module name: path} of every module of the five packages."""
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: pathlib.Path):
    """(imported module, names imported from it, line) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = tuple(a.name for a in node.names)
            # "from pkg import module" imports a module, not a name
            submodules = [n for n in names if f"{target}.{n}" in MODULES]
            for sub in submodules:
                yield f"{target}.{sub}", (), node.lineno
            rest = tuple(n for n in names if n not in submodules)
            if rest or not submodules:
                yield target, rest, node.lineno


def _ours(target: str):
    """The module of ours that an import names (the longest known prefix), or None."""
    parts = target.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in MODULES:
            return candidate
    return None


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def _edges():
    for name, path in MODULES.items():
        for target, names, line in _imports(name, path):
            yield name, path, target, names, line


def test_layers_import_one_way():
    upward = [f"{path.relative_to(ROOT)}:{line} imports {target}"
              for name, path, target, _, line in _edges()
              if _ours(target) and _layer(_ours(target)) > _layer(name)]
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_ps_data_structures_import_neither_beam_nor_our_other_packages():
    bad = []
    for name, path, target, _, line in _edges():
        if not name.startswith("ps"):
            continue
        top = target.split(".")[0]
        other_ours = top in LAYERS and top != "ps"
        beam = top == "apache_beam"
        if other_ours or (beam and name not in PS_DOFN_MODULES):
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {target}"
           for name, path, target, names, line in _edges()
           if _ours(target) and _ours(target) != name
           for private in [[n for n in names if n.startswith("_") and not n.startswith("__")]]
           if private]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph: dict = {name: set() for name in MODULES}
    for name, _, target, _, _ in _edges():
        module = _ours(target)
        if module and module != name and not name.startswith(module + "."):
            # a package's __init__ importing its own modules is not a cycle with them
            if not (MODULES[name].name != "__init__.py" and module == name.rpartition(".")[0]
                    and MODULES[module].name == "__init__.py"):
                graph[name].add(module)
    cycles = []
    state: dict = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", LAYERS)
def test_every_package_is_read(package):
    assert any(m.split(".")[0] == package for m in MODULES), package
