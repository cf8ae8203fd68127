"""The package's layering, read from its source: no import cycles between its modules (module-level imports and
imports inside functions alike), and no module importing another module's private name."""

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "spot_compile"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for each import of a spot_compile module in `path`."""
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module.split(".")[0] != "spot_compile":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{module}.{n}" for n in names if (PACKAGE.parent / f"{module}.{n}".replace(".", "/")).with_suffix(".py").is_file()]
            found += [(m, []) for m in submodules]
            found.append((module, [n for n in names if f"{module}.{n}" not in submodules]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "spot_compile"]
    return found


def _package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_no_import_cycles_between_modules():
    modules = _package_modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target, _ in _imports(path):
            if target in modules and target != name and not (name.startswith(target + ".") and modules[target].name == "__init__.py"):
                graph.add_edge(name, target)
    # the package's __init__ re-exports the public API: it may import anything, and nothing imports it back
    graph.remove_node("spot_compile")
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_another_modules_private_name():
    offenders = []
    for name, path in _package_modules().items():
        for target, names in _imports(path):
            offenders += [f"{name} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not offenders, offenders


# Which folders (and top-level modules) each part of the package may import: the layering the folders' docstrings
# state. A new import across a boundary not listed here is a decision to make on purpose, in this table.
MAY_IMPORT = {
    "ops": set(),
    "data": {"errors"},
    "graph": {"errors", "passes"},  # capture's clean-up of masks that mask nothing is a pass
    "passes": {"errors", "graph", "ops"},
    "scorers": {"errors", "graph", "ops"},
    "measure": {"errors", "data"},
    "planning": {"errors", "graph", "passes", "measure"},
    "policy_configs": {"errors"},
    "policies": {"errors", "graph", "passes", "planning", "policy_configs", "scorers", "serialization"},
    "config": {"errors", "policy_configs"},
    "export": {"errors", "serialization"},
    "api": {"errors", "config", "export", "graph", "measure", "planning", "policies", "policy_configs"},
    "serialization": {"errors", "api", "config", "graph", "policies", "policy_configs", "scorers"},
    "models": {"errors", "data", "serialization"},
    "calibration": {"errors", "api", "config", "data", "graph", "measure", "passes", "policies", "policy_configs", "scorers",
                    "serialization"},
    "cli": None,  # the command line may import anything
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_each_folder_imports_only_the_layers_below_it():
    crossings = []
    for name, path in _package_modules().items():
        allowed = MAY_IMPORT.get(_part(name), None)
        if allowed is None or _part(name) in ("", "__main__", "errors"):
            continue
        for target, _ in _imports(path):
            dst = _part(target)
            if dst and dst != _part(name) and dst not in allowed:
                crossings.append(f"{name} imports {target}")
    assert not crossings, crossings
    missing = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} - set(MAY_IMPORT)
    assert not missing, f"folders without a layering rule: {missing}"


def test_every_folder_opens_with_a_docstring_saying_what_lives_there():
    for folder in PACKAGE.iterdir():
        init = folder / "__init__.py"
        if folder.is_dir() and folder.name not in ("assets", "__pycache__"):
            assert init.is_file(), f"{folder.name}/ has no __init__.py"
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and len(doc) > 80, f"{folder.name}/__init__.py says nothing of what lives there"


# The modules that define configs, and what those may reach at import: configs are inert data, so making one loads
# no pass, no graph code and no model.
CONFIG_MODULES = ("spot_compile.config", "spot_compile.policy_configs", "spot_compile.calibration.config",
                  "spot_compile.scorers.predictor_config")


def _module_level_imports(path: Path) -> set[str]:
    """Modules `path` imports when it is imported (not inside functions), of any package."""
    tree = ast.parse(path.read_text())
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names
                      if (PACKAGE.parent / f"{module}.{a.name}".replace(".", "/")).with_suffix(".py").is_file()}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_defining_a_config_imports_no_pass_and_no_torch():
    modules = _package_modules()
    reached, todo = set(), list(CONFIG_MODULES)
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        if name in modules:
            todo += sorted(_module_level_imports(modules[name]))
    ours = {m for m in reached if m.startswith("spot_compile.")}
    assert ours <= set(CONFIG_MODULES) | {"spot_compile.errors"}, sorted(ours)
    assert not {m for m in reached if m.split(".")[0] == "torch"}, sorted(reached)


def test_the_calibration_configs_mask_gradients_are_the_ones_the_pass_implements():
    from spot_compile.calibration.config import MASK_GRADIENTS
    from spot_compile.passes import soft_pruning

    assert MASK_GRADIENTS == soft_pruning.MASK_GRADIENTS


def test_importing_the_config_modules_loads_no_pass_and_not_torch():
    import subprocess
    import sys

    code = ("import sys; " + "; ".join(f"import {m}" for m in CONFIG_MODULES) +
            "; import spot_compile; c = spot_compile.SparsifyConfig(policy='spot', predictors='p.pt'); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('spot_compile.passes')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
