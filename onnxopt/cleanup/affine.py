"""Fold constant scales and shifts that follow a convolution into its weights and bias.

Exporters of re-parameterized networks (PP-LCNetV3's learnable affine blocks in PaddleOCR's
detector and recognizer, MobileOne) leave ``Conv -> Mul(scale) -> Add(shift)`` behind, and
others a bias as a separate ``Add``. Folded, the convolution computes the same values alone:
one node instead of three in float, and in int8 no float island (dequantize, Mul, Add,
quantize) between two integer kernels.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxopt.graph import (
    UniqueNames,
    add_initializer,
    constant_array,
    float64_array,
    is_default_domain,
    move_initializer_to,
    remove_if_unused,
    set_constant,
    take_over_output,
)

logger = logging.getLogger(__name__)

# Ops whose constant second operand folds into the convolution before them.
AFFINE_OPS = ("Mul", "Div", "Add", "Sub")


@dataclasses.dataclass
class AffineFoldResult:
    """How many Mul, Div, Add and Sub nodes were folded into the convolution before them."""

    folded: int = 0


def fold_conv_affines(model: ir.Model) -> AffineFoldResult:
    """Fold ``Conv -> Mul/Div/Add/Sub(constant)`` into the Conv, repeatedly, in every graph.

    Applies when the constant is a scalar or one value per output channel, the convolution's
    weights and bias are constants it alone reads, and its output goes to that node alone (and
    is not a graph output), so the fold changes nothing else. The folded node's output keeps its
    name.
    """
    result = AffineFoldResult()
    names = UniqueNames(model)
    for graph in model.graphs():
        changed = True
        while changed:
            changed = False
            for node in list(graph):
                conv = _foldable(node)
                if conv is not None:
                    _fold(conv, node, names)
                    result.folded += 1
                    changed = True
    logger.info("folded %d scales and shifts into convolutions", result.folded)
    return result


def _operands(node: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(the computed input, the constant one) of an affine node, either way round for Mul and
    Add; None when it has no constant operand where one can fold."""
    if node.op_type not in AFFINE_OPS or not is_default_domain(node) or len(node.inputs) != 2:
        return None
    first, second = node.inputs
    if first is None or second is None:
        return None
    if second.const_value is not None and first.const_value is None:
        return first, second
    if (
        node.op_type in ("Mul", "Add")
        and first.const_value is not None
        and second.const_value is None
    ):
        return second, first
    return None


def _foldable(node: ir.Node) -> ir.Node | None:
    """The Conv that ``node`` can fold into, or None."""
    operands = _operands(node)
    if operands is None:
        return None
    computed, constant = operands
    conv = computed.producer()
    if conv is None or conv.op_type != "Conv" or not is_default_domain(conv):
        return None
    if len(computed.uses()) != 1 or computed.is_graph_output() or conv.graph is not node.graph:
        return None
    parameters = [value for value in conv.inputs[1:] if value is not None]
    if not parameters or any(not _own_constant(value, conv) for value in parameters):
        return None
    weight = conv.inputs[1]
    if weight.dtype != ir.DataType.FLOAT or constant_array(constant).dtype != np.float32:
        return None
    if _per_channel(constant, weight.const_value.shape[0], len(weight.const_value.shape)) is None:
        return None
    return conv


def _own_constant(value: ir.Value, conv: ir.Node) -> bool:
    return (
        value.const_value is not None
        and value.is_initializer()
        and not value.is_graph_input()
        and all(usage.node is conv for usage in value.uses())
    )


def _per_channel(constant: ir.Value, channels: int, rank: int) -> np.ndarray | None:
    """The constant as one value per output channel, or None when it broadcasts otherwise."""
    array = constant_array(constant).astype(np.float64)
    if array.size == 1:
        return np.full(channels, float(array.reshape(())))
    if array.ndim > rank or array.size != channels:
        return None
    aligned = (1,) * (rank - array.ndim) + array.shape
    if aligned[1] != channels or any(size != 1 for size in aligned[2:]) or aligned[0] != 1:
        return None
    return array.reshape(channels)


def _fold(conv: ir.Node, node: ir.Node, names: UniqueNames) -> None:
    weight = conv.inputs[1]
    channels, rank = weight.const_value.shape[0], len(weight.const_value.shape)
    _, constant = _operands(node)
    values = _per_channel(constant, channels, rank)
    dtype = weight.const_value.numpy().dtype
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    weights = float64_array(weight)
    shift = float64_array(bias) if bias is not None else np.zeros(channels)
    if node.op_type in ("Mul", "Div"):
        factor = values if node.op_type == "Mul" else 1.0 / values
        weights = weights * factor.reshape(-1, *([1] * (rank - 1)))
        shift = shift * factor
    else:
        shift = shift + (values if node.op_type == "Add" else -values)
    set_constant(weight, weights.astype(dtype))
    move_initializer_to(weight, conv.graph)
    if bias is None:
        bias = add_initializer(conv.graph, names(f"{weight.name}_bias"), shift.astype(dtype))
        conv.resize_inputs(3)
        conv.replace_input_with(2, bias)
    else:
        set_constant(bias, shift.astype(dtype))
        move_initializer_to(bias, conv.graph)
    take_over_output(node, conv.outputs[0])
    remove_if_unused(constant)
