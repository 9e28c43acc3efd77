"""Divisions by constants as multiplications, which onnxruntime runs as integer kernels."""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.cleanup.division import divisions_to_multiplications
from onnxopt.passes.base import OnnxoptPass, PassResult


class DivToMulPass(OnnxoptPass):
    """Rewrite ``Div(x, constant)`` as ``Mul(x, 1 / constant)``.

    onnxruntime quantizes Mul and not Div, so the ``/ 6`` of an exported HardSwish would keep
    a float island between integer kernels. Changes results by at most one rounding of the
    reciprocal, which is why the int8 preset runs it and the cleanup preset does not.
    """

    name = "div-to-mul"

    def call(self, model: ir.Model) -> PassResult:
        rewritten = divisions_to_multiplications(model)
        return PassResult(model, modified=bool(rewritten), changes=rewritten)
