"""Turn Constant nodes into initializers."""

from __future__ import annotations

import logging
from typing import Annotated

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnxopt.options import Range
from onnxopt.passes.base import OnnxoptPass, PassResult

logger = logging.getLogger(__name__)


class LiftConstantsPass(OnnxoptPass):
    """Lift Constant nodes, in the main graph and subgraphs, to initializers.

    Exporters such as Paddle's store weights as Constant nodes; the passes after this one
    (BatchNorm folding, quantization) look for weights among initializers. Safe because an
    initializer holds the same tensor the node made. A Constant that is a graph output stays a
    node, and functions keep theirs, since they cannot hold initializers.

    Args:
        size_limit: lift only constants of at least this many elements; smaller ones, such as
            the shapes fed to Reshape, stay readable as nodes.
        lift_all_constants: also lift constants given as value_float(s), value_int(s) or
            value_string(s), not only tensors.
    """

    name = "lift-constants"

    def __init__(
        self, size_limit: Annotated[int, Range(low=0)] = 16, lift_all_constants: bool = True
    ):
        super().__init__()
        self.size_limit = size_limit
        self.lift_all_constants = lift_all_constants

    def call(self, model: ir.Model) -> PassResult:
        before = _count_constants(model.graph)
        LiftConstantsToInitializersPass(
            lift_all_constants=self.lift_all_constants, size_limit=self.size_limit
        )(model)
        lifted = before - _count_constants(model.graph)
        logger.info("lifted %d constants to initializers", lifted)
        return PassResult(model, modified=bool(lifted), changes=lifted)


def _count_constants(graph: ir.Graph) -> int:
    return sum(1 for node in graph.all_nodes() if node.op_type == "Constant")
