"""The layout keeps the design (docs/design.md): no import cycles, one-way imports, small modules.

Imports are read from the source with `ast`, function-local ones included, so a cycle hidden in a
function body fails here as well.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "compiler": "tvmdeploy.compiler",
    "runtime": "tvmdeploy.runtime",
    "targets": "tvmdeploy.targets",
}
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """Every project module by its import name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its source (module level or in functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # `from pkg import submodule` imports the submodule; `import a.b` imports a and a.b.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges = {name: imports_of(name, path, known) for name, path in mods.items()}
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: an edge to each parent package.
    for name in list(edges):
        for target in list(edges[name]):
            parent = target.rpartition(".")[0]
            while parent in known and parent != name and not name.startswith(parent + "."):
                edges[name].add(parent)
                parent = parent.rpartition(".")[0]
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_counting_function_local_imports():
    edges = graph()
    assert len(edges) > 40  # the walk found the project
    assert find_cycle(edges) is None, " → ".join(find_cycle(edges))


@pytest.mark.parametrize("lower", ["tvmdeploy.runtime", "tvmdeploy.targets"])
def test_imports_point_one_way(lower):
    """runtime ← targets ← compiler: the runtime and the profiles never import the compiler."""
    bad = {
        name: sorted(t for t in targets if t.startswith("tvmdeploy.compiler"))
        for name, targets in graph().items()
        if name.startswith(lower)
    }
    assert not {k: v for k, v in bad.items() if v}
    if lower == "tvmdeploy.runtime":
        assert not any(
            t.startswith("tvmdeploy.targets")
            for name, targets in graph().items()
            if name.startswith(lower)
            for t in targets
        )


def test_stages_never_import_a_driver():
    drivers = "tvmdeploy.compiler.drivers"
    front = {"tvmdeploy.compiler", "tvmdeploy.compiler.cli"}
    offenders = {
        name: sorted(t for t in targets if t.startswith(drivers))
        for name, targets in graph().items()
        if name.startswith("tvmdeploy.compiler")
        and not name.startswith(drivers)
        and name not in front
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_modules_are_small_or_say_why():
    """Over ~500 lines needs a reason in the module docstring (saying why it is long)."""
    too_long = []
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "long" not in doc.lower():
            too_long.append(f"{name}: {lines} lines")
    assert not too_long


def test_docstrings_point_inside_the_project():
    """Docstrings name docs/design.md, not a DESIGN.md the project does not hold."""
    stale = [name for name, path in modules().items() if "DESIGN.md" in path.read_text()]
    assert not stale
