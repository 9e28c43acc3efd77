"""Fold constant scales and shifts after a convolution into its weights and bias."""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.cleanup.affine import fold_conv_affines
from onnxopt.passes.base import OnnxoptPass, PassResult


class FoldConvAffinePass(OnnxoptPass):
    """Fold ``Conv -> Mul/Div/Add/Sub(constant)`` into the Conv's weights and bias.

    Applies to a scalar or per-output-channel constant after a Conv whose weights and bias are
    constants of its own and whose output goes to that node alone: then scaling the weights and
    shifting the bias computes the same values (up to float rounding) and changes nothing else.
    Re-parameterized networks (PP-LCNetV3 in PaddleOCR's models) leave such scales and shifts
    after every convolution; folded, int8 has no float island between integer kernels there.
    """

    name = "fold-conv-affine"

    def call(self, model: ir.Model) -> PassResult:
        result = fold_conv_affines(model)
        return PassResult(model, modified=bool(result.folded), changes=result.folded)
