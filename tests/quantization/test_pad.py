"""Pad in int8: a shortcut padded with zero channels (dlib's face ResNet, CIFAR "option A"
ResNets) keeps the residual Add after it, and everything downstream, in integers."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxopt.quantization.fusion import onnxruntime_optimized
from onnxopt.quantization.qdq import QuantizationOptions, quantize_model
from onnxopt.quantization.targets import TARGETS
from tests.quantization.helpers import build, cosine, feeds, measured_ranges, random_weights, run


def padded_shortcut(fill: float | None = None, mode: str = "constant"):
    """conv (4 channels) -> Relu -> [conv to 8 channels] + [shortcut padded to 8 channels]
    -> Relu -> conv. ``fill``: the Pad's constant value input (None: none given)."""
    weights = random_weights(conv_a=(4, 3, 3, 3), conv_b=(8, 4, 3, 3), conv_c=(4, 8, 1, 1))
    pads = np.array([0, 0, 0, 0, 0, 4, 0, 0], np.int64)
    constants = {"pads": pads} | ({} if fill is None else {"fill": np.array(fill, np.float32)})
    pad = helper.make_node(
        "Pad",
        ["a", "pads", *([] if fill is None else ["fill"])],
        ["shortcut"],
        name="pad",
        mode=mode,
    )
    nodes = [
        helper.make_node("Conv", ["x", "conv_a"], ["a_raw"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Relu", ["a_raw"], ["a"], name="relu_a"),
        helper.make_node("Conv", ["a", "conv_b"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
        pad,
        helper.make_node("Add", ["b", "shortcut"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["s"], name="relu_s"),
        helper.make_node("Conv", ["s", "conv_c"], ["y"], name="conv_c"),
    ]
    return build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]}, weights | constants)


def shortcut_pad(model):
    """The shortcut's Pad (not those a 3-channel convolution reads its input through)."""
    return next(
        node for node in model.graph if node.op_type == "Pad" and node.name.startswith("pad")
    )


def quantized(model, target: str = "onnxruntime-cpu"):
    samples = feeds(model, count=6)
    reference = run(model, samples)
    report = quantize_model(
        model,
        measured_ranges(model, samples),
        {},
        QuantizationOptions.for_target(TARGETS[target]),
    )
    return report, cosine(reference, run(model, samples))


def test_a_zero_padded_shortcut_pads_the_integers_and_its_add_runs_in_int8():
    model = padded_shortcut()
    report, fidelity = quantized(model)
    assert report.quantized["pad"] == "Pad" and report.quantized["add"] == "Add"
    pad = shortcut_pad(model)
    assert pad.inputs[0].producer().op_type == "QuantizeLinear"
    assert pad.inputs[2].const_value.numpy().dtype == np.uint8
    optimized = onnxruntime_optimized(model)
    producers = {output: node.op_type for node in optimized.node for output in node.output}
    kernels = {node.op_type for node in optimized.node}
    assert "QLinearAdd" in kernels and "Add" not in kernels and "Relu" not in kernels
    assert all(
        producers.get(node.input[0]) != "DequantizeLinear"
        for node in optimized.node
        if node.op_type == "Pad"
    )
    assert fidelity > 0.99


def test_the_padded_channels_read_as_exact_zeros():
    """The fill is the zero point: the padded channels dequantize to 0.0, not to a rounding."""
    model = padded_shortcut()
    quantized(model)
    pad = shortcut_pad(model)
    dequantize = next(usage.node for usage in pad.outputs[0].uses())
    scale, zero_point = (value.const_value.numpy() for value in dequantize.inputs[1:])
    filled = pad.inputs[2].const_value.numpy()
    assert (filled.astype(np.float32) - zero_point.astype(np.float32)) * scale == 0.0


def test_a_pad_with_another_fill_stays_float_and_says_why():
    model = padded_shortcut(0.5)
    report, fidelity = quantized(model)
    kept = {entry["node"]: entry["reason"] for entry in report.kept_float}
    assert "fill value is not a constant zero" in kept["pad"]
    assert fidelity > 0.99


@pytest.mark.parametrize("target", ["generic", "openvino"])
def test_other_targets_keep_explicit_conversions_around_the_pad(target):
    model = padded_shortcut()
    report, _ = quantized(model, target)
    pad = shortcut_pad(model)
    assert report.quantized["pad"] == "Pad"
    assert pad.inputs[0].producer().op_type == "DequantizeLinear"


def test_an_edge_pad_with_an_unused_float_fill_pads_the_integers_and_loads():
    """A fill given to an edge-mode Pad is ignored, but must take the data's type."""
    model = padded_shortcut(0.5, mode="edge")
    report, fidelity = quantized(model)
    pad = shortcut_pad(model)
    assert report.quantized["pad"] == "Pad"
    assert pad.inputs[0].producer().op_type == "QuantizeLinear"
    assert pad.inputs[2].const_value.numpy().dtype == np.uint8
    assert fidelity > 0.99


def test_openvino_runs_the_openvino_targets_padded_shortcut():
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from onnxopt.openvino_runtime import OpenVinoSession

    model, reference = padded_shortcut(), padded_shortcut()
    quantized(model, "openvino")
    sample = feeds(reference, 1)
    result = OpenVinoSession(model).run(None, sample[0])[0]
    assert cosine(result.reshape(-1), run(reference, sample)) > 0.99
