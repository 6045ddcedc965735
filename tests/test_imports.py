"""The library's imports point one way: no cycle among the modules of gsa_kernels, and no import of
the tooling (tuning/) or of the test oracle (reference/).

Read statically with `ast` from the files, so every import counts, those inside functions and under
`if TYPE_CHECKING` included, and nothing is imported to check it. The layers, lowest first: kernels/
<- the config lookup (problem_keys, candidates, resources, launches, tuned_file, lookup, autotune,
configs) <- launchers/ <- autograd, ops <- chunk, fused_recurrent <- layers/.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "gsa_kernels"
PACKAGE = "gsa_kernels"
FORBIDDEN = ("tuning", "reference")        # top-level packages the library must never import


def module_name(path: Path, root: Path = PACKAGE_DIR, package: str = PACKAGE) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imports_of(source: str, module: str, is_package: bool, modules=()) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in `source`, at any depth, and every
    importlib.import_module / __import__ call with a literal name. `from a import b` yields a.b when
    that is one of `modules` (a submodule), else a; relative imports are resolved against `module`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = {f"{base}.{alias.name}" for alias in node.names}
            out += [(name if name in modules else base, node.lineno) for name in sorted(names)]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                out.append((node.args[0].value, node.lineno))
    return out


def import_graph(root: Path = PACKAGE_DIR, package: str = PACKAGE):
    """({module: {modules of the package it imports}}, [(file, line, name) of forbidden imports])."""
    files = {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    graph, forbidden = {}, []
    for module, path in files.items():
        edges = set()
        for name, line in imports_of(path.read_text(), module, path.name == "__init__.py", files):
            where = (str(path.relative_to(root.parent)), line, name)
            if name.split(".")[0] in FORBIDDEN and where not in forbidden:
                forbidden.append(where)
            if name in files and name != module:
                edges.add(name)
        graph[module] = edges
    return graph, sorted(forbidden)


def find_cycle(graph: dict) -> list | None:
    """One cycle of the directed graph as [a, b, ..., a], or None when it has none."""
    state, stack = {}, []          # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_inside_the_library():
    graph, _ = import_graph()
    assert len(graph) > 20 and "gsa_kernels.chunk" in graph     # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_never_imports_tuning_or_reference():
    _, forbidden = import_graph()
    assert not forbidden, "gsa_kernels imports its tooling or its test oracle: " + "; ".join(
        f"{file}:{line} imports {name}" for file, line, name in forbidden)


def test_launchers_and_config_lookup_sit_below_autograd_and_the_public_api():
    """The layers of the module docstring: nothing imports a layer above its own."""
    graph, _ = import_graph()
    lookup = {f"gsa_kernels.{m}" for m in ("problem_keys", "candidates", "resources", "launches",
                                           "tuned_file", "lookup", "autotune", "configs")}
    launchers = {m for m in graph if m.startswith("gsa_kernels.launchers")}
    upper = {"gsa_kernels.autograd", "gsa_kernels.ops", "gsa_kernels.chunk", "gsa_kernels.fused_recurrent",
             "gsa_kernels"} | {m for m in graph if m.startswith("gsa_kernels.layers")}
    for module in lookup:
        assert not graph[module] & (launchers | upper), (module, graph[module] & (launchers | upper))
    for module in launchers:
        assert not graph[module] & upper, (module, graph[module] & upper)
    kernels = {m for m in graph if m.startswith("gsa_kernels.kernels")}
    for module in kernels:
        assert graph[module] <= kernels, (module, graph[module] - kernels)


# ---------------------------------------------------------------------------------------------------
# the checks themselves can fail

def test_cycle_finder_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}) is None


def test_import_reader_sees_lazy_relative_and_dynamic_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "import importlib\n\n\ndef g():\n    import tuning.search\n"
        "    return importlib.import_module('pkg.a'), __import__('reference')\n")
    graph, forbidden = import_graph(pkg, "pkg")
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    assert forbidden == [("pkg/sub/b.py", 5, "tuning.search"), ("pkg/sub/b.py", 6, "reference")]
