"""Where quantization loses accuracy: each quantized tensor and layer compared with the float model.

Both models run on the same samples with their intermediate tensors exposed as outputs. A tensor
of the quantized model is compared with the float tensor that plays its part: a DequantizeLinear
output with the float input its consumer reads in the float model (after a Relu the quantizer
absorbed, that is the Relu's output, not the convolution's), any other tensor with the float
tensor of the same name. The errors are cumulative: a tensor's noise includes everything
quantized before it, which is what the per-layer table should show (where the error grows).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Collection, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.graph import constant_array
from onnxopt.metrics import sqnr_db
from onnxopt.runtime import (
    Feed,
    ProbeSession,
    SerializedModel,
    concurrently,
    groups_within,
    memory_headroom,
    release_freed_memory,
    tensor_bytes,
)

logger = logging.getLogger(__name__)

# Tensors fetched at once per model when comparing them, at least. The two models run side by
# side, so a group costs twice this at the peak: at 2**25 comparing tensors set
# EfficientNet-Lite0's peak RSS (520 MB, against 470 MB at 2**24, for the same time).
PROBE_BYTES = 2**24

# Where the process has held more at its peak than it holds now, groups may take this share of
# that headroom per model instead, so that the two models' tensors and a difference fit in
# memory the process has used already. Fewer groups cost fewer sessions and runs: at
# PROBE_BYTES each of PicoDet's maps is a group of its own, and its 60 groups took 13 of the
# fallback's 35 s; with the headroom its int8 run takes 53 s instead of 69 s, at the same peak
# RSS (1446 MB; EfficientNet-Lite0 441 -> 450 MB, the DB text detector 1189 -> 1210 MB).
HEADROOM_SHARE = 1 / 4


@dataclasses.dataclass
class TensorNoise:
    """Power of a float tensor and of the quantized model's difference from it, over all samples."""

    signal: float = 0.0
    noise: float = 0.0

    @property
    def sqnr_db(self) -> float:
        return sqnr_db(self.signal, self.noise)

    @property
    def noise_ratio(self) -> float:
        """Noise power over signal power: what a node adds shows as a difference of these."""
        if self.noise == 0.0:
            return 0.0
        return math.inf if self.signal == 0.0 else self.noise / self.signal


@dataclasses.dataclass
class LayerSqnr:
    """One quantized tensor's fidelity, and the node that computes it (None for a graph input)."""

    node: str | None
    op_type: str
    tensor: str
    sqnr_db: float


def layer_sqnr(
    float_model: ir.Model, quantized_model: ir.Model, feeds: Sequence[Feed]
) -> list[LayerSqnr]:
    """SQNR of every quantized activation of ``quantized_model``, worst first."""
    noise = compare_tensors(float_model, quantized_model, feeds, layer_tensors(quantized_model))
    return layers_from(quantized_model, noise)


def layer_tensors(quantized_model: ir.Model) -> set[str]:
    """The tensors ``layers_from`` reads: what ``compare_tensors`` must measure for it."""
    return {name for _, name in measured_quantizations(quantized_model)}


def layers_from(quantized_model: ir.Model, noise: dict[str, TensorNoise]) -> list[LayerSqnr]:
    """The per-layer table from a ``compare_tensors`` result, worst first."""
    layers = []
    for quantize, name in measured_quantizations(quantized_model):
        measured = noise.get(name)
        if measured is None:
            continue
        source = quantize.inputs[0]
        producer = source.producer()
        layers.append(
            LayerSqnr(
                producer.name if producer is not None else None,
                producer.op_type if producer is not None else "input",
                source.name,
                measured.sqnr_db,
            )
        )
    return sorted(layers, key=lambda layer: (layer.sqnr_db, layer.tensor))


def compare_tensors(
    float_model: ir.Model,
    quantized_model: ir.Model,
    feeds: Sequence[Feed],
    names: Collection[str] | None = None,
) -> dict[str, TensorNoise]:
    """Signal and noise of quantized-model tensors that have a float counterpart, by name.

    ``names`` limits the comparison to those tensors (None: every one), which saves runs: the
    tensors are compared in groups of at most PROBE_BYTES per model (sized on the first
    sample), each group with sessions of its own, since with every tensor of both models
    fetched at once a detector at 640x640 would hold gigabytes.
    """
    pairs = float_counterparts(float_model, quantized_model)
    if names is not None:
        pairs = {name: pairs[name] for name in pairs if name in names}
    noise = {name: TensorNoise() for name in pairs}
    if not feeds or not pairs:
        return noise
    integers = _integer_readings(quantized_model)
    with (
        SerializedModel(float_model) as float_source,
        SerializedModel(quantized_model) as quantized_source,
    ):
        for group in _groups_by_size(float_source, pairs, feeds[0]):
            _add_noise(noise, pairs, integers, group, float_source, quantized_source, feeds)
            release_freed_memory()
    return noise


def _add_noise(
    noise: dict[str, TensorNoise],
    pairs: dict[str, str],
    integers: dict[str, tuple[np.ndarray, np.ndarray]],
    group: list[str],
    float_model: SerializedModel,
    quantized_model: SerializedModel,
    feeds: Sequence[Feed],
) -> None:
    """Add one group's signal and noise over all samples; a tensor that cannot be compared
    (missing, or shaped unlike its counterpart) is dropped from ``noise``. The tensors in
    ``integers`` are read as integers and dequantized with their scale and zero point."""
    quantized_probe = ProbeSession(quantized_model, group, threads=1, prune=True)
    float_probe = ProbeSession(
        float_model, list(dict.fromkeys(pairs[name] for name in group)), threads=1, prune=True
    )
    for feed in feeds:
        quantized_values, float_values = concurrently(
            lambda probe, feed=feed: probe.run(feed), [quantized_probe, float_probe]
        )
        for name in group:
            if name not in noise:
                continue
            observed = quantized_values.get(name)
            if observed is not None and name in integers:
                scale, zero_point = integers[name]
                observed = (observed.astype(np.float32) - zero_point) * scale
            reference = float_values.get(pairs[name])
            if observed is None or reference is None or observed.shape != reference.shape:
                del noise[name]
                continue
            # Squares in float32, sums in float64: no float64 copies of a detector's maps.
            reference = np.asarray(reference, dtype=np.float32)
            difference = np.array(observed, dtype=np.float32)  # an array even when 0-d
            difference -= reference
            noise[name].signal += float(np.sum(np.square(reference), dtype=np.float64))
            noise[name].noise += float(
                np.sum(np.square(difference, out=difference), dtype=np.float64)
            )


def _groups_by_size(
    float_model: ir.Model | SerializedModel, pairs: dict[str, str], feed: Feed
) -> list[list[str]]:
    """The quantized-model names of ``pairs`` in groups whose float counterparts hold at most
    PROBE_BYTES on ``feed`` (sized by ``runtime.tensor_bytes``), or HEADROOM_SHARE of the
    process's memory headroom where that is more."""
    sizes = tensor_bytes(float_model, set(pairs.values()), feed)
    max_bytes = max(PROBE_BYTES, int(memory_headroom() * HEADROOM_SHARE))
    return groups_within(
        ((name, sizes.get(float_name, 0)) for name, float_name in pairs.items()), max_bytes
    )


def node_added_noise(
    float_model: ir.Model,
    quantized_model: ir.Model,
    noise: dict[str, TensorNoise],
    nodes: Iterable[str],
) -> dict[str, float]:
    """Noise-to-signal ratio each named quantized node adds to what reaches it, largest first.

    A node's output (after its own QuantizeLinear, if any) carries the noise of its inputs plus what
    quantizing the node added; the difference of the ratios is the node's own share. It ranks
    nodes by the damage they do themselves, so one bad layer does not make every layer after it
    look bad too. A node is charged for the quantization of an input when that quantization
    exists for it (its producer emits float), not when its producer is an integer kernel that
    emits int8 anyway. Nodes the quantizer replaced (a MatMul quantized at run time) are found
    through their float counterpart's tensor names, which quantization keeps.
    """
    added = {}
    for name, (inputs, output) in _noise_points(float_model, quantized_model, nodes).items():
        before = max(
            (noise[value.name].noise_ratio for value in inputs if value.name in noise),
            default=0.0,
        )
        after = noise[output.name].noise_ratio if output and output.name in noise else before
        share = after - before
        added[name] = 0.0 if math.isnan(share) else share
    return dict(sorted(added.items(), key=lambda item: -item[1]))


def noise_points(
    float_model: ir.Model, quantized_model: ir.Model, nodes: Iterable[str]
) -> set[str]:
    """The quantized-model tensors ``node_added_noise`` reads for ``nodes``: what
    ``compare_tensors`` must measure for it, of all the tensors it could."""
    return {
        value.name
        for inputs, output in _noise_points(float_model, quantized_model, nodes).values()
        for value in [*inputs, *([output] if output is not None else [])]
    }


def _noise_points(
    float_model: ir.Model, quantized_model: ir.Model, nodes: Iterable[str]
) -> dict[str, tuple[list[ir.Value], ir.Value | None]]:
    """For each named node, the values its input noise and its output noise are read at."""
    quantized_nodes = {node.name: node for node in quantized_model.graph if node.name}
    float_nodes = {node.name: node for node in float_model.graph if node.name}
    values = {value.name: value for value in _values(quantized_model.graph)}
    ordered = list(nodes)
    names = set(ordered)
    points = {}
    for name in ordered:
        node = quantized_nodes.get(name)
        if node is not None:
            inputs = [_charged_input(value, names) for value in node.inputs]
            output = node.outputs[0]
        elif name in float_nodes:
            counterpart = float_nodes[name]
            inputs = [values.get(value.name) for value in counterpart.inputs if value is not None]
            output = values.get(counterpart.outputs[0].name)
        else:
            continue
        points[name] = (
            [value for value in inputs if value is not None and not is_quantized_constant(value)],
            _as_consumed(output) if output is not None else None,
        )
    return points


def _charged_input(value: ir.Value | None, quantized: set[str]) -> ir.Value | None:
    """What a node's input noise is measured at: before the input's Q/DQ pair when the pair is
    there for this node (its producer is not a quantized node), else the dequantized value."""
    if value is None:
        return None
    dequantize = value.producer()
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return value
    quantize = dequantize.inputs[0].producer()
    if quantize is None or quantize.op_type != "QuantizeLinear":
        return value
    source = quantize.inputs[0]
    producer = source.producer()
    return value if producer is not None and producer.name in quantized else source


def activation_pairs(model: ir.Model) -> list[tuple[ir.Node, ir.Node]]:
    """(QuantizeLinear, DequantizeLinear) pairs that quantize an activation, in graph order."""
    pairs = []
    for node in model.graph:
        if node.op_type != "DequantizeLinear":
            continue
        producer = node.inputs[0].producer()
        if producer is not None and producer.op_type == "QuantizeLinear":
            pairs.append((producer, node))
    return pairs


def measured_quantizations(model: ir.Model) -> list[tuple[ir.Node, str]]:
    """Each QuantizeLinear of an activation, with the tensor its noise is measured at: its
    DequantizeLinear's output, or its own integers where they are read only rearranged."""
    return [
        *(
            (quantize, dequantize.outputs[0].name)
            for quantize, dequantize in activation_pairs(model)
        ),
        *((quantize, quantize.outputs[0].name) for quantize in _laid_out_quantizations(model)),
    ]


# What an int8 stem reads its input through (quantization/stems.py): the DequantizeLinear
# after it sees the integers padded or rearranged, unlike the float tensor they stand for.
INTEGER_LAYOUT_OPS = frozenset({"Pad", "SpaceToDepth"})


def _laid_out_quantizations(model: ir.Model) -> list[ir.Node]:
    """QuantizeLinear nodes of an activation whose integers are read only through
    INTEGER_LAYOUT_OPS, with constant scale and zero point."""
    found = []
    for node in model.graph:
        if node.op_type != "QuantizeLinear" or len(node.inputs) < 3:
            continue
        uses = list(node.outputs[0].uses())
        constant = all(constant_array(value) is not None for value in node.inputs[1:3])
        if constant and uses and all(use.node.op_type in INTEGER_LAYOUT_OPS for use in uses):
            found.append(node)
    return found


def _integer_readings(model: ir.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The scale and zero point of each quantized tensor measured as integers."""
    return {
        quantize.outputs[0].name: (
            constant_array(quantize.inputs[1]).astype(np.float32),
            constant_array(quantize.inputs[2]).astype(np.float32),
        )
        for quantize in _laid_out_quantizations(model)
    }


def float_counterparts(float_model: ir.Model, quantized_model: ir.Model) -> dict[str, str]:
    """For each float tensor of the quantized model, the float-model tensor it stands for."""
    float_values = {
        value.name
        for value in _values(float_model.graph)
        if value.dtype == ir.DataType.FLOAT and value.const_value is None
    }
    float_nodes = {node.outputs[0].name: node for node in float_model.graph if node.outputs}
    pairs = {}
    for quantize, dequantize in activation_pairs(quantized_model):
        name = _consumer_reads(dequantize.outputs[0], float_nodes) or quantize.inputs[0].name
        if name in float_values:
            pairs[dequantize.outputs[0].name] = name
    for quantize in _laid_out_quantizations(quantized_model):
        if quantize.inputs[0].name in float_values:
            pairs[quantize.outputs[0].name] = quantize.inputs[0].name
    for node in quantized_model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for value in node.outputs:
            if value.name in float_values and value.dtype == ir.DataType.FLOAT:
                pairs[value.name] = value.name
    return pairs


def _consumer_reads(value: ir.Value, float_nodes: dict[str, ir.Node]) -> str | None:
    """The float-model tensor that a consumer of ``value`` reads at the same input, if it exists."""
    for usage in value.uses():
        consumer = usage.node
        if not consumer.outputs:
            continue
        counterpart = float_nodes.get(consumer.outputs[0].name)
        if (
            counterpart is not None
            and counterpart.op_type == consumer.op_type
            and usage.idx < len(counterpart.inputs)
            and counterpart.inputs[usage.idx] is not None
        ):
            return counterpart.inputs[usage.idx].name
    return None


def _as_consumed(value: ir.Value) -> ir.Value:
    """The value after its QuantizeLinear -> DequantizeLinear pair, or itself when it has none."""
    for usage in value.uses():
        if usage.node.op_type == "QuantizeLinear":
            for inner in usage.node.outputs[0].uses():
                if inner.node.op_type == "DequantizeLinear":
                    return inner.node.outputs[0]
    return value


def is_quantized_constant(value: ir.Value) -> bool:
    """A constant, or the DequantizeLinear of one (a quantized weight or bias), not an activation."""
    if value.const_value is not None:
        return True
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type == "DequantizeLinear"
        and producer.inputs[0].const_value is not None
    )


def _values(graph: ir.Graph) -> list[ir.Value]:
    return [*graph.inputs, *(value for node in graph for value in node.outputs)]
