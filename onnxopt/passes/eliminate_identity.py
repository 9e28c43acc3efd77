"""Remove Identity nodes."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass

from onnxopt.passes.base import OnnxoptPass

logger = logging.getLogger(__name__)


class EliminateIdentityPass(OnnxoptPass):
    """Remove Identity nodes from the main graph, subgraphs and functions, keeping output names.

    An Identity that makes a graph output is removed only when its input is computed in the same
    graph and is not an output itself: its input then takes the output's name. Otherwise the node
    stays, because ONNX forbids a graph input as an output, onnxruntime rejects a subgraph output
    taken straight from the outer scope, and one value cannot carry two output names.
    """

    name = "eliminate-identity"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        eliminator = _SafeIdentityElimination()
        eliminator(model)
        self.changes = eliminator.eliminated
        logger.info("removed %d Identity nodes", self.changes)
        return ir.passes.PassResult(model, modified=bool(self.changes))


class _SafeIdentityElimination(IdentityEliminationPass):
    """onnx_ir's pass, minus the output cases it gets wrong, counting what it removes."""

    eliminated = 0

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and not _keeps_output_names(node):
            return False
        eliminated = super()._try_eliminate_identity_node(node)
        self.eliminated += eliminated
        return eliminated


def _keeps_output_names(node: ir.Node) -> bool:
    """Whether removing this Identity leaves every graph output with its own name and producer."""
    if len(node.inputs) != 1 or node.inputs[0] is None or not node.outputs[0].is_graph_output():
        return True
    source = node.inputs[0]
    producer = source.producer()
    return producer is not None and producer.graph is node.graph and not source.is_graph_output()
