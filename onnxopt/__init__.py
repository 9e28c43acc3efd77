"""onnxopt: optimize ONNX models for CPU and edge deployment.

The Python API mirrors the command line::

    import onnxopt

    result = onnxopt.optimize("model.onnx", "model.opt.onnx", recipe="cleanup", data="calib.npz")
    print(result.report()["validation"])
"""

from onnxopt.__about__ import __version__
from onnxopt.api import OptimizeResult, optimize, quantize
from onnxopt.context import Context
from onnxopt.errors import InputError, OnnxoptError, ProcessingError, ValidationFailed
from onnxopt.io import load, save
from onnxopt.pipeline import Pipeline
from onnxopt.recipe import Recipe, load_recipe

__all__ = [
    "Context",
    "InputError",
    "OnnxoptError",
    "OptimizeResult",
    "Pipeline",
    "ProcessingError",
    "Recipe",
    "ValidationFailed",
    "__version__",
    "load",
    "load_recipe",
    "optimize",
    "quantize",
    "save",
]
