from __future__ import annotations

import numpy as np
from onnx import helper

from onnxopt.passes.equalize import EqualizePass
from onnxopt.quantization.equalization import input_channel_ranges, output_channel_ranges
from onnxopt.quantization.qdq import QuantizationOptions, quantize_model
from tests.quantization.helpers import build, feeds, measured_ranges, random_weights, run


def spread(ranges: np.ndarray) -> float:
    return float(ranges.max() / ranges.min())


def separable_chain(between: str = "Relu"):
    """conv -> act -> depthwise -> grouped (2 groups) -> LeakyRelu -> pointwise, channels 1000x apart."""
    weights = random_weights(
        conv_w=(8, 3, 3, 3),
        conv_b=(8,),
        depthwise_w=(8, 1, 3, 3),
        depthwise_b=(8,),
        grouped_w=(8, 4, 1, 1),
        pointwise_w=(6, 8, 1, 1),
        pointwise_b=(6,),
    )
    channel_factors = np.logspace(-2, 1, 8).astype(np.float32)
    weights["conv_w"] *= channel_factors.reshape(-1, 1, 1, 1)
    weights["conv_b"] *= channel_factors
    weights["depthwise_w"] *= channel_factors[::-1].reshape(-1, 1, 1, 1)
    activation = (
        helper.make_node("Clip", ["c1", "zero", "six"], ["a1"], name="act")
        if between == "Clip"
        else helper.make_node("Relu", ["c1"], ["a1"], name="act")
    )
    weights |= {"zero": np.array(0, np.float32), "six": np.array(6, np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c1"], pads=[1] * 4, name="conv"),
        activation,
        helper.make_node(
            "Conv",
            ["a1", "depthwise_w", "depthwise_b"],
            ["c2"],
            pads=[1] * 4,
            group=8,
            name="depthwise",
        ),
        helper.make_node("Conv", ["c2", "grouped_w"], ["c3"], group=2, name="grouped"),
        helper.make_node("LeakyRelu", ["c3"], ["a3"], alpha=0.1, name="leaky"),
        helper.make_node("Conv", ["a3", "pointwise_w", "pointwise_b"], ["c4"], name="pointwise"),
        helper.make_node("Relu", ["c4"], ["y"], name="out"),
    ]
    return build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 6, 8, 8]}, weights)


def weight(model, name):
    return model.graph.initializers[name].const_value.numpy()


def test_equalization_keeps_outputs_and_evens_channel_ranges():
    model = separable_chain()
    samples = feeds(model, count=4)
    before = run(model, samples)
    first_spread = spread(output_channel_ranges(weight(model, "conv_w")))
    depthwise_spread = spread(output_channel_ranges(weight(model, "depthwise_w")))

    equalize = EqualizePass(iterations=3)(model)

    assert equalize.changes == 3
    after = run(model, samples)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    assert first_spread > 500 and depthwise_spread > 500
    assert spread(output_channel_ranges(weight(model, "conv_w"))) < first_spread / 20
    assert spread(output_channel_ranges(weight(model, "depthwise_w"))) < depthwise_spread / 20
    # The last pair of the chain is balanced exactly: both sides share each channel's range.
    np.testing.assert_allclose(
        output_channel_ranges(weight(model, "grouped_w")),
        input_channel_ranges(weight(model, "pointwise_w"), groups=1),
        rtol=1e-5,
    )


def test_equalization_makes_per_tensor_quantization_usable():
    def per_tensor_error(model):
        samples = feeds(model, count=4)
        reference = run(model, samples)
        quantize_model(
            model,
            measured_ranges(model, samples),
            {},
            QuantizationOptions(per_channel=False, reduce_range=False),
        )
        quantized = run(model, samples)
        return float(np.sqrt(np.mean((quantized - reference) ** 2)))

    plain = per_tensor_error(separable_chain())
    equalized_model = separable_chain()
    EqualizePass()(equalized_model)
    equalized = per_tensor_error(equalized_model)
    assert equalized < plain / 3


def test_relu6_is_not_positive_homogeneous_so_its_chain_is_left_alone():
    model = separable_chain(between="Clip")
    conv_w = weight(model, "conv_w").copy()
    equalize = EqualizePass()(model)
    np.testing.assert_array_equal(weight(model, "conv_w"), conv_w)
    assert equalize.details["refused"] == {
        "Clip with an upper bound (Relu6) is not positive-homogeneous": 1
    }
    assert equalize.changes == 2


def test_an_activation_used_elsewhere_stops_the_pair():
    weights = random_weights(first_w=(4, 3, 1, 1), second_w=(4, 4, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "first_w"], ["c1"], name="first"),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu"),
        helper.make_node("Conv", ["a1", "second_w"], ["c2"], name="second"),
        helper.make_node("Add", ["c2", "a1"], ["y"], name="residual"),
    ]
    model = build(nodes, {"x": [1, 3, 4, 4]}, {"y": [1, 4, 4, 4]}, weights)
    equalize = EqualizePass()(model)
    assert equalize.changes == 0
    assert equalize.details["refused"] == {"an activation between them is used elsewhere": 1}
