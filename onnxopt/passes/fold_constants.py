"""Fold nodes whose inputs are all constant into initializers."""

from __future__ import annotations

from typing import Annotated

import onnx_ir as ir

from onnxopt.cleanup.constants import INPUT_SIZE_LIMIT, OUTPUT_SIZE_LIMIT, fold_constants
from onnxopt.options import Range
from onnxopt.passes.base import OnnxoptPass, PassResult


class FoldConstantsPass(OnnxoptPass):
    """Evaluate nodes whose inputs are all constant and keep their results as initializers.

    Applies to any model; onnxscript's folder computes each result with ONNX's reference
    evaluator, so outputs stay the same. Quantize and dequantize nodes are never folded, so
    quantized weights stay quantized, and ops the folder would rewrite into forms newer than the
    model's opset are left alone. What folding leaves unused is removed afterwards, as
    remove-dead-code does.

    Args:
        input_size_limit: do not fold a node with a constant input of more elements than this
            (a Transpose that is its input's only consumer is folded anyway).
        output_size_limit: do not fold a node whose result has more elements than this, unless
            the inputs it frees are at least as large.
        shape_inference: infer shapes node by node while folding, so ops such as Shape and Size
            fold when the shapes are static.
    """

    name = "fold-constants"

    def __init__(
        self,
        input_size_limit: Annotated[int, Range(low=0)] = INPUT_SIZE_LIMIT,
        output_size_limit: Annotated[int, Range(low=0)] = OUTPUT_SIZE_LIMIT,
        shape_inference: bool = True,
    ):
        super().__init__()
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit
        self.shape_inference = shape_inference

    def call(self, model: ir.Model) -> PassResult:
        result = fold_constants(
            model,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
            shape_inference=self.shape_inference,
        )
        return PassResult(
            model,
            modified=result.modified,
            changes=result.folded + result.removed.total,
            details={"folded": result.folded, "removed": result.removed.total},
        )
