"""Imports only go downward, layer by layer (bench, pipeline, store, stages): a module of a lower layer never
imports one of a higher layer, at module level or inside a function."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["stages", "store", "pipeline", "bench"]  # lowest first


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_no_module_imports_a_layer_above_its_own(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    wrong = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) & above)
        for path in sorted((REPO / layer).glob("*.py"))
        if imported_packages(path) & above
    }
    assert not wrong, wrong


def imported_modules(path: Path) -> set[str]:
    """The project's modules a file imports, at module level or inside a function (a lazy import is still an
    arrow: it only moves the cycle to run time)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {n for n in names if n.split(".")[0] in LAYERS and (REPO / (n.replace(".", "/") + ".py")).is_file()}
    return found


def test_no_import_cycle_among_the_modules():
    graph = {
        ".".join(path.relative_to(REPO).with_suffix("").parts): imported_modules(path)
        for layer in LAYERS
        for path in sorted((REPO / layer).glob("*.py"))
    }
    graph = {module: {m for m in imports if m != module} for module, imports in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for other in sorted(graph.get(module, ())):
            if state.get(other) == 1:
                return path + [module, other]
            if other not in state:
                found = cycle_from(other, path + [module])
                if found:
                    return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = cycle_from(module, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]) :])


def test_the_command_line_declares_and_renders_only():
    """pipeline/cli.py (and store_cli.py) hold options and the calls between them: what a command shows is
    pipeline/render.py's, the process's lifecycle pipeline/lifecycle.py's, the work an orchestration module's."""
    for name in ("cli.py", "store_cli.py"):
        source = (REPO / "pipeline" / name).read_text()
        tree = ast.parse(source)
        printing = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "print"
        ]
        assert not printing, f"pipeline/{name} prints at lines {printing}: render it in pipeline/render.py"
        assert "locals()" not in source, f"pipeline/{name}: options reach configs by name, never through locals()"
    assert len((REPO / "pipeline" / "cli.py").read_text().splitlines()) < 500
