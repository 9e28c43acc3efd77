"""The package's shape: layers that point one way, modules that import alone, public APIs only.

Layers, bottom to top (docs/architecture.md):
foundations (io, data, runtime, metrics, ...) < algorithm packages (calibration, quantization,
cleanup, ...) < passes, context, recipe, pipeline < api, report, cli. A module imports only from
its own layer or below, and an algorithm package never from the passes layer or above.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "onnxopt"

FOUNDATIONS = 0
ALGORITHMS = 1
PASSES = 2
TOP = 3
LAYER_NAMES = {FOUNDATIONS: "foundations", ALGORITHMS: "algorithms", PASSES: "passes", TOP: "top"}

# Top-level module or package of onnxopt -> its layer. A new module must be placed here.
LAYERS = {
    "__about__": FOUNDATIONS,
    "errors": FOUNDATIONS,
    "progress": FOUNDATIONS,
    "options": FOUNDATIONS,
    "graph": FOUNDATIONS,
    "shapes": FOUNDATIONS,
    "mapped": FOUNDATIONS,
    "openvino_runtime": FOUNDATIONS,
    "runtime": FOUNDATIONS,
    "io": FOUNDATIONS,
    "data": FOUNDATIONS,
    "metrics": FOUNDATIONS,
    "serialize": FOUNDATIONS,
    "validation": FOUNDATIONS,
    "fidelity": FOUNDATIONS,
    "padding": FOUNDATIONS,
    "linalg": FOUNDATIONS,
    "summary": FOUNDATIONS,
    "compare": FOUNDATIONS,
    "calibration": ALGORITHMS,
    "quantization": ALGORITHMS,
    "cleanup": ALGORITHMS,
    "pruning": ALGORITHMS,
    "transfer": ALGORITHMS,
    "bridge": ALGORITHMS,
    "context": PASSES,
    "passes": PASSES,
    "recipe": PASSES,
    "pipeline": PASSES,
    "api": TOP,
    "report": TOP,
    "cli": TOP,
    "plot": TOP,
    "__init__": TOP,
    "__main__": TOP,
}

# Dependencies whose private modules or names we may use only with an upper-bound version pin.
PINNED_IF_PRIVATE = {"onnxscript": "onnxscript", "onnx_ir": "onnx-ir"}


def module_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = [module_name(path) for path in module_files()]


def top_level(module: str) -> str:
    """The onnxopt module or package a dotted name belongs to: onnxopt.passes.base -> passes."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in the file, relative imports resolved."""
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    )
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: str) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in ``source``, a module of ``package``."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [alias.name for alias in node.names]
            submodules = [name for name in names if f"{base}.{name}" in MODULES]
            found.extend((f"{base}.{name}", []) for name in submodules)
            if len(submodules) < len(names):
                found.append((base, [name for name in names if name not in submodules]))
    return found


def test_every_module_is_placed_in_a_layer():
    unplaced = {top_level(name) for name in MODULES} - set(LAYERS)
    assert not unplaced, f"add these to LAYERS in {Path(__file__).name}: {sorted(unplaced)}"


@pytest.mark.parametrize("path", module_files(), ids=module_name)
def test_imports_point_down_only(path):
    source = LAYERS[top_level(module_name(path))]
    upward = []
    for module, _ in imports_of(path):
        if module.split(".")[0] != "onnxopt" or module == "onnxopt.__about__":
            continue
        target = LAYERS.get(top_level(module))
        if target is not None and target > source:
            upward.append(f"{module} ({LAYER_NAMES[target]})")
    assert not upward, f"{module_name(path)} ({LAYER_NAMES[source]}) imports upward: {upward}"


@pytest.mark.parametrize(
    "path",
    [path for path in module_files() if LAYERS[top_level(module_name(path))] == ALGORITHMS],
    ids=module_name,
)
def test_algorithm_packages_never_import_passes_pipeline_api_or_cli(path):
    forbidden = re.compile(r"^onnxopt\.(passes|pipeline|api|cli|recipe|context)(\.|$)")
    found = [module for module, _ in imports_of(path) if forbidden.match(module)]
    assert not found, f"{module_name(path)} imports {found}"


def private_uses(imports: list[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    """(distribution, what) for each private module or name of a pinned-if-private dependency."""
    uses = []
    for module, names in imports:
        root = module.split(".")[0]
        if root not in PINNED_IF_PRIVATE:
            continue
        private = [part for part in module.split(".") if part.startswith("_")]
        private += [name for name in names if name.startswith("_")]
        uses.extend((PINNED_IF_PRIVATE[root], f"{module}: {item}") for item in private)
    return uses


def upper_bounded(distribution: str) -> bool:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0]
        if name.lower().replace("_", "-") == distribution and re.search(r"<|==|~=", requirement):
            return True
    return False


@pytest.mark.parametrize("path", module_files(), ids=module_name)
def test_private_apis_of_dependencies_only_with_an_upper_bound_pin(path):
    unpinned = [
        what
        for distribution, what in private_uses(imports_of(path))
        if not upper_bounded(distribution)
    ]
    assert not unpinned, (
        f"{module_name(path)} uses private APIs without an upper-bound pin in pyproject.toml: "
        f"{unpinned}"
    )


def test_private_use_check_sees_private_modules_and_names():
    source = (
        "from onnxscript.optimizer import _constant_folding\n"
        "from onnx_ir.passes.common import IdentityEliminationPass, _c_api_utils\n"
        "import onnx_ir._core\n"
        "from onnx import _mapping\n"
    )
    assert private_uses(imports_in(source, "onnxopt")) == [
        ("onnxscript", "onnxscript.optimizer: _constant_folding"),
        ("onnx-ir", "onnx_ir.passes.common: _c_api_utils"),
        ("onnx-ir", "onnx_ir._core: _core"),
    ]


# Imports the dependencies once, then forks a child per onnxopt module that imports that module
# alone: each child starts with no onnxopt module loaded, as a fresh interpreter would, without
# paying the dependencies' import time (two seconds for onnx_ir) again for every module.
LONE_IMPORTS = """
import importlib, json, os, sys, traceback
import numpy, onnx, onnx_ir, onnxruntime, onnxscript, rich
results = {}
for name in sys.argv[1:]:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            message = ""
        except BaseException:
            message = traceback.format_exc()
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        results[name] = pipe.read()
    os.waitpid(child, 0)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def lone_imports() -> dict[str, str]:
    """For each module, the traceback of importing it alone, or ""."""
    result = subprocess.run(
        [sys.executable, "-c", LONE_IMPORTS, *MODULES],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_on_its_own(name, lone_imports):
    assert lone_imports[name] == ""


def test_lone_import_check_sees_an_import_cycle(tmp_path):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic.b import VALUE\nNAME = 'a'\n")
    (package / "b.py").write_text("from cyclic.a import NAME\nVALUE = 1\n")
    result = subprocess.run(
        [sys.executable, "-c", LONE_IMPORTS, "cyclic.a", "cyclic.b"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    assert "partially initialized module" in json.loads(result.stdout)["cyclic.a"]


def test_package_names_load_on_first_use():
    import onnxopt

    for name in onnxopt.__all__:
        assert getattr(onnxopt, name) is not None
    assert onnxopt.optimize.__module__ == "onnxopt.api"
    with pytest.raises(AttributeError, match="no attribute 'optimise'"):
        onnxopt.optimise  # noqa: B018
