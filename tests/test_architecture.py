"""The package's shape, checked: layers that import only downwards, small modules, a small
public face, and no test or development support on an application's import path."""

from __future__ import annotations

import ast
import pathlib

import flask_neon

PACKAGE = pathlib.Path(flask_neon.__file__).resolve().parent

#: Bottom to top. A module imports only from layers below its own.
LAYERS: list[set[str]] = [
    {"_errors", "_retry", "_pagination", "_session", "_timing", "_liveness", "_statements"},
    {"_models", "_context", "_drivers"},
    {"_settings", "_url", "_probe", "_settling", "_transactions"},
    {"_settings_loader", "_monitoring", "driver", "_nplusone"},
    {"_metrics"},
    {"_profiles"},
    {"_engine"},
    {"_state"},
    {"_assembly", "_handlers", "_reports", "_compat", "_request"},
    {"_health", "_cli"},
    {"_extension"},
    {"__init__"},
]
#: Support packages: above the runtime, never imported by it.
SUPPORT = {"local", "testing"}
#: The drivers' package: one module per DBAPI, its own layer (it imports only _errors and
#: _liveness); nothing but these modules imports a DBAPI.
DRIVER_PACKAGE = "_drivers"
MAX_LINES = 350


def runtime_modules() -> dict[str, pathlib.Path]:
    return {path.stem: path for path in PACKAGE.glob("*.py")}


def imports_of(path: pathlib.Path, package: str = "flask_neon") -> set[str]:
    """The flask_neon modules ``path`` imports, anywhere in it (functions, TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith(package + "."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(package + "."):
                    found.add(alias.name.split(".")[1])
    return found


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if module in layer:
            return index
    raise AssertionError(f"flask_neon/{module}.py is in no layer of tests/test_architecture.py")


def test_every_runtime_module_imports_only_downwards() -> None:
    wrong = []
    for module, path in runtime_modules().items():
        for target in imports_of(path):
            if target in SUPPORT:
                wrong.append(f"{module} imports the support package {target}")
            elif layer_of(target) >= layer_of(module):
                wrong.append(
                    f"{module} (layer {layer_of(module)}) imports {target} "
                    f"(layer {layer_of(target)})"
                )
    assert wrong == []


def test_modules_are_small() -> None:
    sizes = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert {name: size for name, size in sizes.items() if size > MAX_LINES} == {}


def test_the_public_face_is_what_users_type() -> None:
    assert sorted(flask_neon.__all__) == [
        "DatabaseContext",
        "DatabaseUnavailableError",
        "ErrorCause",
        "NPlusOneError",
        "NeonConfigError",
        "NeonDB",
        "NeonError",
        "NeonSettings",
        "NeonStateError",
    ]
    for name in flask_neon.__all__:
        assert getattr(flask_neon, name).__doc__, f"{name} has no docstring"


#: Modules and packages users may import by name; every other module is private (``_name``).
PUBLIC_MODULES = {"__init__", "driver", "local", "testing"}


def test_everything_else_is_private() -> None:
    names = {path.stem for path in PACKAGE.glob("*.py")}
    names |= {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert {name for name in names if not name.startswith("_")} | {"__init__"} == PUBLIC_MODULES


def test_only_the_driver_modules_import_a_driver() -> None:
    # What differs between DBAPIs lives in one module per driver (DESIGN.md); the embedded
    # server's admin connection (local/) is support, not the runtime.
    dbapis = {"psycopg2", "psycopg"}
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if parts[0] in {DRIVER_PACKAGE, *SUPPORT}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(name.split(".")[0] in dbapis for name in names):
                importers.add("/".join(parts))
    assert importers == set()
