"""Attention heads as channel groups: where a multi-head attention block can lose whole heads.

A head is ``head_dim`` columns of the Q, K and V projection weights (and biases), the same
``head_dim`` rows of the output projection, and one unit of every shape constant that counts
heads: the Reshape into ``[batch, seq, heads, head_dim]`` and the Reshape back to
``[batch, seq, heads * head_dim]``. ``find_attention_groups`` recognises the block that
exporters spell out (HuggingFace BERT, ViT and the like)::

    X -> MatMul(Wq) [-> Add(bq)] -> Reshape -> Transpose [-> Mul/Div by a scalar] -.
    X -> MatMul(Wk) [-> Add(bk)] -> Reshape -> Transpose [-> Mul/Div by a scalar] -> MatMul
      -> [Mul/Div, Add mask, Cast] -> Softmax [-> Cast/Dropout] -> MatMul(with V's heads)
      -> Transpose -> Reshape -> MatMul(Wo)       (V: X -> MatMul(Wv) ... -> Transpose)

with Gemm projections too, and the com.microsoft ``Attention`` op (a packed QKV weight and
``num_heads``). Transposes are checked by what they do, not by their count: Q and V must
reach the products as ``[batch, heads, seq, head_dim]``, K as ``[batch, heads, head_dim,
seq]``. A mask or bias added to the scores must be the same for every head, or a constant
with a heads axis (cut with the heads).

Shape constants become the block's own: a Constant node, or an initializer other nodes read
too (Q, K and V Reshapes, or several layers, sharing ``[12]`` or ``[0, -1, 12, 32]``), is
copied into a new initializer that one node reads, and a computed target (a Concat of
Shape-Gather results and constants) read by several Reshapes gets a Concat per Reshape; so
``shrink.apply_keep`` edits one block without touching another. This renames, never
changes values. A head-count entry of ``-1`` needs no edit: Reshape infers it.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from onnxopt.graph import UniqueNames, add_initializer, constant_array, default_opset
from onnxopt.pruning.groups import AttributeEdit, ChannelGroup, ChannelSlice, ShapeEdit, Unprunable
from onnxopt.shapes import infer_shapes

logger = logging.getLogger(__name__)

# Ops between the scores and Softmax, and between Softmax and the product with V, that act on
# every head alike (an Add's or Mul's other operand is checked to be the same for every head).
_SCORE_OPS = ("Add", "Mul", "Div", "Cast")
_PROBABILITY_OPS = ("Cast", "Dropout", "Identity")
# The order of the split axes [batch, seq, heads, head_dim] each product operand must have.
_QUERY_AXES = [0, 2, 1, 3]
_KEY_AXES = [0, 2, 3, 1]


class _Refused(Exception):
    """The block is attention but cannot lose heads; the message says why."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One entry of a Reshape target: its constant (None if computed at run time) and where
    that constant lives: element ``element`` of input ``operand`` of the Concat that builds
    the target, or of the Reshape's own input 1 when the target is a constant."""

    value: int | None
    operand: int
    element: int


@dataclasses.dataclass
class _Projection:
    node: ir.Node
    nodes: list[ir.Node]  # the projection and its bias Add
    slices: list[ChannelSlice]  # weight and bias, width 1 (one column)
    width: int  # output features: heads * head_dim
    depth: int  # input features


@dataclasses.dataclass
class _Split:
    projection: _Projection
    reshape: ir.Node
    heads: int
    head_dim: int
    heads_entry: _Entry | None  # None when the entry is -1


@dataclasses.dataclass
class _Finder:
    model: ir.Model
    sequence_length: int
    names: UniqueNames
    inferred: bool = False


def find_attention_groups(
    model: ir.Model, sequence_length: int = 128
) -> tuple[list[ChannelGroup], list[Unprunable]]:
    """The attention blocks of ``model`` whose heads can be cut, one ``heads`` group each, and
    the blocks that cannot, with the reason.

    Changes the model without changing what it computes: the groups' shape constants become
    initializers of their own (see the module docstring), and value shapes may be inferred.

    Args:
        model: the model; its main graph is searched.
        sequence_length: tokens per sample for ``flops_per_channel`` where the graph's shapes
            do not fix it; the attention products grow with its square.
    """
    finder = _Finder(model, sequence_length, UniqueNames(model))
    groups: list[ChannelGroup] = []
    unprunable: list[Unprunable] = []
    for node in list(model.graph):
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            found = _match_block(finder, node)
        elif node.op_type == "Attention" and node.domain == "com.microsoft":
            found = _match_packed(finder, node)
        elif "Attention" in node.op_type:
            found = Unprunable(
                node.name,
                f"attention heads: {node.op_type} ({node.domain or 'ai.onnx'}) is not supported",
            )
        else:
            continue
        if isinstance(found, ChannelGroup):
            groups.append(found)
        elif found is not None:
            unprunable.append(found)
    logger.info("attention: %d head groups, %d blocks left whole", len(groups), len(unprunable))
    return groups, unprunable


def _match_block(finder: _Finder, softmax: ir.Node) -> ChannelGroup | Unprunable | None:
    """The heads group of the attention block around ``softmax``; None if it is no attention."""
    block: list[ir.Node] = [softmax]
    operands: list[tuple[ir.Node, int]] = []
    scores = _scores_product(softmax.inputs[0], block, operands)
    context = _context_product(softmax.outputs[0], block)
    if scores is None or context is None:
        return None
    try:
        _check_softmax_axis(finder, softmax)
        reshapes = [
            _heads_source(scores.inputs[0], _QUERY_AXES, block),
            _heads_source(scores.inputs[1], _KEY_AXES, block),
            _heads_source(context.inputs[1], _QUERY_AXES, block),
        ]
        query, key, value = splits = [_split(reshape) for reshape in reshapes]
        if not query.heads == key.heads == value.heads or query.head_dim != key.head_dim:
            raise _Refused("Q, K and V are not split into the same heads")
        heads, head_dim = value.heads, value.head_dim
        merge = _merge_reshape(context, block)
        merge_entry = _merge_entry(merge, heads * head_dim)
        output = _output_projection(merge.outputs[0], heads * head_dim)
        per_head = [p for p in (_per_head(finder, n, i, heads) for n, i in operands) if p]
        block += [scores, context, merge, *reshapes]
        block += [node for split in splits for node in split.projection.nodes]
        _check_private(block, merge, _shape_readable(splits, merge))
    except _Refused as refusal:
        return Unprunable(softmax.name, f"attention heads: {refusal}")
    shape_edits = [
        _own_shape_edit(finder, split.reshape, split.heads_entry, 1)
        for split in splits
        if split.heads_entry is not None
    ]
    if merge_entry is not None:
        shape_edits.append(_own_shape_edit(finder, merge, merge_entry, head_dim))
    producers: list[ChannelSlice] = []
    sequence = _sequence(finder, query.projection.node)
    macs = sequence**2 * (query.head_dim + value.head_dim)
    for split in splits:
        producers += [dataclasses.replace(s, width=split.head_dim) for s in split.projection.slices]
        macs += sequence * split.projection.depth * split.head_dim
    for node, index in per_head:
        tensor = _own_constant(finder, node, index)
        producers.append(ChannelSlice(tensor.name, tensor.const_value.shape.rank() - 3))
    nodes = tuple(split.projection.node.name for split in splits)
    return _group(
        finder, nodes, heads, head_dim, producers, output, shape_edits, (), macs, sequence
    )


def _check_softmax_axis(finder: _Finder, softmax: ir.Node) -> None:
    """Softmax must normalise each head's rows alone: over the last axis. Before opset 13 its
    default (axis 1) flattens heads and keys into one softmax."""
    default = -1 if default_opset(finder.model) >= 13 else 1
    if softmax.attributes.get_int("axis", default) not in (-1, 3):
        raise _Refused(f"Softmax {softmax.name!r} does not normalise over the last axis alone")


def _scores_product(
    value: ir.Value, block: list[ir.Node], operands: list[tuple[ir.Node, int]]
) -> ir.Node | None:
    """The MatMul of Q and K that Softmax's input is computed from, through scaling and
    masking; records the nodes passed, and their other operands in ``operands``."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "MatMul" and all(constant_array(v) is None for v in node.inputs):
        return node
    if node.op_type not in _SCORE_OPS:
        return None
    for index in (0,) if node.op_type in ("Cast", "Div") else (0, 1):
        found = _scores_product(node.inputs[index], block, operands)
        if found is not None:
            block.append(node)
            operands.extend((node, other) for other in range(len(node.inputs)) if other != index)
            return found
    return None


def _context_product(value: ir.Value, block: list[ir.Node]) -> ir.Node | None:
    """The MatMul of the attention probabilities (Softmax's output) with V."""
    for use in value.uses():
        node = use.node
        if node.op_type in _PROBABILITY_OPS and use.idx == 0:
            found = _context_product(node.outputs[0], block)
            if found is not None:
                block.append(node)
                return found
        elif node.op_type == "MatMul" and use.idx == 0 and constant_array(node.inputs[1]) is None:
            return node
    return None


def _heads_source(value: ir.Value, axes: list[int], block: list[ir.Node]) -> ir.Node:
    """The Reshape that splits heads off a product operand, checking that the transposes on
    the way put the split axes in the order ``axes``; scalar scales may come between."""
    perms: list[list[int]] = []
    node = value.producer()
    while node is not None and node.op_type != "Reshape":
        if node.op_type == "Transpose" and "perm" in node.attributes:
            perms.append(list(node.attributes.get_ints("perm")))
            data = node.inputs[0]
        else:
            data = _scaled(node)
            if data is None:
                raise _Refused(
                    f"{node.op_type} {node.name!r} lies between a head split and a product"
                )
        block.append(node)
        node = data.producer()
    if node is None:
        raise _Refused(f"no Reshape splits the heads off {value.name!r}")
    order = [0, 1, 2, 3]
    for perm in reversed(perms):
        if len(perm) != 4:
            raise _Refused(f"a Transpose before {value.name!r} is not 4-D")
        order = [order[axis] for axis in perm]
    if order != axes:
        raise _Refused(f"{value.name!r} has the split axes in order {order}, not {axes}")
    return node


def _scaled(node: ir.Node) -> ir.Value | None:
    """The data a Mul or Div by a scalar constant scales, or None for another node."""
    if node.op_type not in ("Mul", "Div"):
        return None
    for data, scale in ((0, 1), (1, 0)) if node.op_type == "Mul" else ((0, 1),):
        array = constant_array(node.inputs[scale])
        if array is not None and array.size == 1:
            return node.inputs[data]
    return None


def _split(reshape: ir.Node) -> _Split:
    """Heads, head size and the head-count entry of a Reshape to [batch, seq, heads, head_dim]."""
    projection = _projection(reshape.inputs[0])
    entries = _target_entries(reshape)
    if entries is None or len(entries) != 4:
        raise _Refused(f"the target of Reshape {reshape.name!r} is not 4 entries it can read")
    heads_entry, dim_entry = entries[2], entries[3]
    if heads_entry.value is not None and heads_entry.value > 0:
        heads = heads_entry.value
        head_dim = projection.width // heads
        if heads * head_dim != projection.width or dim_entry.value not in (-1, head_dim):
            raise _Refused(f"Reshape {reshape.name!r} does not split {projection.width} features")
        return _Split(projection, reshape, heads, head_dim, heads_entry)
    if heads_entry.value == -1 and dim_entry.value is not None and dim_entry.value > 0:
        head_dim = dim_entry.value
        if projection.width % head_dim:
            raise _Refused(f"Reshape {reshape.name!r} does not split {projection.width} features")
        return _Split(projection, reshape, projection.width // head_dim, head_dim, None)
    raise _Refused(f"the head count in the target of Reshape {reshape.name!r} is not a constant")


def _projection(value: ir.Value) -> _Projection:
    """The Q, K or V projection that writes ``value``: MatMul with a constant weight and an
    optional bias Add, or Gemm."""
    node = value.producer()
    nodes: list[ir.Node] = []
    bias: ir.Value | None = None
    if node is not None and node.op_type == "Add":
        constant = [v for v in node.inputs if constant_array(v) is not None]
        data = [v for v in node.inputs if constant_array(v) is None]
        if len(constant) != 1 or len(data) != 1:
            raise _Refused(f"Add {node.name!r} before a head split is not a bias")
        nodes.append(node)
        bias, node = constant[0], data[0].producer()
    if node is None or node.op_type not in ("MatMul", "Gemm") or node.inputs[1] is None:
        raise _Refused(f"{value.name!r} does not come from a MatMul or Gemm projection")
    nodes.append(node)
    weight = _weight(node.inputs[1])
    shape = weight.const_value.shape
    axis = 0 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 1
    if shape.rank() != 2 or node.attributes.get_int("transA", 0):
        raise _Refused(f"the weight of {node.op_type} {node.name!r} is not a plain matrix")
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        if bias is not None:
            raise _Refused(f"Gemm {node.name!r} has a bias and a bias Add")
        bias = node.inputs[2]
    width = shape[axis]
    slices = [ChannelSlice(weight.name, axis)]
    bias_shape = [] if bias is None else list(constant_array(bias).shape)
    if bias_shape[-1:] == [width] and all(dim == 1 for dim in bias_shape[:-1]):
        slices.append(ChannelSlice(_weight(bias).name, len(bias_shape) - 1))
    elif bias is not None and constant_array(bias).size != 1:  # one value for all: not cut
        raise _Refused(f"bias {bias.name!r} does not hold one value per feature")
    return _Projection(node, nodes, slices, width, shape[1 - axis])


def _weight(value: ir.Value) -> ir.Value:
    """A weight the group may cut: an initializer that one node reads."""
    if not value.is_initializer() or value.const_value is None:
        raise _Refused(f"{value.name!r} is not an initializer (lift constants first)")
    if value.is_graph_input() or len(value.uses()) != 1:
        raise _Refused(f"{value.name!r} is a graph input or read by other nodes too")
    return value


def _target_entries(reshape: ir.Node) -> list[_Entry] | None:
    """The entries of a Reshape's target: a constant, or a Concat of constants and
    one-element run-time values; None for anything else."""
    target = reshape.inputs[1]
    array = constant_array(target)
    if array is not None:
        return [_Entry(int(v), 1, i) for i, v in enumerate(array.reshape(-1))]
    concat = target.producer()
    if concat is None or concat.op_type != "Concat":
        return None
    entries: list[_Entry] = []
    for operand, part in enumerate(concat.inputs):
        array = constant_array(part)
        producer = part.producer()
        if array is not None:
            entries += [_Entry(int(v), operand, i) for i, v in enumerate(array.reshape(-1))]
        elif producer is not None and producer.op_type == "Unsqueeze":
            entries.append(_Entry(None, operand, 0))
        elif part.shape is not None and part.shape.rank() == 1 and isinstance(part.shape[0], int):
            entries += [_Entry(None, operand, i) for i in range(part.shape[0])]
        else:
            return None
    return entries


def _merge_reshape(context: ir.Node, block: list[ir.Node]) -> ir.Node:
    """The Reshape back to [batch, seq, heads * head_dim], after transposes that put the
    context's axes [batch, heads, seq, head_dim] back in the split order."""
    order = list(_QUERY_AXES)
    value = context.outputs[0]
    while True:
        uses = [use for use in value.uses() if not _reads_batch_or_sequence(use.node)]
        if len(uses) != 1 or value.is_graph_output():
            raise _Refused(f"{value.name!r} is read outside the attention block")
        node = uses[0].node
        if node.op_type == "Reshape":
            break
        if node.op_type != "Transpose" or "perm" not in node.attributes:
            raise _Refused(f"{node.op_type} {node.name!r} follows the product with V")
        order = [order[axis] for axis in node.attributes.get_ints("perm")]
        block.append(node)
        value = node.outputs[0]
    if order != [0, 1, 2, 3]:
        raise _Refused(f"the heads are merged from axis order {order}")
    return node


def _merge_entry(merge: ir.Node, width: int) -> _Entry | None:
    """The last entry of the merging Reshape's target, which counts heads * head_dim; None
    if it is -1 (nothing to edit)."""
    entries = _target_entries(merge) or []
    last = entries[-1] if entries else None
    if last is None or last.value not in (-1, width):
        raise _Refused(f"the last entry of Reshape {merge.name!r} is not {width} or -1")
    return None if last.value == -1 else last


def _output_projection(value: ir.Value, width: int) -> tuple[ir.Node, ChannelSlice, int]:
    """The output projection that reads the merged heads, the slice over its rows (one head
    a row, widened later), and its output features."""
    uses = value.uses()
    node = uses[0].node if len(uses) == 1 and not value.is_graph_output() else None
    if node is None or node.op_type not in ("MatMul", "Gemm") or uses[0].idx != 0:
        raise _Refused(f"the merged heads {value.name!r} feed no single output projection")
    if node.attributes.get_int("transA", 0):
        raise _Refused(f"the output projection {node.name!r} transposes its input")
    weight = _weight(node.inputs[1])
    axis = 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 0
    shape = weight.const_value.shape
    if shape.rank() != 2 or shape[axis] != width:
        raise _Refused(f"the output projection {node.name!r} does not read {width} features")
    return node, ChannelSlice(weight.name, axis), shape[1 - axis]


def _per_head(finder: _Finder, node: ir.Node, index: int, heads: int) -> tuple[ir.Node, int] | None:
    """Check an operand the scores are masked or scaled with: the same for every head (its
    heads axis, third from the end, is 1 or absent; None), or a constant with one slice a
    head, cut with the heads (returned)."""
    value = node.inputs[index]
    array = constant_array(value)
    shape = list(array.shape) if array is not None else _shape(finder, value)
    if shape is None:
        raise _Refused(f"cannot tell whether {value.name!r} differs per head (unknown shape)")
    if len(shape) < 3 or shape[-3] == 1:
        return None
    if array is not None and shape[-3] == heads:
        return node, index
    raise _Refused(f"{value.name!r} differs per head and is not a constant")


def _shape(finder: _Finder, value: ir.Value) -> list | None:
    """The value's shape, inferring the model's shapes once if it is not known."""
    if value.shape is None and not finder.inferred:
        infer_shapes(finder.model)
        finder.inferred = True
    return None if value.shape is None else list(value.shape)


def _shape_readable(splits: list[_Split], merge: ir.Node) -> set[int]:
    """Values laid out [batch, seq, ...] (projections, head splits, the merge's input): a
    Shape may read their axes 0 and 1, which a cut leaves alone."""
    values = [merge.inputs[0]]
    for split in splits:
        values.append(split.reshape.outputs[0])
        if split.projection.node.op_type == "MatMul":
            values += [node.outputs[0] for node in split.projection.nodes]
    return {id(value) for value in values}


def _check_private(block: list[ir.Node], merge: ir.Node, shape_readable: set[int]) -> None:
    """Every value inside the block is read by the block only (or by a Shape of a batch or
    sequence axis), so that cutting heads changes nothing else; the merged heads are checked
    to feed the output projection alone."""
    members = {id(node) for node in block}
    for node in block:
        if node is merge:
            continue
        for value in node.outputs:
            if value.is_graph_output():
                raise _Refused(f"{value.name!r} is a graph output")
            for use in value.uses():
                if id(use.node) in members:
                    continue
                if id(value) in shape_readable and _reads_batch_or_sequence(use.node):
                    continue
                raise _Refused(
                    f"{value.name!r} is also read by {use.node.op_type} {use.node.name!r}"
                )


def _reads_batch_or_sequence(node: ir.Node) -> bool:
    """A Shape whose result only Gathers read, at index 0 or 1."""
    if node.op_type != "Shape" or "start" in node.attributes or "end" in node.attributes:
        return False
    for use in node.outputs[0].uses():
        index = constant_array(use.node.inputs[1]) if use.node.op_type == "Gather" else None
        if index is None or index.size != 1 or int(index) not in (0, 1):
            return False
    return True


def _own_shape_edit(
    finder: _Finder, reshape: ir.Node, entry: _Entry, per_channel: int
) -> ShapeEdit:
    """A ShapeEdit of ``entry`` of the Reshape's target, once the constant holding it is an
    initializer that only this Reshape (or a Concat of its own) reads."""
    holder = (
        reshape if constant_array(reshape.inputs[1]) is not None else _own_concat(finder, reshape)
    )
    tensor = _own_constant(finder, holder, entry.operand)
    return ShapeEdit(tensor.name, entry.element, per_channel)


def _own_concat(finder: _Finder, reshape: ir.Node) -> ir.Node:
    """The Concat that builds the Reshape's target, cloned if anything else reads it."""
    target = reshape.inputs[1]
    concat = target.producer()
    if len(target.uses()) == 1 and not target.is_graph_output():
        return concat
    clone = ir.node(
        "Concat",
        list(concat.inputs),
        attributes={"axis": concat.attributes.get_int("axis")},
        name=finder.names(f"{concat.name}_{reshape.name}"),
    )
    output = clone.outputs[0]
    output.name = finder.names(f"{target.name}_{reshape.name}")
    output.type, output.shape = target.type, target.shape
    finder.model.graph.insert_before(reshape, clone)
    reshape.replace_input_with(1, output)
    return clone


def _own_constant(finder: _Finder, node: ir.Node, index: int) -> ir.Value:
    """Input ``index`` of ``node``, a constant, as an initializer that only ``node`` reads:
    a Constant node's tensor, or an initializer read elsewhere too, is copied into a new one."""
    value = node.inputs[index]
    if value.is_initializer() and not value.is_graph_input() and len(value.uses()) == 1:
        return value
    name = finder.names(f"{node.name}_input{index}")
    own = add_initializer(finder.model.graph, name, constant_array(value).copy())
    node.replace_input_with(index, own)
    if not value.uses() and not value.is_graph_output():
        producer = value.producer()
        if producer is not None:
            finder.model.graph.remove(producer, safe=True)
        elif value.is_initializer() and not value.is_graph_input():
            del finder.model.graph.initializers[value.name]
    return own


def _sequence(finder: _Finder, projection: ir.Node) -> int:
    """Tokens per sample: the projection input's sequence axis if shapes fix it, else the
    default."""
    shape = _shape(finder, projection.inputs[0])
    if shape is not None and len(shape) >= 2 and isinstance(shape[-2], int):
        return shape[-2]
    return finder.sequence_length


def _group(
    finder: _Finder,
    producer_nodes: tuple[str, ...],
    heads: int,
    head_dim: int,
    producers: list[ChannelSlice],
    output: tuple[ir.Node, ChannelSlice, int],
    shape_edits: list[ShapeEdit],
    attribute_edits: tuple[AttributeEdit, ...],
    macs: int,
    sequence: int,
) -> ChannelGroup:
    """The heads group; ``macs`` per head before the output projection, whose rows this adds
    (``head_dim`` of them, each read at each of ``sequence`` tokens)."""
    out_node, out_slice, out_features = output
    consumer = dataclasses.replace(out_slice, width=head_dim)
    macs += sequence * head_dim * out_features
    initializers = finder.model.graph.initializers
    parameters = 0
    for piece in dict.fromkeys([*producers, consumer]):
        tensor = initializers[piece.tensor].const_value
        parameters += tensor.size // tensor.shape[piece.axis] * piece.width
    return ChannelGroup(
        name=producer_nodes[0],
        kind="heads",
        channels=heads,
        producers=tuple(producers),
        consumers=(consumer,),
        consumer_nodes=(out_node.name,),
        shape_edits=tuple(shape_edits),
        attribute_edits=attribute_edits,
        flops_per_channel=float(macs),
        parameters_per_channel=parameters,
        producer_nodes=producer_nodes,
    )


def _match_packed(finder: _Finder, node: ir.Node) -> ChannelGroup | Unprunable:
    """com.microsoft Attention: a packed [d_model, 3 * heads * head_dim] weight (Q, K, V side
    by side), its bias, ``num_heads``, then an output projection."""
    try:
        if "qkv_hidden_sizes" in node.attributes:
            raise _Refused("qkv_hidden_sizes is set")
        if any(v is not None for v in node.inputs[4:]) or any(v.uses() for v in node.outputs[1:]):
            raise _Refused("it has past state or an attention bias")
        heads = node.attributes.get_int("num_heads")
        weight = _weight(node.inputs[1])
        depth, packed = weight.const_value.shape
        width = packed // 3
        head_dim = width // heads
        if head_dim * heads * 3 != packed:
            raise _Refused(f"its weight {weight.name!r} is not 3 x {heads} heads wide")
        producers = [ChannelSlice(weight.name, 1, k * width, head_dim) for k in range(3)]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = _weight(node.inputs[2])
            producers += [ChannelSlice(bias.name, 0, k * width, head_dim) for k in range(3)]
        output = _output_projection(node.outputs[0], width)
    except _Refused as refusal:
        return Unprunable(node.name, f"attention heads: {refusal}")
    sequence = _sequence(finder, node)
    macs = 2 * sequence**2 * head_dim + 3 * sequence * depth * head_dim
    edits = (AttributeEdit(node.name, "num_heads"),)
    return _group(
        finder, (node.name,), heads, head_dim, producers, output, [], edits, macs, sequence
    )
