"""pyro_vae's modules import one another without a circle.

The graph is read from the source with :mod:`ast`, not by importing anything. An edge
A -> B is any import statement in A that names B, wherever it stands: at module level,
inside a function (a lazy import, as ``evaluate_model`` once imported ``pyro_vae.models``),
or under ``if TYPE_CHECKING``. A lazy import still couples the two modules (each needs
the other to work), and it is how a circle usually hides, so it counts here. The forms
read: ``from .x import a``, ``from . import x``, ``from ..x import a``,
``import pyro_vae.x`` and ``from pyro_vae.x import a``; ``from P import a`` is an edge to
the submodule ``P.a`` when there is one, else to ``P``.

Not edges: names resolved from strings when first used (the registries' "module:attribute"
declarations in :mod:`pyro_vae.catalog`, the package's ``__getattr__``), and the parent
package that Python runs before any of its submodules (counting it would make every
package that imports its own families, as ``pyro_vae.models`` does, a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package in folder ``root``, its own modules only."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                for alias in node.names:
                    targets.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle ``[a, b, ..., a]`` of the graph, or None (depth-first search)."""
    done, path, on_path = set(), [], set()

    def visit(node):
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


def test_pyro_vae_imports_have_no_circle():
    graph = import_graph(REPO / "pyro_vae")
    # the walk sees lazy imports and the shared protocol below programs, bounds and posterior tools
    assert "pyro_vae.scoring" in graph["pyro_vae.ais"]  # (imported inside a function only)
    for module in ("pyro_vae.evaluate", "pyro_vae.posterior", "pyro_vae.models", "pyro_vae.models.vae"):
        assert "pyro_vae.protocol" in graph[module], module
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_walk_finds_a_circle_through_a_lazy_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import pkg.b\n")
    (package / "b.py").write_text("from .sub import c\n")
    (package / "sub" / "__init__.py").write_text("from . import c\n")
    (package / "sub" / "c.py").write_text("def f():\n    from ..a import g\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": {"pkg.sub.c"},
                     "pkg.sub.c": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    (package / "sub" / "c.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(package)) is None
