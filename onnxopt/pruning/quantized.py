"""Pruning a model quantized already: its layers hold integer weights pruning does not read."""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.quantization.plan import find_quantized_ops


def quantized_model_error(model: ir.Model, what: str) -> InputError | None:
    """The error to give instead of "nothing to prune" where ``model`` is quantized already
    (its weights are integers behind DequantizeLinear or in integer kernels); None otherwise."""
    found = find_quantized_ops(model)
    if not found:
        return None
    return InputError(
        f"{what}: the model is already quantized (it contains {', '.join(found)})",
        fix="prune the float model it came from; the prune-int8 recipe then quantizes it",
    )
