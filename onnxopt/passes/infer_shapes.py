"""Record the shapes and types ONNX shape inference finds."""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.shapes import infer_shapes


class InferShapesPass(OnnxoptPass):
    """Run ONNX shape inference and keep the shapes and types it finds on the values.

    Applies to any model, of any size: later passes and runtimes plan better with known shapes.
    Safe because it changes only the types and shapes recorded on values, never a node; if
    inference fails, the model is left as it was and a warning says why.

    Args:
        data_prop: propagate the values of shape computations (Shape, Concat, Gather...), so
            that the output of a Reshape fed a computed shape gets a static shape. Skipped for
            models with a 1-D value longer than ``onnxopt.shapes.LONGEST_PROPAGATED_VECTOR``.
    """

    name = "infer-shapes"

    def __init__(self, data_prop: bool = True):
        super().__init__()
        self.data_prop = data_prop

    def call(self, model: ir.Model) -> PassResult:
        changed = infer_shapes(model, data_prop=self.data_prop)
        return PassResult(model, modified=bool(changed), changes=changed)
