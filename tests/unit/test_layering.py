"""The package's import direction: lower layers never import higher ones, and no module imports itself back.

Layers, lowest first (README, "Layout")::

    core (_version, _errors, _io, _validation, _device, _progress, _distributed)
    -> data / capture / models -> directions -> evaluate (pure metrics) -> edit / explain
    -> experiments (orchestration) -> report -> cli (with ``__main__``)
    -> ``unveil/__init__.py``, the public facade (nothing below may import it: ``from unveil import EDDP``
       inside the package is ``from unveil.directions import EDDP``)

A module may import its own layer or any lower one. Every ``import`` and ``from ... import`` is read
statically with :mod:`ast`, including the ones inside functions (lazy imports still run). The module graph
has an edge ``a -> b`` when ``a`` names ``b`` in an import (``from pkg import name`` names ``pkg.name`` when
that is a module, else ``pkg``); the packages a name passes through (``unveil``, ``unveil.pkg``) are not
counted, or every module would import the facade.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = "unveil"

#: top-level module or subpackage of ``unveil`` -> layer (higher imports lower, never the reverse)
LAYER_OF: Dict[str, int] = {
    **dict.fromkeys(["_version", "_errors", "_io", "_validation", "_device", "_progress", "_distributed"], 0),
    **dict.fromkeys(["data", "capture", "models"], 1),
    "directions": 2,
    "evaluate": 3,
    **dict.fromkeys(["edit", "explain"], 4),
    "experiments": 5,
    "report": 6,
    **dict.fromkeys(["cli", "__main__"], 7),
    "": 8,  # unveil/__init__.py: the public facade (EDDP, unveil.explain, unveil.influence, unveil.run_demo)
}
LAYER_NAMES = {0: "core", 1: "data/capture/models", 2: "directions", 3: "evaluate", 4: "edit/explain",
               5: "experiments", 6: "report", 7: "cli", 8: "the unveil facade"}

#: Known violations, (importer, imported): each breaks a rule today and is waiting for its fix. The test fails on
#: any violation not listed here, and on a listed pair that no longer breaks a rule (then delete it here), so the
#: list only shrinks. An import cycle is allowed only when one of its imports is listed.
KNOWN: Set[Tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def _modules() -> Dict[str, Path]:
    mods = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Iterator[Tuple[str, int]]:
    """``(imported module, line)`` for every import of an ``unveil`` module in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    yield _known_prefix(alias.name, modules), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == ROOT or target.startswith(ROOT + ".")):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in modules else _known_prefix(target, modules)), node.lineno


def _known_prefix(dotted: str, modules: Dict[str, Path]) -> str:
    while dotted not in modules and "." in dotted:
        dotted = dotted.rpartition(".")[0]
    return dotted


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    if top not in LAYER_OF:
        raise AssertionError(f"{module}: its top-level part {top!r} has no layer; add it to LAYER_OF in {__file__}")
    return LAYER_OF[top]


def _graph() -> Tuple[Dict[str, Set[str]], Dict[Tuple[str, str], List[int]]]:
    modules = _modules()
    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    lines: Dict[Tuple[str, str], List[int]] = {}
    for name, path in modules.items():
        for target, line in _imports(name, path, modules):
            if target == name or target not in modules:
                continue
            edges[name].add(target)
            if line not in lines.setdefault((name, target), []):
                lines[(name, target)].append(line)
    return edges, lines


def _strongly_connected(edges: Dict[str, Set[str]]) -> List[Set[str]]:
    """Tarjan's algorithm (iterative); the components of more than one module are the import cycles."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[Set[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(comp)
    return out


def _where(pair: Tuple[str, str], lines) -> str:
    a, b = pair
    return f"{a} imports {b} ({_modules()[a].relative_to(SRC.parent)}, line {', '.join(map(str, lines[pair]))})"


@functools.lru_cache(maxsize=None)
def _violations():
    edges, lines = _graph()
    upward = {(a, b) for a, bs in edges.items() for b in bs if _layer(a) < _layer(b)}
    cycles = _strongly_connected(edges)
    in_cycle = {(a, b) for comp in cycles for a in comp for b in edges[a] if b in comp}
    return edges, lines, upward, cycles, in_cycle


def test_no_import_goes_up_a_layer():
    _, lines, upward, _, _ = _violations()
    new = sorted(upward - KNOWN)
    assert not new, "imports of a higher layer from a lower one:\n" + "\n".join(
        f"  {_where(p, lines)}: {LAYER_NAMES[_layer(p[0])]} -> {LAYER_NAMES[_layer(p[1])]}" for p in new)


def _shortest_cycle(comp: Set[str], edges: Dict[str, Set[str]]) -> List[str]:
    """A shortest cycle through the component (modules in import order, the first repeated at the end)."""
    best: List[str] = []
    for start in sorted(comp):
        parent = {start: None}
        queue = [start]
        while queue:
            v = queue.pop(0)
            if start in edges[v] and v in parent:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                cycle = path[::-1] + [start]
                if not best or len(cycle) < len(best):
                    best = cycle
                break
            for w in sorted(edges[v] & comp):
                if w not in parent:
                    parent[w] = v
                    queue.append(w)
    return best


def test_no_import_cycle():
    edges, lines, _, _, _ = _violations()
    pruned = {a: {b for b in bs if (a, b) not in KNOWN} for a, bs in edges.items()}
    cycles = _strongly_connected(pruned)
    msg = []
    for comp in cycles:
        cycle = _shortest_cycle(comp, pruned)
        msg.append(f"  a cycle among {len(comp)} modules ({', '.join(sorted(comp))}), for example:\n"
                   + "\n".join(f"    {_where(p, lines)}" for p in zip(cycle, cycle[1:])))
    assert not cycles, "import cycles (break one import of each):\n" + "\n".join(msg)


def test_known_violations_still_occur():
    _, _, upward, _, in_cycle = _violations()
    stale = sorted(KNOWN - upward - in_cycle)
    assert not stale, ("these KNOWN pairs no longer break a rule (fixed, or the import is gone); delete them from "
                       "KNOWN in tests/unit/test_layering.py:\n" + "\n".join(f"  {a} -> {b}" for a, b in stale))


def test_every_module_has_a_layer_and_the_parser_sees_lazy_imports():
    for name in _modules():
        _layer(name)
    edges, _, _, _, _ = _violations()
    # a sanity check of the parser: imports inside functions, relative ones, and ``from pkg import submodule``
    assert "unveil.evaluate.dissection" in edges["unveil.experiments.demo"]
    assert "unveil.explain.actmax" in edges["unveil.experiments.shortcut"]
