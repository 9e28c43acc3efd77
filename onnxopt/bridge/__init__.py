"""The torch bridge: run, differentiate and fine-tune an ONNX graph as a torch module.

``to_module(model)`` interprets the graph with torch ops (weights become ``nn.Parameter``s named
after their initializers); ``write_back(module, model)`` copies trained weights into the model.
``training`` holds the loop the pruning and transfer passes fine-tune with. Torch is an
optional dependency (``pip install 'onnxopt[torch]'``): importing this package without it is
an InputError that says so.
"""

from __future__ import annotations

from onnxopt.errors import InputError

try:
    import torch  # noqa: F401
except ImportError as error:
    raise InputError(
        "the torch bridge needs torch, which is not installed",
        fix="pip install 'onnxopt[torch]'",
    ) from error

from onnxopt.bridge.interpreter import NodeFailedError, UnsupportedModelError
from onnxopt.bridge.module import OnnxModule, to_module, write_back

__all__ = ["NodeFailedError", "OnnxModule", "UnsupportedModelError", "to_module", "write_back"]
