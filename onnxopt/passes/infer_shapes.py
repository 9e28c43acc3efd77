"""Record the shapes and types ONNX shape inference finds."""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from onnxopt.passes.base import OnnxoptPass

logger = logging.getLogger(__name__)

# ONNX data propagation builds one shape dimension per element of a 1-D input to Add, Mul and
# the like (about 200 bytes each), known data or not; past this length that costs real memory.
LONGEST_PROPAGATED_VECTOR = 65536


class InferShapesPass(OnnxoptPass):
    """Run ONNX shape inference and keep the shapes and types it finds on the values.

    Later passes and runtimes plan better with known shapes. Initializers over 1 KB are left out
    of the call (onnx_ir's helper does that), so models over protobuf's 2 GB limit work too. If
    inference fails, the model is left as it was and a warning says why. Not onnx_ir's
    ShapeInferencePass: it sets only the element type of a value it had no type for, which turns
    a sequence into a tensor.

    Args:
        data_prop: propagate the values of shape computations (Shape, Concat, Gather...), so
            that the output of a Reshape fed a computed shape gets a static shape. Skipped for
            models with a 1-D value longer than LONGEST_PROPAGATED_VECTOR, where ONNX would
            spend gigabytes on it.
    """

    name = "infer-shapes"

    def __init__(self, data_prop: bool = True):
        super().__init__()
        self.data_prop = data_prop

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        data_prop = self.data_prop and not _has_long_vector(model)
        if self.data_prop and not data_prop:
            logger.info("skipping data propagation: the model has 1-D values too long for it")

        def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
            return onnx.shape_inference.infer_shapes(
                proto, check_type=True, strict_mode=True, data_prop=data_prop
            )

        # onnx raises several kinds of errors; any of them leaves the model as it was.
        try:
            inferred = ir.serde.deserialize_model(_c_api_utils.call_onnx_api(infer, model))
        except Exception as error:
            logger.warning("shape inference failed, the model is left as it was: %s", error)
            return ir.passes.PassResult(model, modified=False)
        self.changes = _merge(model, inferred)
        logger.info("inferred or refined the shape or type of %d values", self.changes)
        return ir.passes.PassResult(model, modified=bool(self.changes))


def _merge(model: ir.Model, inferred: ir.Model) -> int:
    """Copy the types and shapes inference found onto the model's values; count those that changed."""
    changed = 0
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs(), strict=True):
        inferred_values = ir.convenience.create_value_mapping(
            inferred_graph, include_subgraphs=False
        )
        for name, value in ir.convenience.create_value_mapping(
            graph, include_subgraphs=False
        ).items():
            found = inferred_values.get(name)
            if found is None or (found.type, found.shape) == (value.type, value.shape):
                continue
            if found.type is not None:
                value.type = found.type
            if found.shape is not None:
                value.shape = found.shape
            changed += 1
    return changed


def _has_long_vector(model: ir.Model) -> bool:
    values = ir.convenience.create_value_mapping(model.graph).values()
    return any(
        value.shape is not None
        and len(value.shape) == 1
        and isinstance(value.shape[0], int)
        and value.shape[0] > LONGEST_PROPAGATED_VECTOR
        for value in values
    )
