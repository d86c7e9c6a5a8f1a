"""ktrain's modules import one another in a stated floor order, with no circle.

Read from the source (nothing is imported), so it runs in a second. A module may import
modules on its own floor or below; an arrow that runs up, a circle, a module on no floor, or a
function-level import that only dodges one, fails with the modules' names. The Layout
section of docs/development.md draws the same floors.
"""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # the fast tier: README, Development

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"launcher": "ktrain", "strategies": "ktrain.strategies", "configs": "ktrain.configs"}

FLOORS = [
    # what everything may use: no ktrain imports beyond this floor
    {"ktrain", "errors", "schema", "session", "environment", "collectives", "handshake",
     "optimizers", "global_metrics"},
    {"backends", "console", "userfn", "checkpoint", "tracking", "output", "stopping", "regroup",
     "report", "lease"},
    {"config"},  # the whole schema, every strategy's options included
    # cluster and runtime: where ranks are, how they start, meet, are watched
    {"rendezvous", "supervisor", "watchdog", "launch", "jax_runtime", "torch_runtime",
     "allocation", "sharding"},
    {"readers", "sources", "data", "ray_data"},  # data
    # how ranks are started: handed the training function, never importing it
    {"strategies.base", "strategies.mirrored", "strategies.multiworker", "strategies.horovod",
     "strategies.spark", "strategies.ray", "strategies"},
    {"resume", "assembly", "callbacks", "exports", "worker"},  # what a rank runs
    {"cli", "worker_entry", "__main__", "configs", "configs.digits", "configs.streaming",
     "configs.synthetic"},  # commands, entry points, shipped examples
]
FLOOR = {f"ktrain.{name}" if name != "ktrain" else name: level
         for level, names in enumerate(FLOORS) for name in names}

UPWARD = {("ktrain", "ktrain.sources"): "ktrain.Files, the public name for data fns, without "
                                        "loading TensorFlow with every `import ktrain`"}
"""The only arrows allowed to run up, and why."""

HEAVY_PACKAGES = {"keras", "tensorflow", "jax"}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = ast.parse(path.read_text(), str(path))
    return found


MODULES = _modules()


def _imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(ktrain module imported, whether at the top level) for every import statement."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES
                       else node.module for alias in node.names]
        else:
            continue
        found += [(target, id(node) in top) for target in targets
                  if target.split(".")[0] == "ktrain"]
    return found


ARROWS = {name: _imports(tree) for name, tree in MODULES.items()}


def _loads_a_framework(name: str, seen=()) -> bool:
    """Whether importing ``name`` loads Keras, TensorFlow or JAX (at its top level, itself or
    through the ktrain modules it imports there)."""
    for node in MODULES[name].body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            if any(n and n.split(".")[0] in HEAVY_PACKAGES for n in names):
                return True
        if isinstance(node, ast.Assign) and "optional_tensorflow" in ast.unparse(node.value):
            return True
    return any(_loads_a_framework(target, (*seen, name)) for target, at_top in ARROWS[name]
               if at_top and target in MODULES and target not in seen and target != name)


def test_every_module_is_on_a_floor():
    assert not set(MODULES) - set(FLOOR), (
        f"put {sorted(set(MODULES) - set(FLOOR))} on a floor in FLOORS (and in the Layout of "
        f"docs/development.md)")
    assert not set(FLOOR) - set(MODULES), f"no such modules: {sorted(set(FLOOR) - set(MODULES))}"


def test_no_import_runs_up_a_floor():
    upward = [f"{module} (floor {FLOOR[module]}) imports {target} (floor {FLOOR[target]})"
              for module, arrows in ARROWS.items() for target, _ in arrows
              if target in FLOOR and FLOOR[target] > FLOOR[module]
              and (module, target) not in UPWARD]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = {module: {t for t, _ in arrows if t in MODULES and t != module}
             for module, arrows in ARROWS.items()}
    circles = []

    def visit(module, path):
        for target in sorted(graph[module]):
            if target in path:
                circles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_imports_inside_functions_only_put_off_loading_a_framework():
    """ktrain's own modules are imported at the top, where a reader looks; inside a function
    only one that loads Keras, TensorFlow or JAX, so that a process that does not train (a
    launcher, ``ktrain export``'s checks, a JAX-only machine) does not load it."""
    hidden = [f"{module} imports {target} inside a function"
              for module, arrows in ARROWS.items() for target, at_top in arrows
              if not at_top and target in MODULES and not _loads_a_framework(target)]
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("light", ["ktrain.cli", "ktrain.strategies", "ktrain.config"])
def test_what_a_launcher_imports_loads_no_framework(light):
    """The test above relies on this: the modules ``ktrain run`` imports before it knows
    whether it trains load no framework (a launcher of workers never does)."""
    assert not _loads_a_framework(light)
