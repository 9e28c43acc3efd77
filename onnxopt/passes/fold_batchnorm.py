"""Fold BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it."""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.cleanup.batchnorm import fold_batchnorms
from onnxopt.passes.base import OnnxoptPass, PassResult


class FoldBatchNormPass(OnnxoptPass):
    """Fold BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

    Applies to an inference BatchNorm right after one of those ops. Safe because the producer's
    weights are constant and feed nothing else, and its output goes to the BatchNorm alone, so
    scaling the weights and bias changes no other result; BatchNorms in training mode, with
    parameters that are not one per channel or of another type than the weights are left alone.
    """

    name = "fold-batchnorm"

    def call(self, model: ir.Model) -> PassResult:
        result = fold_batchnorms(model)
        details = {"refused": result.refused} if result.refused else {}
        return PassResult(
            model, modified=bool(result.folded), changes=result.folded, details=details
        )
