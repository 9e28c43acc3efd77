"""Remove what no graph output depends on."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

from onnxopt.passes.base import OnnxoptPass

logger = logging.getLogger(__name__)


class RemoveDeadCodePass(OnnxoptPass):
    """Remove nodes, initializers, functions and opset imports that no graph output needs.

    Inputs and outputs stay as they are, so the model keeps its signature: an initializer that is
    also a graph input stays, since a caller may feed that input. Unused initializers of subgraphs
    go too, which onnx_ir's pass leaves.
    """

    name = "remove-dead-code"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = _count_nodes(model)
        initializers = _count_initializers(model)
        functions = len(model.functions)
        RemoveUnusedNodesPass()(model)
        _remove_unused_subgraph_initializers(model)
        self.details = {
            "nodes": nodes - _count_nodes(model),
            "initializers": initializers - _count_initializers(model),
        }
        RemoveUnusedFunctionsPass()(model)
        self.details["functions"] = functions - len(model.functions)
        opsets_changed = RemoveUnusedOpsetsPass()(model).modified
        self.changes = sum(self.details.values())
        logger.info(
            "removed %(nodes)d nodes, %(initializers)d initializers, %(functions)d functions",
            self.details,
        )
        return ir.passes.PassResult(model, modified=bool(self.changes) or opsets_changed)


def _count_nodes(model: ir.Model) -> int:
    count = sum(1 for _ in model.graph.all_nodes())
    return count + sum(1 for function in model.functions.values() for _ in function.all_nodes())


def _count_initializers(model: ir.Model) -> int:
    return sum(len(graph.initializers) for graph in model.graphs())


def _remove_unused_subgraph_initializers(model: ir.Model) -> None:
    for graph in model.graph.subgraphs():
        for name, value in list(graph.initializers.items()):
            if not (value.uses() or value.is_graph_input() or value.is_graph_output()):
                del graph.initializers[name]
