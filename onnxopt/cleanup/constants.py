"""Fold nodes whose inputs are all constant, with onnxscript's public constant folder."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnxscript import optimizer

from onnxopt.cleanup.dead_code import DeadCodeResult, remove_dead_code
from onnxopt.cleanup.holding import held_back
from onnxopt.graph import default_opset

logger = logging.getLogger(__name__)

# onnxscript's own defaults: no folding of a node with a constant input of more elements than
# this (a Transpose that is its input's only consumer is folded anyway)...
INPUT_SIZE_LIMIT = 8192
# ... or of a node whose result has more elements than this, unless the inputs it frees are at
# least as large.
OUTPUT_SIZE_LIMIT = 512 * 512

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

# ConstantOfShape up to this many elements is folded: exporters compute padding with it, and a
# small constant there lets the Pad fold into its Conv. onnxscript never folds it by default.
CONSTANT_OF_SHAPE_FOLD_LIMIT = 4096


@dataclasses.dataclass
class ConstantFoldResult:
    """What ``fold_constants`` did.

    Attributes:
        folded: nodes the folder replaced by constants or simpler nodes.
        removed: what folding left unused, removed afterwards.
        modified: whether the model changed at all (the folder also refines types and shapes).
    """

    folded: int
    removed: DeadCodeResult
    modified: bool


def fold_constants(
    model: ir.Model,
    *,
    input_size_limit: int = INPUT_SIZE_LIMIT,
    output_size_limit: int = OUTPUT_SIZE_LIMIT,
    shape_inference: bool = True,
) -> ConstantFoldResult:
    """Evaluate nodes whose inputs are all constant and keep their results as initializers.

    Uses onnxscript's constant folder (ONNX reference evaluator), in the main graph, subgraphs
    and functions (as Constant nodes there), which also simplifies some ops from known shapes.
    Quantize and dequantize nodes are never folded, whatever their inputs, so quantized weights
    stay quantized; small ConstantOfShape nodes are. Ops the folder would rewrite into forms newer
    than the model's opset are held back (``should_fold`` is asked too late to stop a rewrite;
    the folder skips a node of a domain the model does not import before it tries anything).
    What folding leaves unused is removed afterwards.

    Args:
        model: changed in place.
        input_size_limit: do not fold a node with a constant input of more elements than this.
        output_size_limit: do not fold a node whose result has more elements than this, unless
            the inputs it frees are at least as large.
        shape_inference: infer shapes node by node while folding, so ops such as Shape and Size
            fold when the shapes are static.
    """
    before = _all_nodes(model)
    with held_back(model, rewrites_beyond_opset(model)):
        modified = optimizer.fold_constants_ir(
            model,
            onnx_shape_inference=shape_inference,
            input_size_limit=input_size_limit,
            output_size_limit=output_size_limit,
            should_fold=_should_fold,
        ).modified
    # The folder takes out of its graph each node it replaces. The nodes of the branch an If
    # folded on a constant condition drops stay in their (now detached) branch, uncounted.
    folded = sum(1 for node in before if node.graph is None)
    removed = remove_dead_code(model)
    logger.info("folded %d nodes, removed %d things left unused", folded, removed.total)
    changed = modified or bool(folded or removed.total) or removed.opsets_removed
    return ConstantFoldResult(folded, removed, changed)


def rewrites_beyond_opset(model: ir.Model) -> list[ir.Node]:
    """The nodes the folder would rewrite into ops newer than the model's opset.

    The folder looks up the version of a node's domain in the model's opset imports, in
    functions too, and its rewrites are registered for the "" domain only.
    """
    opset = default_opset(model)
    return [
        node
        for node in _all_nodes(model)
        if node.domain == "" and opset < REWRITE_MIN_OPSET.get(node.op_type, 0)
    ]


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


def _all_nodes(model: ir.Model) -> list[ir.Node]:
    nodes = list(model.graph.all_nodes())
    for function in model.functions.values():
        nodes.extend(function.all_nodes())
    return nodes
