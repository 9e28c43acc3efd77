"""SmoothQuant: activation outliers moved into the weights, the function kept."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxopt.quantization.plan import QuantizationOptions
from onnxopt.quantization.qdq import quantize_model
from onnxopt.quantization.smoothing import smooth_dense_inputs
from onnxopt.quantization.targets import TARGETS
from tests.quantization.helpers import build, cosine, measured_ranges, ops, random_weights, run

CHANNELS = 16


def outlier_block(key_weight: str = "key_w", key_input: str = "h", transposed_gemm=False):
    """x -> Mul by per-channel gains (two channels 60x the rest) -> query and key MatMuls (or a
    Gemm with transB), and the scaled activation also into a residual Add."""
    weights = random_weights(query_w=(CHANNELS, CHANNELS), key_w=(CHANNELS, CHANNELS))
    gains = np.ones(CHANNELS, np.float32)
    gains[[3, 11]] = 60.0
    weights["gains"] = gains
    key = (
        helper.make_node("Gemm", ["h", "key_wt"], ["key"], transB=1, name="key")
        if transposed_gemm
        else helper.make_node("MatMul", [key_input, key_weight], ["key"], name="key")
    )
    if transposed_gemm:
        weights["key_wt"] = weights.pop("key_w").T.copy()
    nodes = [
        helper.make_node("Mul", ["x", "gains"], ["h"], name="gain"),
        helper.make_node("MatMul", ["h", "query_w"], ["query"], name="query"),
        key,
        helper.make_node("Add", ["query", "key"], ["qk"], name="sum"),
        helper.make_node("Add", ["qk", "h"], ["y"], name="residual"),
    ]
    shape = [8, CHANNELS] if transposed_gemm else [1, 8, CHANNELS]
    return build(nodes, {"x": shape}, {"y": shape}, weights)


def samples(model, count=16, seed=3):
    rng = np.random.default_rng(seed)
    shape = [int(d) for d in model.graph.inputs[0].shape]
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("transposed_gemm", [False, True])
def test_smoothing_keeps_the_function_and_shares_one_division(transposed_gemm):
    model = outlier_block(transposed_gemm=transposed_gemm)
    feeds = samples(model)
    before = run(model, feeds)
    report = smooth_dense_inputs(model, feeds)
    np.testing.assert_allclose(run(model, feeds), before, rtol=1e-4, atol=1e-4)
    assert report.inputs == {"h": ["query", "key"]}
    assert 0.0 < report.alphas["h"] <= 1.0
    assert ops(model)["Mul"] == 2  # the gains, and one division for both layers
    residual = next(node for node in model.graph if node.name == "residual")
    assert residual.inputs[1].name == "h"  # the other reader keeps the unscaled activation


def test_smoothing_makes_static_int8_of_an_outlier_input_accurate():
    options = QuantizationOptions.for_target(TARGETS["openvino"])
    results = {}
    for smoothed in (False, True):
        model = outlier_block()
        feeds = samples(model)
        reference = run(model, feeds)
        if smoothed:
            smooth_dense_inputs(model, feeds)
        quantize_model(model, measured_ranges(model, feeds), {}, options)
        results[smoothed] = cosine(reference, run(model, feeds))
    assert results[True] > results[False]
    assert results[True] > 0.999


def test_a_weight_shared_with_a_layer_reading_another_input_is_left_alone():
    model = outlier_block(key_weight="query_w", key_input="x")
    feeds = samples(model)
    before = run(model, feeds)
    report = smooth_dense_inputs(model, feeds)
    assert not report.inputs
    assert report.skipped["h"] == "a weight of a reader is shared with another node"
    np.testing.assert_array_equal(run(model, feeds), before)


def test_a_weight_two_layers_of_the_group_share_is_scaled_once():
    model = outlier_block(key_weight="query_w")
    feeds = samples(model)
    before = run(model, feeds)
    report = smooth_dense_inputs(model, feeds)
    assert report.inputs == {"h": ["query", "key"]}
    np.testing.assert_allclose(run(model, feeds), before, rtol=1e-4, atol=1e-4)


def test_a_fixed_alpha_is_used_for_every_input():
    model = outlier_block()
    report = smooth_dense_inputs(model, samples(model), alpha=0.5)
    assert report.alphas == {"h": 0.5}
