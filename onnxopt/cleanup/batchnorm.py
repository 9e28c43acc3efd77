"""Fold BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

In inference a BatchNorm is an affine map per channel: y = (x - mean) * s + beta with
s = gamma / sqrt(var + epsilon). After a producer y = W * x + b it is the same producer with
W' = W * s (along the output channels) and b' = (b - mean) * s + beta.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxopt.graph import (
    UniqueNames,
    add_initializer,
    default_opset,
    float64_array,
    is_default_domain,
    move_initializer_to,
    remove_if_unused,
    set_constant,
    take_over_output,
)

logger = logging.getLogger(__name__)

PRODUCERS = ("Conv", "ConvTranspose", "Gemm")

# The BatchNormalization attribute defaults of every opset.
DEFAULT_EPSILON = 1e-5
# Before opset 7, a BatchNorm with is_test = 0 (the default) computes batch statistics.
FIRST_OPSET_WITHOUT_IS_TEST = 7


@dataclasses.dataclass
class BatchNormFoldResult:
    """What ``fold_batchnorms`` did.

    Attributes:
        folded: BatchNorms folded into their producer.
        refused: BatchNorms after a Conv, ConvTranspose or Gemm left as they were, by reason.
    """

    folded: int = 0
    refused: dict[str, int] = dataclasses.field(default_factory=dict)


def fold_batchnorms(model: ir.Model) -> BatchNormFoldResult:
    """Fold every BatchNormalization that follows a Conv, ConvTranspose or Gemm into it.

    In the main graph and subgraphs; in functions too, though there the weights are never
    initializers, so nothing folds. A fold happens only when it changes nothing else: the
    producer's output goes to the BatchNorm alone and is not a graph output; the producer's
    weights and bias and the BatchNorm's parameters are constant initializers, not graph
    inputs, and the weights and bias feed nothing else; no input is left empty; the BatchNorm
    runs in inference mode with one output; its parameters are one per output channel and of
    the weights' type. The BatchNorm's output keeps its name, on the producer's output now.
    Computed in float64, stored in the weights' type. Parameters left unused are removed.

    Args:
        model: changed in place.
    """
    result = BatchNormFoldResult()
    refused: collections.Counter[str] = collections.Counter()
    names = UniqueNames(model)
    opset = default_opset(model)
    nodes = list(model.graph.all_nodes())
    for function in model.functions.values():
        nodes.extend(function.all_nodes())
    for batchnorm in nodes:
        if batchnorm.op_type != "BatchNormalization" or not is_default_domain(batchnorm):
            continue
        source = batchnorm.inputs[0] if batchnorm.inputs else None
        producer = source.producer() if source is not None else None
        if producer is None or producer.op_type not in PRODUCERS or not is_default_domain(producer):
            continue
        reason = _refusal(producer, batchnorm, opset)
        if reason is not None:
            logger.debug("not folding %s: %s", batchnorm.name, reason)
            refused[reason] += 1
            continue
        _fold(producer, batchnorm, names)
        result.folded += 1
    result.refused = dict(refused)
    logger.info("folded %d BatchNormalization nodes", result.folded)
    return result


def _refusal(producer: ir.Node, batchnorm: ir.Node, opset: int) -> str | None:
    """Why the BatchNorm cannot be folded into its producer, or None when nothing stands in the way."""
    if producer.graph is not batchnorm.graph:
        return f"the {producer.op_type} is in an enclosing graph"
    output = producer.outputs[0]
    if len(producer.outputs) != 1 or len(output.uses()) != 1 or output.is_graph_output():
        return f"the {producer.op_type}'s output has other consumers or is a graph output"
    if len(producer.inputs) < 2 or any(value is None for value in producer.inputs):
        return f"the {producer.op_type} has an empty optional input"
    if len(batchnorm.inputs) != 5 or any(value is None for value in batchnorm.inputs):
        return "it has an empty input"
    attributes = [*producer.attributes.values(), *batchnorm.attributes.values()]
    if any(attribute.is_ref() for attribute in attributes):
        return "its attributes refer to those of a function"
    if len(batchnorm.outputs) != 1 or _training(batchnorm, opset):
        return "it runs in training mode"
    weights = producer.inputs[1:]
    parameters = batchnorm.inputs[1:]
    if not all(_is_constant_initializer(value) for value in (*weights, *parameters)):
        return "weights or parameters are not constant initializers"
    if any(list(value.uses()) != [(producer, index + 1)] for index, value in enumerate(weights)):
        return f"the {producer.op_type}'s weights or bias feed other nodes too"
    channels = _output_channels(producer)
    if channels is None:
        return f"the {producer.op_type}'s weights do not have the shape it needs"
    if any(value.const_value.shape != (channels,) for value in parameters):
        return "its parameters are not one per channel"
    if len({value.const_value.dtype for value in (*weights, *parameters)}) != 1:
        return "its parameters differ in type from the weights"
    return None


def _training(batchnorm: ir.Node, opset: int) -> bool:
    if batchnorm.attributes.get_int("training_mode", 0) != 0:
        return True
    return opset < FIRST_OPSET_WITHOUT_IS_TEST and batchnorm.attributes.get_int("is_test", 0) == 0


def _is_constant_initializer(value: ir.Value) -> bool:
    return (
        value.is_initializer()
        and value.const_value is not None
        and not value.is_graph_input()
        and not value.is_graph_output()
    )


def _output_channels(producer: ir.Node) -> int | None:
    """How many output channels the producer's weights make, or None when their shape is off."""
    shape = producer.inputs[1].const_value.shape
    if producer.op_type == "Gemm":
        if len(shape) != 2:
            return None
        return shape[0] if producer.attributes.get_int("transB", 0) else shape[1]
    if len(shape) < 3:
        return None
    if producer.op_type == "ConvTranspose":
        group = producer.attributes.get_int("group", 1)
        return shape[1] * group if group > 0 and shape[0] % group == 0 else None
    return shape[0]


def _fold(producer: ir.Node, batchnorm: ir.Node, names: UniqueNames) -> None:
    gamma, beta, mean, var = (float64_array(value) for value in batchnorm.inputs[1:])
    epsilon = batchnorm.attributes.get_float("epsilon", DEFAULT_EPSILON)
    scale = gamma / np.sqrt(var + epsilon)
    weight = producer.inputs[1]
    dtype = weight.const_value.numpy().dtype
    set_constant(weight, _scaled_weights(producer, float64_array(weight), scale).astype(dtype))
    move_initializer_to(weight, producer.graph)

    # Gemm computes alpha * A @ B + beta * C: beta goes into the new bias and away from the node.
    bias_scale = 1.0
    if producer.op_type == "Gemm" and "beta" in producer.attributes:
        bias_scale = producer.attributes.get_float("beta", 1.0)
        producer.attributes.pop("beta")
    bias = producer.inputs[2] if len(producer.inputs) > 2 else None
    old_bias = float64_array(bias) if bias is not None else 0.0
    new_bias = ((bias_scale * old_bias - mean) * scale + beta).astype(dtype)
    if bias is None:
        bias = add_initializer(producer.graph, names(f"{weight.name}_bias"), new_bias)
        producer.resize_inputs(3)
        producer.replace_input_with(2, bias)
    else:
        set_constant(bias, new_bias)
        move_initializer_to(bias, producer.graph)

    _take_over_output(producer.outputs[0], batchnorm)


def _scaled_weights(producer: ir.Node, weights: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The weights with each output channel multiplied by its scale."""
    if producer.op_type == "Gemm":
        axis = 0 if producer.attributes.get_int("transB", 0) else 1
        return weights * np.expand_dims(scale, 1 - axis)
    if producer.op_type == "ConvTranspose":
        # Weights (C_in, C_out / group, k...): output channel g * C_out / group + j is at
        # [group g's rows, j]; scale reshaped to (group, 1, C_out / group, 1...) matches them.
        group = producer.attributes.get_int("group", 1)
        in_channels, per_group, *kernel = weights.shape
        grouped = weights.reshape(group, in_channels // group, per_group, *kernel)
        factors = scale.reshape(group, 1, per_group, *([1] * len(kernel)))
        return (grouped * factors).reshape(weights.shape)
    return weights * scale.reshape(-1, *([1] * (weights.ndim - 1)))


def _take_over_output(output: ir.Value, batchnorm: ir.Node) -> None:
    """Make ``output`` stand for the BatchNorm's output, name included, and remove the BatchNorm."""
    parameters = [value for value in batchnorm.inputs[1:] if value is not None]
    take_over_output(batchnorm, output)
    for parameter in parameters:
        remove_if_unused(parameter)
