"""Channel groups: what must be cut together, across residual sums, concatenations,
depthwise convolutions and flattens, and what must stay whole, with the reason."""

from __future__ import annotations

import numpy as np
from onnx import helper

from onnxopt.pruning.channels import find_channel_groups
from onnxopt.pruning.groups import AttributeEdit, ChannelSlice
from tests.quantization.helpers import build, random_weights


def residual_net():
    """stem -> Relu -> inner, Add(stem, inner) -> depthwise -> Clip -> head -> Flatten -> fc."""
    weights = random_weights(
        stem=(8, 3, 3, 3), stem_b=(8,), inner=(8, 8, 1, 1), inner_b=(8,),
        dw=(8, 1, 3, 3), dw_b=(8,), head=(6, 8, 1, 1), fc=(5, 6 * 64), fc_b=(5,),
    )  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "stem", "stem_b"], ["s"], name="stem", pads=[1] * 4),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "inner", "inner_b"], ["i"], name="inner"),
        helper.make_node("Add", ["r", "i"], ["sum"], name="residual"),
        helper.make_node("Conv", ["sum", "dw", "dw_b"], ["d"], name="dw", group=8, pads=[1] * 4),
        helper.make_node("Clip", ["d", "low", "high"], ["c"], name="clip"),
        helper.make_node("Conv", ["c", "head"], ["h"], name="head"),
        helper.make_node("Flatten", ["h"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["y"], name="fc", transB=1),
    ]
    weights["low"], weights["high"] = np.float32(0), np.float32(6)
    return build(nodes, {"x": ["N", 3, 8, 8]}, {"y": ["N", 5]}, weights)


def concat_net():
    """Two convolutions concatenated along the channels, read by one pointwise conv."""
    weights = random_weights(a=(4, 3, 3, 3), b=(6, 3, 1, 1), b_b=(6,), mix=(5, 10, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "a"], ["ya"], name="a", pads=[1] * 4),
        helper.make_node("Conv", ["x", "b", "b_b"], ["yb"], name="b"),
        helper.make_node("Concat", ["ya", "yb"], ["cat"], name="cat", axis=1),
        helper.make_node("Relu", ["cat"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "mix"], ["y"], name="mix"),
    ]
    return build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 5, 8, 8]}, weights)


def by_name(groups):
    return {group.name: group for group in groups}


def test_a_residual_sum_joins_its_streams_and_the_depthwise_conv_goes_with_them():
    groups, unprunable = find_channel_groups(residual_net())
    stem = by_name(groups)["stem"]
    assert stem.channels == 8
    assert set(stem.producer_nodes) == {"stem", "inner", "dw"}
    assert {piece.tensor for piece in stem.producers} == {
        "stem", "stem_b", "inner", "inner_b", "dw", "dw_b"
    }  # fmt: skip
    assert {piece.tensor for piece in stem.consumers} == {"inner", "head"}
    assert set(stem.consumer_nodes) == {"inner", "head"}
    assert stem.attribute_edits == (AttributeEdit("dw", "group"),)
    assert stem.flops_per_channel > 0 and stem.parameters_per_channel > 0
    assert [(item.node, item.reason) for item in unprunable] == [("fc", "reaches the model output")]


def test_a_flatten_before_a_gemm_makes_each_channel_as_wide_as_the_image():
    head = by_name(find_channel_groups(residual_net())[0])["head"]
    assert head.consumers == (ChannelSlice("fc", 1, 0, 64),)
    assert head.producers == (ChannelSlice("head", 0),)


def test_concatenated_groups_are_offset_in_the_layer_that_reads_them():
    groups = by_name(find_channel_groups(concat_net())[0])
    assert groups["a"].consumers == (ChannelSlice("mix", 1, 0),)
    assert groups["b"].consumers == (ChannelSlice("mix", 1, 4),)
    assert set(groups["b"].producers) == {ChannelSlice("b", 0), ChannelSlice("b_b", 0)}


def single_conv_then(*nodes, outputs=None, constants=None):
    weights = {
        **random_weights(w=(4, 3, 1, 1), v=(2, 4, 1, 1), g=(2, 2, 1, 1)),
        **(constants or {}),
    }
    first = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    return build([first, *nodes], {"x": [1, 3, 4, 4]}, outputs or {"y": [1, 2, 4, 4]}, weights)


def reasons(model):
    return {item.node: item.reason for item in find_channel_groups(model)[1]}


def test_what_the_finder_does_not_understand_stays_whole_with_the_reason():
    softmax = single_conv_then(
        helper.make_node("Softmax", ["c"], ["s"], name="softmax", axis=1),
        helper.make_node("Conv", ["s", "v"], ["y"], name="next"),
    )
    assert "Softmax softmax normalizes over its channels" in reasons(softmax)["conv"]
    mixing = single_conv_then(
        helper.make_node("Reshape", ["c", "shape"], ["y"], name="reshape"),
        outputs={"y": [1, 2, 32]},
        constants={"shape": np.array([1, 2, 32], dtype=np.int64)},
    )
    assert "Reshape reshape mixes its channels" in reasons(mixing)["conv"]
    grouped = single_conv_then(helper.make_node("Conv", ["c", "g"], ["y"], name="grouped", group=2))
    found = reasons(grouped)
    assert "grouped convolution grouped" in found["conv"]
    assert found["grouped"] == "grouped convolution (not depthwise)"
    unknown = single_conv_then(
        helper.make_node("TopK", ["c", "k"], ["y", "indices"], name="topk", axis=1),
        outputs={"y": [1, 1, 4, 4]},
        constants={"k": np.array([1], dtype=np.int64)},
    )
    assert "read by TopK topk, not understood" in reasons(unknown)["conv"]


def test_a_weight_computed_at_run_time_is_no_producer():
    model = build(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="dynamic")],
        {"x": [1, 3, 4, 4], "w": [2, 3, 1, 1]},
        {"y": [1, 2, 4, 4]},
        {},
    )
    assert reasons(model) == {"dynamic": "weight is not a constant"}


def padded_shortcut_net(mode: str = "constant"):
    """stem (8) -> Relu -> wide (16, stride 2) -> Relu -> inner (16), and a shortcut that
    pools the stem's output and pads it with 8 zero channels (dlib's and CIFAR ResNets'
    downsampling): Add(inner, Pad(AveragePool(r))) -> Relu -> head."""
    weights = random_weights(
        stem=(8, 3, 3, 3), stem_b=(8,), wide=(16, 8, 3, 3), wide_b=(16,),
        inner=(16, 16, 3, 3), inner_b=(16,), head=(4, 16, 1, 1),
    )  # fmt: skip
    weights["pads"] = np.array([0, 0, 0, 0, 0, 8, 0, 0], dtype=np.int64)
    nodes = [
        helper.make_node("Conv", ["x", "stem", "stem_b"], ["s"], name="stem", pads=[1] * 4),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node(
            "Conv", ["r", "wide", "wide_b"], ["w"], name="wide", pads=[1] * 4, strides=[2, 2]
        ),
        helper.make_node("Relu", ["w"], ["rw"], name="relu_wide"),
        helper.make_node("Conv", ["rw", "inner", "inner_b"], ["i"], name="inner", pads=[1] * 4),
        helper.make_node(
            "AveragePool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Pad", ["p", "pads"], ["padded"], name="pad", mode=mode),
        helper.make_node("Add", ["i", "padded"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["rs"], name="relu_sum"),
        helper.make_node("Conv", ["rs", "head"], ["y"], name="head"),
    ]
    return build(nodes, {"x": ["N", 3, 8, 8]}, {"y": ["N", 4, 4, 4]}, weights)


def test_a_shortcut_padded_with_zero_channels_pairs_them_with_the_wide_stream():
    groups, _ = find_channel_groups(padded_shortcut_net())
    found = by_name(groups)
    # The stem's 8 channels run on through the shortcut, with the first 8 of inner's.
    stem = found["stem"]
    assert stem.channels == 8
    assert ChannelSlice("inner", 0) in stem.producers
    assert ChannelSlice("head", 1) in stem.consumers
    # The padded 8 pair with inner's last 8; cutting them lowers the pads.
    padding = found["pad padding after"]
    assert padding.channels == 8
    assert ChannelSlice("inner", 0, offset=8) in padding.producers
    assert ChannelSlice("head", 1, offset=8) in padding.consumers
    assert [(edit.tensor, edit.index) for edit in padding.shape_edits] == [("pads", 5)]
    assert "wide" in found


def test_a_shortcut_padded_with_edge_values_stays_whole():
    assert "Pad pad pads its channels" in reasons(padded_shortcut_net("edge"))["stem"]
