"""A quantized convolution of an image's few channels reads them, and its weights, padded with
zero channels to 4, the form onnxruntime's integer kernels run faster; the outputs stay the
same, and the weight is stored unpadded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import helper

from onnxopt.quantization.fusion import onnxruntime_optimized
from onnxopt.quantization.qdq import QuantizationOptions, quantize_model
from onnxopt.quantization.targets import TARGETS
from tests.quantization.helpers import build, cosine, feeds, measured_ranges, random_weights, run


def stem(channels: int = 3, kernel: int = 3, group: int = 1):
    """conv (``channels`` in, 8 out, ``kernel``, stride 2) -> Relu -> 1x1 conv."""
    weights = random_weights(w1=(8, channels // group, kernel, kernel), b1=(8,), w2=(8, 8, 1, 1))
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w1", "b1"],
            ["c"],
            pads=[kernel // 2] * 4,
            strides=[2, 2],
            group=group,
            name="stem",
        ),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="head"),
    ]
    return build(nodes, {"x": [1, channels, 16, 16]}, {"y": [1, 8, 8, 8]}, weights)


def quantized(model, stem_channels: int | None = 4):
    target = dataclasses.replace(TARGETS["onnxruntime-cpu"], stem_channels=stem_channels)
    samples = feeds(model, count=6)
    options = dataclasses.replace(QuantizationOptions.for_target(target), reduce_range=False)
    quantize_model(model, measured_ranges(model, samples), {}, options)
    return run(model, samples)


def stem_node(model):
    return next(node for node in model.graph if node.name == "stem")


@pytest.mark.parametrize("channels", [1, 3])
def test_a_3x3_stem_reads_four_channels_and_gives_the_same_outputs(channels):
    padded, plain = stem(channels), stem(channels)
    padded_outputs, plain_outputs = quantized(padded), quantized(plain, stem_channels=None)
    np.testing.assert_array_equal(padded_outputs, plain_outputs)
    for index in (0, 1):
        pad = stem_node(padded).inputs[index].producer().inputs[0].producer()
        assert pad.op_type == "Pad"
        assert list(pad.inputs[1].const_value.numpy()) == [0, 0, 0, 0, 0, 4 - channels, 0, 0]
    stored = stem_node(padded).inputs[1].producer().inputs[0].producer().inputs[0]
    assert stored.is_initializer() and stored.const_value.shape == (8, channels, 3, 3)
    optimized = onnxruntime_optimized(padded)
    producers = {output: node.op_type for node in optimized.node for output in node.output}
    pads = [node for node in optimized.node if node.op_type == "Pad"]
    assert len(pads) == 1, "onnxruntime folds the weight's Pad when it loads the model"
    assert producers.get(pads[0].input[0]) == "QuantizeLinear"
    readers = [node.op_type for node in optimized.node if pads[0].output[0] in node.input]
    assert readers == ["QLinearConv"]
    assert cosine(padded_outputs, run(stem(channels), feeds(stem(channels), count=6))) > 0.99


@pytest.mark.parametrize(
    "channels, kernel, group",
    [(3, 7, 1), (4, 3, 1), (2, 3, 2)],
    ids=["7x7 kernel", "four channels already", "depthwise"],
)
def test_other_convolutions_read_their_channels_as_they_are(channels, kernel, group):
    model = stem(channels, kernel, group)
    quantized(model)
    assert not any(node.op_type == "Pad" for node in model.graph)


def test_targets_other_than_onnxruntime_keep_the_stem_as_it_is():
    for name in ("openvino", "generic"):
        assert TARGETS[name].stem_channels is None
    assert TARGETS["onnxruntime-cpu"].stem_channels == 4
