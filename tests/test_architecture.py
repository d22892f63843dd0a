"""The package's import graph, read with ``ast``: imports run one way down the declared layers.

Checked here, for every module under ``kernattr/``:

* each module belongs to a declared layer, and imports only from its own layer or below;
* the import graph (module-level and function-level imports alike) has no cycle;
* the numerical core imports no kernattr module inside a function (an import placed in a function
  to dodge a circle is still a circle), and imports neither flax nor optax;
* no private name (``_x``) is imported from another module (a helper two modules need is a named
  helper in a shared module);
* the experiments use the public API: ``kernattr``, ``kernattr.adapters``,
  ``kernattr.groundtruth``, the top-level public modules, and their own modules; no private
  module of the library. (The CLI and the engine of ``kernattr fit`` beside it are the library's
  own command and may use its modules, but no private name.)
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import NamedTuple

import pytest

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
PACKAGE = "kernattr"

# Lowest first. A module may import from its own layer or from a layer below it. A prefix names a
# module or a package (and everything in it; ``kernattr`` itself names only its ``__init__``); the
# longest matching prefix decides.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # argument checks, linear algebra, meshes and replication
    ("ground", ("kernattr._checks", "kernattr._linalg", "kernattr._sharding")),
    # statistics of arrays (ranks, correlations, LDS, bootstrap intervals); the surrogates'
    # leave-one-out rank criterion uses them, so they sit under the surrogates
    ("metrics", ("kernattr._metrics",)),
    ("data", ("kernattr.data",)),  # masks, loaders, synthetic games
    ("labels", ("kernattr.labels",)),  # gradients, projection, losses, the estimator, its solvers
    ("surrogates", ("kernattr.surrogates",)),
    ("readouts", ("kernattr.readouts",)),  # attributions, uncertainty, mask selection
    ("baselines", ("kernattr._baselines",)),
    ("training", ("kernattr.groundtruth", "kernattr.adapters")),  # optax / flax from here up
    # a user's model -> attributions, save / load, plots: built from the modules below
    ("workflow", ("kernattr.workflow", "kernattr.io", "kernattr.plots")),
    # kernattr/__init__.py re-exports the public names of everything above; nothing above
    # imports it but the drivers
    ("face", ("kernattr",)),
    ("experiments", ("kernattr.experiments",)),
    # the command line: flag parsing (cli) and the engine of `kernattr fit` (cli_fit)
    ("cli", ("kernattr.cli", "kernattr.cli_fit")),
)
CORE = ("ground", "metrics", "data", "labels", "surrogates", "readouts", "baselines")
DRIVERS = ("experiments",)
# what the drivers may import from the library (besides their own modules)
PUBLIC = ("kernattr", "kernattr.adapters", "kernattr.groundtruth", "kernattr.workflow",
          "kernattr.io", "kernattr.plots")
HEAVY = ("flax", "optax")


class Import(NamedTuple):
    source: str  # importing module
    target: str  # imported module (or package)
    names: tuple[str, ...]  # names taken from it (``from target import a, b``); () for ``import``
    line: int
    in_function: bool


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(rel)


def _modules() -> dict[str, str]:
    out = {}
    for base, dirs, files in os.walk(os.path.join(ROOT, PACKAGE)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(base, f)
                out[_module_name(path)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return os.path.exists(os.path.join(ROOT, *name.split("."), "__init__.py"))


def _resolve(module: str, level: int, target: str | None) -> str:
    """Absolute name of ``from <level dots><target> import ...`` inside ``module``."""
    if level == 0:
        return target or ""
    parts = module.split(".")
    base = parts if _is_package(module) else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str):
        self.module = module
        self.depth = 0
        self.imports: list[Import] = []
        self.heavy: list[tuple[str, int]] = []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            top = alias.name.split(".")[0]
            if top in HEAVY:
                self.heavy.append((alias.name, node.lineno))
            if top == PACKAGE:
                self.imports.append(Import(self.module, alias.name, (), node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom):
        target = _resolve(self.module, node.level, node.module)
        top = target.split(".")[0]
        if top in HEAVY:
            self.heavy.append((target, node.lineno))
        if top != PACKAGE:
            return
        names = tuple(a.name for a in node.names)
        # ``from pkg import submodule`` imports the submodule itself
        plain = tuple(n for n in names if f"{target}.{n}" not in MODULES)
        for n in names:
            if f"{target}.{n}" in MODULES:
                self.imports.append(Import(self.module, f"{target}.{n}", (), node.lineno, self.depth > 0))
        if plain:
            self.imports.append(Import(self.module, target, plain, node.lineno, self.depth > 0))


def _parse():
    imports, heavy = [], {}
    for module, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        v = _Visitor(module)
        v.visit(tree)
        imports += v.imports
        heavy[module] = v.heavy
    return imports, heavy


IMPORTS, HEAVY_IMPORTS = _parse()


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for p in prefixes:
            inside = module.startswith(p + ".") and p != PACKAGE  # "kernattr" is only __init__
            if (module == p or inside) and len(p) > best_len:
                best, best_len = name, len(p)
    return best


RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-loop): Tarjan."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _edges(imports) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    return edges


def _private_module(name: str) -> bool:
    return any(part.startswith("_") for part in name.split(".")[1:])


def _violations() -> set[tuple[str, str, str]]:
    """Every broken rule as ``(module, imported module, rule)``."""
    found = set()
    for imp in IMPORTS:
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if imp.target not in MODULES:
            found.add((imp.source, imp.target, "missing"))
            continue
        if RANK[dst] > RANK[src]:
            found.add((imp.source, imp.target, "upward"))
        if imp.in_function and src in CORE:
            found.add((imp.source, imp.target, "in-function"))
        if any(n.startswith("_") and not n.startswith("__") for n in imp.names):
            found.add((imp.source, imp.target, "private-name"))
        if src in DRIVERS and layer_of(imp.target) not in DRIVERS:
            if imp.target not in PUBLIC and _private_module(imp.target):
                found.add((imp.source, imp.target, "private"))
    return found


def test_the_package_was_found():
    assert "kernattr" in MODULES and len(MODULES) > 20
    assert len(IMPORTS) > 50


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"declare the layer of {missing} in LAYERS"


def test_imports_run_down_the_layers():
    bad = sorted(
        f"{imp.source} ({layer_of(imp.source)}) imports {imp.target} ({layer_of(imp.target)}) "
        f"at line {imp.line}"
        for imp in IMPORTS
        if imp.target in MODULES and RANK[layer_of(imp.target)] > RANK[layer_of(imp.source)]
    )
    assert not bad, "imports that run up the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    cycles = _cycles(_edges(IMPORTS))
    assert not cycles, f"import cycles: {cycles}"


def test_no_import_cycle_between_layers_or_subpackages():
    """The same check one level up: subpackages (and top-level modules) as nodes."""

    def unit(m):
        parts = m.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 else m

    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        a, b = unit(imp.source), unit(imp.target)
        if a != b and b != PACKAGE and a != PACKAGE:
            edges.setdefault(a, set()).add(b)
    assert not _cycles(edges)


def test_core_imports_nothing_inside_functions():
    bad = sorted(f"{i.source}:{i.line} imports {i.target} inside a function" for i in IMPORTS
                 if i.in_function and layer_of(i.source) in CORE)
    assert not bad, "\n".join(bad)


def test_core_imports_neither_flax_nor_optax():
    bad = sorted(f"{m}:{line} imports {what}" for m, hits in HEAVY_IMPORTS.items()
                 if layer_of(m) in CORE for what, line in hits)
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_module():
    bad = sorted(f"{i.source}:{i.line} imports {[n for n in i.names if n.startswith('_')]} "
                 f"from {i.target}" for i in IMPORTS
                 if any(n.startswith("_") and not n.startswith("__") for n in i.names))
    assert not bad, "\n".join(bad)


def test_experiments_use_the_public_api():
    """Experiments import the library only through its public modules (``import kernattr as
    ka``, ``kernattr.adapters``, ``kernattr.groundtruth``, ...), never a private module."""
    found = sorted(f"{v[0]} imports {v[1]}" for v in _violations() if v[2] == "private")
    assert not found, "\n".join(found)


def test_no_other_violation():
    other = sorted(v for v in _violations() if v[2] != "private")
    assert not other, other


def test_import_kernattr_loads_neither_flax_nor_optax():
    """At run time too: ``import kernattr`` (the core) loads no flax and no optax."""
    code = ("import sys, kernattr; bad = [m for m in ('flax', 'optax') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=120)


# --- the checker itself, on small made-up packages -------------------------------------------
@pytest.mark.parametrize("edges,expected", [
    ({"a": {"b"}, "b": {"c"}}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"a"}}, [["a"]]),
])
def test_cycle_finder(edges, expected):
    assert _cycles(edges) == expected


def test_visitor_sees_function_level_and_relative_imports():
    src = ("from .. import _checks\nfrom ._krr import fit_kernel_direct, _private\n"
           "def f():\n    from ..readouts import _attribution\n    import optax\n")
    v = _Visitor("kernattr.surrogates._nystrom")
    v.visit(ast.parse(src))
    got = {(i.target, i.names, i.in_function) for i in v.imports}
    assert ("kernattr._checks", (), False) in got
    assert ("kernattr.surrogates._krr", ("fit_kernel_direct", "_private"), False) in got
    assert ("kernattr.readouts._attribution", (), True) in got
    assert v.heavy == [("optax", 5)]


def test_layer_of():
    assert layer_of("kernattr") == "face"
    assert layer_of("kernattr._checks") == "ground"
    assert layer_of("kernattr.surrogates._krr") == "surrogates"
    assert layer_of("kernattr.experiments.pipeline") == "experiments"
    assert layer_of("kernattr.cli_fit") == "cli"
    assert layer_of("kernattr.somewhere_new") is None
    assert RANK["surrogates"] < RANK["readouts"] < RANK["workflow"] < RANK["face"] < RANK["experiments"]
