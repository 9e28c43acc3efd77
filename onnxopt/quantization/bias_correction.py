"""Bias correction: cancel the mean output shift that rounding the weights to int8 causes.

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction" (2019).
A quantized layer computes y_q = Wq x + b instead of y = W x + b, so its output is off by
(W - Wq) x, whose mean over the data is (W - Wq) E[x]. Rounding errors of one output channel's
weights do not cancel when the inputs have a nonzero mean (every input after a Relu), and the
shift adds up over the kernel and over the layers after it. Adding (W - Wq) E[x] to the bias
cancels it exactly in the mean; with per-input-channel means that is one dot product per output
channel, and the corrected bias is quantized to int32 with the scale it already had, so the
integer kernel onnxruntime fuses stays the same.

For a convolution E[x] is taken per input channel and spatial position is ignored, except that
zero padding is accounted for: a tap that falls in the padding for a share of output positions
contributes only for the rest. For Gemm and MatMul the means are per input feature (last axis).
A MatMul has no bias input; its shift goes into the constant of a float Add that follows it alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.graph import laid_out_constant
from onnxopt.quantization import numerics
from onnxopt.quantization.nodes import QdqBuilder

logger = logging.getLogger(__name__)

CORRECTED_OPS = ("Conv", "Gemm", "MatMul")

# Means are asked for along axis 1 (channels of a convolution input) or the last axis (features).
CHANNEL_AXIS = 1
FEATURE_AXIS = -1

# Gives the per-channel means of a float tensor along an axis, or None when unknown.
ChannelMeans = Callable[[str, int], np.ndarray | None]


@dataclasses.dataclass
class BiasCorrectionReport:
    """What bias correction changed.

    Attributes:
        corrected: per corrected node, the largest shift of one output channel's bias.
        created: nodes that had no bias and were given one to hold the correction.
        skipped: nodes that could not be corrected, with the reason.
    """

    corrected: dict[str, float] = dataclasses.field(default_factory=dict)
    created: list[str] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Target:
    """A quantized node, its float counterpart, and the float tensor whose means correct it."""

    node: ir.Node
    float_node: ir.Node
    weight: ir.Node  # the DequantizeLinear of the int8 weight
    input_name: str
    axis: int

    def weight_error(self) -> tuple[np.ndarray, np.ndarray]:
        """W - Wq in the weight's layout, and the weight's scales."""
        quantized, scales = _dequantize(self.weight)
        return self.float_node.inputs[1].const_value.numpy() - quantized, scales


def mean_requests(quantized: ir.Model, float_model: ir.Model) -> dict[str, int]:
    """Float tensors whose per-channel means correction reads, with the axis of each."""
    counterparts = _float_nodes_by_output(float_model)
    requests = {}
    for node in quantized.graph:
        target = _target(node, counterparts)
        if isinstance(target, _Target):
            requests[target.input_name] = target.axis
    return requests


def correct_biases(
    quantized: ir.Model, float_model: ir.Model, means: ChannelMeans, create_bias: bool = True
) -> BiasCorrectionReport:
    """Shift the bias of every quantized Conv, Gemm and MatMul by its mean quantization error.

    Args:
        quantized: the QDQ model ``quantize_model`` made from ``float_model``; changed in place.
        float_model: the float model it was quantized from, for the float weights and biases.
        means: per-channel means of a float tensor of ``float_model`` along an axis.
        create_bias: give a Conv or Gemm without a bias an int32 one to hold the correction.
    """
    counterparts = _float_nodes_by_output(float_model)
    report = BiasCorrectionReport()
    builder = QdqBuilder(quantized.graph)
    for node in list(quantized.graph):
        target = _target(node, counterparts)
        if target is None:
            continue
        label = node.name or node.outputs[0].name
        reason = target if isinstance(target, str) else None
        if reason is None:
            error, scales = target.weight_error()
            mean = means(target.input_name, target.axis)
            shift = None if mean is None else _output_shift(target, error, mean)
            if shift is None:
                reason = f"no per-channel means of its input '{target.input_name}'"
            else:
                reason = _apply(target, shift, scales, create_bias, builder, report, label)
        if reason is not None:
            report.skipped.append({"node": label, "op_type": node.op_type, "reason": reason})
    logger.info(
        "corrected %d biases (%d created), skipped %d",
        len(report.corrected),
        len(report.created),
        len(report.skipped),
    )
    return report


def _target(node: ir.Node, counterparts: dict[str, ir.Node]) -> _Target | str | None:
    """The node as a correction target, a reason it cannot be one, or None if it is not quantized."""
    if node.op_type not in CORRECTED_OPS or node.domain not in ("", "ai.onnx"):
        return None
    weight = _int8_dequantize(node.inputs[1] if len(node.inputs) > 1 else None)
    if weight is None:
        return None
    float_node = counterparts.get(node.outputs[0].name)
    if float_node is None or float_node.op_type != node.op_type:
        return "its float counterpart is not in the float model"
    float_weight = float_node.inputs[1] if len(float_node.inputs) > 1 else None
    if float_weight is None or float_weight.const_value is None or float_node.inputs[0] is None:
        return "its float weights are not constants"
    shape = tuple(float_weight.const_value.shape)
    if shape != tuple(_int8_values(weight).const_value.shape):
        return "its float and quantized weights differ in shape"
    if node.op_type == "MatMul" and len(shape) != 2:
        return "its weight is not a matrix"
    axis = CHANNEL_AXIS if node.op_type == "Conv" else FEATURE_AXIS
    return _Target(node, float_node, weight, float_node.inputs[0].name, axis)


def _output_shift(target: _Target, error: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """(W - Wq) E[x] per output channel, or None when the means do not fit the weights."""
    mean = np.asarray(mean, dtype=np.float64)
    if not np.all(np.isfinite(mean)):
        return None
    node = target.node
    if node.op_type == "Conv":
        groups = node.attributes.get_int("group", 1)
        outputs, per_group = error.shape[0], error.shape[1]
        if mean.shape != (per_group * groups,) or outputs % groups:
            return None
        coverage = _tap_coverage(target.float_node, error.shape[2:])
        kernel_error = (error * coverage).reshape(outputs, per_group, -1).sum(axis=2)
        group_of_output = np.arange(outputs) // (outputs // groups)
        return (kernel_error * mean.reshape(groups, per_group)[group_of_output]).sum(axis=1)
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    matrix = error.T if transposed else error
    if mean.shape != (matrix.shape[0],):
        return None
    return mean @ matrix


def _tap_coverage(node: ir.Node, kernel: tuple[int, ...]) -> np.ndarray:
    """Share of output positions where each kernel tap reads the input rather than zero padding.

    All ones when the input's spatial size is unknown.
    """
    shape = node.inputs[0].shape
    spatial = None if shape is None or len(shape) != len(kernel) + 2 else list(shape)[2:]
    if spatial is None or not all(isinstance(size, int) for size in spatial):
        return np.ones(kernel)
    rank = len(kernel)
    strides = _ints(node, "strides", [1] * rank)
    dilations = _ints(node, "dilations", [1] * rank)
    pads = _ints(node, "pads", [0] * (2 * rank))
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    coverage = np.ones(())
    for dim in range(rank):
        size, taps, stride, dilation = spatial[dim], kernel[dim], strides[dim], dilations[dim]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            outputs = math.ceil(size / stride)
            total = max((outputs - 1) * stride + dilation * (taps - 1) + 1 - size, 0)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        else:
            begin, end = (0, 0) if auto_pad == "VALID" else (pads[dim], pads[dim + rank])
            outputs = (size + begin + end - dilation * (taps - 1) - 1) // stride + 1
        if outputs < 1:
            return np.ones(kernel)
        positions = np.arange(outputs)[:, None] * stride + np.arange(taps)[None, :] * dilation
        inside = ((positions - begin >= 0) & (positions - begin < size)).mean(axis=0)
        coverage = np.multiply.outer(coverage, inside)
    return coverage


def _apply(
    target: _Target,
    shift: np.ndarray,
    weight_scales: np.ndarray,
    create_bias: bool,
    builder: QdqBuilder,
    report: BiasCorrectionReport,
    label: str,
) -> str | None:
    """Add the shift to the node's bias; the reason when there is no bias to hold it."""
    node = target.node
    if node.op_type == "MatMul":
        return _shift_following_add(node, shift, report, label)
    bias_input = node.inputs[2] if len(node.inputs) > 2 else None
    if bias_input is not None:
        return _shift_int32_bias(target, bias_input, shift, report, label)
    if not create_bias:
        return "it has no bias (create_bias is off)"
    if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
        return "Gemm with beta != 1 cannot take an int32 bias"
    input_scale = _activation_scale(node.inputs[0])
    if input_scale is None:
        return "its input is not quantized"
    scales = np.broadcast_to(weight_scales, shift.shape)
    values, bias_scales = numerics.quantize_bias(shift, input_scale, scales)
    axis = 0 if weight_scales.size > 1 else None
    if axis is None:
        bias_scales = bias_scales.reshape(-1)[:1].reshape(())
    dequantized = builder.dequantized_constant(
        builder.unique(f"{label}_bias"),
        values,
        bias_scales,
        np.zeros_like(bias_scales, dtype=np.int32),
        axis,
        before=node,
    )
    node.resize_inputs(3)
    node.replace_input_with(2, dequantized)
    report.created.append(label)
    report.corrected[label] = float(np.abs(shift).max(initial=0))
    return None


def _shift_int32_bias(
    target: _Target,
    bias_input: ir.Value,
    shift: np.ndarray,
    report: BiasCorrectionReport,
    label: str,
) -> str | None:
    bias = bias_input.producer()
    if bias is None or bias.op_type != "DequantizeLinear":
        return "its bias is not quantized"
    values, scale = bias.inputs[0], bias.inputs[1]
    if values.const_value is None or scale is None or scale.const_value is None:
        return "its bias is not a constant"
    if values.const_value.dtype != ir.DataType.INT32 or len(values.uses()) != 1:
        return "its bias is not an int32 constant of its own"
    scales = np.broadcast_to(scale.const_value.numpy().astype(np.float64), shift.shape)
    # From the float bias, not the int32 one, so correcting twice gives the same bias.
    float_bias = _float_bias(target.float_node, shift.shape)
    if float_bias is None:
        return "its float bias is not one constant per output channel"
    corrected = np.round((float_bias + shift) / scales)
    corrected = np.clip(corrected, -numerics.INT32_LIMIT, numerics.INT32_LIMIT).astype(np.int32)
    values.const_value = ir.tensor(corrected, name=values.name)
    report.corrected[label] = float(np.abs(shift).max(initial=0))
    return None


def _shift_following_add(
    node: ir.Node, shift: np.ndarray, report: BiasCorrectionReport, label: str
) -> str | None:
    """Put a MatMul's shift into the constant of the float Add that alone reads its output.

    A quantized MatMul output passes a QuantizeLinear/DequantizeLinear pair on its way to the Add;
    the mean shift passes it too, so the Add after the pair holds the correction just as well.
    """
    output = _through_quantize_pair(node.outputs[0])
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output() or uses[0].node.op_type != "Add":
        return "MatMul without a following Add to hold the correction"
    add = uses[0].node
    constant = add.inputs[1 - uses[0].idx]
    if constant is None or constant.const_value is None or len(constant.uses()) != 1:
        return "the Add after it has no constant of its own"
    array = constant.const_value.numpy()
    if array.dtype.kind != "f" or array.size != shift.size or array.shape[-1:] != shift.shape:
        return "the Add after it is not a bias of one value per output feature"
    corrected = (array.astype(np.float64) + shift.reshape(array.shape)).astype(array.dtype)
    constant.const_value = ir.tensor(corrected, name=constant.name)
    report.corrected[label] = float(np.abs(shift).max(initial=0))
    return None


def _through_quantize_pair(value: ir.Value) -> ir.Value:
    """The value after a QuantizeLinear -> DequantizeLinear pair that alone reads ``value``, else itself."""
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].node.op_type != "QuantizeLinear" or value.is_graph_output():
        return value
    quantized = uses[0].node.outputs[0]
    dequantizers = list(quantized.uses())
    if len(dequantizers) != 1 or dequantizers[0].node.op_type != "DequantizeLinear":
        return value
    return dequantizers[0].node.outputs[0]


def _int8_dequantize(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear of a constant int8 tensor with constant scales that makes ``value``
    (the int8 tensor may be laid out from the constant, as onnxopt's int8 stems read theirs)."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    values, scale = _int8_values(producer), producer.inputs[1]
    if values.const_value is None or scale.const_value is None:
        return None
    return producer if values.const_value.dtype == ir.DataType.INT8 else None


def _int8_values(producer: ir.Node) -> ir.Value:
    """The constant a DequantizeLinear reads, through a layout that keeps its scales' axis."""
    scale = producer.inputs[1].const_value
    per_channel = scale is not None and scale.size > 1
    axis = producer.attributes.get_int("axis", 1) if per_channel else None
    return laid_out_constant(producer.inputs[0], axis)


def _dequantize(producer: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """The float values (in the constant's layout) and the scales of a DequantizeLinear of
    constants."""
    values, scale = _int8_values(producer), producer.inputs[1]
    zero_point = producer.inputs[2] if len(producer.inputs) > 2 else None
    integers = values.const_value.numpy().astype(np.float64)
    scales = scale.const_value.numpy().astype(np.float64)
    offsets = (
        zero_point.const_value.numpy().astype(np.float64)
        if zero_point is not None and zero_point.const_value is not None
        else np.zeros_like(scales)
    )
    if scales.size > 1:
        axis = producer.attributes.get_int("axis", 1) % integers.ndim
        shape = [1] * integers.ndim
        shape[axis] = -1
        return (integers - offsets.reshape(shape)) * scales.reshape(shape), scales
    return (integers - offsets) * scales, scales


def _activation_scale(value: ir.Value) -> float | None:
    producer = value.producer()
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    scale = producer.inputs[1].const_value
    return None if scale is None or scale.size != 1 else float(scale.numpy())


def _float_bias(node: ir.Node, shape: tuple[int, ...]) -> np.ndarray | None:
    """The float model's bias (zeros when it has none), or None when it is not of this shape."""
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        return np.zeros(shape)
    array = None if bias.const_value is None else bias.const_value.numpy()
    return None if array is None or array.shape != shape else array.astype(np.float64)


def _float_nodes_by_output(model: ir.Model) -> dict[str, ir.Node]:
    """Nodes of the float model by the name of their first output, which quantization keeps."""
    return {node.outputs[0].name: node for node in model.graph if node.outputs}


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attribute = node.attributes.get(name)
    return list(attribute.value) if attribute is not None else default
