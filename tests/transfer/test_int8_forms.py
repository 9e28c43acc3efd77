"""Transfer into onnxopt's own int8 forms: for transformers, MatMulInteger with run-time
activation scales, int8 embedding tables with a scale per row, float16 norms and biases; for
CNNs, stems laid out for onnxruntime (a 3x3 stem reading its channels padded to 4, a 7x7 stem
reading 2x2 blocks), whose weight is read and written as the layer's own, in its kernel's
shape."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.api import optimize
from onnxopt.transfer import TransferSettings, transfer_weights
from tests.helpers import count_ops, run_model
from tests.quantization.helpers import build, cosine

ROWS, WIDTH = 2048, 32  # a table of 65536 values: the quantizer's smallest int8 table


def encoder(seed: int) -> ir.Model:
    """ids -> embedding table -> LayerNorm -> MatMul + bias -> Relu -> MatMul."""
    rng = np.random.default_rng(seed)
    arrays = {
        "table": rng.standard_normal((ROWS, WIDTH)),
        "ln_scale": rng.uniform(0.5, 1.5, WIDTH),
        "ln_bias": rng.standard_normal(WIDTH) * 0.1,
        "w1": rng.standard_normal((WIDTH, WIDTH)) / 6,
        "b1": rng.standard_normal(WIDTH) * 0.1,
        "w2": rng.standard_normal((WIDTH, 16)) / 6,
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"]),
        helper.make_node(
            "LayerNormalization", ["embedded", "ln_scale", "ln_bias"], ["normed"], axis=-1
        ),
        helper.make_node("MatMul", ["normed", "w1"], ["hidden"]),
        helper.make_node("Add", ["hidden", "b1"], ["biased"]),
        helper.make_node("Relu", ["biased"], ["active"]),
        helper.make_node("MatMul", ["active", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16])],
        initializer=[
            numpy_helper.from_array(array.astype(np.float32), name)
            for name, array in arrays.items()
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def quantized(model: ir.Model, data_path) -> ir.Model:
    """``model`` through the int8 recipe on the samples at ``data_path``, whatever its fidelity."""
    return optimize(
        model,
        None,
        recipe="int8",
        data=data_path,
        overrides=["fallback.min_speedup=none", "validate.min_cosine=0"],
        timing=False,
    ).model


def test_new_weights_into_dynamic_int8_matmuls_and_an_int8_table(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", ids=rng.integers(0, ROWS, (32, 1, 16)))
    target = quantized(encoder(0), tmp_path / "calib.npz")
    ops = count_ops(target)
    assert ops["MatMulInteger"] == 2 and ops["Gather"] == 2 and "MatMul" not in ops
    source = encoder(1)
    report = transfer_weights(target, source, TransferSettings(weight_scales="widen"))
    assert [slot.target for slot in report.slots if slot.left] == []
    sources = {slot.source for slot in report.slots}
    assert sources == {"table", "ln_scale", "ln_bias", "w1", "b1", "w2"}
    by_name = {slot.source: slot.transform for slot in report.slots}
    assert "requantized to int8" in by_name["table"] and "requantized" in by_name["w1"]
    ids = {"ids": rng.integers(0, ROWS, (1, 16))}
    got, expected = run_model(target, ids)[0], run_model(source, ids)[0]
    assert cosine(got.ravel(), expected.ravel()) > 0.999
    assert count_ops(target)["MatMulInteger"] == 2


def cnn(seed: int, kernel: int) -> ir.Model:
    """RGB image -> stem conv (``kernel``, stride 2) -> Relu -> 1x1 conv -> Relu -> pooled."""
    rng = np.random.default_rng(seed)
    arrays = {
        "stem_weight": rng.standard_normal((16, 3, kernel, kernel)) / kernel,
        "stem_bias": rng.standard_normal(16) * 0.1,
        "mix_weight": rng.standard_normal((16, 16, 1, 1)) / 4,
    }
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "stem_weight", "stem_bias"],
            ["s"],
            pads=[kernel // 2] * 4,
            strides=[2, 2],
            name="stem",
        ),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Conv", ["r", "mix_weight"], ["m"], name="mix"),
        helper.make_node("Relu", ["m"], ["a"]),
        helper.make_node("GlobalAveragePool", ["a"], ["y"]),
    ]
    weights = {name: array.astype(np.float32) for name, array in arrays.items()}
    return build(nodes, {"x": [1, 3, 32, 32]}, {"y": [1, 16, 1, 1]}, weights)


@pytest.mark.parametrize("kernel, layout", [(3, "Pad"), (7, "SpaceToDepth")])
def test_new_weights_into_an_int8_stem_laid_out_for_onnxruntime(tmp_path, kernel, layout):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.uniform(0, 1, (32, 1, 3, 32, 32)).astype(np.float32))
    target = quantized(cnn(0, kernel), tmp_path / "calib.npz")
    assert layout in count_ops(target)
    source = cnn(1, kernel)
    report = transfer_weights(target, source, TransferSettings(weight_scales="widen"))
    assert [slot.target for slot in report.slots if slot.left] == []
    assert {"stem_weight", "stem_bias", "mix_weight"} <= {slot.source for slot in report.slots}
    image = {"x": rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)}
    got, expected = run_model(target, image)[0], run_model(source, image)[0]
    before = run_model(cnn(0, kernel), image)[0]
    assert cosine(got.ravel(), expected.ravel()) > 0.99
    assert not np.allclose(before, expected, atol=0.05), "the two weight sets differ"
