"""The package's import structure: no module of ours imported inside a function, no import
cycle, and the light modules the CLI starts with import no torch, rich or converter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mobileone_cli"
OURS = "mobileone_cli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The modules of ours an import statement names (`from x import y` may name module x.y)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == OURS]
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
        base = ".".join([*package, base]) if base else ".".join(package)
    if base.split(".")[0] != OURS:
        return []
    names = [base]
    names += [f"{base}.{alias.name}" for alias in node.names]
    return names


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _top_level_imports(path: Path) -> set[str]:
    module = _module_name(path)
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        statements = [node]
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not run
            statements = [] if "TYPE_CHECKING" in ast.unparse(node.test) else [*node.body]
        for statement in statements:
            if isinstance(statement, ast.Import | ast.ImportFrom):
                found.update(name for name in _imported(statement, module) if name in MODULES)
    found.discard(module)
    return found


@pytest.mark.parametrize("path", MODULES.values(), ids=list(MODULES))
def test_no_module_of_ours_is_imported_inside_a_function(path: Path) -> None:
    module = _module_name(path)
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom):
                assert not _imported(node, module), (
                    f"{module}.{function.name} imports {ast.unparse(node)}: import it at the top")


def test_the_package_has_no_import_cycle() -> None:
    # A package's __init__ runs before its submodules, so `a.b` depends on `a` too: a
    # package __init__ that imported its own submodules would close a cycle here.
    graph = {module: _top_level_imports(path) for module, path in MODULES.items()}
    for module in graph:
        parent = module.rsplit(".", 1)[0]
        if "." in module and parent in graph:
            graph[module] = graph[module] | {parent}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, " -> ".join([*visiting[visiting.index(module):], module])
        visiting.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_cli_starts_without_torch_rich_or_any_converter() -> None:
    code = ("import sys, mobileone_cli.cli; "
            "heavy = {'torch', 'numpy', 'rich', 'onnx', 'onnxruntime', 'coremltools', "
            "'executorch', 'litert_torch', 'ai_edge_litert'} & set(sys.modules); "
            "print(sorted(heavy))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True)
    assert completed.stdout.strip() == "[]"
