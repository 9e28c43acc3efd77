"""SmoothQuant for dense layers whose inputs are quantized with calibrated ranges.

A transformer's LayerNorm outputs hold a few channels far larger than the rest; one int8 scale
per tensor spends its levels on those and rounds the others away (MiniLM quantized with static
ranges: sentence-embedding cosine 0.86). Dividing channel j of a dense layer's input by s_j and
multiplying row j of its weight by s_j leaves the product unchanged, and with
``s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha)`` (Xiao et al. 2023) the outliers move into
the weights, which are quantized per output channel. The division is a Mul by a constant,
shared by all the layers that read the input; runtimes fold it into the quantization after it.

No one alpha suits every layer (MiniLM in OpenVINO, every dense layer int8: cosine 0.908 at
0.3, 0.990 at 0.5, 0.994 at 0.75, 0.987 at 0.95), so by default each input gets the alpha of
``ALPHA_GRID`` whose simulated int8 layer (per-tensor activations, per-channel weights) is
closest to the float one on sampled rows of the input.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.graph import UniqueNames, add_initializer, constant_array
from onnxopt.padding import padding_mask_input, token_rows
from onnxopt.progress import QUIET, Progress
from onnxopt.runtime import Feed, ProbeSession

logger = logging.getLogger(__name__)

# Smoothing scales are kept within this factor of 1: beyond it float rounding of the rescaled
# weights starts to matter, and no outlier seen in practice needs more.
SCALE_LIMIT = 1e4

# The alphas tried for each input, and what the trial measures on: rows of the input sampled
# across the feeds, and at most this many of the layers' output columns.
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
SAMPLED_ROWS = 512
SAMPLED_COLUMNS = 256


@dataclasses.dataclass
class SmoothingReport:
    """What ``smooth_dense_inputs`` did.

    Attributes:
        inputs: the layer inputs divided by smoothing scales, each with the layers reading it.
        skipped: inputs left alone, with the reason.
    """

    inputs: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    alphas: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Group:
    """The dense layers reading one activation, and where each keeps its input channels."""

    activation: ir.Value
    layers: list[ir.Node]

    def weight(self, layer: ir.Node) -> ir.Value:
        return layer.inputs[1]

    def channel_axis(self, layer: ir.Node) -> int:
        """The weight's axis of input channels: rows, or columns of a Gemm with transB."""
        return 1 if layer.op_type == "Gemm" and layer.attributes.get_int("transB", 0) else 0

    def channels(self) -> int:
        layer = self.layers[0]
        return self.weight(layer).const_value.shape[self.channel_axis(layer)]


def smooth_dense_inputs(
    model: ir.Model,
    feeds: Iterable[Feed],
    alpha: float | None = None,
    symmetric_activations: bool = False,
    progress: Progress = QUIET,
) -> SmoothingReport:
    """Move activation outliers of every MatMul and Gemm with a constant weight into the weight.

    Args:
        model: changed in place; computes the same function (up to float rounding).
        feeds: samples on which the inputs' largest magnitudes per channel are measured.
        alpha: the migration strength of SmoothQuant for every input (0.5 by its authors;
            larger moves more of the outliers into the weights); None chooses one per input
            from ``ALPHA_GRID``.
        symmetric_activations: the inputs will be quantized to symmetric int8 (else to
            uint8 with a zero point), for the choice of alpha.
        progress: shows the samples measured.
    """
    report = SmoothingReport()
    groups = _groups(model, report)
    if not groups:
        return report
    feeds = list(feeds)
    maxima, rows = _channel_maxima(model, groups, feeds, progress)
    unique = UniqueNames(model)
    for group in groups:
        name = group.activation.name
        activation = maxima.get(name)
        if activation is None:
            report.skipped[name] = "its channels were not measured"
            continue
        weight = _weight_maxima(group)
        chosen = alpha
        if chosen is None:
            chosen = _best_alpha(
                rows[name], _stacked_weights(group), activation, weight, symmetric_activations
            )
        report.alphas[name] = chosen
        _apply(model.graph, group, _scales(activation, weight, chosen), unique)
        report.inputs[name] = [layer.name or layer.op_type for layer in group.layers]
    logger.info("smoothed the inputs of %d dense layers", sum(map(len, report.inputs.values())))
    return report


def _groups(model: ir.Model, report: SmoothingReport) -> list[_Group]:
    """Dense layers with a constant float weight, by the activation they read; an activation
    read also by layers that cannot take the scales, or with weights shared elsewhere, is
    left out."""
    readers: dict[ir.Value, list[ir.Node]] = {}
    for node in model.graph:
        if _dense_layer(node):
            readers.setdefault(node.inputs[0], []).append(node)
    groups = []
    for activation, layers in readers.items():
        group = _Group(activation, layers)
        problem = _group_problem(group)
        if problem:
            report.skipped[activation.name or ""] = problem
        else:
            groups.append(group)
    return groups


def _dense_layer(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return False
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return False
    weight = node.inputs[1]
    if weight.const_value is None or weight.dtype != ir.DataType.FLOAT:
        return False
    if len(weight.const_value.shape) != 2 or node.inputs[0].const_value is not None:
        return False
    return node.op_type == "MatMul" or not node.attributes.get_int("transA", 0)


def _group_problem(group: _Group) -> str | None:
    channels = {
        group.weight(layer).const_value.shape[group.channel_axis(layer)] for layer in group.layers
    }
    if len(channels) != 1:
        return "its readers disagree on its channel count"
    members = set(group.layers)
    for layer in group.layers:
        if any(use.node not in members for use in group.weight(layer).uses()):
            return "a weight of a reader is shared with another node"
    shape = group.activation.shape
    if shape is not None and shape.rank() and shape[-1] != next(iter(channels)):
        return "its last axis is not the readers' input channels"
    return None


def _channel_maxima(
    model: ir.Model, groups: Sequence[_Group], feeds: Sequence[Feed], progress: Progress
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The largest magnitude of each channel (last axis) of every group's activation, over the
    positions that hold tokens (padding left out); and up to SAMPLED_ROWS of its rows, taken
    evenly from every feed."""
    names = [group.activation.name for group in groups]
    channels = {group.activation.name: group.channels() for group in groups}
    mask = padding_mask_input(model)
    probe = ProbeSession(model, names, prune=True)
    maxima: dict[str, np.ndarray] = {}
    sampled: dict[str, list[np.ndarray]] = {name: [] for name in names}
    per_feed = max(1, SAMPLED_ROWS // max(len(feeds), 1))
    with progress.task("measuring channels to smooth", len(feeds)) as advance:
        for feed in feeds:
            for name, array in probe.run(feed, names).items():
                rows = np.asarray(token_rows(np.asarray(array), feed, mask))
                if rows.size == 0 or rows.shape[-1] != channels[name]:
                    continue
                rows = rows.reshape(-1, channels[name])
                largest = np.abs(rows).max(axis=0)
                maxima[name] = largest if name not in maxima else np.maximum(maxima[name], largest)
                step = max(1, len(rows) // per_feed)
                sampled[name].append(rows[::step][:per_feed].astype(np.float32))
            advance(1)
    finite = {name: values for name, values in maxima.items() if np.all(np.isfinite(values))}
    return finite, {name: np.concatenate(sampled[name]) for name in finite}


def _stacked_weights(group: _Group) -> np.ndarray:
    """The group's weights side by side as [input channels, outputs], at most SAMPLED_COLUMNS
    outputs, evenly spaced."""
    weights = [constant_array(group.weight(layer)).astype(np.float32) for layer in group.layers]
    stacked = np.concatenate(
        [
            weight.T if group.channel_axis(layer) == 1 else weight
            for weight, layer in zip(weights, group.layers, strict=True)
        ],
        axis=1,
    )
    step = max(1, stacked.shape[1] // SAMPLED_COLUMNS)
    return stacked[:, ::step]


def _best_alpha(
    rows: np.ndarray,
    weights: np.ndarray,
    activation: np.ndarray,
    weight: np.ndarray,
    symmetric: bool,
) -> float:
    """The alpha of ALPHA_GRID whose smoothed layer, quantized, is closest to the float one on
    ``rows``: per-tensor activations over the rows' range, per-output-channel weights."""
    exact = rows @ weights
    energy = float(np.sum(exact.astype(np.float64) ** 2)) or 1.0
    errors = {}
    for alpha in ALPHA_GRID:
        scales = _scales(activation, weight, alpha).astype(np.float32)
        quantized_rows = _fake_quantized_activations(rows / scales, symmetric)
        quantized_weights = _fake_quantized_weights(weights * scales[:, None])
        difference = (quantized_rows @ quantized_weights - exact).astype(np.float64)
        errors[alpha] = float(np.sum(difference**2)) / energy
    return min(errors, key=errors.__getitem__)


def _fake_quantized_activations(values: np.ndarray, symmetric: bool) -> np.ndarray:
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if high - low < 1e-12:
        return values
    if symmetric:
        scale = max(-low, high) / 127
        return np.clip(np.round(values / scale), -127, 127) * scale
    scale = (high - low) / 255
    zero = np.round(-low / scale)
    return (np.clip(np.round(values / scale) + zero, 0, 255) - zero) * scale


def _fake_quantized_weights(weights: np.ndarray) -> np.ndarray:
    scales = np.abs(weights).max(axis=0) / 127
    scales = np.where(scales > 0, scales, 1.0)
    return np.clip(np.round(weights / scales), -127, 127) * scales


def _weight_maxima(group: _Group) -> np.ndarray:
    """The largest weight magnitude of each input channel over all the group's layers."""
    return np.max(
        [
            np.abs(constant_array(group.weight(layer))).max(axis=1 - group.channel_axis(layer))
            for layer in group.layers
        ],
        axis=0,
    )


def _scales(activation: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha); 1 where either side is zero."""
    activation, weight = activation.astype(np.float64), weight.astype(np.float64)
    usable = (activation > 0) & (weight > 0)
    scales = np.ones_like(activation)
    scales[usable] = activation[usable] ** alpha / weight[usable] ** (1 - alpha)
    return np.clip(scales, 1 / SCALE_LIMIT, SCALE_LIMIT)


def _apply(graph: ir.Graph, group: _Group, scales: np.ndarray, unique: UniqueNames) -> None:
    """Divide the activation by ``scales`` once, for the group, and scale the weights' rows."""
    activation = group.activation
    base = activation.name or "activation"
    divisor = add_initializer(
        graph, unique(f"{base}_smoothing_scale"), (1.0 / scales).astype(np.float32)
    )
    smooth = ir.node("Mul", [activation, divisor], name=unique(f"{base}_smoothing"))
    smoothed = smooth.outputs[0]
    smoothed.name = unique(f"{base}_smoothed")
    smoothed.dtype, smoothed.shape = activation.dtype, activation.shape
    order = {node: position for position, node in enumerate(graph)}
    graph.insert_before(min(group.layers, key=order.__getitem__), smooth)
    scaled: set[ir.Value] = set()
    for layer in group.layers:
        layer.replace_input_with(0, smoothed)
        weight = group.weight(layer)
        if weight in scaled:  # read by two layers of the group: its rows scale once
            continue
        scaled.add(weight)
        axis = group.channel_axis(layer)
        shape = [1, 1]
        shape[axis] = len(scales)
        values = constant_array(weight).astype(np.float64) * scales.reshape(shape)
        weight.const_value = ir.tensor(values.astype(np.float32), name=weight.name)
