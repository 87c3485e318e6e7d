"""The import layering of src/mathgrpo (docs/architecture.md, "Layers"): every import, at module level or inside
a function, goes to a module of the same layer or a lower one, and no two modules import each other in a circle.
Read with `ast`, nothing imported, so a lazy import inside a function counts like any other."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mathgrpo"

# Lowest first. A package (rollout/, a future trl_compat/) is one entry: its submodules share its layer and may
# import each other freely. A new module must be given a layer here (the test says so).
LAYERS: list[set[str]] = [
    {"config", "settings", "registry", "files", "metrics", "devices"},
    {"presets", "answers", "sources", "timed_verify", "memory_plan"},
    {"data", "prompts", "rewards", "eval_stats", "scoring", "diagnose"},
    {"loss", "logprobs", "advantages", "lmhead", "correction"},
    {"modelinfo", "qlora"},
    {"packing", "loading"},
    {"models"},
    {"rollout"},
    {"distributed", "fsdp"},
    {"runs", "checkpoint"},
    {"trackers", "logger"},
    {"sampling", "update"},
    {"report", "documents"},
    {"trainer", "evaluate"},
    {"cli", "trl_compat", "__init__", "__main__"},
]

# Known upward imports, each a follow-up (none left); any other upward import fails the test.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def _unit(path: Path) -> str:
    """The layer unit of a file: its top-level module or package under mathgrpo/."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported unit, line) for every import of a mathgrpo module in the file, at any depth."""
    rel = path.relative_to(SRC)
    package = ["mathgrpo", *rel.parts[:-1]]  # the package the file's relative imports start from
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
            else:
                target = node.module.split(".") if node.module else []
            if target[:1] != ["mathgrpo"]:
                continue
            names = [target[1]] if len(target) > 1 else [a.name for a in node.names]  # `from . import x`
            found += [(n, node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], node.lineno) for a in node.names
                      if a.name.startswith("mathgrpo.")]
    return found


def _graph() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> ["file:line", ...], imports inside a unit left out."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(SRC.rglob("*.py")):
        unit = _unit(path)
        graph.setdefault(unit, {})
        for target, line in _imports(path):
            if target != unit:
                graph[unit].setdefault(target, []).append(f"{path.relative_to(SRC.parent)}:{line}")
    return graph


def _layer_of() -> dict[str, int]:
    return {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def test_every_module_has_a_layer():
    layer = _layer_of()
    missing = sorted(u for u in _graph() if u not in layer)
    assert not missing, f"modules without a layer: {missing}; add each to LAYERS in tests/test_layering.py " \
                        f"and to the layering rule in docs/architecture.md"


def test_no_upward_import():
    layer = _layer_of()
    offenders = [f"{where}: {unit} (layer {layer[unit]}) imports {target} (layer {layer[target]})"
                 for unit, targets in _graph().items() for target, wheres in targets.items()
                 if unit in layer and target in layer and layer[target] > layer[unit]
                 and (unit, target) not in ALLOWED_UPWARD for where in wheres]
    assert not offenders, "upward imports (docs/architecture.md, Layers):\n" + "\n".join(offenders)


def test_allowed_upward_imports_still_exist():
    """An exception that is no longer needed is removed, so that it cannot hide a new import later."""
    graph = _graph()
    stale = [pair for pair in ALLOWED_UPWARD if pair[1] not in graph.get(pair[0], {})]
    assert not stale, f"ALLOWED_UPWARD lists imports that are gone: {stale}; delete them"


def test_no_import_cycle():
    """No circle of imports between units, also within a layer (the allowed upward imports left out)."""
    graph = {u: {t for t in ts if (u, t) not in ALLOWED_UPWARD} for u, ts in _graph().items()}
    cycles, state = [], {}

    def visit(u: str, stack: list[str]) -> None:
        state[u] = "open"
        for t in sorted(graph.get(u, ())):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [u, t]) if t in stack else f"{u} -> {t}")
            elif t not in state:
                visit(t, stack + [u])
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walk_sees_lazy_imports():
    """The walk must see imports inside functions (the kind that hid the models <-> fsdp cycle)."""
    graph = _graph()
    assert "fsdp" in graph["checkpoint"] and "models" in graph["fsdp"]  # module level, function level
    assert "trl_compat" in graph["__init__"]  # `from . import trl_compat` inside __getattr__
