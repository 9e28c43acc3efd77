"""ONNX shape inference on an ir model of any size, keeping the types and shapes it finds."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.graph import initializer_as_input

logger = logging.getLogger(__name__)

# ONNX data propagation builds one shape dimension per element of a 1-D input to Add, Mul and
# the like (about 200 bytes each), known data or not; past this length that costs real memory.
LONGEST_PROPAGATED_VECTOR = 65536

# Initializers larger than this travel to onnx as typed graph inputs without their contents, so
# the protobuf stays small whatever the model weighs (2 GB models included).
LARGEST_INLINED_INITIALIZER_BYTES = 1024


def value_bytes(
    value: ir.Value, dims: Mapping[str, int] | None = None, free: int | None = None
) -> int | None:
    """The bytes ``value`` holds by its shape: each named dimension as ``dims`` gives it, else
    ``free``; None when its type, its shape or a dimension is unknown."""
    if value.shape is None or value.dtype is None:
        return None
    elements = 1
    for dim in value.shape:
        size = dim if isinstance(dim, int) else (dims or {}).get(dim.value, free)
        if size is None:
            return None
        elements *= size
    return elements * value.dtype.itemsize


def known_sizes(model: ir.Model, names: set[str], feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Bytes of the named float tensors whose shapes are known on ``feed``: fixed dimensions, or
    free ones named like an input's and bound by the feed's array."""
    bound: dict[str, int] = {}
    for value in model.graph.inputs:
        array = feed.get(value.name)
        if value.shape is None or array is None or np.ndim(array) != len(value.shape):
            continue
        for dim, size in zip(value.shape, np.shape(array), strict=True):
            if not isinstance(dim, int) and dim.value is not None:
                bound[dim.value] = size
    sizes = {}
    for node in model.graph:
        for value in node.outputs:
            size = value_bytes(value, bound) if value.name in names else None
            if size is not None:
                sizes[value.name] = size
    return sizes


def infer_shapes(model: ir.Model, data_prop: bool = True) -> int:
    """Run ONNX shape inference and record the types and shapes it finds on the model's values.

    Strict inference with type checks, in the main graph and subgraphs. Not onnx_ir's
    ShapeInferencePass: it sets only the element type of a value it had no type for, which turns
    a sequence into a tensor. If inference fails, the model is left as it was and a warning
    says why.

    Args:
        model: changed in place: only value types and shapes.
        data_prop: propagate the values of shape computations (Shape, Concat, Gather...), so
            that the output of a Reshape fed a computed shape gets a static shape. Skipped for
            models with a 1-D value longer than LONGEST_PROPAGATED_VECTOR, where ONNX would
            spend gigabytes on it.

    Returns:
        The number of values whose type or shape was found or refined.
    """
    if data_prop and _has_long_vector(model):
        logger.info("skipping data propagation: the model has 1-D values too long for it")
        data_prop = False
    # onnx raises several kinds of errors; any of them leaves the model as it was.
    try:
        proto = onnx.shape_inference.infer_shapes(
            _light_proto(model), check_type=True, strict_mode=True, data_prop=data_prop
        )
    except Exception as error:
        logger.warning("shape inference failed, the model is left as it was: %s", error)
        return 0
    changed = _merge(model, ir.serde.deserialize_model(proto))
    logger.info("inferred or refined the shape or type of %d values", changed)
    return changed


def _light_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as protobuf, its large initializers turned into typed inputs without data.

    Works on a copy that shares the tensors, so the model itself is never touched.
    """
    copy = model.clone()
    graph = copy.graph
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is not None and tensor.nbytes <= LARGEST_INLINED_INITIALIZER_BYTES:
            continue
        initializer_as_input(graph, value)
    return ir.serde.serialize_model(copy)


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
