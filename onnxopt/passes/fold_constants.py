"""Fold nodes whose inputs are all constant into initializers."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnxscript.optimizer import _constant_folding

from onnxopt.passes.base import OnnxoptPass
from onnxopt.passes.remove_dead_code import RemoveDeadCodePass

logger = logging.getLogger(__name__)

# Folding these would erase the scales and zero points that quantized weights carry.
QUANTIZATION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})

# The folder rewrites these ops into forms of newer opsets, whatever the model's opset: Constant
# with value_int(s) (opset 12), Unsqueeze, Squeeze and Split taking axes or splits as inputs (13).
REWRITE_MIN_OPSET = {
    "Gather": 12,
    "Shape": 12,
    "Size": 12,
    "ConcatFromSequence": 13,
    "SplitToSequence": 13,
}


class FoldConstantsPass(OnnxoptPass):
    """Evaluate nodes whose inputs are all constant and keep their results as initializers.

    Uses onnxscript's constant folder (ONNX reference evaluator), which also simplifies some ops
    from known shapes. Quantize and dequantize nodes are never folded, whatever their inputs, so
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
        input_size_limit: int = _constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        output_size_limit: int = _constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
        shape_inference: bool = True,
    ):
        super().__init__()
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit
        self.shape_inference = shape_inference

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folder = _CountingFolder(
            shape_inference=self.shape_inference,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
            should_fold=_should_fold,
        )
        modified = folder(model).modified
        cleanup = RemoveDeadCodePass()
        cleanup(model)
        self.changes = folder.replaced + cleanup.changes
        self.details = {"folded": folder.replaced, "removed": cleanup.changes}
        logger.info(
            "folded %d nodes, removed %d things left unused", folder.replaced, cleanup.changes
        )
        return ir.passes.PassResult(model, modified=modified or bool(self.changes))


class _CountingFolder(_constant_folding.FoldConstantsPass):
    """onnxscript's folder, counting the nodes it replaces and skipping rewrites the opset lacks."""

    replaced = 0
    opset = 1

    def call(self, model: ir.Model) -> _constant_folding.FoldConstantsResult:
        self.opset = model.opset_imports.get("", 1)
        return super().call(model)

    def process_node(
        self, node: ir.Node, is_function: bool
    ) -> _constant_folding.Replacement | None:
        if node.domain == "" and self.opset < REWRITE_MIN_OPSET.get(node.op_type, 0):
            return None
        return super().process_node(node, is_function)

    def replace_node(
        self,
        node: ir.Node,
        replacement: _constant_folding.Replacement,
        root: ir.Graph | ir.Function,
    ) -> None:
        super().replace_node(node, replacement, root)
        self.replaced += 1


# ConstantOfShape up to this many elements is folded: exporters compute padding with it, and a
# small constant there lets the Pad fold into its Conv. onnxscript never folds it by default.
CONSTANT_OF_SHAPE_FOLD_LIMIT = 4096


def _should_fold(node: ir.Node) -> bool | None:
    """Refuse quantization ops in any domain, fold small ConstantOfShape, leave the rest to the folder."""
    if node.op_type in QUANTIZATION_OPS:
        return False
    if (
        node.op_type == "ConstantOfShape"
        and node.domain == ""
        and node.inputs[0].const_value is not None
    ):
        elements = int(np.prod(node.inputs[0].const_value.numpy()))
        return True if elements <= CONSTANT_OF_SHAPE_FOLD_LIMIT else None
    return None
