"""The package's import graph: no cycle, imports only point down the data path, every module imports alone.

The static graph holds every import of a ``mambavlm`` module in the package, function-level ones
included (a cycle held open by an import inside a function is still a cycle). The layers are the
README's map, bottom to top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mambavlm"

LAYERS: list[tuple[str, ...]] = [
    ("mambavlm.versions", "mambavlm.config", "mambavlm.atomic", "mambavlm.processes", "mambavlm.progress"),
    ("mambavlm.ops",),
    ("mambavlm.scan",),
    ("mambavlm.vision",),
    ("mambavlm.projector",),
    ("mambavlm.llm",),
    ("mambavlm.generation",),
    ("mambavlm.model", "mambavlm.configuration", "mambavlm.processing"),
    ("mambavlm.data",),
    ("mambavlm.training",),
    ("mambavlm.distill", "mambavlm.eval"),
    ("mambavlm.describe", "mambavlm.chat", "mambavlm.demo", "mambavlm"),
]
"""Bottom to top: a module may import from its own layer or a lower one."""

OPTIONAL_DEPENDENCIES: dict[str, str] = {"mambavlm.eval.lmms_eval_model": "lmms_eval"}
"""Modules that exist for an optional extra and import it at the top: imported only where it is installed."""


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (resolved to the deepest known module)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if is_package else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    graph = {name: imported_modules(name, path, set(names)) for name, path in names.items()}
    # a module importing a name from its own package's __init__ (mambavlm.x -> mambavlm.x.y) is the
    # facade re-exporting it; an import of the bare top package is an edge to the facade
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (each one holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def layer_of(module: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (level, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it where it sits on the data path")
    return best[0]


def test_the_cycle_finder_finds_a_cycle_held_open_by_a_function_level_import(tmp_path: Path) -> None:
    """The detector itself, on a hand-made package: a -> b at top level, b -> a inside a function."""
    (tmp_path / "a.py").write_text("from pkg.b import g\n")
    (tmp_path / "b.py").write_text("def g():\n    from pkg.a import f\n    return f\n")
    known = {"pkg.a", "pkg.b"}
    graph = {
        "pkg.a": imported_modules("pkg.a", tmp_path / "a.py", known),
        "pkg.b": imported_modules("pkg.b", tmp_path / "b.py", known),
    }
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert strongly_connected(graph) == [["pkg.a", "pkg.b"]]
    assert strongly_connected({"x": {"y"}, "y": set()}) == []


def test_the_package_has_no_import_cycle() -> None:
    cycles = strongly_connected(import_graph())
    assert not cycles, f"import cycles (each list imports itself through its members): {cycles}"


def test_imports_only_point_down_the_data_path() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_module_is_named_like_a_standard_library_module() -> None:
    clashes = sorted(
        name for name in module_names() if name.rsplit(".", 1)[-1] in sys.stdlib_module_names
    )
    assert not clashes, f"modules shadowing the standard library: {clashes}"


@pytest.mark.slow
def test_every_module_imports_on_its_own() -> None:
    """Each module imported first, with no other package module loaded (third-party libraries are
    loaded once to keep this fast): an import that only works in some order fails here. Importing any
    submodule runs the package's ``__init__`` first, so the modules it loads are checked by importing the
    package alone (importing one of them on its own would repeat that same import); every other module is
    then imported after a fresh package."""
    script = textwrap.dedent(
        f"""
        import importlib, importlib.util, sys, traceback
        import torch, transformers, timm, accelerate  # noqa: F401  (loaded once; ours are not)

        def ours():
            return {{m for m in sys.modules if m == "mambavlm" or m.startswith("mambavlm.")}}

        failures, covered = [], set()
        for name in ["mambavlm"] + {sorted(module_names())!r}:
            needs = {OPTIONAL_DEPENDENCIES!r}.get(name)
            if name in covered or (needs and importlib.util.find_spec(needs) is None):
                continue
            for loaded in ours():
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception:
                failures.append(name + ":\\n" + traceback.format_exc(limit=3))
            if name == "mambavlm":
                covered = ours()
        print("\\n".join(failures))
        sys.exit(1 if failures else 0)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
