"""Every op the quantizer knows, on a Conv -> op -> Conv chain: what onnxruntime then really runs.

The expected outcomes are written out here from what onnxruntime 1.2x's CPU provider fuses, not
read from the quantizer's rules table, so a wrong rule fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxopt.quantization.fusion import fusion_report, onnxruntime_optimized
from onnxopt.quantization.qdq import QuantizationOptions, quantize_model
from tests.quantization.helpers import build, cosine, feeds, measured_ranges, random_weights, run

# op type -> (the node between the two convs, reading "a" (and "b"), writing "mid"; extra constants;
# channels of "mid"; spatial size of "mid")
CASES = {
    "Add": (helper.make_node("Add", ["a", "b"], ["mid"]), {}, 4, 8),
    "Mul": (helper.make_node("Mul", ["a", "b"], ["mid"]), {}, 4, 8),
    "Concat": (helper.make_node("Concat", ["a", "b"], ["mid"], axis=1), {}, 8, 8),
    "AveragePool": (
        helper.make_node("AveragePool", ["a"], ["mid"], kernel_shape=[2, 2], strides=[2, 2]),
        {},
        4,
        4,
    ),
    "Sigmoid": (helper.make_node("Sigmoid", ["a"], ["mid"]), {}, 4, 8),
    "LeakyRelu": (helper.make_node("LeakyRelu", ["a"], ["mid"], alpha=0.1), {}, 4, 8),
    "MaxPool": (
        helper.make_node("MaxPool", ["a"], ["mid"], kernel_shape=[2, 2], strides=[2, 2]),
        {},
        4,
        4,
    ),
    "Resize": (
        helper.make_node("Resize", ["a", "", "scales"], ["mid"], mode="nearest"),
        {"scales": np.array([1, 1, 2, 2], np.float32)},
        4,
        16,
    ),
    "Reshape": (
        helper.make_node("Reshape", ["a", "shape"], ["mid"]),
        {"shape": np.array([1, 4, 8, 8])},
        4,
        8,
    ),
    "Transpose": (helper.make_node("Transpose", ["a"], ["mid"], perm=[0, 1, 3, 2]), {}, 4, 8),
    "Slice": (
        helper.make_node("Slice", ["a", "starts", "ends", "axes"], ["mid"]),
        {"starts": np.array([0]), "ends": np.array([2]), "axes": np.array([1])},
        2,
        8,
    ),
    "Split": (
        helper.make_node("Split", ["a", "split"], ["mid", "rest"], axis=1),
        {"split": np.array([2, 2])},
        2,
        8,
    ),
    "Gather": (
        helper.make_node("Gather", ["a", "indices"], ["mid"], axis=1),
        {"indices": np.array([0, 2, 3])},
        3,
        8,
    ),
    "Squeeze": (
        helper.make_node("Squeeze", ["a5", "axes"], ["mid"]),
        {"axes": np.array([2])},
        4,
        8,
    ),
    "Unsqueeze": (
        helper.make_node("Unsqueeze", ["a", "axes"], ["a5"]),
        {"axes": np.array([2])},
        4,
        8,
    ),
    "Expand": (
        helper.make_node("Expand", ["a", "shape"], ["mid"]),
        {"shape": np.array([1, 4, 8, 8])},
        4,
        8,
    ),
    "Tile": (
        helper.make_node("Tile", ["a", "repeats"], ["mid"]),
        {"repeats": np.array([1, 1, 1, 1])},
        4,
        8,
    ),
    "Softmax": (helper.make_node("Softmax", ["a"], ["mid"], axis=1), {}, 4, 8),
    "HardSigmoid": (helper.make_node("HardSigmoid", ["a"], ["mid"]), {}, 4, 8),
    "HardSwish": (helper.make_node("HardSwish", ["a"], ["mid"]), {}, 4, 8),
    "Pad": (
        helper.make_node("Pad", ["a", "pads"], ["mid"], mode="reflect"),
        {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1])},
        4,
        10,
    ),
}


def chain(op_type: str):
    node, constants, channels, _ = CASES[op_type]
    weights = random_weights(conv_a=(4, 3, 3, 3), conv_b=(4, 3, 3, 3), conv_c=(4, channels, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "conv_a"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
        helper.make_node("Conv", ["x", "conv_b"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
    ]
    if op_type == "Squeeze":
        nodes.append(helper.make_node("Unsqueeze", ["a", "axes"], ["a5"], name="unsqueeze"))
    if op_type == "Unsqueeze":
        nodes += [node, helper.make_node("Squeeze", ["a5", "axes"], ["mid"], name="squeeze")]
    else:
        nodes.append(node)
    node.name = op_type.lower()
    nodes += [
        helper.make_node("Conv", ["mid", "conv_c"], ["c"], name="conv_c"),
        helper.make_node("GlobalAveragePool", ["c"], ["y"], name="pool"),
    ]
    outputs = {"y": [1, 4, 1, 1]}
    if op_type not in ("Add", "Mul", "Concat"):
        outputs["b"] = [1, 4, 8, 8]
    return build(nodes, {"x": [1, 3, 8, 8]}, outputs, weights | constants)


# The integer kernel onnxruntime runs the op as, once quantized.
INTEGER_KERNEL = {
    "Add": "QLinearAdd",
    "Mul": "QLinearMul",
    "Concat": "QLinearConcat",
    "AveragePool": "QLinearAveragePool",
    "Sigmoid": "QLinearSigmoid",
    "LeakyRelu": "QLinearLeakyRelu",
    "Softmax": "QLinearSoftmax",
}
# Ops that only move data: onnxruntime drops the pair around them and runs them on uint8 (a Pad
# the quantizer rewrites to pad the integers itself).
ON_UINT8 = {
    "MaxPool",
    "Resize",
    "Reshape",
    "Transpose",
    "Slice",
    "Gather",
    "Squeeze",
    "Unsqueeze",
    "Tile",
    "Pad",
}
# Ops the quantizer quantizes although onnxruntime leaves nothing of them to check (Expand of a
# constant shape) or keeps them float inside (Split).
QUANTIZED_ONLY = {"Expand", "Split"}
# Ops onnxruntime has no integer kernel for, spelled out in ops it has (Mul, Add, Clip).
SPELLED_OUT = {"HardSigmoid", "HardSwish"}


def test_every_case_has_an_expected_outcome():
    assert set(CASES) == set(INTEGER_KERNEL) | ON_UINT8 | QUANTIZED_ONLY | SPELLED_OUT


@pytest.mark.parametrize("op_type", sorted(CASES))
def test_each_op_between_two_convs(op_type):
    model = chain(op_type)
    samples = feeds(model, count=6)
    reference = run(model, samples)
    report = quantize_model(model, measured_ranges(model, samples), {}, QuantizationOptions())
    kept = {entry["node"]: entry["reason"] for entry in report.kept_float}
    name = op_type.lower()
    optimized = onnxruntime_optimized(model)
    producers = {output: node.op_type for node in optimized.node for output in node.output}
    if op_type in SPELLED_OUT:
        fused = {node.op_type for node in optimized.node}
        assert op_type not in fused and "QLinearMul" in fused and name not in kept
    else:
        assert report.quantized[name] == op_type
    if op_type in INTEGER_KERNEL:
        assert INTEGER_KERNEL[op_type] in {node.op_type for node in optimized.node}
    if op_type in ON_UINT8:
        runs = [node for node in optimized.node if node.op_type == op_type]
        assert runs and all(producers.get(node.input[0]) != "DequantizeLinear" for node in runs), (
            f"onnxruntime runs {op_type} on dequantized float"
        )
    assert {"conv_a", "conv_c"} <= set(report.quantized)
    assert fusion_report(model).rate == 1.0
    assert cosine(reference, run(model, samples)) > 0.99
