"""The package's layout contract (issue 10).

- The public API is the same objects whatever was imported first: no submodule shadows a public
  function (`matformer.train`, `matformer.generate`, `matformer.evaluate` are functions).
- The import graph of `src/matformer` (read with `ast`, module-level and function-level imports)
  has no cycle.
- No matformer module is imported inside a function, except the CLI's lazy verb loading (so
  `matformer --help` and `matformer info` never import torch), listed below with the reason.
- Dependencies run one way (issue 22): errors < tiers < models < io < data < {inference,
  training, slicing} < evaluation < serving < cli. A module imports only from its own layer or
  lower ones; the three peers in the middle do not import each other. `matformer/__init__.py` (the lazy
  public API) is exempt, and nothing but the CLI imports that API back.
- argparse is imported only under `matformer/cli/`: the library takes arguments, not flags.
- No module imports another module's `_private` name: what crosses a module boundary is public.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import matformer

PACKAGE = Path(matformer.__file__).parent

# Where a function may import a matformer module, and why: the command line stays torch-free
# until a verb runs (`matformer --help` and `matformer info` never import torch), so the CLI and
# each verb's `run` import the library lazily; `load_model` imports the model (torch) while the
# rest of io/checkpoint serves `info` without it.
LAZY_IMPORT_MODULES = ("matformer.cli", "matformer.cli.")
LAZY_IMPORT_FUNCTIONS = {("matformer.io.checkpoint", "load_model")}


def _lazy_allowed(module: str, function: str) -> bool:
    return (module == LAZY_IMPORT_MODULES[0] or module.startswith(LAZY_IMPORT_MODULES[1])
            or (module, function) in LAZY_IMPORT_FUNCTIONS)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The matformer modules an import statement in `module` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "matformer"]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "matformer":
        return []
    out = []
    for a in node.names:  # `from pkg import submodule` loads the submodule
        sub = f"{target}.{a.name}"
        out.append(sub if sub in MODULES else target)
    return out


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported matformer module, enclosing function or None) for every runtime import;
    imports under `if TYPE_CHECKING:` are for annotations only and are skipped."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for c in child.orelse:
                    visit(c, func)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _resolve(module, child, path.name == "__init__.py"):
                    found.append((target, func))
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            visit(child, func or inner)

    visit(tree, None)
    return [(t, f) for t, f in found if t != module]


GRAPH = {m: _imports(m) for m in MODULES}


def _imported_names(module: str) -> list[tuple[str, str]]:
    """(module, name) for every `from X import name` in `module`, any import (stdlib too), at any
    depth, `if TYPE_CHECKING:` included (an annotation still names what it uses); a plain
    `import X` gives (X, "")."""
    path = MODULES[module]
    found: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(target, a.name) for a in node.names]
    return found


NAMES = {m: _imported_names(m) for m in MODULES}

# The layer order, lowest first; the peers share a rank and may not import each other.
LAYERS = ("errors", "tiers", "models", "io", "data", ("inference", "training", "slicing", "hf"),
          "evaluation", "serving", "cli")
RANK = {name: i for i, layer in enumerate(LAYERS)
        for name in ((layer,) if isinstance(layer, str) else layer)}


def _layer(module: str) -> str | None:
    """The layer of a matformer module: its first component under `matformer` (None for the
    package itself, the lazy public API)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _layer_violations() -> list[str]:
    bad = []
    for m in MODULES:
        own = _layer(m)
        if own is None:  # matformer/__init__.py: the lazy public API, exempt
            continue
        if own not in RANK:
            bad.append(f"{m} is in no layer (add it to LAYERS or move it)")
            continue
        for target in sorted({t for t, _ in GRAPH[m]}):
            other = _layer(target)
            if other == own:
                continue
            if other is None:  # the public API re-exports every layer: only the CLI may use it
                if own != "cli":
                    bad.append(f"{m} imports the public API `matformer` (import from the module)")
            elif other not in RANK or RANK[other] > RANK[own]:
                bad.append(f"{m} ({own}) imports {target} ({other}): a higher layer")
            elif RANK[other] == RANK[own]:
                bad.append(f"{m} ({own}) imports its peer {target} ({other})")
    return bad


def _private_imports() -> list[str]:
    bad = []
    for m in MODULES:
        for target, name in NAMES[m]:
            if (target.split(".")[0] == "matformer" and target != m and name.startswith("_")
                    and not name.startswith("__") and f"{target}.{name}" not in MODULES):
                bad.append(f"{m} imports {target}.{name}")
    return sorted(set(bad))


def test_the_import_graph_has_no_cycle() -> None:
    edges = {m: sorted({t for t, _ in GRAPH[m] if t in MODULES}) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                walk(t, path + [t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            walk(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_matformer_imports_inside_functions_but_the_lazy_cli() -> None:
    lazy = sorted({(m, f, t) for m in MODULES for t, f in GRAPH[m]
                   if f is not None and not _lazy_allowed(m, f)})
    assert not lazy, "function-level imports of matformer modules: " + ", ".join(
        f"{m}.{f} imports {t}" for m, f, t in lazy)


def test_dependencies_run_one_way_through_the_layers() -> None:
    bad = _layer_violations()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_only_the_cli_imports_argparse() -> None:
    bad = sorted(m for m in MODULES if not (m == "matformer.cli" or m.startswith("matformer.cli."))
                 and any(t == "argparse" or t.startswith("argparse.") for t, _ in NAMES[m]))
    assert not bad, "argparse outside matformer/cli/: " + ", ".join(bad)


def test_no_module_imports_another_modules_private_name() -> None:
    bad = _private_imports()
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_rule_readers_see_what_they_check() -> None:
    # The three rules above would pass vacuously on readers that find nothing.
    assert ("argparse", "") in NAMES["matformer.cli"] or any(
        t == "argparse" for m in MODULES if m.startswith("matformer.cli.") for t, _ in NAMES[m])
    assert set(RANK) <= {_layer(m) for m in MODULES} | {"errors", "tiers"}
    assert RANK["models"] < RANK["io"] < RANK["data"] < RANK["slicing"] == RANK["training"]
    assert RANK["evaluation"] < RANK["cli"]


def test_the_graph_reader_sees_imports() -> None:
    # The two tests above would pass vacuously on a reader that finds nothing.
    assert ("matformer.models.lm.config", None) in GRAPH["matformer.models.lm.model"]
    assert any(f is not None for _, f in GRAPH["matformer.cli.eval"])


def test_no_module_is_named_like_a_public_name() -> None:
    # A submodule import sets the package attribute of its name: it would replace the function.
    short = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    assert not short & set(matformer.__all__)


_CHECK_ORDERS = r"""
import importlib, json, pkgutil, sys, types

def purge():
    for name in [n for n in sys.modules if n == "matformer" or n.startswith("matformer.")]:
        del sys.modules[name]

def every_module():
    import matformer
    return sorted(m.name for m in pkgutil.walk_packages(matformer.__path__, "matformer.")
                  if not m.name.endswith(".__main__"))  # runs the CLI: not a library module

def check():
    import matformer
    bad = []
    for name in matformer.__all__:
        obj = getattr(matformer, name)
        want = getattr(importlib.import_module(matformer._EXPORTS[name]), name)
        if isinstance(obj, types.ModuleType) or obj is not want:
            bad.append(name)
    return bad

modules = every_module()
# First touches: every public name, and every direct child of the package. Only a direct child
# `matformer.X` is bound as an attribute of `matformer` when imported (what could replace a public
# name), and a deeper module first imports its parents in order, so starting from each direct
# child covers what starting from every module covered (O(children) orders, not O(modules)).
children = sorted({".".join(m.split(".")[:2]) for m in modules})
orders = [[("name", n)] for n in importlib.import_module("matformer").__all__]
orders += [[("module", m)] for m in children]
failures = {}
for first in orders:
    purge()
    import matformer
    kind, what = first[0]
    if kind == "name":
        getattr(matformer, what)
    else:
        importlib.import_module(what)
    bad = check()
    for m in modules:  # then everything else
        importlib.import_module(m)
    bad += check()
    if bad:
        failures[f"{kind} {what} first"] = sorted(set(bad))
print(json.dumps({"orders": len(orders), "failures": failures}))
"""


def test_public_names_are_the_same_objects_in_every_import_order() -> None:
    # One fresh interpreter; before each order every matformer module is dropped from
    # sys.modules, so each order starts from a fresh package (torch stays loaded: it is not ours).
    out = subprocess.run([sys.executable, "-c", _CHECK_ORDERS], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["orders"] > len(matformer.__all__) + 5
    assert result["failures"] == {}


@pytest.mark.parametrize("first", [
    "matformer.TrainConfig",  # the example: train was the module after this
    "__import__('matformer.inference.decode')",
    "__import__('matformer.evaluation.lm')",
])
def test_public_functions_in_a_fresh_interpreter(first: str) -> None:
    code = (
        "import types, matformer\n"
        f"{first}\n"
        "for n in ('train', 'generate', 'evaluate', 'speculative_generate', 'load_model'):\n"
        "    assert callable(getattr(matformer, n)) and not isinstance(getattr(matformer, n),"
        " types.ModuleType), n\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
