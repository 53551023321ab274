"""The package's shape: one dependency direction between its folders, no import cycles, every folder packaged.

Read from the source with `ast` (nothing is imported), so a new back-edge fails here before it fails anywhere else.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "alvts_calib"

# Lowest first: a module may import its own layer and the layers before it, never a later one. The top-level modules
# (errors, options, outputs, progress, tokens, data, answers, version) are the base; "api" is the package's
# __init__, the public names (it also exports the evaluation harness). base to calibration is the product;
# evaluation/, demo/ and testing/ are not, so nothing in the product imports them.
LAYERS = ("base", "model", "selector", "artifact", "runtime", "calibration", "evaluation", "api", "demo", "testing")
PRODUCT = LAYERS[: LAYERS.index("calibration") + 1] + ("api",)
FRONT_ENDS = ("integrations",)  # may import the product, nothing after it


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every alvts_calib module `path` imports, anywhere in the file (lazy and TYPE_CHECKING imports too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from . import x` / `from .pkg import module` name modules too
            found.update(f"{module}.{alias.name}" for alias in node.names)
    modules = _all_modules()
    return {module for module in found if module in modules and module != name}


def _all_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    if len(parts) == 2 and (PACKAGE / f"{parts[1]}.py").exists():
        return "base"
    return parts[1]


def test_every_module_has_a_layer():
    unknown = {module: _layer(module) for module in _all_modules()}
    unknown = {module: layer for module, layer in unknown.items() if layer not in LAYERS + FRONT_ENDS}
    assert not unknown, f"modules outside the known layers (add the folder to LAYERS): {unknown}"


def test_imports_follow_the_layers():
    wrong = []
    for module, path in sorted(_all_modules().items()):
        layer = _layer(module)
        for imported in sorted(_imports(path)):
            target = _layer(imported)
            if target in FRONT_ENDS and layer not in FRONT_ENDS:
                wrong.append(f"{module} imports the front-end {imported}")
            elif layer in FRONT_ENDS:
                if target not in PRODUCT and target not in FRONT_ENDS:
                    wrong.append(f"the front-end {module} imports {imported}, which is not product code")
            elif LAYERS.index(target) > LAYERS.index(layer):
                wrong.append(f"{module} ({layer}) imports {imported} ({target}), a later layer")
    assert not wrong, "imports against the layer order (lowest first) " + ", ".join(LAYERS) + ":\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {module: _imports(path) for module, path in _all_modules().items()}
    graph = {module: {t for t in targets if not module.startswith(t + ".")} for module, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(target):] + [module, target]))
            if target not in state:
                visit(target, trail + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_pyproject_packages_every_folder():
    configured = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {_module_name(path) for path in PACKAGE.rglob("__init__.py")}
    assert folders == {package for package in configured if package.startswith("alvts_calib")}


def _public_names(package: str) -> set[str]:
    """The `__all__` of a package's `__init__`, read from its source."""
    init = ROOT.joinpath(*package.split("."), "__init__.py")
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def test_front_ends_import_public_names_only():
    """The CLI and the benchmarks use what the package exports: a name in `alvts_calib` or one of its folders'
    `__all__`, or a top-level module (errors, data, outputs, options, tokens, answers) as it is."""
    packages = {_module_name(path) for path in PACKAGE.rglob("__init__.py")}
    wrong = []
    for path in sorted([*ROOT.joinpath("cli").glob("*.py"), *ROOT.joinpath("benchmarks").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                wrong += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("alvts_calib.")]
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("alvts_calib"):
                continue
            if node.module in packages:
                public = _public_names(node.module)
                wrong += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name not in public]
            elif _layer(node.module) != "base":
                wrong.append(f"{path.name}: from {node.module} import ... (a module inside a folder)")
    assert not wrong, "front-ends reaching past the public names:\n" + "\n".join(wrong)
