"""Cut channel groups out of a model: smaller weights, fewer multiply-accumulates.

``apply_keep`` removes every channel of a group but those kept from all the constants the
group lists (weights, biases, BatchNorm parameters, shape constants) and from the attributes
that count them, then infers the graph's value shapes again. Groups can share a tensor (two
groups concatenated into one Conv's input): each tensor remembers which of its original
positions were cut already (in its value's ``meta``), so a group's offsets keep meaning the
original positions whatever was cut before. ``model_statistics`` counts parameters and
multiply-accumulates, the figures a structured pruning target is set in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.graph import set_constant
from onnxopt.pruning.groups import ChannelGroup, ChannelSlice
from onnxopt.runtime import Feed, ProbeSession
from onnxopt.shapes import infer_shapes
from onnxopt.summary import summarize

logger = logging.getLogger(__name__)

# Where a tensor's value records the original positions cut from it, per axis.
_CUT_KEY = "onnxopt.pruning.cut"


def apply_keep(model: ir.Model, group: ChannelGroup, keep: np.ndarray) -> None:
    """Cut ``group`` in place down to the channels in ``keep`` (sorted int indices)."""
    apply_keeps(model, [(group, keep)])


def apply_keeps(model: ir.Model, cuts: list[tuple[ChannelGroup, np.ndarray]]) -> None:
    """Cut several groups, then infer shapes once (what ``apply_keep`` does for one)."""
    initializers = model.graph.initializers
    changed: list[ir.Value] = []
    for group, keep in cuts:
        keep = np.unique(np.asarray(keep, dtype=np.int64))
        if keep.size == 0 or keep[0] < 0 or keep[-1] >= group.channels:
            raise ValueError(f"group {group.name}: keep must be 1 to {group.channels} channels")
        if keep.size == group.channels:
            continue
        removed = group.channels - keep.size
        for piece in dict.fromkeys((*group.producers, *group.consumers)):
            value = _initializer(initializers, piece.tensor, group)
            _cut(value, piece, group.channels, keep)
            changed.append(value)
        for edit in dict.fromkeys(group.shape_edits):
            value = _initializer(initializers, edit.tensor, group)
            array = value.const_value.numpy().copy()
            array.reshape(-1)[edit.index] -= removed * edit.per_channel
            set_constant(value, array)
            changed.append(value)
        nodes = {node.name: node for node in model.graph}
        for edit in dict.fromkeys(group.attribute_edits):
            node = nodes[edit.node]
            count = node.attributes.get_int(edit.attribute) - removed * edit.per_channel
            node.attributes[edit.attribute] = ir.AttrInt64(edit.attribute, count)
            changed.append(node.outputs[0])
    if changed:
        _reinfer_shapes(model, changed)


def _initializer(initializers: Mapping[str, ir.Value], name: str, group: ChannelGroup) -> ir.Value:
    value = initializers.get(name)
    if value is None or value.const_value is None:
        raise ValueError(f"group {group.name}: {name!r} is not an initializer of the main graph")
    return value


def _cut(value: ir.Value, piece: ChannelSlice, channels: int, keep: np.ndarray) -> None:
    """Remove the group's channels not in ``keep`` from the tensor along ``piece.axis``."""
    array = value.const_value.numpy()
    axis = piece.axis % array.ndim
    cut_before: dict[int, np.ndarray] = value.meta.setdefault(_CUT_KEY, {})
    already = cut_before.get(axis, np.zeros(0, dtype=np.int64))
    # Original positions of the group's channels, those to drop, and where they lie now.
    dropped = np.setdiff1d(np.arange(channels), keep)
    original = (piece.offset + dropped[:, None] * piece.width + np.arange(piece.width)).ravel()
    original = np.setdiff1d(original, already)
    current = original - np.searchsorted(already, original)
    if current.size and current[-1] >= array.shape[axis]:
        raise ValueError(
            f"{value.name!r} has {array.shape[axis]} positions on axis {axis}, "
            f"fewer than its channel slice {piece} covers"
        )
    set_constant(value, np.delete(array, current, axis=axis))
    cut_before[axis] = np.union1d(already, original)


def removed_positions(value: ir.Value, axis: int) -> np.ndarray:
    """The original positions along ``axis`` that cuts removed from an initializer (sorted;
    empty when none): how recovery lines the pruned weights up with the original ones."""
    return value.meta.get(_CUT_KEY, {}).get(axis, np.zeros(0, dtype=np.int64))


def _reinfer_shapes(model: ir.Model, changed: list[ir.Value]) -> None:
    """Forget the shapes of every value computed from what changed, then infer them again
    (graph outputs keep theirs: a group never reaches them)."""
    outputs = {id(value) for value in model.graph.outputs}
    stale: list[ir.Value] = []
    seen: set[int] = set()
    frontier = list(changed)
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            for output in use.node.outputs:
                if id(output) in seen:
                    continue
                seen.add(id(output))
                stale.append(output)
                frontier.append(output)
    for value in changed:
        if value.producer() is not None and id(value) not in seen:
            stale.append(value)
    for value in stale:
        if id(value) not in outputs:
            value.shape = None
    infer_shapes(model)


def layer_macs(node: ir.Node) -> int | None:
    """Multiply-accumulates of a Conv, ConvTranspose, Gemm or MatMul per sample (the first
    axis of its output is the sample axis); None for other nodes or unknown shapes."""
    if node.op_type not in LAYER_OPS or len(node.inputs) < 2:
        return None
    shapes = [_static(value) for value in (node.inputs[0], node.inputs[1], node.outputs[0])]
    if any(shape is None for shape in shapes):
        return None
    return _macs(node, *shapes)


LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _macs(node: ir.Node, data_shape, weight_shape, output_shape) -> int:
    if node.op_type == "Conv":
        return math.prod(output_shape[1:]) * math.prod(weight_shape[1:])
    if node.op_type == "ConvTranspose":
        return math.prod(data_shape[1:]) * math.prod(weight_shape[1:])
    if node.op_type == "Gemm":
        transposed = node.attributes.get_int("transA", 0)
        depth = data_shape[0] if transposed else data_shape[-1]
        return output_shape[-1] * depth
    if len(data_shape) == 1:
        return math.prod(output_shape) * data_shape[0]
    per_sample = output_shape[1:] if len(output_shape) > 2 else output_shape[-1:]
    return math.prod(per_sample) * data_shape[-1]


def _static(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(value.const_value.shape)
    if value.shape is None or not all(isinstance(dim, int) for dim in value.shape[1:]):
        return None
    return tuple(dim if isinstance(dim, int) else 1 for dim in value.shape)


def model_statistics(model: ir.Model, feed: Feed | None = None) -> tuple[int, int]:
    """(parameters, multiply-accumulates per sample) of the model; layers whose shapes are
    not known count no multiply-accumulates (run shape inference first, or give a ``feed``:
    see ``node_macs``)."""
    parameters = summarize(model, sparsity=False).parameter_count
    return parameters, sum(node_macs(model, feed).values())


def node_macs(model: ir.Model, feed: Feed | None = None) -> dict[str, int]:
    """Multiply-accumulates per sample of each main-graph layer whose shapes are known, by
    node name. With a ``feed`` (one calibration sample) the shapes are those the layers
    see when it is run: a transformer exported with a symbolic sequence length, whose
    Reshapes hide the length from shape inference, gets its layers and its attention
    products counted at the feed's length."""
    layers = [node for node in model.graph if node.op_type in LAYER_OPS and len(node.inputs) > 1]
    shapes: dict[str, tuple[int, ...]] = {}
    if feed is not None:
        names = [
            value.name
            for node in layers
            for value in (node.inputs[0], node.inputs[1], node.outputs[0])
            if value is not None and value.const_value is None
        ]
        probe = ProbeSession(model, names, threads=1, prune=True)
        shapes = {name: np.shape(array) for name, array in probe.run(feed).items()}
    macs = {}
    for node in layers:
        found = [
            shapes.get(value.name) or _static(value)
            for value in (node.inputs[0], node.inputs[1], node.outputs[0])
        ]
        if all(shape is not None for shape in found):
            count = _macs(node, *found)
            if count:
                macs[node.name] = count
    return macs
