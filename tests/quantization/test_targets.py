"""Runtime targets: each writes the Q/DQ form its runtime reads, and is measured there."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from onnxopt.graph import constant_array
from onnxopt.quantization.plan import QuantizationOptions
from onnxopt.quantization.targets import TARGETS
from tests.quantization.helpers import build, cosine, random_weights
from tests.quantization.test_qdq import cnn, quantize, transformer_block


def options_for(name: str) -> QuantizationOptions:
    return QuantizationOptions.for_target(TARGETS[name])


def zero_points(model: ir.Model) -> list[np.ndarray]:
    return [
        constant_array(node.inputs[2])
        for node in model.graph
        if node.op_type == "QuantizeLinear" and len(node.inputs) > 2
    ]


def test_generic_target_writes_symmetric_int8_activations():
    model = cnn()
    report, reference, quantized = quantize(model, options_for("generic"))
    points = zero_points(model)
    assert points and all(point.dtype == np.int8 and not point.any() for point in points)
    assert {entry["zero_point"] for entry in report.tensors.values()} == {0}
    assert set(report.quantized) >= {"conv1", "conv2", "fc"}
    assert cosine(reference, quantized) > 0.99


def test_generic_and_openvino_targets_quantize_matmuls_statically():
    for name in ("generic", "openvino"):
        model = transformer_block()
        report, reference, quantized = quantize(model, options_for(name))
        op_types = {node.op_type for node in model.graph}
        assert not report.dynamic
        assert "DynamicQuantizeLinear" not in op_types and "MatMulInteger" not in op_types
        assert {"query", "key", "value"} <= set(report.quantized)
        assert cosine(reference, quantized) > 0.98, name


def test_openvino_target_leaves_the_constants_of_add_and_mul_float():
    weights = random_weights(w=(16, 16), bias=(16,))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
        helper.make_node("Add", ["h", "bias"], ["biased"], name="bias_add"),
        helper.make_node("Add", ["biased", "x"], ["y"], name="residual"),
    ]
    for name, quantized_constant in (("onnxruntime-cpu", True), ("openvino", False)):
        model = build(nodes, {"x": [1, 8, 16]}, {"y": [1, 8, 16]}, weights)
        options = QuantizationOptions.for_target(TARGETS[name], dynamic_matmul=False)
        report, _, _ = quantize(model, options)
        assert "dense" in report.quantized
        assert ("bias" in report.tensors) is quantized_constant, name


def test_the_default_target_is_todays_onnxruntime_form():
    assert QuantizationOptions() == options_for("onnxruntime-cpu")
    model = transformer_block()
    report, _, _ = quantize(model, options_for("onnxruntime-cpu"))
    assert sorted(report.dynamic) == ["key", "query", "value"]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_an_explicit_dynamic_matmul_option_overrides_the_targets_choice(name):
    options = QuantizationOptions.for_target(TARGETS[name], dynamic_matmul=False)
    assert options.dynamic_matmul is False and options.target is TARGETS[name]
