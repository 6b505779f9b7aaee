"""The shape of the code: who may import whom, no import cycles, module and function sizes.

The import graph is built with ``ast`` from every ``import`` in the tree:
imports inside functions and under ``TYPE_CHECKING`` count like any other. An import of
``a.b.c`` reaches ``a`` and ``a.b`` too, except the importer's own enclosing packages
(Python runs those first whatever the module imports).

Each module belongs to a *part*: ``actors``, ``broker``, ``workers``, ``mlx_fleet.client``,
``mlx_fleet.gateway``, the rest of ``mlx_fleet`` (the composition root), ``tests`` and
``benchmarks``. ``ALLOWED`` says which parts each part may import:

- ``actors`` is the base: it imports nothing of ours above it.
- ``broker`` and ``workers`` import ``actors`` and never each other.
- ``mlx_fleet.client`` imports only ``actors``; ``mlx_fleet.gateway`` only the client and ``actors``.
- the rest of ``mlx_fleet`` (the CLI, the wiring, the embedded fleet) imports everything, and only
  it, ``tests`` and ``benchmarks`` import it.
- Nothing outside ``tests`` imports ``tests`` (benchmarks have helpers of their own).
- No module imports itself back, directly or through others.
- Every import of our own packages names a module that exists (benchmarks too, which no test imports).
- No production module is over 400 lines, and no function over 80.
- Every repository file a comment or a doc cites exists.
- No merge-conflict marker is left in a tracked text.
- Every test module under tests/integration and tests/conformance carries the
  ``integration`` marker in its ``pytestmark``; no test module under tests/unit
  imports what starts processes.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = ("actors", "broker", "workers", "mlx_fleet")
PACKAGES = (*PRODUCTION, "tests", "benchmarks")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
SUBPARTS = ("mlx_fleet.client", "mlx_fleet.gateway")  # parts inside a package, checked before the package
ROOT_PART = "mlx_fleet"
# Which parts each part may import (itself always).
ALLOWED: dict[str, set[str]] = {
    "actors": set(),
    "broker": {"actors"},
    "workers": {"actors"},
    "mlx_fleet.client": {"actors"},
    "mlx_fleet.gateway": {"actors", "mlx_fleet.client"},
    ROOT_PART: {"actors", "broker", "workers", "mlx_fleet.client", "mlx_fleet.gateway"},
    "benchmarks": {*PRODUCTION, "mlx_fleet.client", "mlx_fleet.gateway"},
    "tests": {*PRODUCTION, "mlx_fleet.client", "mlx_fleet.gateway", "benchmarks"},
}


def part_of(module: str) -> str:
    """The part a dotted module name belongs to (``mlx_fleet.client.core`` -> ``mlx_fleet.client``)."""
    for sub in SUBPARTS:
        if module == sub or module.startswith(sub + "."):
            return sub
    return module.split(".")[0]


# Over the limits and not yet split: each entry says why. An entry that no longer
# applies fails the test, so the list only ever shrinks.
MODULE_ALLOWANCE: dict[str, str] = {}
FUNCTION_ALLOWANCE: dict[str, str] = {}


@dataclass
class Graph:
    """Modules (dotted names) and the modules each one imports."""

    files: dict[str, Path] = field(default_factory=dict)
    edges: dict[str, set[str]] = field(default_factory=dict)


def module_name(path: Path, root: Path) -> str:
    """``actors/children.py`` -> ``actors.children``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an ``import`` anywhere in ``tree`` may refer to (``from a import b``: a and a.b)."""
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(p for p in [*base_parts, node.module or ""] if p)
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def build_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> Graph:
    """The import graph of ``packages`` under ``root``; an import of ``a.b.c`` also reaches ``a`` and ``a.b``."""
    graph = Graph()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            graph.files[module_name(path, root)] = path
    for module, path in graph.files.items():
        targets: set[str] = set()
        for name in imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py"):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in graph.files and prefix != module and not module.startswith(prefix + "."):
                    targets.add(prefix)
        graph.edges[module] = targets
    return graph


def missing_imports(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Imports of our own packages that name no module of the tree (a module moved or removed)."""
    graph = build_graph(root, packages)
    bad = []
    for module, path in graph.files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            bad += [f"{module} -> {name}" for name in names
                    if name.split(".")[0] in packages and name not in graph.files]
    return sorted(bad)


def wrong_way_imports(graph: Graph) -> list[str]:
    """Imports that break the layering, as ``importer -> imported`` lines."""
    bad = []
    for module, targets in sorted(graph.edges.items()):
        src = part_of(module)
        for target in sorted(targets):
            dst = part_of(target)
            if dst != src and dst not in ALLOWED.get(src, set()):
                bad.append(f"{module} -> {target}")
    return bad


def cycles(graph: Graph) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.edges.get(v, ())):
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
                found.append(sorted(group))

    for v in sorted(graph.edges):
        if v not in index:
            visit(v)
    return found


def oversized(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Production modules over MAX_MODULE_LINES and functions over MAX_FUNCTION_LINES, with their lengths."""
    modules: dict[str, int] = {}
    functions: dict[str, int] = {}
    for package in PRODUCTION:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            text = path.read_text()
            if len(text.splitlines()) > MAX_MODULE_LINES:
                modules[rel] = len(text.splitlines())
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        functions[f"{rel}:{node.name}"] = length
    return modules, functions


PROCESS_SUITES = ("tests/integration", "tests/conformance")
# Importing one of these is how a test module starts processes (or a whole fleet).
STARTS_PROCESSES = ("subprocess", "multiprocessing", "pty", "mlx_fleet.embedded", "tests.integration")


def has_module_marker(tree: ast.Module, marker: str) -> bool:
    """True when a top-level ``pytestmark = ...`` (one mark or a list of them) includes ``pytest.mark.<marker>``."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            for sub in ast.walk(node.value):
                if (isinstance(sub, ast.Attribute) and sub.attr == marker and isinstance(sub.value, ast.Attribute)
                        and sub.value.attr == "mark"):
                    return True
    return False


def unmarked_process_tests(root: Path) -> list[str]:
    """Test modules of the process suites without ``pytest.mark.integration`` in their ``pytestmark``."""
    return [path.relative_to(root).as_posix() for suite in PROCESS_SUITES
            for path in sorted((root / suite).rglob("test_*.py"))
            if not has_module_marker(ast.parse(path.read_text(), str(path)), "integration")]


def unit_tests_starting_processes(root: Path) -> list[str]:
    """``tests/unit`` test modules that import something of STARTS_PROCESSES, as ``module -> what`` lines."""
    found = []
    for path in sorted((root / "tests" / "unit").rglob("test_*.py")):
        module = module_name(path, root)
        names = imported_names(ast.parse(path.read_text(), str(path)), module, False)
        found += [f"{module} -> {what}" for what in STARTS_PROCESSES
                  if any(name == what or name.startswith(what + ".") for name in names)]
    return found


# ---- the checks on this tree -------------------------------------------------------------------


def test_no_import_goes_the_wrong_way() -> None:
    assert wrong_way_imports(build_graph(ROOT)) == []


def test_every_import_of_our_own_names_an_existing_module() -> None:
    assert missing_imports(ROOT) == []


def test_there_is_no_import_cycle() -> None:
    assert cycles(build_graph(ROOT)) == []


def test_only_the_composition_root_imports_actors_broker_and_workers_together() -> None:
    graph = build_graph(ROOT)
    packages_reached: dict[str, set[str]] = {}
    for module, targets in graph.edges.items():
        if module.split(".")[0] in PRODUCTION:
            packages_reached.setdefault(module.split(".")[0], set()).update(t.split(".")[0] for t in targets)
    assert {p for p, reached in packages_reached.items() if {"actors", "broker", "workers"} <= reached} == {"mlx_fleet"}


def test_modules_and_functions_stay_small() -> None:
    modules, functions = oversized(ROOT)
    assert {m: n for m, n in modules.items() if m not in MODULE_ALLOWANCE} == {}
    assert {f: n for f, n in functions.items() if f not in FUNCTION_ALLOWANCE} == {}
    stale = (set(MODULE_ALLOWANCE) - set(modules)) | (set(FUNCTION_ALLOWANCE) - set(functions))
    assert not stale, f"within the limits now; drop the allowance: {sorted(stale)}"


def test_every_test_that_starts_processes_is_marked_integration() -> None:
    assert unmarked_process_tests(ROOT) == []
    assert unit_tests_starting_processes(ROOT) == []


CITED = re.compile(r"\b(?:actors|broker|workers|mlx_fleet|tests|benchmarks|docs|scripts)/[\w./-]*\.(?:py|md|sh|json|toml)\b")


def test_every_cited_file_exists() -> None:
    texts = [p for p in ROOT.glob("*.md")] + [p for p in (ROOT / "docs").glob("*.md")]
    texts += [p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if p != Path(__file__).resolve()]
    texts.append(ROOT / "benchmarks" / "README.md")
    missing = {f"{path.relative_to(ROOT)}: {ref}" for path in texts for ref in CITED.findall(path.read_text())
               if not (ROOT / ref).exists()}
    assert sorted(missing) == []


MARKER = re.compile(r"^(?:<{7}|>{7})(?: |$)", re.MULTILINE)


def test_no_merge_conflict_marker_is_left_in_a_tracked_text() -> None:
    texts = [p for p in ROOT.glob("*.md")] + [p for p in (ROOT / "docs").rglob("*") if p.is_file()]
    texts += [p for package in PACKAGES for p in (ROOT / package).rglob("*")
              if p.is_file() and p.suffix in (".py", ".md", ".sh", ".toml", ".txt")]
    texts += [ROOT / "pyproject.toml", ROOT / ".ci" / "run", *(ROOT / "scripts").glob("*")]
    marked = sorted(str(p.relative_to(ROOT)) for p in texts if p.is_file() and MARKER.search(p.read_text(errors="replace")))
    assert marked == []


# ---- the checker itself, on a made-up tree ----------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


BASE = {"actors/__init__.py": "", "broker/__init__.py": "", "workers/__init__.py": "", "mlx_fleet/__init__.py": "",
        "mlx_fleet/client/__init__.py": "", "mlx_fleet/gateway/__init__.py": ""}


@pytest.mark.parametrize(("files", "want"), [
    ({"actors/a.py": "def f():\n    from broker import b\n", "broker/b.py": ""}, ["actors.a -> broker", "actors.a -> broker.b"]),
    ({"broker/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import workers.w\n", "workers/w.py": ""},
     ["broker.b -> workers", "broker.b -> workers.w"]),
    ({"workers/w.py": "from mlx_fleet.cli import main\n", "mlx_fleet/cli.py": ""},
     ["workers.w -> mlx_fleet", "workers.w -> mlx_fleet.cli"]),
    ({"mlx_fleet/client/c.py": "from mlx_fleet.gateway import g\nimport broker.b\n", "mlx_fleet/gateway/g.py": "",
      "broker/b.py": ""}, ["mlx_fleet.client.c -> broker", "mlx_fleet.client.c -> broker.b", "mlx_fleet.client.c -> mlx_fleet.gateway", "mlx_fleet.client.c -> mlx_fleet.gateway.g"]),
    ({"mlx_fleet/gateway/g.py": "from mlx_fleet.client import c\nfrom mlx_fleet import cli\n",
      "mlx_fleet/client/c.py": "", "mlx_fleet/cli.py": ""}, ["mlx_fleet.gateway.g -> mlx_fleet.cli"]),
    ({"mlx_fleet/cli.py": "import actors.a, broker.b, workers.w\n", "actors/a.py": "", "broker/b.py": "", "workers/w.py": ""}, []),
    ({"benchmarks/load.py": "from tests.integration.fleets import start_fleet\n", "tests/integration/fleets.py": ""},
     ["benchmarks.load -> tests.integration.fleets"]),
])
def test_the_checker_finds_wrong_way_imports(tmp_path: Path, files: dict[str, str], want: list[str]) -> None:
    write_tree(tmp_path, {**BASE, **files})
    assert wrong_way_imports(build_graph(tmp_path, PACKAGES)) == want


def test_the_checker_finds_cycles_through_function_and_type_checking_imports(tmp_path: Path) -> None:
    write_tree(tmp_path, {**BASE,
                          "broker/state.py": "from broker.status import view\n",
                          "broker/status.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                              "    from broker.state import State\n",
                          "actors/one.py": "def f():\n    from . import two\n",
                          "actors/two.py": "import actors.one\n",
                          "actors/three.py": "import actors.two\n"})
    assert cycles(build_graph(tmp_path, PRODUCTION)) == [["actors.one", "actors.two"], ["broker.state", "broker.status"]]


def test_the_checker_measures_modules_and_functions(tmp_path: Path) -> None:
    long_function = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    write_tree(tmp_path, {**BASE, "workers/big.py": "\n" * MAX_MODULE_LINES + long_function,
                          "workers/ok.py": "def g():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1)})
    modules, functions = oversized(tmp_path)
    assert modules == {"workers/big.py": MAX_MODULE_LINES + MAX_FUNCTION_LINES + 1}
    assert functions == {"workers/big.py:f": MAX_FUNCTION_LINES + 1}


def test_the_checker_finds_process_tests_without_the_integration_marker(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "tests/integration/test_listed.py": "import pytest\npytestmark = [pytest.mark.integration, pytest.mark.timeout(9)]\n",
        "tests/integration/test_alone.py": "import pytest\npytestmark = pytest.mark.integration\n",
        "tests/integration/test_timeout_only.py": "import pytest\npytestmark = pytest.mark.timeout(9)\n",
        "tests/conformance/test_per_test.py": "import pytest\n@pytest.mark.integration\ndef test_x():\n    pass\n",
        "tests/conformance/helper.py": "",
        "tests/unit/test_pure.py": "import json\n",
        "tests/unit/test_spawns.py": "def test_x():\n    import subprocess\n",
        "tests/unit/test_fleet.py": "from tests.integration.fleets import start_fleet\n",
    })
    assert unmarked_process_tests(tmp_path) == ["tests/integration/test_timeout_only.py",
                                                "tests/conformance/test_per_test.py"]
    assert unit_tests_starting_processes(tmp_path) == ["tests.unit.test_fleet -> tests.integration",
                                                       "tests.unit.test_spawns -> subprocess"]
