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


def test_coremltools_imports_without_the_probes_it_never_needs_here() -> None:
    """`quiet_coremltools` imports coremltools with scikit-learn, transformers, ExecuTorch
    and torchao seen as absent (4.8 s of 6.2 s in an `[all]` install); each still imports
    afterwards, and the ExecuTorch backend's own imports work in the same process."""
    code = ("import sys\n"
            "from mobileone_cli.mil import _UNUSED_PROBES, quiet_coremltools\n"
            "with quiet_coremltools():\n"
            "    import coremltools\n"
            "print(sorted(set(_UNUSED_PROBES) & {m.split('.')[0] for m in sys.modules}))\n"
            "import importlib.util\n"
            "installed = [n for n in _UNUSED_PROBES if importlib.util.find_spec(n)]\n"
            "for name in installed:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(installed) == sorted(set(_UNUSED_PROBES) & set(sys.modules)))\n"
            "from coremltools.converters.mil.frontend.torch import load\n")
    assert _printed(code) == ["[]", "True"]


def test_asking_a_backend_whether_it_is_installed_imports_none_of_it() -> None:
    """`--to all` asks every backend first; that must leave ExecuTorch and LiteRT unimported
    (a parent imported there would make coremltools import ExecuTorch's exporter, 1.8 s)."""
    code = ("import sys\n"
            "from mobileone_cli.export.registry import BACKENDS\n"
            "from mobileone_cli.export.runtimes import findable\n"
            "print([name for name, backend in BACKENDS.items() if backend.missing()])\n"
            "print(sorted({'executorch', 'litert_torch', 'ai_edge_litert', 'onnxruntime'}\n"
            "             & {name.split('.')[0] for name in sys.modules}))\n"
            "print(findable('json.decoder'), findable('os.path'), findable('json.absent'),\n"
            "      findable('absent_package.module'))\n")
    assert _printed(code) == ["[]", "[]", "True True False False"]


def _printed(code: str) -> list[str]:
    """The lines a fresh interpreter prints running `code`; its stderr if it fails."""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.splitlines()
