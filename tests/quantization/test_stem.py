"""A quantized convolution of an image's few channels reads them, and its weights, padded with
zero channels to 4 (kernels up to 5x5) or rearranged into 2x2 blocks (5x5 and 7x7, stride 2), the forms
onnxruntime's integer kernels run faster; the outputs stay the same, and the weight is stored as
the layer's own."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import helper

from onnxopt.quantization.fusion import onnxruntime_optimized
from onnxopt.quantization.qdq import QuantizationOptions, quantize_model
from onnxopt.quantization.targets import TARGETS
from onnxopt.transfer.storage import stored_constant
from tests.quantization.helpers import build, cosine, feeds, measured_ranges, random_weights, run


def stem(
    channels: int = 3,
    kernel: int = 3,
    group: int = 1,
    stride: int = 2,
    size: int | str = 16,
    pads: list[int] | None = None,
):
    """conv (``channels`` in, 8 out, ``kernel``, ``stride``) -> Relu -> 1x1 conv, on
    ``size``x``size`` images."""
    weights = random_weights(w1=(8, channels // group, kernel, kernel), b1=(8,), w2=(8, 8, 1, 1))
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w1", "b1"],
            ["c"],
            pads=pads if pads is not None else [kernel // 2] * 4,
            strides=[stride, stride],
            group=group,
            name="stem",
        ),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="head"),
    ]
    return build(nodes, {"x": [1, channels, size, size]}, {"y": [1, 8, None, None]}, weights)


def quantized(model, stem_channels: int | None = 4, space_to_depth: bool = True):
    target = dataclasses.replace(
        TARGETS["onnxruntime-cpu"],
        stem_channels=stem_channels,
        stem_space_to_depth=space_to_depth,
    )
    samples = feeds(model, count=6)
    options = dataclasses.replace(QuantizationOptions.for_target(target), reduce_range=False)
    quantize_model(model, measured_ranges(model, samples), {}, options)
    return run(model, samples)


def stem_node(model):
    return next(node for node in model.graph if node.name == "stem")


@pytest.mark.parametrize("kernel, stride", [(3, 2), (5, 1)], ids=["3x3", "5x5 stride 1"])
@pytest.mark.parametrize("channels", [1, 3])
def test_a_small_stem_reads_four_channels_and_gives_the_same_outputs(channels, kernel, stride):
    def model():
        return stem(channels, kernel, stride=stride)

    padded, plain = model(), model()
    padded_outputs, plain_outputs = quantized(padded), quantized(plain, stem_channels=None)
    np.testing.assert_array_equal(padded_outputs, plain_outputs)
    for index in (0, 1):
        pad = stem_node(padded).inputs[index].producer().inputs[0].producer()
        assert pad.op_type == "Pad"
        assert list(pad.inputs[1].const_value.numpy()) == [0, 0, 0, 0, 0, 4 - channels, 0, 0]
    stored = stem_node(padded).inputs[1].producer().inputs[0].producer().inputs[0]
    assert stored.is_initializer() and stored.const_value.shape == (8, channels, kernel, kernel)
    optimized = onnxruntime_optimized(padded)
    producers = {output: node.op_type for node in optimized.node for output in node.output}
    pads = [node for node in optimized.node if node.op_type == "Pad"]
    assert len(pads) == 1, "onnxruntime folds the weight's Pad when it loads the model"
    assert producers.get(pads[0].input[0]) == "QuantizeLinear"
    readers = [node.op_type for node in optimized.node if pads[0].output[0] in node.input]
    assert readers == ["QLinearConv"]
    assert cosine(padded_outputs, run(model(), feeds(model(), count=6))) > 0.99


@pytest.mark.parametrize("kernel", [5, 7])
@pytest.mark.parametrize(
    "channels, size, pads",
    [(3, 16, [3, 3, 3, 3]), (1, 15, [3, 3, 3, 3]), (3, 17, [2, 3, 1, 0])],
    ids=["RGB", "grey, odd size", "uneven pads"],
)
def test_a_stride_2_stem_reads_2x2_blocks_and_gives_the_same_outputs(channels, size, pads, kernel):
    def model():
        return stem(channels, kernel=kernel, size=size, pads=pads)

    blocked, plain = model(), model()
    blocked_outputs = quantized(blocked)
    np.testing.assert_array_equal(blocked_outputs, quantized(plain, space_to_depth=False))
    node = stem_node(blocked)
    blocks_per_side = (kernel + 1) // 2
    assert list(node.attributes.get_ints("kernel_shape")) == [blocks_per_side] * 2
    assert list(node.attributes.get_ints("strides")) == [1, 1]
    blocks = node.inputs[0].producer().inputs[0].producer()
    assert blocks.op_type == "SpaceToDepth" and blocks.inputs[0].producer().op_type == "Pad"
    assert node.inputs[1].producer().inputs[0].const_value is None, "the layout is computed"
    stored = stored_constant(node, 1)
    assert stored.value.is_initializer() and stored.read().shape == (8, channels, kernel, kernel)
    optimized = onnxruntime_optimized(blocked)
    op_types = [node.op_type for node in optimized.node]
    assert op_types.count("Pad") == 1 and "Reshape" not in op_types, (
        "onnxruntime folds the weight's layout when it loads the model"
    )
    consumers = {name: node.op_type for node in optimized.node for name in node.input}
    space_to_depth = next(node for node in optimized.node if node.op_type == "SpaceToDepth")
    assert consumers[space_to_depth.output[0]] in ("QLinearConv", "Transpose")
    assert op_types.count("QLinearConv") == 1
    reference = model()
    assert cosine(blocked_outputs, run(reference, feeds(reference, count=6))) > 0.99


@pytest.mark.parametrize(
    "channels, kernel, group, stride, size",
    [
        (3, 7, 1, 1, 16),
        (3, 7, 1, 2, "height"),
        (3, 9, 1, 2, 16),
        (4, 3, 1, 2, 16),
        (2, 3, 2, 2, 16),
    ],
    ids=["7x7 stride 1", "7x7 on images of any size", "9x9", "four channels already", "depthwise"],
)
def test_other_convolutions_read_their_channels_as_they_are(channels, kernel, group, stride, size):
    model = stem(channels, kernel, group, stride, size)
    quantized(model)
    op_types = {node.op_type for node in model.graph}
    assert "Pad" not in op_types and "SpaceToDepth" not in op_types


def test_targets_other_than_onnxruntime_keep_the_stem_as_it_is():
    for name in ("openvino", "generic"):
        assert TARGETS[name].stem_channels is None
        assert not TARGETS[name].stem_space_to_depth
    assert TARGETS["onnxruntime-cpu"].stem_channels == 4
    assert TARGETS["onnxruntime-cpu"].stem_space_to_depth
