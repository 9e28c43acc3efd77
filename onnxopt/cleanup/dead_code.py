"""Remove what no graph output depends on: nodes, initializers, functions and opset imports."""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DeadCodeResult:
    """What ``remove_dead_code`` removed.

    Attributes:
        nodes: nodes removed, in the main graph, subgraphs and functions.
        initializers: initializers removed, in the main graph and subgraphs.
        functions: functions no node calls any more.
        opsets_removed: whether an opset import no node uses was dropped.
    """

    nodes: int = 0
    initializers: int = 0
    functions: int = 0
    opsets_removed: bool = False

    @property
    def total(self) -> int:
        """Nodes, initializers and functions removed, together."""
        return self.nodes + self.initializers + self.functions

    def counts(self) -> dict[str, int]:
        """The counts by label, as the report shows them."""
        return {"nodes": self.nodes, "initializers": self.initializers, "functions": self.functions}


def remove_dead_code(model: ir.Model) -> DeadCodeResult:
    """Remove nodes, initializers, functions and opset imports that no graph output needs.

    Inputs and outputs stay as they are, so the model keeps its signature: an initializer that
    is also a graph input stays, since a caller may feed that input. Unused initializers of
    subgraphs go too, which onnx_ir's RemoveUnusedNodesPass leaves.

    Args:
        model: changed in place.
    """
    nodes = count_nodes(model)
    initializers = _count_initializers(model)
    functions = len(model.functions)
    RemoveUnusedNodesPass()(model)
    _remove_unused_subgraph_initializers(model)
    # Counted before functions go: the nodes of a removed function are not counted twice.
    result = DeadCodeResult(
        nodes=nodes - count_nodes(model), initializers=initializers - _count_initializers(model)
    )
    RemoveUnusedFunctionsPass()(model)
    result.functions = functions - len(model.functions)
    result.opsets_removed = RemoveUnusedOpsetsPass()(model).modified
    logger.info(
        "removed %d nodes, %d initializers, %d functions",
        result.nodes,
        result.initializers,
        result.functions,
    )
    return result


def count_nodes(model: ir.Model) -> int:
    """Nodes of the main graph, its subgraphs and the model's functions."""
    count = sum(1 for _ in model.graph.all_nodes())
    return count + sum(1 for function in model.functions.values() for _ in function.all_nodes())


def _count_initializers(model: ir.Model) -> int:
    return sum(len(graph.initializers) for graph in model.graphs())


def _remove_unused_subgraph_initializers(model: ir.Model) -> None:
    for graph in model.graph.subgraphs():
        for name, value in list(graph.initializers.items()):
            if not (value.uses() or value.is_graph_input() or value.is_graph_output()):
                del graph.initializers[name]
