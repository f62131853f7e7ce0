"""The import graph between the project's subpackages, read from the source (ast, nothing imported).

    python scripts/import_graph.py        # modules per subpackage, one line per edge, cycles if any

Every import counts, at module level or inside a function: a deferred import is still a dependency.
tests/test_layout.py checks the same graph against the layering that README.md describes.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("vllm_adaspkv", "offline_search", "demo")
# The layers, lowest first: a subpackage may import only from lower layers (and from itself).
LAYERS = (
    ("vllm_adaspkv.errors", "vllm_adaspkv.cpp_build"),
    ("vllm_adaspkv.kv", "vllm_adaspkv.sparse"),
    ("vllm_adaspkv.format", "offline_search.core"),
    ("vllm_adaspkv.engine", "offline_search.data"),
    ("vllm_adaspkv", "offline_search.model"),
    ("offline_search.search", "offline_search.evaluation"),
    ("offline_search.kit",),
    ("offline_search.cli",),
    ("demo",),  # its subcommand plugs into the CLI (entry point); it uses the CLI's extras check
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The subpackage a module belongs to: vllm_adaspkv.kv, offline_search.core, demo, ..."""
    parts = module.split(".")
    if parts[0] == "demo":
        return "demo"
    candidate = ".".join(parts[:2])
    return candidate if candidate in RANK else parts[0]


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imports_of(path: Path, module: str) -> set[str]:
    """Every module name this file imports (absolute names; relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def module_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    modules = project_modules()
    return {name: {m for m in imports_of(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def unit_edges(graph: dict[str, set[str]]) -> Counter:
    """(importing subpackage, imported subpackage) -> number of module-to-module imports."""
    return Counter((unit_of(a), unit_of(b)) for a, targets in graph.items() for b in targets
                   if unit_of(a) != unit_of(b))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each a cycle to break."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    graph = module_graph()
    per_unit = Counter(unit_of(m) for m in graph)
    print("modules per subpackage:")
    for unit in sorted(per_unit, key=lambda u: (RANK.get(u, -1), u)):
        print(f"  {unit:28} {per_unit[unit]:3d}")
    print("imports between subpackages (importer -> imported: module imports):")
    for (a, b), n in sorted(unit_edges(graph).items(), key=lambda e: (-RANK[e[0][0]], e[0])):
        print(f"  {a} -> {b}: {n}")
    module_cycles, unit_cycles = cycles(graph), cycles(_unit_graph(graph))
    print(f"module cycles: {module_cycles or 'none'}; subpackage cycles: {unit_cycles or 'none'}")
    return 1 if module_cycles or unit_cycles else 0


def _unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units = defaultdict(set)
    for a, b in unit_edges(graph):
        units[a].add(b)
    return units


if __name__ == "__main__":
    sys.exit(main())
