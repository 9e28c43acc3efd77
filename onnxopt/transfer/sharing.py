"""Shared constants of a target, untied while new weights are written and tied again after.

Exporters share one initializer between layers whose values happened to be equal (two
BatchNorms' zero biases, through an Identity or directly), and networks tie weights on
purpose (an embedding table and the output projection). A source may give such layers
different values. ``untie`` gives every reader its own copy; ``retie`` then merges the
copies whose written values are still equal to their original's, so ties the source keeps
stay ties and the file does not grow.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph import UniqueNames, is_default_domain

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


def untie(model: ir.Model) -> dict[str, list[ir.Value]]:
    """Give every reader of a shared float initializer of the main graph its own copy;
    returns the copies made, by original name."""
    graph = model.graph
    names = UniqueNames(model)
    copies: dict[str, list[ir.Value]] = {}
    for node in list(graph):
        if node.op_type != "Identity" or not is_default_domain(node):
            continue
        value = node.inputs[0]
        if not _float_initializer(value) or node.outputs[0].is_graph_output():
            continue
        output = node.outputs[0]
        placeholder = ir.Value(name=names(f"{value.name}_untied"))
        output.replace_all_uses_with(placeholder)
        graph.remove(node, safe=True)
        copy = _copy(graph, value, output.name or names(value.name))
        placeholder.replace_all_uses_with(copy)
        copies.setdefault(value.name, []).append(copy)
    for value in list(graph.initializers.values()):
        if not _float_initializer(value) or value.is_graph_output():
            continue
        for usage in list(value.uses())[1:]:
            copy = _copy(graph, value, names(value.name))
            usage.node.replace_input_with(usage.idx, copy)
            copies.setdefault(value.name, []).append(copy)
    return copies


def retie(model: ir.Model, copies: dict[str, list[ir.Value]]) -> None:
    """Merge each copy ``untie`` made back into its original where their values are equal."""
    initializers = model.graph.initializers
    for name, made in copies.items():
        original = initializers.get(name)
        for copy in made:
            if original is None or copy.const_value is None:
                continue
            if np.array_equal(copy.const_value.numpy(), original.const_value.numpy()):
                copy.replace_all_uses_with(original)
                del initializers[copy.name]


def _float_initializer(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.is_initializer()
        and value.const_value is not None
        and value.dtype in FLOAT_TYPES
    )


def _copy(graph: ir.Graph, value: ir.Value, name: str) -> ir.Value:
    array = value.const_value.numpy().copy()
    copy = ir.Value(name=name, shape=value.shape, type=value.type)
    copy.const_value = ir.tensor(array, name=copy.name)
    graph.register_initializer(copy)
    return copy
