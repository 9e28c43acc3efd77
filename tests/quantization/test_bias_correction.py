from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxopt.context import Context
from onnxopt.data import open_data
from onnxopt.errors import ProcessingError
from onnxopt.passes.correct_bias import CorrectBiasPass
from onnxopt.passes.quantize import QuantizePass
from onnxopt.quantization import numerics
from onnxopt.quantization.fusion import fusion_report
from tests.quantization.helpers import build, calibrated, random_weights, run


def samples_with_mean(model_input: str, shape: tuple[int, ...], count: int = 8):
    """Inputs with a different nonzero mean per channel (axis 1), as after a Relu or a bias."""
    rng = np.random.default_rng(3)
    channel_means = np.linspace(0.5, 3.0, shape[1]).reshape(1, -1, *[1] * (len(shape) - 2))
    return [
        {model_input: (rng.standard_normal(shape) + channel_means).astype(np.float32)}
        for _ in range(count)
    ]


def badly_rounding_weights(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Weights 0.45 of an int8 step above a grid point: every one of them rounds down."""
    limit = (
        numerics.INT8_SYMMETRIC_RANGE if numerics.cpu_has_vnni() else numerics.INT8_REDUCED_RANGE
    )[1]
    rng = np.random.default_rng(seed)
    steps = np.linspace(0.002, 0.01, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    grid = rng.integers(-limit + 1, limit - 1, shape) + 0.45
    grid.reshape(shape[0], -1)[:, 0] = limit  # the channel's largest weight sets its scale
    return (grid * steps).astype(np.float32)


def quantized_with_context(model, samples, **quantize_options):
    context = Context(data=open_data(samples, model), calibration=calibrated(model, samples))
    quantize = QuantizePass(**quantize_options)
    quantize.bind(context)
    quantize(model)
    return context


def corrected(model, samples, create_bias=True):
    """The correct-bias pass's result on weights rounded to nearest, and the context it ran in."""
    context = quantized_with_context(model, samples, rounding="nearest")
    correct = CorrectBiasPass(create_bias=create_bias)
    correct.bind(context)
    return correct(model), context


def mean_error(model, reference, samples, channels):
    """The mean output error of each channel: what bias correction aims at."""
    error = (run(model, samples) - reference).reshape(len(samples), channels, -1)
    return np.abs(error.mean(axis=(0, 2))).max()


def conv_model():
    weights = {
        "conv_w": badly_rounding_weights((8, 4, 3, 3)),
        "conv_b": np.linspace(-0.5, 0.5, 8).astype(np.float32),
        "depthwise_w": badly_rounding_weights((8, 1, 3, 3), seed=1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c1"], pads=[1] * 4, name="conv"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node(
            "Conv", ["r1", "depthwise_w"], ["c2"], pads=[1] * 4, group=8, name="depthwise"
        ),
        helper.make_node("GlobalAveragePool", ["c2"], ["y"], name="pool"),
    ]
    return build(nodes, {"x": [1, 4, 8, 8]}, {"y": [1, 8, 1, 1]}, weights)


def test_bias_correction_cancels_the_mean_error_of_rounded_weights():
    samples = samples_with_mean("x", (1, 4, 8, 8))
    reference = run(conv_model(), samples)

    plain = conv_model()
    quantized_with_context(plain, samples, rounding="nearest")
    before = mean_error(plain, reference, samples, 8)

    model = conv_model()
    correct, _ = corrected(model, samples)
    after = mean_error(model, reference, samples, 8)

    assert correct.changes == 2
    assert correct.details == {"corrected": 2, "biases created": 1}
    assert after < before / 10
    initializers = model.graph.initializers
    assert initializers["conv_b_quantized"].const_value.dtype.name == "INT32"
    assert initializers["depthwise_bias_quantized"].const_value.dtype.name == "INT32"
    fusion = fusion_report(model)
    assert fusion.rate == 1.0 and fusion.op_counts["QLinearConv"] == 2


def test_without_create_bias_a_conv_without_bias_is_skipped():
    samples = samples_with_mean("x", (1, 4, 8, 8))
    model = conv_model()
    correct, context = corrected(model, samples, create_bias=False)
    assert correct.details == {"corrected": 1, "skipped": 1}
    skipped = context.quantization.bias_correction.report.skipped
    assert skipped == [
        {
            "node": "depthwise",
            "op_type": "Conv",
            "reason": "it has no bias (create_bias is off)",
        }
    ]


def test_correcting_twice_gives_the_same_biases():
    samples = samples_with_mean("x", (1, 4, 8, 8))
    model = conv_model()
    _, context = corrected(model, samples)
    biases = ("conv_b_quantized", "depthwise_bias_quantized")
    first = [model.graph.initializers[name].const_value.numpy() for name in biases]
    again = CorrectBiasPass()
    again.bind(context)
    again(model)
    for name, values in zip(biases, first, strict=True):
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), values)


def dense_model():
    weights = random_weights(first_w=(16, 12), first_b=(16,), second_w=(16, 6), third_w=(6, 5))
    weights["third_b"] = np.zeros(5, np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "first_w", "first_b"], ["h1"], transB=1, name="first"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("Gemm", ["r1", "second_w"], ["h2"], name="second"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "third_w"], ["h3"], name="third"),
        helper.make_node("Add", ["h3", "third_b"], ["y"], name="third_bias"),
    ]
    return build(nodes, {"x": [32, 12]}, {"y": [32, 5]}, weights)


def test_gemm_and_matmul_are_corrected_along_their_input_features():
    rng = np.random.default_rng(5)
    feature_means = np.linspace(-2.0, 3.0, 12, dtype=np.float32)
    samples = [
        {"x": (rng.standard_normal((32, 12)) + feature_means).astype(np.float32)} for _ in range(6)
    ]
    reference = run(dense_model(), samples)
    plain = dense_model()
    quantized_with_context(plain, samples)
    before = np.abs((run(plain, samples) - reference).reshape(-1, 5).mean(axis=0)).max()

    model = dense_model()
    correct, _ = corrected(model, samples)
    after = np.abs((run(model, samples) - reference).reshape(-1, 5).mean(axis=0)).max()

    assert correct.details == {"corrected": 3, "biases created": 1}
    assert after < before / 3
    # onnxruntime turns MatMul + float Add into a float Gemm before it fuses QDQ, corrected or not.
    assert fusion_report(model).op_counts == fusion_report(plain).op_counts


def test_bias_correction_needs_a_quantize_pass_before_it():
    model = conv_model()
    correct = CorrectBiasPass()
    correct.bind(Context())
    with pytest.raises(ProcessingError, match="put 'quantize' before 'correct-bias'"):
        correct(model)


def stem_model(kernel: int):
    """An RGB stem (``kernel``, stride 2) -> pooled: its int8 input and weight are laid out for
    onnxruntime (channels padded to 4 up to 5x5, 2x2 blocks at 7x7)."""
    weights = {
        "stem_w": badly_rounding_weights((8, 3, kernel, kernel)),
        "stem_b": np.linspace(-0.5, 0.5, 8).astype(np.float32),
    }
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "stem_w", "stem_b"],
            ["c"],
            pads=[kernel // 2] * 4,
            strides=[2, 2],
            name="stem",
        ),
        helper.make_node("GlobalAveragePool", ["c"], ["y"], name="pool"),
    ]
    return build(nodes, {"x": [1, 3, 16, 16]}, {"y": [1, 8, 1, 1]}, weights)


@pytest.mark.parametrize("kernel, layout", [(3, "Pad"), (7, "SpaceToDepth")])
def test_bias_correction_reads_a_stems_weight_through_its_layout(kernel, layout):
    samples = samples_with_mean("x", (1, 3, 16, 16))
    reference = run(stem_model(kernel), samples)
    plain = stem_model(kernel)
    quantized_with_context(plain, samples, rounding="nearest")
    assert layout in {node.op_type for node in plain.graph}
    before = mean_error(plain, reference, samples, 8)

    model = stem_model(kernel)
    correct, _ = corrected(model, samples)
    assert correct.details == {"corrected": 1}
    assert mean_error(model, reference, samples, 8) < before / 5
