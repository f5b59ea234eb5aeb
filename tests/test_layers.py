"""The layer contract (docs/architecture.md): every import of the project, function-local ones included,
points down the layers or sideways within one, and no import cycle exists.

Read from the source with ``ast`` (nothing is imported), so an import hidden inside a function counts as
much as one at the top of a file. Imports under ``if TYPE_CHECKING:`` are annotations only and are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: module prefix -> layer (1 = bottom). The longest matching prefix decides.
LAYERS: dict[str, int] = {
    # 1 math and plumbing
    "diffmem": 1,  # the package root: lazy re-exports only (``__getattr__``), and ``__version__``
    "diffmem.scores": 1,
    "diffmem.hooks": 1,
    "diffmem.io": 1,
    "diffmem.saved": 1,
    "diffmem.seeding": 1,
    "diffmem.registry": 1,
    "diffmem.precision": 1,
    "diffmem.attention": 1,
    # 2 models and data
    "diffmem.fingerprint": 2,
    "diffmem.modelio": 2,
    "diffmem.conditioning": 2,
    "diffmem.generation": 2,
    "diffmem.data": 2,
    "diffmem.shards": 2,
    "diffmem.records": 2,
    "diffmem.prompt_sets": 2,
    "diffmem.embed": 2,
    "diffmem.tiny": 2,
    "diffmem.report": 2,
    # 3 edits
    "diffmem.edits": 3,
    "diffmem.edit": 3,
    # 4 methods
    "diffmem.detectors": 4,
    "diffmem.mitigations": 4,
    "diffmem.localize": 4,
    "diffmem.attack": 4,
    "diffmem.solidmark": 4,
    "diffmem.detect": 4,
    "diffmem.embedding_mitigation": 4,
    # 5 the guard
    "diffmem.guard": 5,
    # 6 flows
    "diffmem.evaluate": 6,
    "diffmem.train": 6,
    "diffmem.scan": 6,
    "diffmem.organism": 6,
    "diffmem.benchmark": 6,
    # 7 entry points
    "diffmem.cli": 7,
    "diffmem.cli_args": 7,
    "diffmem.commands": 7,
    "diffmem.__main__": 7,
    "diffmem.pipelines": 7,
    "benchmarks": 7,
}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for ``diffmem/``, ``pipelines/`` (``diffmem.pipelines``) and ``benchmarks/``."""
    out: dict[str, Path] = {}
    for folder, prefix in (("diffmem", ("diffmem",)), ("pipelines", ("diffmem", "pipelines"))):
        for path in (root / folder).rglob("*.py"):
            parts = prefix + path.relative_to(root / folder).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (root / "benchmarks").glob("*.py"):
        out[f"benchmarks.{path.stem}"] = path
    return out


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def project_imports(module: str, path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in ``path``, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[tuple[str, int]] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                found += [(a.name, child.lineno) for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package[: len(package) - child.level + 1] + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in modules else base, child.lineno))
            stack.append(child)
    return [(m, line) for m, line in found if m.split(".")[0] in ("diffmem", "benchmarks") and m in modules]


def layer_of(module: str) -> int:
    """The layer of ``module``: its longest prefix in ``LAYERS`` (the root ``diffmem`` only as itself)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS and (prefix != "diffmem" or module == "diffmem"):
            return LAYERS[prefix]
    raise KeyError(module)


def import_graph(root: Path = ROOT) -> dict[str, list[tuple[str, int]]]:
    files = module_files(root)
    return {m: project_imports(m, p, set(files)) for m, p in files.items()}


def upward_imports(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    return sorted(
        f"{src} (layer {layer_of(src)}) line {line} imports {dst} (layer {layer_of(dst)})"
        for src, targets in graph.items()
        for dst, line in targets
        if layer_of(dst) > layer_of(src)
    )


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    edges = {m: sorted({d for d, _ in ts if d != m}) for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return out


def test_every_module_has_a_layer():
    missing = []
    for module in module_files():
        try:
            layer_of(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"modules with no layer in LAYERS: {missing}"


def test_no_import_points_up_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_contract_catches_an_inverted_import(tmp_path):
    """A copy of a bottom-layer module that imports an entry point, and a two-module cycle, are caught."""
    for folder in ("diffmem", "pipelines", "benchmarks"):
        (tmp_path / folder).mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text("")
    (tmp_path / "diffmem" / "__init__.py").write_text("")
    (tmp_path / "diffmem" / "io.py").write_text(
        "def f():\n    from diffmem.cli import main  # hidden in a function\n    return main\n"
    )
    (tmp_path / "diffmem" / "cli.py").write_text("from diffmem import io\nmain = io\n")
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == ["diffmem.io (layer 1) line 2 imports diffmem.cli (layer 7)"]
    assert cycles(graph) == [["diffmem.cli", "diffmem.io"]]


@pytest.mark.parametrize("layer", sorted(set(LAYERS.values())))
def test_layers_are_listed_in_the_architecture_doc(layer):
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert f"| {layer} " in doc


def function_local_imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every ``diffmem`` import made inside a function of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.walk(node):
                if isinstance(child, ast.ImportFrom) and (child.module or "").split(".")[0] == "diffmem":
                    found.append((child.module, child.lineno))
                elif isinstance(child, ast.Import):
                    found += [
                        (a.name, child.lineno) for a in child.names if a.name.split(".")[0] == "diffmem"
                    ]
    return found


def test_project_imports_are_at_the_top_of_files():
    """A file's header shows what of the project it depends on: no ``diffmem`` import inside a function
    (an optional third-party dependency may still be imported where it is used)."""
    local = [
        f"{path.relative_to(ROOT)} line {line} imports {module} inside a function"
        for path in module_files().values()
        for module, line in function_local_imports(path)
    ]
    assert not local, "\n".join(local)


def test_a_function_local_project_import_is_caught(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\n\n\ndef f():\n    from diffmem.io import atomic_write\n    import json\n")
    assert function_local_imports(path) == [("diffmem.io", 5)]
