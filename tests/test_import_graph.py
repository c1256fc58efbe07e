"""The layers of fmct import downwards only: no module imports one of a higher layer (:data:`LAYERS`, as the
README's architecture section lists them), no cycle among its modules or among its packages, function-level
imports included.

An edge from a module to one of its own parent packages is left out: importing ``fmct.synth.subject``
always runs ``fmct/synth/__init__.py`` first, whatever the module says, so that edge is Python's, not
a layer that points upwards.
"""

import ast
from pathlib import Path

import fmct

PACKAGE_ROOT = Path(fmct.__file__).parent

# Lowest first. A unit is a top-level module or package of fmct; every unit has a layer, and a module may
# import its own layer and those below.
LAYERS = [
    (
        "core",
        {
            "fmct",
            "fmct.errors",
            "fmct.atomic",
            "fmct.codec",
            "fmct.tables",
            "fmct.fingerprint",
            "fmct.log",
            "fmct.devices",
            "fmct.distributed",
            "fmct.schedules",
            "fmct.pseudonym",
            "fmct.config",
            "fmct.card",
            "fmct.paths",
        },
    ),
    ("io", {"fmct.io", "fmct.preprocess", "fmct.store", "fmct.scans"}),
    ("models", {"fmct.models", "fmct.hub"}),
    ("data", {"fmct.data", "fmct.datasets", "fmct.synth"}),
    ("inference", {"fmct.detector", "fmct.saliency"}),
    ("evaluation", {"fmct.eval"}),
    ("pretraining", {"fmct.ssl"}),
    ("verbs", {"fmct.ingest", "fmct.predict", "fmct.export", "fmct.demo"}),
    ("cli", {"fmct.cli"}),
]


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        parts = ("fmct",) + path.relative_to(PACKAGE_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """fmct modules that ``name`` imports anywhere in its body (the innermost known module of each)."""
    targets = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            targets += [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(target + "."):
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None; iterative DFS with colours."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    for start in sorted(graph):
        if colour[start]:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        colour[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                stack.pop()
            elif colour[nxt] == 1:
                return path[path.index(nxt) :] + [nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def unit_of(module: str) -> str:
    """The top-level unit of a module: ``fmct.eval.probe`` -> ``fmct.eval``, ``fmct`` -> ``fmct``."""
    return ".".join(module.split(".")[:2])


def layer_of(module: str) -> int:
    unit = unit_of(module)
    return next(index for index, (_, units) in enumerate(LAYERS) if unit in units)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer, as "importer -> imported (layer -> layer)"."""
    return sorted(
        f"{source} -> {target} ({LAYERS[layer_of(source)][0]} -> {LAYERS[layer_of(target)][0]})"
        for source, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(source)
    )


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between units (a unit's own modules importing each other is no edge)."""
    units: dict[str, set[str]] = {}
    for source, targets in graph.items():
        units.setdefault(unit_of(source), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(source))
    return units


def test_every_unit_has_a_layer():
    assigned = [unit for _, units in LAYERS for unit in units]
    assert len(assigned) == len(set(assigned)), "a unit is in two layers"
    missing = sorted({unit_of(module) for module in import_graph()} - set(assigned))
    assert not missing, f"give these a layer in LAYERS and in the README: {missing}"


def test_layer_check_finds_a_planted_upward_import():
    graph = {"fmct.models.vit3d": {"fmct.eval.metrics"}, "fmct.eval.metrics": {"fmct.errors"}, "fmct.errors": set()}
    assert upward_imports(graph) == ["fmct.models.vit3d -> fmct.eval.metrics (models -> evaluation)"]
    assert find_cycle(package_graph({"fmct.eval.a": {"fmct.detector"}, "fmct.detector": {"fmct.eval.b"}})) is not None


def test_modules_import_only_their_layer_and_below():
    upward = upward_imports(import_graph())
    assert not upward, "imports from a higher layer (move the code down, or pass it in):\n" + "\n".join(upward)


def test_packages_have_no_import_cycle():
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_detector_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_reads_function_level_and_relative_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from .store import Store\n    import fmct.atomic\n")
    known = {"fmct.eval.m", "fmct.eval.store", "fmct.atomic"}
    assert imported_modules("fmct.eval.m", module, known) == {"fmct.eval.store", "fmct.atomic"}


def test_fmct_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
