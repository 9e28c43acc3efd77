"""Models from ONNX text, and running them with onnxruntime, for the pass tests."""

from __future__ import annotations

import collections

import numpy as np
import onnx.parser
import onnx_ir as ir

from onnxopt import runtime
from onnxopt.recipe import load_recipe

# The cleanup preset's passes, in its order, without the final validation.
CLEANUP = tuple(spec.name for spec in load_recipe("cleanup").passes if spec.name != "validate")


def model_from_text(text: str) -> ir.Model:
    """An ir model from ONNX text syntax (see onnx.parser), checked by onnx first."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def run_model(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs for one feed, computed by onnxruntime."""
    return runtime.run(runtime.create_session(model), [feeds])[0]


def count_ops(model: ir.Model) -> dict[str, int]:
    """How many nodes of each op type the model has, subgraphs and functions included."""
    nodes = list(model.graph.all_nodes())
    for function in model.functions.values():
        nodes.extend(function.all_nodes())
    return dict(collections.Counter(node.op_type for node in nodes))


def assert_outputs_close(
    actual: list[np.ndarray], expected: list[np.ndarray], rtol: float = 1e-5, atol: float = 1e-5
) -> None:
    for actual_output, expected_output in zip(actual, expected, strict=True):
        np.testing.assert_allclose(actual_output, expected_output, rtol=rtol, atol=atol)


def output_names(model: ir.Model) -> list[str | None]:
    return [value.name for value in model.graph.outputs]
