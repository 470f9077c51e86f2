"""Structure figures of src/safedistill, read with ast (nothing is imported): import floors,
import circles, the longest functions and the lines per method module, so the figures quoted in
docs/design.md can be reproduced.

An edge a -> b is a module-level import of b in a (imports inside functions and under
`if TYPE_CHECKING:` run later or never, so they neither order modules nor close circles; `--lazy`
counts them too). `from pkg import name` points at pkg/name.py when that is a module, else at pkg.
A module's floor is 0 when it imports no package module, else one above the highest floor it
imports; a circle is a strongly connected group of two or more modules.

    python bench/structure.py               # summary: floors, circles, functions over --limit
    python bench/structure.py --top 20 --limit 60 --lazy
    python bench/structure.py --whole-config --upward   # list them

Two more figures (issue 23): functions outside cli.py, config.py and train.py that take the whole
RunConfig (a parameter typed RunConfig or named cfg, lambdas included), and arrows that run back
up: imports (lazy and type-only ones included, and importlib strings naming a module) from a
module to one on a higher layer of LAYERS, the package's intended order from the ground up.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "safedistill"
SRC = Path(__file__).resolve().parent.parent / "src" / PACKAGE
# The intended layers, ground floor first (docs/design.md): a module may import its own layer and
# those below it. A module's layer is named by its longest dotted prefix listed here: report.report
# (one run directory's report.md, which the recipe writes) sits below train, report.compare (which
# runs recipes) above it.
LAYERS = (
    ("errors", "console", "faults", "files", "config", ""),
    ("data",),
    ("models",),
    ("engine",),
    ("losses",),
    ("teachers",),
    ("eval",),
    ("searches",),
    ("methods",),
    ("rundir",),  # the run directory: its own files include the METHODS rows' (lazily)
    ("report.report",),
    ("train",),
    ("report",),
    ("cli",),
)
# The modules that may see the whole RunConfig: the CLI, the config itself and the recipe.
WHOLE_CONFIG_OK = ("cli", "config", "train")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_modules(root: Path) -> dict[str, tuple[Path, ast.Module]]:
    return {
        module_name(path, root): (path, ast.parse(path.read_text(), filename=str(path)))
        for path in sorted(root.rglob("*.py"))
    }


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.Module, lazy: bool) -> list[ast.Import | ast.ImportFrom]:
    """Module-level imports (with `lazy`, every import anywhere in the file)."""
    if lazy:
        return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and not is_type_checking(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return found


def resolve_from(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def targets(node: ast.Import | ast.ImportFrom, here: str, is_package: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    base = resolve_from(node, here, is_package)
    found = set()
    for alias in node.names:
        if f"{base}.{alias.name}" in known:
            found.add(f"{base}.{alias.name}")
        elif base in known:
            found.add(base)
    return found


def import_graph(modules: dict[str, tuple[Path, ast.Module]], lazy: bool) -> dict[str, set[str]]:
    """Module -> the package modules it imports; with `lazy`, also a string constant that names
    a module (an importlib target)."""
    known = set(modules)
    graph = {}
    for name, (path, tree) in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in import_nodes(tree, lazy):
            edges |= targets(node, name, is_package, known)
        if lazy:
            edges |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in known}
        graph[name] = edges - {name}
    return graph


def layer(module: str) -> int:
    parts = module.removeprefix(PACKAGE).lstrip(".").split(".")
    prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
    return next(i for p in prefixes for i, names in enumerate(LAYERS) if p in names)


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a module to one on a higher layer (pass the lazy graph: every arrow)."""
    return sorted((a, b) for a, bs in graph.items() for b in bs if layer(b) > layer(a))


def whole_config(modules: dict[str, tuple[Path, ast.Module]]) -> list[str]:
    """module:function (lambdas as <lambda>:line) of every function outside WHOLE_CONFIG_OK with a
    parameter typed RunConfig or named cfg."""
    found = []
    for module, (_, tree) in modules.items():
        short = module.removeprefix(f"{PACKAGE}.")
        if short in WHOLE_CONFIG_OK:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            a = node.args
            params = a.posonlyargs + a.args + a.kwonlyargs
            if any(p.arg == "cfg" or "RunConfig" in ast.unparse(p.annotation or ast.Constant("")) for p in params):
                found.append(f"{short}:{getattr(node, 'name', '<lambda>')}:{node.lineno}")
    return sorted(found)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def floors(graph: dict[str, set[str]], groups: list[list[str]]) -> dict[str, int]:
    """Floor of each module; the members of a circle share one floor."""
    group_of = {m: tuple(g) for g in groups for m in g}
    floor: dict[str, int] = {}

    def height(v: str, seen: frozenset[str]) -> int:
        if v in floor:
            return floor[v]
        members = group_of.get(v, (v,))
        below = {w for m in members for w in graph[m]} - set(members)
        h = 1 + max((height(w, seen | {v}) for w in below), default=-1)
        for m in members:
            floor[m] = h
        return h

    for v in graph:
        height(v, frozenset())
    return floor


def functions(modules: dict[str, tuple[Path, ast.Module]]) -> list[tuple[int, str]]:
    """(lines, module:qualified name) of every function and method, nested ones included."""
    found = []

    def walk(node: ast.AST, prefix: str, module: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found.append((child.end_lineno - child.lineno + 1, f"{module}:{name}"))
                walk(child, f"{name}.", module)
            else:
                walk(child, prefix, module)

    for module, (_, tree) in modules.items():
        walk(tree, "", module.removeprefix(f"{PACKAGE}."))
    return sorted(found, reverse=True)


def method_lines(root: Path) -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in sorted((root / "methods").glob("*.py"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=SRC, help="package folder (default: src/safedistill)")
    parser.add_argument("--top", type=int, default=10, help="how many of the longest functions to list")
    parser.add_argument("--limit", type=int, default=60, help="flag functions longer than this many lines")
    parser.add_argument("--lazy", action="store_true", help="count imports inside functions too")
    parser.add_argument("--floors", action="store_true", help="list every module with its floor")
    parser.add_argument("--whole-config", action="store_true", help="list the functions that take the RunConfig")
    parser.add_argument("--upward", action="store_true", help="list the arrows that run back up")
    args = parser.parse_args(argv)

    modules = read_modules(args.root)
    graph = import_graph(modules, args.lazy)
    groups = circles(graph)
    floor = floors(graph, groups)
    funcs = functions(modules)
    over = [f for f in funcs if f[0] > args.limit]

    print(f"modules: {len(modules)}   import floors: {max(floor.values()) + 1}   circles: {len(groups)}")
    for g in groups:
        print("  circle: " + " <-> ".join(m.removeprefix(f"{PACKAGE}.") for m in g))
    if args.floors:
        for v in sorted(floor, key=lambda m: (floor[m], m)):
            print(f"  floor {floor[v]:2d}  {v.removeprefix(PACKAGE + '.') or PACKAGE}")
    print(f"functions: {len(funcs)}   longest: {funcs[0][0]} lines ({funcs[0][1]})   over {args.limit}: {len(over)}")
    for lines, name in funcs[: max(args.top, len(over))]:
        print(f"  {lines:4d}  {name}" + ("   > limit" if lines > args.limit else ""))
    every = import_graph(modules, lazy=True)
    config_floor = floors(every, circles(every)).get(f"{PACKAGE}.config")
    print(f"config.py floor (every import counted): {config_floor}")
    up = upward(every)
    print(f"arrows that run back up: {len(up)}")
    for a, b in up if args.upward else []:
        print(f"  {a.removeprefix(PACKAGE + '.')} -> {b.removeprefix(PACKAGE + '.')}")
    whole = whole_config(modules)
    print(f"functions outside {', '.join(WHOLE_CONFIG_OK)} taking the whole RunConfig: {len(whole)}")
    for name in whole if args.whole_config else []:
        print(f"  {name}")
    print("lines per method module: " + ", ".join(f"{k} {v}" for k, v in method_lines(args.root).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
