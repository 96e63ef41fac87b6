"""A package's import graph, read from its source with `ast` (nothing is imported), and two rules.

Data flows one way through jfacerec: commands drive evaluation, evaluation drives training and
inference, which drive models, which drive data and losses, which rest on core. Each module may
import only modules in its own layer and below, so a layer can be read, tested and changed
without the layers above it; and no two modules may import each other, even indirectly (a cycle
makes import order matter and makes "the layer below" meaningless).

Graph rules:
- Every import statement counts, wherever it is: module level, inside a function, under
  `if TYPE_CHECKING:`. A lazy import is still a dependency, only a deferred one.
- `import a.b.c` and `from a.b.c import name` are edges to `a.b.c`; `from a.b import c` is an
  edge to `a.b.c` when that module exists, else to `a.b` (c is then a name defined in a.b).
  A target that is not a module of the package is cut to its longest prefix that is.
- Self-edges and edges from a module to one of its own ancestor packages are dropped: a module
  cannot run before its ancestors' `__init__` has, so importing them adds no dependency; and a
  package `__init__` importing its own submodules is the normal pattern, which would otherwise
  make every such package a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from pathlib import Path

# (layer name, {group name: module patterns}), bottom layer first. A pattern matches that module
# and every module under it; "=name" matches the module `name` only. Groups in one layer are
# peers: they may not import each other.
Layers = Sequence[tuple[str, Mapping[str, Sequence[str]]]]


class ImportGraph(dict[str, set[str]]):
    """module -> the package modules it imports; `sites[(a, b)]`: "file:line" of each import."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: dict[tuple[str, str], list[str]] = {}

    def where(self, src: str, dst: str) -> str:
        return ", ".join(self.sites.get((src, dst), ["?"]))


def module_name(path: Path, package_dir: Path, package_name: str) -> str:
    parts = [package_name, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def build_graph(package_dir: Path, package_name: str) -> ImportGraph:
    """Every in-package import of every .py file under `package_dir` (rules in the module doc)."""
    paths = sorted(package_dir.rglob("*.py"))
    files = {module_name(p, package_dir, package_name): p for p in paths}
    # Every folder is a package, with or without an __init__.py (a namespace package).
    modules = {m.rsplit(".", i)[0] for m in files for i in range(m.count(".") + 1)}
    graph = ImportGraph()

    def known(name: str) -> str | None:  # the longest prefix of `name` that is a package module
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    for module in sorted(modules):
        graph.setdefault(module, set())
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        where = path.relative_to(package_dir.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from .` is the package holding this module
                    here = module.split(".") if is_package else module.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for dst in dict.fromkeys(map(known, targets)):  # one site per statement and module
                if dst is None or dst == module or module.startswith(dst + "."):
                    continue
                graph[module].add(dst)
                graph.sites.setdefault((module, dst), []).append(f"{where}:{node.lineno}")
    return graph


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle path per strongly connected component of more than one module.

    The path starts and ends at the component's first module (alphabetically) and is the shortest
    loop through it, e.g. ["a", "b", "a"]; `describe_cycle` adds the import sites. Self-edges and
    edges to a module's own ancestor packages are not in the graph (see `build_graph`), so a
    package `__init__` importing its submodules, which import the package back, is no cycle.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graphs here are a few dozen modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: set[str] = set()
            while (w := stack.pop()) != v:
                component.add(w)
            components.append(component | {v})

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        if len(component) < 2:
            continue
        start = min(component)
        came_from: dict[str, str] = {}
        frontier = [start]
        while start not in came_from:  # breadth-first, inside the component, back to start
            reached = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w not in came_from:
                        came_from[w] = v
                        reached.append(w)
            frontier = reached
        path = [start, came_from[start]]
        while path[-1] != start:
            path.append(came_from[path[-1]])
        cycles.append(path[::-1])
    return sorted(cycles)


def describe_cycle(graph: ImportGraph, cycle: list[str]) -> str:
    hops = [f"    {graph.where(a, b)}: {a} imports {b}" for a, b in zip(cycle, cycle[1:])]
    return "\n".join([" -> ".join(cycle), *hops])


def layer_of(module: str, layers: Layers) -> tuple[int, str, str] | None:
    """(layer index, layer name, group name) of the longest pattern matching `module`, or None."""
    best: tuple[int, tuple[int, str, str]] | None = None
    for i, (layer, groups) in enumerate(layers):
        for group, patterns in groups.items():
            for pattern in patterns:
                exact = pattern.startswith("=")
                name = pattern.lstrip("=")
                if module == name or (not exact and module.startswith(name + ".")):
                    if best is None or len(name) > best[0]:
                        best = (len(name), (i, layer, group))
    return best[1] if best else None


def layer_violations(graph: ImportGraph, layers: Layers) -> list[str]:
    """Imports of a higher layer, or of a peer group in the same layer, one message per edge.

    Imports within one group are always allowed (cycles are `find_cycles`'s business); modules
    in no layer are skipped here and reported by checking `layer_of` for each module.
    """
    messages = []
    for src in sorted(graph):
        for dst in sorted(graph[src]):
            a, b = layer_of(src, layers), layer_of(dst, layers)
            if a is None or b is None or (a[0], a[2]) == (b[0], b[2]):  # same group
                continue
            if b[0] > a[0]:
                why = f"layer {b[0]} {b[1]!r} is above layer {a[0]} {a[1]!r}"
            elif b[0] == a[0]:
                why = f"groups {a[2]!r} and {b[2]!r} are peers in layer {a[0]} {a[1]!r}"
            else:
                continue
            where = graph.where(src, dst)
            messages.append(f"{where}: {src} ({a[2]}) imports {dst} ({b[2]}): {why}")
    return messages
