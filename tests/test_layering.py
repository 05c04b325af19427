"""The import arrows of DESIGN.md, read from the source with `ast` (nothing is imported to check them).

- `toolkit` (all but the CLI, toolkit/cli/) never imports `export` or `serve`, at any depth;
  the CLI imports them only inside functions (or for type checking), so `toolkit --help` stays light;
- `export` never imports `serve`;
- the ONNX Runtime, OpenVINO and TensorRT runners, and every project module they reach, never
  import torch or torchvision (importing torch costs seconds and hundreds of MB);
- no import cycles among the project's modules, counting imports inside functions and under
  `if TYPE_CHECKING:` (a lazy or type-only cycle is still two modules that cannot be understood
  apart). Type-only imports never run, so they do not count for torch.

Imports by computed name (`importlib.import_module(...)`, as the runtime registry does) are not seen.

And size, which the arrows alone do not hold (issue 20): no function over 80 lines, no module over
600, in toolkit/, export/ and serve/. Past those, a function wants named phases and a module a split
by job.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("toolkit", "export", "serve")
TORCH_FREE_RUNNERS = ("toolkit.runtime.onnxruntime_runner", "toolkit.runtime.openvino_runner",
                      "toolkit.runtime.tensorrt_runner")
TORCH = ("torch", "torchvision")
CLI = "toolkit.cli"  # the package of the command line, the one part of toolkit that may reach export/serve
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


@dataclass(frozen=True)
class Import:
    """One imported name, as an absolute dotted path, and where it is imported."""

    importer: str
    target: str
    line: int
    lazy: bool  # inside a function or method: runs when called, not when imported
    type_only: bool  # under `if TYPE_CHECKING:`: never runs

    def __str__(self) -> str:
        where = "type-only" if self.type_only else "in a function" if self.lazy else "at module level"
        return f"{self.importer}:{self.line} imports {self.target} ({where})"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module: str, is_package: bool) -> Iterator[Import]:
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, lazy: bool, type_only: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno, lazy, type_only)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from a import b` may import the submodule a.b; resolution keeps whichever exists.
            for alias in node.names:
                yield Import(module, f"{base}.{alias.name}" if alias.name != "*" else base, node.lineno, lazy,
                             type_only)
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            child_type_only = type_only or (isinstance(node, ast.If) and _is_type_checking(node.test)
                                            and child in node.body)
            yield from visit(child, child_lazy, child_type_only)

    yield from visit(tree, False, False)


class ImportGraph:
    """Every import in the given packages under `root`, resolved to project modules where it names one."""

    def __init__(self, root: Path, packages: tuple[str, ...]) -> None:
        self.modules: dict[str, Path] = {}
        for package in packages:
            for path in sorted((root / package).rglob("*.py")):
                self.modules[module_name(path, root)] = path
        self.imports: list[Import] = []
        for name, path in self.modules.items():
            tree = ast.parse(path.read_text("utf-8"), filename=str(path))
            self.imports += _imports(tree, name, path.name == "__init__.py")

    def resolve(self, target: str) -> str | None:
        """The project module a dotted name lives in (longest prefix), or None for third-party code."""
        while target and target not in self.modules:
            target = target.rpartition(".")[0]
        return target or None

    def edges(self, type_only: bool = False) -> dict[str, set[str]]:
        """module -> project modules it imports when run (and, with `type_only`, for type checking)."""
        out: dict[str, set[str]] = {name: set() for name in self.modules}
        for imp in self.imports:
            target = self.resolve(imp.target)
            if target is not None and target != imp.importer and (type_only or not imp.type_only):
                out[imp.importer].add(target)
        return out

    def reached_from(self, start: str) -> set[str]:
        """Modules that importing `start` and calling its functions can load: imports at any depth,
        plus the parent packages whose `__init__` runs first."""
        edges, seen, todo = self.edges(), set(), [start]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            todo += edges[name]
            parts = name.split(".")
            todo += [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in self.modules]
        return seen


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def _is_package(target: str, packages: tuple[str, ...]) -> bool:
    return target.split(".")[0] in packages


def _in_cli(module: str) -> bool:
    return module == CLI or module.startswith(CLI + ".")


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph(ROOT, PACKAGES)


def test_the_graph_sees_the_project(graph):
    """Guards the rules below against passing on an empty or misread graph."""
    assert {CLI, "toolkit.evaluate", "export.pipeline", "serve.server"} <= set(graph.modules)
    assert "toolkit.errors" in graph.edges()["toolkit.evaluate"]
    from_cli = {(graph.resolve(i.target), i.lazy) for i in graph.imports if _in_cli(i.importer)}
    assert ("export.pipeline", True) in from_cli and ("serve.server", True) in from_cli
    assert all(graph.reached_from(r) for r in TORCH_FREE_RUNNERS)


def test_only_the_cli_imports_export_or_serve(graph):
    bad = [str(i) for i in graph.imports if i.importer.startswith("toolkit") and not _in_cli(i.importer)
           and _is_package(i.target, ("export", "serve"))]
    assert bad == [], "toolkit must not depend on export/serve:\n" + "\n".join(bad)


def test_the_cli_imports_export_and_serve_only_inside_functions(graph):
    bad = [str(i) for i in graph.imports if _in_cli(i.importer)
           and _is_package(i.target, ("export", "serve")) and not (i.lazy or i.type_only)]
    assert bad == [], "keep `toolkit --help` light:\n" + "\n".join(bad)


def test_export_never_imports_serve(graph):
    bad = [str(i) for i in graph.imports
           if i.importer.startswith("export") and _is_package(i.target, ("serve",))]
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize("runner", TORCH_FREE_RUNNERS)
def test_torch_free_runtimes_never_reach_torch(graph, runner):
    reached = graph.reached_from(runner)
    bad = [str(i) for i in graph.imports if i.importer in reached and not i.type_only
           and i.target.split(".")[0] in TORCH]
    assert bad == [], f"{runner} reaches torch:\n" + "\n".join(bad)


def test_no_import_cycles_even_lazy_or_type_only_ones(graph):
    found = cycles(graph.edges(type_only=True))
    assert found == [], "import cycles (imports inside functions and under TYPE_CHECKING count):\n" + \
        "\n".join(" <-> ".join(c) for c in found)


# --- size -------------------------------------------------------------------------------------------

def long_functions(root: Path, packages: tuple[str, ...], limit: int) -> Iterator[str]:
    """`module:line name (N lines)` for every function or method longer than `limit`, from `def` (or
    its first decorator) to its last line; nested functions count inside their parent too."""
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    length = (node.end_lineno or node.lineno) - start + 1
                    if length > limit:
                        yield f"{module_name(path, root)}:{node.lineno} {node.name} ({length} lines)"


def long_modules(root: Path, packages: tuple[str, ...], limit: int) -> Iterator[str]:
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            lines = len(path.read_text("utf-8").splitlines())
            if lines > limit:
                yield f"{module_name(path, root)} ({lines} lines)"


def test_no_function_over_80_lines():
    bad = list(long_functions(ROOT, PACKAGES, MAX_FUNCTION_LINES))
    assert bad == [], f"over {MAX_FUNCTION_LINES} lines: split into named phases:\n" + "\n".join(bad)


def test_no_module_over_600_lines():
    bad = list(long_modules(ROOT, PACKAGES, MAX_MODULE_LINES))
    assert bad == [], f"over {MAX_MODULE_LINES} lines: split by job:\n" + "\n".join(bad)


def error_classes(root: Path, packages: tuple[str, ...]) -> Iterator[tuple[str, str, int, list[str]]]:
    """(module, class, line, base names) of every class deriving, by name, from an exception."""
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                if not isinstance(node, ast.ClassDef):
                    continue
                bases = [b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                         if isinstance(b, (ast.Name, ast.Attribute))]
                if any(b.endswith(("Error", "Exception")) for b in bases):
                    yield module_name(path, root), node.name, node.lineno, bases


def test_every_error_is_named_error():
    """One hierarchy (toolkit/errors.py for the core, serve/errors.py for the server), names `...Error`."""
    found = list(error_classes(ROOT, PACKAGES))
    assert {"ToolkitError", "UsageError"} <= {name for _, name, _, _ in found}  # the scan sees the hierarchy
    bad = [f"{module}:{line} class {name}({', '.join(bases)})" for module, name, line, bases in found
           if not name.endswith("Error")]
    assert bad == [], "exceptions are named ...Error:\n" + "\n".join(bad)


# --- the checker itself finds what it should, on a generated project -------------------------------

def test_checker_finds_lazy_cycles_layer_breaks_and_torch(tmp_path):
    files = {
        "toolkit/__init__.py": "",
        "toolkit/a.py": "from . import b\n",
        "toolkit/b.py": "def f():\n    from .c import g\n",
        "toolkit/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from serve import app\n"
                        "def g():\n    import toolkit.a\n",
        "toolkit/runtime/__init__.py": "",
        "toolkit/runtime/fast.py": "from ..d import h\n",
        "toolkit/d.py": "def h():\n    import torch.nn\n",
        "toolkit/e.py": "from .f import x\n",
        "toolkit/f.py": "if TYPE_CHECKING:\n    from .e import y\n",
        "serve/__init__.py": "",
        "serve/app.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    fake = ImportGraph(tmp_path, ("toolkit", "serve"))
    assert cycles(fake.edges()) == [["toolkit.a", "toolkit.b", "toolkit.c"]]  # e <-> f is type-only...
    assert cycles(fake.edges(type_only=True)) == [["toolkit.a", "toolkit.b", "toolkit.c"],
                                                  ["toolkit.e", "toolkit.f"]]  # ...and counts here
    serve_import = [i for i in fake.imports if i.target.startswith("serve")]
    assert len(serve_import) == 1 and serve_import[0].type_only and serve_import[0].importer == "toolkit.c"
    reached = fake.reached_from("toolkit.runtime.fast")
    assert reached == {"toolkit", "toolkit.runtime", "toolkit.runtime.fast", "toolkit.d"}
    assert [i.line for i in fake.imports if i.importer in reached and i.target.startswith("torch")] == [2]


def test_size_checker_counts_decorators_and_nested_functions(tmp_path):
    def body(indent: int) -> str:  # eight lines
        return "\n".join(f"{' ' * indent}x{i} = {i}" for i in range(8))

    (tmp_path / "toolkit").mkdir()
    (tmp_path / "toolkit" / "big.py").write_text(
        f"@decorator\ndef outer():\n    def inner():\n{body(8)}\n        return 1\n{body(4)}\n"
        f"class A:\n    def method(self):\n{body(8)}\n")
    found = list(long_functions(tmp_path, ("toolkit",), 10))
    assert found == ["toolkit.big:2 outer (20 lines)"]  # inner (10 lines) and method (9) are within
    assert list(long_modules(tmp_path, ("toolkit",), 29)) == ["toolkit.big (30 lines)"]
    assert list(long_modules(tmp_path, ("toolkit",), 30)) == []
