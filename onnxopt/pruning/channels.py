"""Channel dependency groups of convolutional and dense chains.

Every Conv, ConvTranspose, Gemm or MatMul with a constant weight starts a *stream*: the
channels of its output, along one axis. Walking the graph in order, each node either carries
its input streams on (activations, biases, BatchNorm, pooling, depthwise convolutions,
Flatten before a Gemm, Concat), joins them (a residual Add, a squeeze-excite Mul: one keep
set for both, so their groups are united), ends them (the next layer's input channels, where
they become consumer slices) or does something with them the finder does not understand; the
last makes the group ``Unprunable``, as does a stream reaching a graph output. Refusing is
always safe, so anything unusual is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.graph import constant_array
from onnxopt.pruning.groups import (
    AttributeEdit,
    ChannelGroup,
    ChannelSlice,
    ShapeEdit,
    Unprunable,
)
from onnxopt.pruning.shrink import layer_macs

logger = logging.getLogger(__name__)

# Ops that act on each element alone: a stream passes through them unchanged.
ELEMENTWISE = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
        "Elu", "Selu", "Celu", "Gelu", "Mish", "Softplus", "Softsign", "Erf", "Exp", "Log",
        "Abs", "Neg", "Sqrt", "Reciprocal", "Identity", "Dropout", "Floor", "Ceil", "Round",
        "Sign", "Sin", "Cos", "ThresholdedRelu", "Swish", "Cast",
    }
)  # fmt: skip

# Element-wise ops of several inputs: streams must line up, constants broadcast per channel.
BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu"})

# Ops that pool over the spatial axes only: the channel axis (1) goes through.
POOLING = frozenset(
    {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
)

REDUCTIONS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2"})

LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclasses.dataclass(frozen=True)
class _Stream:
    """A value's channels: along ``axis`` of a ``rank``-axis value, the groups' channels in
    order, each channel ``width`` positions wide."""

    axis: int
    rank: int
    groups: tuple[int, ...]
    width: int = 1


@dataclasses.dataclass
class _Group:
    channels: int
    name: str
    producers: list[ChannelSlice] = dataclasses.field(default_factory=list)
    consumers: list[ChannelSlice] = dataclasses.field(default_factory=list)
    producer_nodes: list[str] = dataclasses.field(default_factory=list)
    consumer_nodes: list[str] = dataclasses.field(default_factory=list)
    shape_edits: list[ShapeEdit] = dataclasses.field(default_factory=list)
    attribute_edits: list[AttributeEdit] = dataclasses.field(default_factory=list)
    convolutional: bool = False
    flops: float = 0.0
    reasons: list[str] = dataclasses.field(default_factory=list)


_MERGED = (
    "producers", "consumers", "producer_nodes", "consumer_nodes", "shape_edits",
    "attribute_edits", "reasons",
)  # fmt: skip


class _Finder:
    """The walk: union-find over groups, a stream per value."""

    def __init__(self, model: ir.Model):
        self.graph = model.graph
        self.groups: list[_Group] = []
        self.parent: list[int] = []
        self.streams: dict[ir.Value, _Stream] = {}
        # Which group sliced a tensor where; per tensor cut, the groups and the nodes that
        # read it where a group knows (any other reader would see it change).
        self.slices: dict[ChannelSlice, int] = {}
        self.edited: dict[str, tuple[set[int], set[str]]] = {}
        self.unprunable: list[Unprunable] = []

    # -- union-find ---------------------------------------------------------------------
    def find(self, index: int) -> int:
        while self.parent[index] != index:
            self.parent[index] = self.parent[self.parent[index]]
            index = self.parent[index]
        return index

    def group(self, index: int) -> _Group:
        return self.groups[self.find(index)]

    def new_group(self, channels: int, name: str) -> int:
        self.groups.append(_Group(channels, name))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def union(self, first: int, second: int, node: ir.Node) -> None:
        """One keep set for both groups; the one found first names it."""
        first, second = sorted((self.find(first), self.find(second)))
        if first == second:
            return
        a, b = self.groups[first], self.groups[second]
        if a.channels != b.channels:
            reason = f"{node.op_type} {node.name} joins {a.channels} and {b.channels} channels"
            self.refuse_groups((first, second), reason)
            return
        self.parent[second] = first
        for field in _MERGED:
            getattr(a, field).extend(getattr(b, field))
        a.flops += b.flops

    def split(self, index: int, at: int) -> int:
        """Cut ``index``'s group after its first ``at`` channels; every place that slices it
        and every stream that carries it get both parts, which then prune apart. Returns the
        second part's group. (A residual sum of a wide stream and a narrower one padded with
        zero channels pairs the wide one's first channels with the narrow one's, and its
        last with the padding.)"""
        root = self.find(index)
        group = self.groups[root]
        rest = _Group(group.channels - at, f"{group.name}[{at}:]")

        def moved(pieces: list[ChannelSlice]) -> list[ChannelSlice]:
            return [
                dataclasses.replace(piece, offset=piece.offset + at * piece.width)
                for piece in pieces
            ]

        for field in _MERGED:
            setattr(rest, field, list(getattr(group, field)))
        rest.producers, rest.consumers = moved(group.producers), moved(group.consumers)
        rest.convolutional = group.convolutional
        rest.flops = group.flops * rest.channels / group.channels
        group.flops -= rest.flops
        group.channels = at
        self.groups.append(rest)
        self.parent.append(len(self.parent))
        new = len(self.parent) - 1
        for piece in (*rest.producers, *rest.consumers):
            self.slices[piece] = new
        for value, stream in self.streams.items():
            if any(self.find(item) == root for item in stream.groups):
                parts = tuple(
                    part
                    for item in stream.groups
                    for part in ((item, new) if self.find(item) == root else (item,))
                )
                self.streams[value] = dataclasses.replace(stream, groups=parts)
        for indices, _ in self.edited.values():
            if any(self.find(item) == root for item in indices):
                indices.add(new)
        return new

    def boundaries(self, stream: _Stream) -> list[int]:
        """Where the stream's groups meet, in channels from its start."""
        ends, total = [], 0
        for index in stream.groups[:-1]:
            total += self.group(index).channels
            ends.append(total)
        return ends

    def align(self, values: list[ir.Value]) -> None:
        """Split groups until the streams of ``values`` (as many channels each) have their
        groups at the same places."""
        while True:
            streams = [self.streams[value] for value in values]
            wanted = sorted({end for stream in streams for end in self.boundaries(stream)})
            straddling = None
            for stream in streams:
                start = 0
                for index in stream.groups:
                    end = start + self.group(index).channels
                    inside = [cut for cut in wanted if start < cut < end]
                    if inside:
                        straddling = (index, inside[0] - start)
                        break
                    start = end
                if straddling:
                    break
            if straddling is None:
                return
            self.split(*straddling)

    def refuse(self, stream: _Stream, reason: str) -> None:
        self.refuse_groups(stream.groups, reason)

    def refuse_groups(self, groups, reason: str) -> None:
        for index in groups:
            reasons = self.group(index).reasons
            if reason not in reasons:
                reasons.append(reason)

    # -- recording ----------------------------------------------------------------------
    def channels(self, stream: _Stream) -> int:
        return sum(self.group(index).channels for index in stream.groups)

    def pieces(self, stream: _Stream):
        """Each group of the stream with its offset along the stream's axis."""
        offset = 0
        for index in stream.groups:
            yield index, offset
            offset += self.group(index).channels * stream.width

    def add_slices(
        self,
        stream: _Stream,
        value: ir.Value,
        axis: int,
        node: ir.Node,
        role: str,
        width: int | None = None,
    ) -> None:
        """Record ``value`` (an initializer) as sliced along ``axis`` by each group of
        ``stream``; a layer's weight also counts its multiply-accumulates per channel."""
        width = stream.width if width is None else width
        tensor = value.const_value
        self.mark_edited(value.name, stream.groups, node)
        macs = layer_macs(node) if node.op_type in LAYERS and value is node.inputs[1] else None
        for index, offset in self.pieces(stream):
            piece = ChannelSlice(value.name, axis, offset * width // stream.width, width)
            # A weight shared by two layers ties their channels together.
            self.union(self.slices.setdefault(piece, index), index, node)
            group = self.group(index)
            (group.producers if role == "producer" else group.consumers).append(piece)
            names = group.producer_nodes if role == "producer" else group.consumer_nodes
            if node.name not in names:
                names.append(node.name)
            if macs:
                group.flops += macs * width / tensor.shape[axis]

    def mark_edited(self, tensor: str, groups, node: ir.Node) -> None:
        indices, readers = self.edited.setdefault(tensor, (set(), set()))
        indices.update(groups)
        readers.add(node.name)

    def initializer(self, value: ir.Value | None) -> ir.Value | None:
        if value is None or value.const_value is None:
            return None
        return value if self.graph.initializers.get(value.name) is value else None


def find_channel_groups(model: ir.Model) -> tuple[list[ChannelGroup], list[Unprunable]]:
    """The channel groups of ``model``'s main graph that can be cut, and the layers whose
    output channels cannot be, with the reason. Needs value shapes (run shape inference)."""
    finder = _Finder(model)
    for node in model.graph:
        handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        inputs = [finder.streams.get(value) for value in node.inputs if value is not None]
        if handler is not None:
            handler(finder, node)
        elif any(inputs):
            for stream in filter(None, inputs):
                finder.refuse(stream, f"read by {node.op_type} {node.name}, not understood")
    _check_boundaries(finder, model)
    return _finish(finder)


def _check_boundaries(finder: _Finder, model: ir.Model) -> None:
    """Streams that leave the graph, and constants also read where no group cuts them."""
    for value, stream in finder.streams.items():
        if value.is_graph_output():
            finder.refuse(stream, "reaches the model output")
        for use in value.uses():
            if use.node.graph is not model.graph:
                finder.refuse(stream, f"read inside the subgraph of {use.node.name}")
    for tensor, (indices, known) in finder.edited.items():
        value = model.graph.initializers[tensor]
        others = sorted({use.node.name for use in value.uses()} - known)
        if others:
            finder.refuse_groups(indices, f"{tensor} is also read by {', '.join(others)}")
        elif value.is_graph_output() or value.is_graph_input():
            finder.refuse_groups(indices, f"{tensor} is a model input or output")


def _finish(finder: _Finder) -> tuple[list[ChannelGroup], list[Unprunable]]:
    groups: list[ChannelGroup] = []
    unprunable = list(finder.unprunable)
    for index, group in enumerate(finder.groups):
        if finder.find(index) != index:
            continue
        if group.reasons:
            unprunable.append(Unprunable(group.name, "; ".join(group.reasons)))
            continue
        if not group.producers:
            # Nothing writes these channels (zeros a Pad adds, read as they are): no weights
            # to score them by, and nothing to gain but the padding.
            continue
        slices = list(dict.fromkeys((*group.producers, *group.consumers)))
        parameters = 0
        for piece in slices:
            shape = finder.graph.initializers[piece.tensor].const_value.shape
            parameters += int(np.prod(shape)) // shape[piece.axis] * piece.width
        groups.append(
            ChannelGroup(
                name=group.name,
                kind="channels" if group.convolutional else "neurons",
                channels=group.channels,
                producers=tuple(dict.fromkeys(group.producers)),
                consumers=tuple(dict.fromkeys(group.consumers)),
                consumer_nodes=tuple(dict.fromkeys(group.consumer_nodes)),
                shape_edits=tuple(dict.fromkeys(group.shape_edits)),
                attribute_edits=tuple(dict.fromkeys(group.attribute_edits)),
                flops_per_channel=group.flops,
                parameters_per_channel=parameters,
                producer_nodes=tuple(dict.fromkeys(group.producer_nodes)),
            )
        )
    return groups, unprunable


# -- the rules, one per op family ---------------------------------------------------------


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else value.shape.rank()


def _dims(value: ir.Value) -> list[int | None] | None:
    if value.shape is None:
        return None
    return [dim if isinstance(dim, int) else None for dim in value.shape]


def _layer(finder: _Finder, node: ir.Node) -> None:
    """Conv, ConvTranspose, Gemm, MatMul: end the input stream (consumer), start a new one."""
    data = node.inputs[0]
    stream = finder.streams.get(data)
    weight = finder.initializer(node.inputs[1]) if len(node.inputs) > 1 else None
    other = finder.streams.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if other is not None:
        finder.refuse(other, f"the weight of {node.op_type} {node.name}")
    if weight is None:
        if stream is not None:
            finder.refuse(stream, f"{node.op_type} {node.name} has no constant weight")
        finder.unprunable.append(Unprunable(node.name, "weight is not a constant"))
        return
    shape = weight.const_value.shape
    groups = node.attributes.get_int("group", 1)
    if node.op_type == "Conv" and groups > 1:
        _grouped_conv(finder, node, stream, weight, groups)
        return
    if node.op_type == "ConvTranspose" and groups > 1:
        if stream is not None:
            finder.refuse(stream, f"grouped ConvTranspose {node.name}")
        finder.unprunable.append(Unprunable(node.name, "grouped ConvTranspose"))
        return
    in_axis, out_axis, output_axis = layer_axes(node, len(shape))
    if in_axis is None:
        if stream is not None:
            finder.refuse(stream, f"{node.op_type} {node.name} reads it in a way not understood")
        finder.unprunable.append(Unprunable(node.name, "a layer layout not understood"))
        return
    if stream is not None:
        rank = _rank(data) or stream.rank
        wanted = 1 if node.op_type.startswith("Conv") else rank - 1
        if stream.axis != wanted or finder.channels(stream) * stream.width != shape[in_axis]:
            finder.refuse(stream, f"{node.op_type} {node.name} reads it along another axis")
        else:
            finder.add_slices(stream, weight, in_axis, node, "consumer")
    output = node.outputs[0]
    index = finder.new_group(int(shape[out_axis]), node.name)
    finder.group(index).convolutional = node.op_type.startswith("Conv")
    rank = _rank(output) or (len(shape) if node.op_type.startswith("Conv") else 2)
    out = _Stream(output_axis % rank, rank, (index,))
    finder.add_slices(out, weight, out_axis, node, "producer")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        _bias(finder, node, out, bias)
    finder.streams[output] = out


def layer_axes(node: ir.Node, weight_rank: int) -> tuple[int | None, int, int]:
    """(weight's input-channel axis, its output-channel axis, the output's channel axis)."""
    if node.op_type == "Conv":
        return 1, 0, 1
    if node.op_type == "ConvTranspose":
        return 0, 1, 1
    if weight_rank != 2:
        return None, 0, 0
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None, 0, 0
        transposed = node.attributes.get_int("transB", 0)
        return (1, 0, 1) if transposed else (0, 1, 1)
    return 0, 1, -1


def _bias(finder: _Finder, node: ir.Node, out: _Stream, bias: ir.Value) -> None:
    constant = finder.initializer(bias)
    if constant is None:
        finder.refuse(out, f"the bias of {node.name} is not a constant")
        return
    shape = constant.const_value.shape
    channels = finder.channels(out)
    if len(shape) == 0 or int(np.prod(shape)) == 1:
        return
    if shape[-1] == channels and int(np.prod(shape)) == channels:
        finder.add_slices(out, constant, len(shape) - 1, node, "producer")
    else:
        finder.refuse(out, f"the bias of {node.name} has shape {list(shape)}")


def _grouped_conv(
    finder: _Finder, node: ir.Node, stream: _Stream | None, weight: ir.Value, groups: int
) -> None:
    """A depthwise convolution (one input channel a group) carries its input's stream:
    its filters and its ``group`` attribute are cut with it. Other grouped ones are refused."""
    shape = weight.const_value.shape
    if stream is None or shape[1] != 1 or finder.channels(stream) * stream.width != groups:
        if stream is not None:
            finder.refuse(stream, f"grouped convolution {node.name}")
        finder.unprunable.append(Unprunable(node.name, "grouped convolution (not depthwise)"))
        return
    if stream.axis != 1:
        finder.refuse(stream, f"depthwise convolution {node.name} reads it along another axis")
        return
    multiplier = shape[0] // groups
    width = stream.width * multiplier
    finder.add_slices(stream, weight, 0, node, "producer", width=width)
    for index in stream.groups:
        finder.group(index).attribute_edits.append(
            AttributeEdit(node.name, "group", per_channel=stream.width)
        )
    out = dataclasses.replace(stream, width=width)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        _bias(finder, node, out, node.inputs[2])
    finder.streams[node.outputs[0]] = out


def _passthrough(finder: _Finder, node: ir.Node) -> None:
    stream = finder.streams.get(node.inputs[0])
    if stream is not None:
        rank = _rank(node.outputs[0])
        finder.streams[node.outputs[0]] = dataclasses.replace(stream, rank=rank or stream.rank)
    for value in node.inputs[1:]:
        if value is not None and value in finder.streams:
            finder.refuse(finder.streams[value], f"a parameter of {node.op_type} {node.name}")


def _pad(finder: _Finder, node: ir.Node) -> None:
    """Padding of the other axes (pads as a constant input, or an attribute), or constant
    channels added before or after the stream's (a shortcut that widens a residual stream
    with zeros): those become groups of their own, whose pruning lowers the pads."""
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    pads_value = node.inputs[1] if len(node.inputs) > 1 else None
    pads = constant_array(pads_value) if pads_value is not None else None
    if pads is None and "pads" in node.attributes:
        pads = np.asarray(node.attributes.get_ints("pads"))
    axes = constant_array(node.inputs[3]) if len(node.inputs) > 3 else None
    if pads is None or axes is not None:
        finder.refuse(stream, f"Pad {node.name} may pad its channels")
        return
    positions = (stream.axis, stream.axis + stream.rank)
    counts = [int(pads[position]) for position in positions]
    if not any(counts):
        finder.streams[node.outputs[0]] = stream
        return
    tensor = finder.initializer(pads_value)
    mode = node.attributes.get_string("mode", "constant")
    if tensor is None or mode != "constant" or min(counts) < 0 or stream.width != 1:
        finder.refuse(
            stream,
            f"Pad {node.name} pads its channels other than with constant channels "
            "(mode 'constant', pads an initializer, none removed)",
        )
        return
    # The padded channels' group on each side (none where that side adds none).
    padding: list[tuple[int, ...]] = []
    for count, position, side in zip(counts, positions, ("before", "after"), strict=True):
        index = finder.new_group(count, f"{node.name} padding {side}") if count else None
        if index is not None:
            finder.group(index).shape_edits.append(ShapeEdit(tensor.name, position))
        padding.append(() if index is None else (index,))
    finder.mark_edited(tensor.name, [*padding[0], *padding[1]], node)
    groups = padding[0] + stream.groups + padding[1]
    finder.streams[node.outputs[0]] = dataclasses.replace(stream, groups=groups)


def _broadcasting(finder: _Finder, node: ir.Node) -> None:
    """A residual sum or a gate joins its streams; constants are cut per channel."""
    inputs = [value for value in node.inputs if value is not None]
    streams = [finder.streams[value] for value in inputs if value in finder.streams]
    if not streams:
        return
    output = node.outputs[0]
    rank = _rank(output) or max(stream.rank for stream in streams)
    first = streams[0]
    axis = first.axis + rank - first.rank
    carried = [value for value in inputs if value in finder.streams]
    if len({(stream.axis + rank - stream.rank, stream.width) for stream in streams}) == 1 and (
        len({finder.channels(stream) for stream in streams}) == 1
    ):
        finder.align(carried)
        streams = [finder.streams[value] for value in carried]
        first = streams[0]
    for stream in streams[1:]:
        shape = (stream.axis + rank - stream.rank, len(stream.groups), stream.width)
        if shape != (axis, len(first.groups), first.width):
            for each in streams:
                finder.refuse(each, f"{node.op_type} {node.name} joins streams that do not line up")
            return
        for a, b in zip(first.groups, stream.groups, strict=True):
            finder.union(a, b, node)
    out = _Stream(axis, rank, first.groups, first.width)
    total = finder.channels(out) * out.width
    for value in inputs:
        if value in finder.streams:
            continue
        dims = _dims(value)
        local = axis - (rank - len(dims)) if dims is not None else None
        if dims is None:
            finder.refuse(out, f"{node.op_type} {node.name} reads a value of unknown shape")
        elif local < 0 or dims[local] == 1:
            continue
        elif dims[local] == total and finder.initializer(value) is not None:
            finder.add_slices(out, finder.initializer(value), local, node, "producer")
        else:
            finder.refuse(out, f"{node.op_type} {node.name} reads {value.name} over the channels")
    finder.streams[output] = out


def _batchnorm(finder: _Finder, node: ir.Node) -> None:
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    if stream.axis != 1 or stream.width != 1:
        finder.refuse(stream, f"BatchNormalization {node.name} normalizes another axis")
        return
    for value in node.inputs[1:5]:
        constant = finder.initializer(value)
        if constant is None:
            finder.refuse(stream, f"BatchNormalization {node.name} has a parameter not constant")
            return
        finder.add_slices(stream, constant, 0, node, "producer")
    finder.streams[node.outputs[0]] = stream


def _pool(finder: _Finder, node: ir.Node) -> None:
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    if stream.axis != 1 or stream.width != 1:
        finder.refuse(stream, f"{node.op_type} {node.name} pools over its channels")
        return
    finder.streams[node.outputs[0]] = stream


def _axes(node: ir.Node, rank: int) -> list[int] | None:
    """The axes a Reduce, Squeeze or Unsqueeze names (attribute or constant input)."""
    if "axes" in node.attributes:
        axes = list(node.attributes.get_ints("axes"))
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_array(node.inputs[1])
        if array is None:
            return None
        axes = [int(axis) for axis in np.ravel(array)]
    else:
        return []
    return [axis % rank for axis in axes]


def _reduce(finder: _Finder, node: ir.Node) -> None:
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    axes = _axes(node, stream.rank)
    if not axes:
        if axes == [] and node.attributes.get_int("noop_with_empty_axes", 0):
            finder.streams[node.outputs[0]] = stream
            return
        finder.refuse(stream, f"{node.op_type} {node.name} reduces over its channels")
        return
    if stream.axis in axes or stream.width != 1:
        finder.refuse(stream, f"{node.op_type} {node.name} reduces over its channels")
        return
    if node.attributes.get_int("keepdims", 1):
        finder.streams[node.outputs[0]] = stream
    else:
        shift = sum(axis < stream.axis for axis in axes)
        finder.streams[node.outputs[0]] = _Stream(
            stream.axis - shift, stream.rank - len(axes), stream.groups
        )


def _squeeze(finder: _Finder, node: ir.Node) -> None:
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    out_rank = _rank(node.outputs[0])
    if node.op_type == "Squeeze":
        axes = _axes(node, stream.rank)
        if axes is None or stream.axis in axes or (not axes and out_rank is None):
            finder.refuse(stream, f"Squeeze {node.name} with axes not known")
            return
        if not axes:
            dims = _dims(node.inputs[0]) or []
            axes = [axis for axis, dim in enumerate(dims) if dim == 1]
        axis = stream.axis - sum(axis < stream.axis for axis in axes)
        rank = stream.rank - len(axes)
    else:
        rank = stream.rank + len(_axes(node, stream.rank + 99) or [])
        axes = _axes(node, rank)
        if axes is None:
            finder.refuse(stream, f"Unsqueeze {node.name} with axes not known")
            return
        axis = stream.axis
        for inserted in sorted(axes):
            if inserted <= axis:
                axis += 1
    finder.streams[node.outputs[0]] = dataclasses.replace(stream, axis=axis, rank=rank)


def _transpose(finder: _Finder, node: ir.Node) -> None:
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    perm = list(node.attributes.get_ints("perm", list(range(stream.rank))[::-1]))
    finder.streams[node.outputs[0]] = dataclasses.replace(stream, axis=perm.index(stream.axis))


def _flatten(finder: _Finder, node: ir.Node) -> None:
    """[N, C, H, W] to [N, C*H*W]: each channel becomes H*W consecutive features."""
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    dims = _dims(node.inputs[0])
    axis = node.attributes.get_int("axis", 1) % stream.rank
    if dims is None or axis > stream.axis or any(dim is None for dim in dims[stream.axis + 1 :]):
        finder.refuse(stream, f"Flatten {node.name} folds its channels with unknown sizes")
        return
    inner = int(np.prod(dims[stream.axis + 1 :], dtype=np.int64))
    if axis != 1 or stream.axis != 1:
        finder.refuse(stream, f"Flatten {node.name} folds its channels with other axes")
        return
    finder.streams[node.outputs[0]] = _Stream(1, 2, stream.groups, stream.width * inner)


def _reshape(finder: _Finder, node: ir.Node) -> None:
    """Only a flatten ([N, C, ...] to [N, C*...]); a target entry that counts the channels is
    a shape edit."""
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    dims = _dims(node.inputs[0])
    entries = _entries(node.inputs[1])
    if (
        dims is None or entries is None or len(entries) != 2 or stream.axis != 1
        or any(dim is None for dim in dims[1:]) or entries[1][0] is None
    ):  # fmt: skip
        finder.refuse(stream, f"Reshape {node.name} mixes its channels with other axes")
        return
    inner = int(np.prod(dims[2:], dtype=np.int64)) * stream.width
    size, holder, position = entries[1]
    if size == -1 and entries[0][0] != -1:
        finder.streams[node.outputs[0]] = _Stream(1, 2, stream.groups, inner)
        return
    value = finder.initializer(holder)
    if size != finder.channels(stream) * inner or value is None:
        finder.refuse(stream, f"Reshape {node.name} mixes its channels with other axes")
        return
    finder.mark_edited(value.name, stream.groups, node)
    for index in stream.groups:
        finder.group(index).shape_edits.append(ShapeEdit(value.name, position, inner))
    finder.streams[node.outputs[0]] = _Stream(1, 2, stream.groups, inner)


def _entries(value: ir.Value) -> list[tuple[int | None, ir.Value, int]] | None:
    """A shape vector's entries: (the entry if constant, the constant holding it, its index
    there), through a Concat of pieces; None when its length is not known."""
    array = constant_array(value)
    if array is not None:
        return [(int(entry), value, index) for index, entry in enumerate(np.ravel(array))]
    producer = value.producer()
    if producer is not None and producer.op_type == "Concat":
        entries = []
        for piece in producer.inputs:
            found = _entries(piece) if piece is not None else None
            if found is None:
                return None
            entries.extend(found)
        return entries
    dims = _dims(value)
    if dims is None or len(dims) != 1 or dims[0] is None:
        return None
    return [(None, value, index) for index in range(dims[0])]


def _concat(finder: _Finder, node: ir.Node) -> None:
    streams = [finder.streams.get(value) for value in node.inputs]
    present = [stream for stream in streams if stream is not None]
    if not present:
        return
    rank = present[0].rank
    axis = node.attributes.get_int("axis", 0) % rank
    if any(stream is None for stream in streams):
        for stream in present:
            finder.refuse(stream, f"Concat {node.name} joins it with a value that is no stream")
        return
    widths = {stream.width for stream in present}
    if all(stream.axis == axis for stream in present) and len(widths) == 1:
        groups = tuple(index for stream in present for index in stream.groups)
        finder.streams[node.outputs[0]] = _Stream(axis, rank, groups, widths.pop())
        return
    _broadcasting(finder, node)


def _split(finder: _Finder, node: ir.Node) -> None:
    """Split along the channels at group boundaries; its sizes constant counts them."""
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    axis = node.attributes.get_int("axis", 0) % stream.rank
    if axis != stream.axis:
        for output in node.outputs:
            finder.streams[output] = stream
        return
    value = finder.initializer(node.inputs[1]) if len(node.inputs) > 1 else None
    if value is None:
        finder.refuse(stream, f"Split {node.name} along its channels without constant sizes")
        return
    sizes = [int(size) for size in value.const_value.numpy()]
    position, pieces = 0, list(finder.pieces(stream))
    for part, (output, size) in enumerate(zip(node.outputs, sizes, strict=True)):
        chosen = [index for index, offset in pieces if position <= offset < position + size]
        covered = sum(finder.group(index).channels * stream.width for index in chosen)
        if covered != size:
            finder.refuse(stream, f"Split {node.name} cuts a group of its channels apart")
            return
        for index in chosen:
            finder.group(index).shape_edits.append(ShapeEdit(value.name, part, stream.width))
        finder.streams[output] = dataclasses.replace(stream, groups=tuple(chosen))
        position += size
    finder.mark_edited(value.name, stream.groups, node)


def _normalize(finder: _Finder, node: ir.Node) -> None:
    """Softmax or LayerNormalization: fine over other axes, not over the channels."""
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    axis = node.attributes.get_int("axis", -1) % stream.rank
    over = range(axis, stream.rank) if node.op_type == "LayerNormalization" else [axis]
    if stream.axis in over:
        finder.refuse(stream, f"{node.op_type} {node.name} normalizes over its channels")
        return
    finder.streams[node.outputs[0]] = stream


def _shape(finder: _Finder, node: ir.Node) -> None:
    """Shape may read the other axes' sizes: those its Gathers pick out."""
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    start = node.attributes.get_int("start", 0)
    start = start % stream.rank if start < 0 else start
    for use in node.outputs[0].uses():
        picked = constant_array(use.node.inputs[1]) if use.node.op_type == "Gather" else None
        if picked is None or use.idx != 0:
            finder.refuse(stream, f"Shape {node.name} reads its channel count")
            return
        positions = {(int(index) % (stream.rank - start)) + start for index in np.ravel(picked)}
        if stream.axis in positions:
            finder.refuse(stream, f"Shape {node.name} reads its channel count")
            return


def _resize(finder: _Finder, node: ir.Node) -> None:
    stream = finder.streams.get(node.inputs[0])
    if stream is None:
        return
    sizes = constant_array(node.inputs[3]) if len(node.inputs) > 3 else None
    if sizes is not None and sizes.size:
        finder.refuse(stream, f"Resize {node.name} sets sizes that count its channels")
        return
    _pool(finder, node)


HANDLERS: dict[str, Callable[[_Finder, ir.Node], None]] = {
    **dict.fromkeys(LAYERS, _layer),
    **dict.fromkeys(ELEMENTWISE - {"PRelu"}, _passthrough),
    **dict.fromkeys(BROADCASTING, _broadcasting),
    **dict.fromkeys(POOLING, _pool),
    **dict.fromkeys(REDUCTIONS, _reduce),
    "Pad": _pad,
    "BatchNormalization": _batchnorm,
    "Squeeze": _squeeze,
    "Unsqueeze": _squeeze,
    "Transpose": _transpose,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Concat": _concat,
    "Split": _split,
    "Softmax": _normalize,
    "LogSoftmax": _normalize,
    "LayerNormalization": _normalize,
    "Shape": _shape,
    "Resize": _resize,
    "Upsample": _pool,
}
