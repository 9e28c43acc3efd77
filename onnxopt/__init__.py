"""onnxopt: optimize ONNX models for CPU and edge deployment.

The Python API mirrors the command line::

    import onnxopt

    result = onnxopt.optimize("model.onnx", "model.opt.onnx", recipe="cleanup", data="calib.npz")
    print(result.report()["validation"])

Names are imported on first use, so ``import onnxopt.calibration`` (or the CLI) loads only what
it needs, and every module imports on its own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from onnxopt.__about__ import __version__

if TYPE_CHECKING:
    from onnxopt.api import OptimizeResult, TransferResult, optimize, quantize, transfer_model
    from onnxopt.context import Context
    from onnxopt.errors import InputError, OnnxoptError, ProcessingError, ValidationFailed
    from onnxopt.io import load, save
    from onnxopt.pipeline import Pipeline
    from onnxopt.recipe import Recipe, load_recipe

_EXPORTS = {
    "Context": "onnxopt.context",
    "InputError": "onnxopt.errors",
    "OnnxoptError": "onnxopt.errors",
    "OptimizeResult": "onnxopt.api",
    "Pipeline": "onnxopt.pipeline",
    "ProcessingError": "onnxopt.errors",
    "Recipe": "onnxopt.recipe",
    "TransferResult": "onnxopt.api",
    "ValidationFailed": "onnxopt.errors",
    "load": "onnxopt.io",
    "load_recipe": "onnxopt.recipe",
    "optimize": "onnxopt.api",
    "quantize": "onnxopt.api",
    "save": "onnxopt.io",
    "transfer_model": "onnxopt.api",
}

__all__ = [
    "Context",
    "InputError",
    "OnnxoptError",
    "OptimizeResult",
    "Pipeline",
    "ProcessingError",
    "Recipe",
    "TransferResult",
    "ValidationFailed",
    "__version__",
    "load",
    "load_recipe",
    "optimize",
    "quantize",
    "save",
    "transfer_model",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'onnxopt' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
