"""Remove Identity nodes from the main graph, subgraphs and functions, keeping output names."""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class IdentityResult:
    """What ``eliminate_identities`` did.

    Attributes:
        removed: Identity nodes removed.
        kept: Identity nodes kept because they give a graph output its own name or producer.
    """

    removed: int = 0
    kept: int = 0


def eliminate_identities(model: ir.Model) -> IdentityResult:
    """Remove Identity nodes, their consumers reading the Identity's input instead.

    An Identity that makes a graph output is removed only when its input is computed in the
    same graph and is not an output itself: its input then takes the output's name. Otherwise
    the node stays, because ONNX forbids a graph input (or an initializer) as an output,
    onnxruntime rejects a subgraph output taken straight from the outer scope, and one value
    cannot carry two output names.

    Args:
        model: changed in place.
    """
    result = IdentityResult()
    nodes = list(model.graph.all_nodes())
    for function in model.functions.values():
        nodes.extend(function.all_nodes())
    for node in nodes:
        if not _is_identity(node):
            continue
        if _keeps_output_names(node):
            _eliminate(node)
            result.removed += 1
        else:
            result.kept += 1
    logger.info("removed %d Identity nodes, kept %d for output names", result.removed, result.kept)
    return result


def _is_identity(node: ir.Node) -> bool:
    return (
        node.op_type == "Identity"
        and node.domain == ""
        and len(node.inputs) == 1
        and len(node.outputs) == 1
        and node.inputs[0] is not None
    )


def _keeps_output_names(node: ir.Node) -> bool:
    """Whether removing this Identity leaves every graph output with its own name and producer."""
    if not node.outputs[0].is_graph_output():
        return True
    source = node.inputs[0]
    producer = source.producer()
    return producer is not None and producer.graph is node.graph and not source.is_graph_output()


def _eliminate(node: ir.Node) -> None:
    source, copy = node.inputs[0], node.outputs[0]
    source.shape = _merged_shape(source.shape, copy.shape)
    if source.type is None:
        source.type = copy.type
    is_output = copy.is_graph_output()
    copy.replace_all_uses_with(source, replace_graph_outputs=True)
    if is_output:
        source.name = copy.name
    node.graph.remove(node, safe=True)


def _merged_shape(known: ir.Shape | None, other: ir.Shape | None) -> ir.Shape | None:
    """``known`` with the dimensions ``other`` knows better: ints over symbols, names over none."""
    if known is None or other is None or len(known) != len(other):
        return other if known is None else known
    return ir.Shape([_better_dim(mine, theirs) for mine, theirs in zip(known, other, strict=True)])


def _better_dim(mine: int | ir.SymbolicDim, theirs: int | ir.SymbolicDim) -> int | ir.SymbolicDim:
    if mine == theirs or not isinstance(mine, ir.SymbolicDim):
        return mine
    if not isinstance(theirs, ir.SymbolicDim) or mine.value is None:
        return theirs
    return mine
