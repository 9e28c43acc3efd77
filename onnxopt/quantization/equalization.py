"""Cross-layer equalization: even out per-channel weight ranges of consecutive convolutions.

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction" (2019).
For two convolutions with a positive-homogeneous activation f between them (f(s x) = s f(x) for
s > 0), dividing output channel i of the first by s_i and multiplying input channel i of the
second by s_i leaves the function unchanged. Choosing s_i = sqrt(r1_i / r2_i), with r the largest
absolute weight of the channel, gives both the same range sqrt(r1_i r2_i), so a channel whose
range was tiny next to its neighbours' no longer rounds to a few levels of a shared scale. This is
what makes depthwise-separable networks (MobileNet) quantize per tensor at all, and it narrows the
spread of the activation between the two layers, which is always quantized per tensor.

Relu, LeakyRelu and a Clip that only bounds from below at 0 are positive-homogeneous. Relu6
(Clip(0, 6)) is not: min(s x, 6) != s min(x, 6) for s != 1, so rescaling through it moves the
saturation point and changes the function; chains through it are left alone and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from onnxopt.graph import clip_bound, is_default_domain

logger = logging.getLogger(__name__)

# Scales are kept in [1 / SCALE_LIMIT, SCALE_LIMIT] so that a channel with a nearly-dead range on
# one side cannot blow the other side's weights (and the activation between) up without bound.
SCALE_LIMIT = 1e3

POSITIVE_HOMOGENEOUS = ("Relu", "LeakyRelu")


@dataclasses.dataclass
class ConvPair:
    """Two convolutions whose shared channels can be rescaled without changing the function."""

    first: ir.Node
    second: ir.Node


@dataclasses.dataclass
class EqualizationReport:
    """Pairs rescaled, and chains that looked like pairs but were refused, by reason."""

    pairs: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    refused: dict[str, int] = dataclasses.field(default_factory=dict)


def equalize_model(model: ir.Model, iterations: int = 2) -> EqualizationReport:
    """Rescale every equalizable convolution pair in place, ``iterations`` sweeps over the graph.

    One sweep equalizes each pair once; in a chain of three or more convolutions the middle one is
    rescaled on both sides, so later sweeps move the whole chain closer to balance.
    """
    report = EqualizationReport()
    changed: dict[ir.Node, tuple[str, str]] = {}
    for _ in range(iterations):
        pairs, refused = find_pairs(model.graph)
        report.refused = dict(refused)
        for pair in pairs:
            if equalize_pair(pair):
                changed[pair.first] = (pair.first.name or "", pair.second.name or "")
    report.pairs = list(changed.values())
    logger.info("equalized %d convolution pairs", len(report.pairs))
    return report


def find_pairs(graph: ir.Graph) -> tuple[list[ConvPair], collections.Counter[str]]:
    """Conv -> [positive-homogeneous activation] -> Conv chains that can be rescaled, in graph order."""
    pairs: list[ConvPair] = []
    refused: collections.Counter[str] = collections.Counter()
    for node in graph:
        if not _is_conv(node):
            continue
        pair, reason = _pair_from(node)
        if pair is not None:
            pairs.append(pair)
        elif reason is not None:
            refused[reason] += 1
            logger.debug("not equalizing after %s: %s", node.name, reason)
    return pairs, refused


def equalize_pair(pair: ConvPair) -> bool:
    """Rescale the channels between the two convolutions; False when every scale would be 1."""
    first_weight = _array(pair.first.inputs[1])
    second_weight = _array(pair.second.inputs[1])
    scales = channel_scales(
        output_channel_ranges(first_weight),
        input_channel_ranges(second_weight, _groups(pair.second)),
    )
    if np.all(scales == 1.0):
        return False
    spatial = (1,) * (first_weight.ndim - 1)
    _replace(pair.first.inputs[1], first_weight / scales.reshape(-1, *spatial))
    if len(pair.first.inputs) > 2 and pair.first.inputs[2] is not None:
        _replace(pair.first.inputs[2], _array(pair.first.inputs[2]) / scales)
    grouped = _by_group(second_weight, _groups(pair.second))
    scales_by_group = scales.reshape(grouped.shape[0], 1, grouped.shape[2])
    scaled = grouped * scales_by_group.reshape(*scales_by_group.shape, *(1,) * (grouped.ndim - 3))
    _replace(pair.second.inputs[1], scaled.reshape(second_weight.shape))
    return True


def channel_scales(first_ranges: np.ndarray, second_ranges: np.ndarray) -> np.ndarray:
    """s_i = sqrt(r1_i / r2_i), clamped; 1 where either range is zero (a dead channel stays put)."""
    usable = (first_ranges > 0) & (second_ranges > 0)
    ratio = np.divide(first_ranges, second_ranges, out=np.ones_like(first_ranges), where=usable)
    return np.clip(np.sqrt(ratio), 1.0 / SCALE_LIMIT, SCALE_LIMIT)


def output_channel_ranges(weight: np.ndarray) -> np.ndarray:
    """Largest |w| of each output channel (axis 0) of a convolution weight."""
    return np.abs(weight).reshape(weight.shape[0], -1).max(axis=1).astype(np.float64)


def input_channel_ranges(weight: np.ndarray, groups: int) -> np.ndarray:
    """Largest |w| touching each input channel of a (possibly grouped) convolution weight.

    Input channel c belongs to group c // (C / groups), where it is column c % (C / groups) of the
    weights of that group's output channels only.
    """
    grouped = np.abs(_by_group(weight, groups))
    ranges = grouped.max(axis=(1, *range(3, grouped.ndim)))
    return ranges.reshape(-1).astype(np.float64)


def _by_group(weight: np.ndarray, groups: int) -> np.ndarray:
    """[O, C/g, k...] as [g, O/g, C/g, k...]."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def _pair_from(first: ir.Node) -> tuple[ConvPair | None, str | None]:
    """The pair starting at ``first``, or None with the reason (None when no chain starts here)."""
    consumer, reason = _only_consumer(first.outputs[0])
    if consumer is None:
        return None, None
    if not _is_conv(consumer):
        if consumer.op_type not in (*POSITIVE_HOMOGENEOUS, "Clip") or consumer.domain != "":
            return None, None
        second, second_reason = _only_consumer(consumer.outputs[0])
        if second is None or not _is_conv(second) or second.inputs[0] is not consumer.outputs[0]:
            return None, None
        if consumer.op_type == "Clip" and not _clip_is_relu(consumer):
            return None, "Clip with an upper bound (Relu6) is not positive-homogeneous"
        reason = reason or second_reason
    else:
        second = consumer
        if second.inputs[0] is not first.outputs[0]:
            return None, None
    reason = reason or _weights_problem(first) or _weights_problem(second)
    if reason:
        return None, reason
    first_weight, second_weight = _array(first.inputs[1]), _array(second.inputs[1])
    groups = _groups(second)
    if first_weight.ndim != second_weight.ndim or second_weight.shape[0] % groups:
        return None, "the convolutions' weights do not line up"
    if second_weight.shape[1] * groups != first_weight.shape[0]:
        return None, "the convolutions' channels do not line up"
    return ConvPair(first, second), None


def _only_consumer(value: ir.Value) -> tuple[ir.Node | None, str | None]:
    """The single node reading ``value``; a reason when the value is used elsewhere too."""
    uses = list(value.uses())
    if not uses:
        return None, None
    consumer = uses[0].node
    if len(uses) > 1 or value.is_graph_output():
        return consumer, "an activation between them is used elsewhere"
    return consumer, None


def _weights_problem(node: ir.Node) -> str | None:
    parameters = [value for value in node.inputs[1:] if value is not None]
    if len(parameters) < 1 or any(value.const_value is None for value in parameters):
        return "weights or bias are not constants"
    if any(value.is_graph_input() for value in parameters):
        return "weights or bias are graph inputs a caller may replace"
    if any(len(value.uses()) != 1 for value in parameters):
        return "weights or bias are shared with other nodes"
    if any(value.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE) for value in parameters):
        return "weights are not float32 or float64"
    return None


def _clip_is_relu(node: ir.Node) -> bool:
    """A Clip with lower bound 0 (or none) and no upper bound: positive-homogeneous."""
    low = clip_bound(node, 1, "min")
    high = clip_bound(node, 2, "max")
    return low is not None and high is not None and low in (0.0, -math.inf) and high == math.inf


def _is_conv(node: ir.Node) -> bool:
    return node.op_type == "Conv" and is_default_domain(node) and len(node.inputs) >= 2


def _groups(node: ir.Node) -> int:
    return node.attributes.get_int("group", 1)


def _array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def _replace(value: ir.Value, array: np.ndarray) -> None:
    """Give an initializer new contents of the same type, as a new tensor (tensors may be shared)."""
    dtype = value.const_value.dtype.numpy()
    value.const_value = ir.tensor(array.astype(dtype), name=value.name)
