from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import runtime
from onnxopt.calibration.moments import collect_hessians
from onnxopt.quantization.fusion import fusion_report
from onnxopt.quantization.gptq import GptqRounding
from onnxopt.quantization.plan import AlreadyQuantizedError, QuantizationOptions
from onnxopt.quantization.qdq import quantize_model
from tests.pruning.test_structured import siamese_net, siamese_samples
from tests.quantization.helpers import (
    build,
    cosine,
    feeds,
    measured_ranges,
    ops,
    random_weights,
    run,
)


def quantize(model, options=None, samples=None, ranges=None, problems=None):
    samples = samples or feeds(model)
    reference = run(model, samples)
    ranges = ranges or measured_ranges(model, samples)
    report = quantize_model(model, ranges, problems or {}, options or QuantizationOptions())
    return report, reference, run(model, samples)


def cnn():
    weights = random_weights(
        conv1_w=(8, 3, 3, 3),
        conv1_b=(8,),
        conv2_w=(8, 8, 3, 3),
        conv2_b=(8,),
        fc_w=(5, 8),
        fc_b=(5,),
    )
    nodes = [
        helper.make_node(
            "Conv", ["x", "conv1_w", "conv1_b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"
        ),
        helper.make_node(
            "Conv", ["p1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1], name="conv2"
        ),
        helper.make_node("Clip", ["c2", "zero", "six"], ["r2"], name="relu6"),
        helper.make_node("Add", ["r2", "p1"], ["sum"], name="residual"),
        helper.make_node("GlobalAveragePool", ["sum"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
    ]
    weights |= {"zero": np.array(0, np.float32), "six": np.array(6, np.float32)}
    return build(nodes, {"x": ["N", 3, 16, 16]}, {"logits": ["N", 5]}, weights)


def test_cnn_is_fully_quantized_and_fused():
    model = cnn()
    report, reference, quantized = quantize(model)
    assert report.quantized_by_op() == {
        "Add": 1,
        "Conv": 2,
        "Flatten": 1,
        "Gemm": 1,
        "GlobalAveragePool": 1,
        "MaxPool": 1,
    }
    assert sorted(report.absorbed) == ["relu1", "relu6"]
    assert "Relu" not in ops(model) and "Clip" not in ops(model)
    fusion = fusion_report(model)
    assert fusion.rate == 1.0
    assert fusion.op_counts["QLinearConv"] == 2 and fusion.op_counts["QGemm"] == 1
    assert fusion.op_counts.get("QLinearAdd", 0) == 1
    assert cosine(reference, quantized) > 0.995


def test_weights_are_int8_per_channel_with_int32_bias():
    model = cnn()
    quantize(model)
    initializers = model.graph.initializers
    assert initializers["conv1_w_quantized"].const_value.dtype.name == "INT8"
    assert initializers["conv1_w_scale"].const_value.shape == (8,)
    assert initializers["conv1_b_quantized"].const_value.dtype.name == "INT32"
    scales = initializers["conv1_w_scale"].const_value.numpy()
    bias_scales = initializers["conv1_b_scale"].const_value.numpy()
    input_scale = initializers["x_scale"].const_value.numpy()
    np.testing.assert_allclose(bias_scales, input_scale * scales, rtol=1e-6)
    assert "conv1_w" not in initializers


def test_data_movement_shares_the_input_scale():
    model = cnn()
    report, _, _ = quantize(model)
    assert report.tensors["p1"] == report.tensors["c1"]
    assert report.tensors["flat"] == report.tensors["gap"]


def test_clip_range_saturates_at_its_bounds():
    model = cnn()
    report, _, _ = quantize(model)
    scale, zero_point = report.tensors["c2"]["scale"], report.tensors["c2"]["zero_point"]
    assert zero_point == 0
    assert scale * 255 <= 6.0 + 1e-6


def transformer_block():
    weights = random_weights(query_w=(16, 16), key_w=(16, 16), value_w=(16, 16))
    weights["mask_bias"] = np.where(np.arange(8) < 6, 0.0, np.finfo(np.float32).min).astype(
        np.float32
    )
    nodes = [
        helper.make_node("MatMul", ["x", "query_w"], ["query"], name="query"),
        helper.make_node("MatMul", ["x", "key_w"], ["key"], name="key"),
        helper.make_node("MatMul", ["x", "value_w"], ["value"], name="value"),
        helper.make_node("Transpose", ["key"], ["key_t"], perm=[0, 2, 1], name="key_transpose"),
        helper.make_node("MatMul", ["query", "key_t"], ["scores"], name="scores"),
        helper.make_node("Add", ["scores", "mask_bias"], ["masked"], name="mask"),
        helper.make_node("Softmax", ["masked"], ["attention"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["attention", "value"], ["context"], name="context"),
        helper.make_node("HardSwish", ["context"], ["y"], name="activation"),
    ]
    return build(nodes, {"x": [1, 8, 16]}, {"y": [1, 8, 16]}, weights)


def test_transformer_matmuls_quantize_dynamically_and_fuse():
    model = transformer_block()
    report, reference, quantized = quantize(model)
    assert sorted(report.dynamic) == ["key", "query", "value"]
    kept = {entry["node"]: entry["reason"] for entry in report.kept_float}
    assert {"scores", "context", "softmax", "mask"} <= set(kept)
    assert "no integer kernel" in kept["activation"]
    fusion = fusion_report(model)
    assert fusion.rate == 1.0
    assert fusion.integer_kernels == 3
    assert cosine(reference, quantized) > 0.999


def test_static_matmuls_fuse_and_attention_masks_stay_float():
    model = transformer_block()
    report, reference, quantized = quantize(model, QuantizationOptions(dynamic_matmul=False))
    assert report.quantized_by_op()["MatMul"] == 5
    kept = {entry["node"]: entry["reason"] for entry in report.kept_float}
    assert "masked" not in report.tensors
    assert "softmax" in kept and "attention" in report.tensors
    assert "no integer kernel" in kept["activation"]
    assert fusion_report(model).rate == 1.0
    assert cosine(reference, quantized) > 0.99


def test_a_non_finite_range_keeps_the_tensor_float():
    model = cnn()
    report, _, _ = quantize(model, problems={"x": "its calibrated range is not finite"})
    kept = {entry["node"]: entry["reason"] for entry in report.kept_float}
    assert kept["conv1"] == "input: its calibrated range is not finite"
    assert "conv1" not in report.quantized


def test_exclusions_by_name_pattern_and_op_type():
    model = cnn()
    options = QuantizationOptions(exclude_nodes=["conv[2]"], exclude_op_types=["Gemm"])
    report, _, _ = quantize(model, options)
    kept = {entry["node"]: entry["reason"] for entry in report.kept_float}
    assert kept["conv2"] == "excluded by name"
    assert kept["fc"] == "excluded by op type"
    assert "conv1" in report.quantized


def test_tensor_overrides_set_a_range_or_keep_float():
    model = cnn()
    options = QuantizationOptions(
        tensor_overrides={"x": {"low": -8.0, "high": 8.0}, "sum": {"type": "float"}}
    )
    report, _, _ = quantize(model, options)
    assert report.tensors["x"]["scale"] == pytest.approx(16.0 / 255)
    kept = {entry["node"]: entry["reason"] for entry in report.kept_float}
    assert "tensor override" in kept["residual"]


def test_graph_output_of_a_conv_keeps_it_float():
    weights = random_weights(w=(4, 3, 1, 1))
    model = build(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        {"x": [1, 3, 4, 4]},
        {"y": [1, 4, 4, 4]},
        weights,
    )
    report, _, _ = quantize(model)
    assert report.quantized == {}
    assert "graph output" in report.kept_float[0]["reason"]


def test_huge_bias_widens_weight_scales_instead_of_overflowing():
    weights = random_weights(w=(4, 3, 1, 1))
    weights["b"] = np.array([1e9, 0, 0, 0], np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap"),
    ]
    model = build(nodes, {"x": [1, 3, 4, 4]}, {"y": [1, 4, 1, 1]}, weights)
    report, reference, quantized = quantize(model, QuantizationOptions(max_abs_range=1e12))
    assert report.widened_weight_scales == ["conv"]
    np.testing.assert_allclose(quantized, reference, rtol=0.02, atol=0.5)


def test_already_quantized_models_are_refused():
    model = cnn()
    quantize(model)
    with pytest.raises(AlreadyQuantizedError, match="QuantizeLinear"):
        quantize_model(model, {}, {}, QuantizationOptions())


def test_per_tensor_weights_when_per_channel_is_off():
    model = cnn()
    quantize(model, QuantizationOptions(per_channel=False))
    assert model.graph.initializers["conv1_w_scale"].const_value.shape == ()


def test_a_range_far_too_wide_keeps_the_tensor_float():
    model = cnn()
    samples = feeds(model)
    ranges = measured_ranges(model, samples) | {"x": (float(np.finfo(np.float32).min), 1.0)}
    report, _, _ = quantize(model, samples=samples, ranges=ranges)
    kept = {entry["node"]: entry["reason"] for entry in report.kept_float}
    assert "too wide for 8 bits" in kept["conv1"]


def test_matmul_with_a_float_bias_add_still_fuses():
    weights = random_weights(w=(16, 16), bias=(16,))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["product"], name="dense"),
        helper.make_node("Add", ["product", "bias"], ["y"], name="bias_add"),
    ]
    model = build(nodes, {"x": [1, 8, 16]}, {"y": [1, 8, 16]}, weights)
    report, reference, quantized = quantize(model, QuantizationOptions(dynamic_matmul=False))
    assert report.quantized == {"dense": "MatMul"}
    assert fusion_report(model).rate == 1.0
    assert cosine(reference, quantized) > 0.999


def embedding(rows: int = 1000, width: int = 128):
    table = random_weights(table=(rows, width))["table"]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="embedding")],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, width])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(model), table


def test_embedding_tables_become_int8_rows_with_a_scale_each():
    model, table = embedding()
    feed = {"ids": np.random.default_rng(0).integers(0, 1000, (1, 16))}
    report = quantize_model(model, {}, {}, QuantizationOptions())
    assert report.tables == ["embedding"] and report.quantized["embedding"] == "Gather"
    stored = {value.const_value.dtype for value in model.graph.initializers.values()}
    # The row scales are stored as float16 (see the test of compact vectors below).
    assert stored == {ir.DataType.INT8, ir.DataType.FLOAT16}
    assert sum(value.const_value.nbytes for value in model.graph.initializers.values()) < (
        table.nbytes / 3
    )
    [embedded] = runtime.create_session(model).run(None, feed)
    expected = table[feed["ids"]]
    # Each row's error is at most half a step of that row's own scale (rounded to float16).
    steps = np.abs(table).max(axis=1)[feed["ids"]][..., None] / 127
    assert np.all(np.abs(embedded - expected) <= steps / 2 * (1 + 2**-10) + 1e-6)
    assert [value.name for value in model.graph.outputs] == ["y"]


def test_small_tables_and_excluded_gathers_stay_float():
    model, _ = embedding(rows=100, width=16)
    report = quantize_model(model, {}, {}, QuantizationOptions())
    kept = {entry["node"]: entry["reason"] for entry in report.kept_float}
    assert "smaller than min_table_elements" in kept["embedding"] and not report.tables
    model, _ = embedding()
    report = quantize_model(model, {}, {}, QuantizationOptions(exclude_nodes=["embedding"]))
    assert not report.tables and ops(model) == {"Gather": 1}


def dense_layer_norm(gamma_scale: float = 1.0):
    """x -> MatMul -> Add bias -> LayerNormalization: a transformer's dense layer."""
    weights = random_weights(dense_w=(16, 32), dense_b=(32,), gamma=(32,), beta=(32,))
    weights["gamma"] = (1.0 + 0.1 * weights["gamma"]) * gamma_scale
    nodes = [
        helper.make_node("MatMul", ["x", "dense_w"], ["dense"], name="dense"),
        helper.make_node("Add", ["dense", "dense_b"], ["biased"], name="bias"),
        helper.make_node(
            "LayerNormalization", ["biased", "gamma", "beta"], ["y"], axis=-1, name="norm"
        ),
    ]
    return build(nodes, {"x": [1, 8, 16]}, {"y": [1, 8, 32]}, weights, opset=17)


def test_vectors_beside_int8_weights_are_stored_as_float16_and_still_fuse():
    """Scales, the bias of a quantized MatMul and LayerNormalization's vectors take half the
    bytes; onnxruntime folds their Casts, so the MatMul still fuses with its bias."""
    model = dense_layer_norm()
    report, reference, quantized = quantize(model)
    assert report.dynamic == ["dense"]
    stored = {
        name: value.const_value.dtype
        for name, value in model.graph.initializers.items()
        if value.const_value.dtype.is_floating_point()
    }
    assert set(stored.values()) == {ir.DataType.FLOAT16}
    assert len(stored) == 4  # the weight scales, the bias, gamma and beta
    assert fusion_report(model).rate == 1.0
    assert cosine(reference, quantized) > 0.999


def test_vectors_float16_would_round_to_subnormals_stay_float32():
    model = dense_layer_norm(gamma_scale=1e-6)
    quantize(model)
    gamma = [
        value.const_value
        for value in model.graph.initializers.values()
        if value.const_value.dtype == ir.DataType.FLOAT and value.const_value.shape == (32,)
    ]
    assert len(gamma) == 1


@pytest.mark.parametrize("op_type", ["Conv", "Gemm"])
def test_a_layer_kept_float_between_int8_ones_runs_float_in_onnxruntime(op_type):
    # onnxruntime quantizes, per tensor, the float weights of a Conv or Gemm between a
    # one-scale DequantizeLinear and a QuantizeLinear; with channels of very different sizes
    # that zeroes the small ones. The float layer must compute what it computes unoptimized.
    rng = np.random.default_rng(3)
    spread = np.logspace(-3, 0, 8, dtype=np.float32)
    if op_type == "Conv":
        second = rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * spread[:, None, None, None]
        weights = random_weights(w1=(8, 3, 3, 3), w3=(4, 8, 1, 1), b2=(8,)) | {"w2": second}
        layers = [
            helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="first"),
            helper.make_node("Conv", ["ra", "w2", "b2"], ["b"], name="second"),
            helper.make_node("Conv", ["rb", "w3"], ["c"], name="third"),
        ]
        shapes = {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]}
    else:
        second = rng.standard_normal((8, 8)).astype(np.float32) * spread[None, :]
        weights = random_weights(w1=(6, 8), w3=(8, 4), b2=(8,)) | {"w2": second}
        layers = [
            helper.make_node("MatMul", ["x", "w1"], ["a"], name="first"),
            helper.make_node("Gemm", ["ra", "w2", "b2"], ["b"], name="second"),
            helper.make_node("MatMul", ["rb", "w3"], ["c"], name="third"),
        ]
        shapes = {"x": [4, 6]}, {"y": [4, 4]}
    activations = [
        helper.make_node("Relu", [name], [f"r{name}" if name != "c" else "y"], name=f"relu_{name}")
        for name in ("a", "b", "c")
    ]
    nodes = [node for pair in zip(layers, activations, strict=True) for node in pair]
    model = build(nodes, *shapes, weights)
    options = QuantizationOptions(exclude_nodes=["second"], dynamic_matmul=False)
    report, _, _ = quantize(model, options)
    assert {"first", "third"} <= set(report.quantized) and "second" not in report.quantized
    samples = feeds(model)
    unoptimized = runtime.create_session(
        model, optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    expected = np.concatenate([unoptimized.run(None, sample)[0].reshape(-1) for sample in samples])
    np.testing.assert_allclose(run(model, samples), expected, rtol=1e-5, atol=1e-5)


def test_a_weight_layers_share_is_stored_once_in_int8():
    # A siamese network's branches read the same weights; an unrolled RNN's steps do too
    # (captcha-whisperer's CRNN came out 3.6x its float size with a copy per step).
    model = siamese_net()
    samples = siamese_samples(8)
    rounding = GptqRounding(collect_hessians(model, list(model.graph), samples))
    reference = run(model, samples)
    quantize_model(
        model, measured_ranges(model, samples), {}, QuantizationOptions(), rounding=rounding
    )
    weights = [
        name
        for name, value in model.graph.initializers.items()
        if value.const_value.dtype == ir.DataType.INT8 and value.const_value.size > 16
    ]
    assert sorted(weights) == ["fc1_quantized", "fc2_quantized"]
    assert all(len(model.graph.initializers[name].uses()) == 2 for name in weights)
    assert fusion_report(model).rate == 1.0
    assert cosine(reference, run(model, samples)) > 0.99
