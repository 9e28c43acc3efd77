"""Small helpers over onnx_ir graphs that every layer uses: opsets, names, constants."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

# The default ONNX domain under both of the names models use for it.
DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: ir.Model) -> int:
    """The model's opset of the default ONNX domain, whichever name it imports it under; 1 if none."""
    declared = declared_default_opset(model.opset_imports)
    return 1 if declared is None else declared


def declared_default_opset(opset_imports: Mapping[str, int]) -> int | None:
    """The version imported for the default ONNX domain, under either of its names, or None."""
    for domain in DEFAULT_DOMAINS:
        if domain in opset_imports:
            return opset_imports[domain]
    return None


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in DEFAULT_DOMAINS


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (an initializer's, or a Constant node's), or None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def clip_bound(node: ir.Node, index: int, attribute: str) -> float | None:
    """A Clip's lower (index 1, attribute "min") or upper (2, "max") bound.

    From its input in opset 11 and later, from its attribute before; an absent bound is
    -inf or inf; None when the bound is an input that is not a constant.
    """
    if len(node.inputs) > index and node.inputs[index] is not None:
        bound = constant_array(node.inputs[index])
        return None if bound is None else float(bound)
    if attribute in node.attributes:
        return node.attributes.get_float(attribute)
    return -math.inf if index == 1 else math.inf


class UniqueNames:
    """Hands out value and node names that nothing in the graph (or every graph of a model) has yet."""

    def __init__(self, scope: ir.Graph | ir.Model):
        graphs = list(scope.graphs()) if isinstance(scope, ir.Model) else [scope]
        self._taken: set[str] = set()
        for graph in graphs:
            self._taken.update(graph.initializers)
            self._taken.update(value.name for value in graph.inputs if value.name)
            for node in graph:
                self._taken.update(value.name for value in node.outputs if value.name)
                if node.name:
                    self._taken.add(node.name)

    def __call__(self, name: str) -> str:
        candidate, suffix = name, 1
        while candidate in self._taken:
            suffix += 1
            candidate = f"{name}_{suffix}"
        self._taken.add(candidate)
        return candidate


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` named ``name`` (which must be free)."""
    value = ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        shape=ir.Shape(array.shape),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def remove_if_unused(value: ir.Value) -> None:
    """Delete the initializer when nothing reads it any more."""
    graph = value.graph
    if graph is None or graph.initializers.get(value.name) is not value:
        return
    if not (value.uses() or value.is_graph_input() or value.is_graph_output()):
        del graph.initializers[value.name]


def move_initializer_to(value: ir.Value, graph: ir.Graph) -> None:
    """Make the initializer one of ``graph``, the subgraph of its only consumer, if it is not yet."""
    if value.graph is graph:
        return
    del value.graph.initializers[value.name]
    graph.register_initializer(value)


def float64_array(value: ir.Value) -> np.ndarray:
    """An initializer's contents in float64, for folding arithmetic."""
    return value.const_value.numpy().astype(np.float64)


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Give the initializer new contents, and their shape."""
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def initializer_as_input(graph: ir.Graph, value: ir.Value) -> None:
    """Make the initializer ``value`` a typed graph input without data: what is fed at run time
    (a weight to vary per run) or left out of a light copy (shape inference)."""
    tensor = value.const_value
    if tensor is not None:
        value.shape = value.shape or ir.Shape(tensor.shape)
        value.dtype = value.dtype or tensor.dtype
    graph.initializers.pop(value.name, None)
    value.const_value = None
    if not value.is_graph_input():
        graph.inputs.append(value)


def take_over_output(node: ir.Node, value: ir.Value) -> None:
    """Make ``value`` stand for ``node``'s output (its uses, graph outputs, name, and type and
    shape where ``value`` has none) and remove ``node``: how a rewrite replaces a node."""
    output = node.outputs[0]
    if value.shape is None:
        value.shape = output.shape
    if value.type is None:
        value.type = output.type
    output.replace_all_uses_with(value, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    value.name = output.name


def sole_use(node: ir.Node) -> tuple[ir.Node, int] | None:
    """The one node that reads ``node``'s only output, and at which input, when nothing else
    (no other node, no graph output) reads it: where a rewrite may take the reader in."""
    if len(node.outputs) != 1 or node.outputs[0].is_graph_output():
        return None
    uses = list(node.outputs[0].uses())
    return (uses[0].node, uses[0].idx) if len(uses) == 1 else None


def laid_out_constant(integers: ir.Value, channel_axis: int | None) -> ir.Value:
    """The constant that Pads of zeros, Reshapes and Transposes lay out as ``integers``
    (onnxopt's int8 stems read their weights padded with zero channels, or rearranged into
    blocks), else ``integers``: the weight is what the layer learned, the layout is storage.
    With scales per channel along ``channel_axis`` (None: one scale), the layout is followed
    only where the channels are on axis 0 and every step leaves that axis as it is, so the
    constant dequantizes with the same scales."""
    if channel_axis not in (None, 0):
        return integers
    source, steps = integers, []
    while (producer := source.producer()) is not None:
        if (
            not is_default_domain(producer)
            or producer.op_type not in LAYOUT_OPS
            or producer.inputs[0] is None
            or (producer.op_type == "Pad" and not _pads_zeros(producer))
        ):
            return integers
        steps.append(producer)
        source = producer.inputs[0]
    if not steps or not source.is_initializer() or source.const_value is None:
        return integers
    channels = source.const_value.shape[0]
    if channel_axis == 0 and not all(_keeps_first_axis(step, channels) for step in steps):
        return integers
    return source


LAYOUT_OPS = frozenset({"Pad", "Reshape", "Transpose"})


def _pads_zeros(pad: ir.Node) -> bool:
    fill = constant_array(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] else None
    return pad.attributes.get_string("mode", "constant") == "constant" and (
        fill is None or not np.any(fill != 0)
    )


def _keeps_first_axis(node: ir.Node, channels: int) -> bool:
    """Whether ``node`` leaves axis 0, of ``channels``, where and as it is."""
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return perm is not None and perm[0] == 0
    operand = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
    if operand is None:
        return False
    if node.op_type == "Pad":
        return operand[0] == 0 and operand[len(operand) // 2] == 0
    return int(operand[0]) == channels
