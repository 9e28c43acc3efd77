"""Remove what no graph output depends on."""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.cleanup.dead_code import remove_dead_code
from onnxopt.passes.base import OnnxoptPass, PassResult


class RemoveDeadCodePass(OnnxoptPass):
    """Remove nodes, initializers, functions and opset imports that no graph output needs.

    Applies to any model. Safe because nothing removed contributes to an output, and inputs and
    outputs stay as they are, so the model keeps its signature: an initializer that is also a
    graph input stays, since a caller may feed that input. Unused initializers of subgraphs go
    too, which onnx_ir's pass leaves.
    """

    name = "remove-dead-code"

    def call(self, model: ir.Model) -> PassResult:
        result = remove_dead_code(model)
        return PassResult(
            model,
            modified=bool(result.total) or result.opsets_removed,
            changes=result.total,
            details=result.counts(),
        )
